"""A site: one dealer website, its names, where to proxy it, and where its certificate stands."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pipeline.models.base import Base, created_at, intpk, utcnow

if TYPE_CHECKING:
    from pipeline.models.certificate import Certificate
    from pipeline.models.order import Order


class SiteState(StrEnum):
    PENDING = "pending"  # queued, no certificate yet
    ISSUING = "issuing"  # an order is in flight
    ACTIVE = "active"  # a certificate is served
    RENEWING = "renewing"  # a certificate is served and a renewal order is in flight
    RETRYING = "retrying"  # the last attempt failed; the next one is scheduled
    BLOCKED = "blocked"  # the CA refused a name for good; needs someone to act


class Site(Base):
    __tablename__ = "sites"

    id: Mapped[intpk]
    # The primary name: the certificate's first SAN and the key everything else uses.
    domain: Mapped[str] = mapped_column(String(253), unique=True)
    upstream: Mapped[str | None] = mapped_column(String(2048))
    customer_ref: Mapped[str | None] = mapped_column(String(255))
    state: Mapped[SiteState] = mapped_column(String(16), default=SiteState.PENDING)
    key_type: Mapped[str | None] = mapped_column(String(16))  # None: the installation default
    profile: Mapped[str | None] = mapped_column(String(64))
    # An issuer this site prefers (a CERTMAN_ISSUERS name) before the installation's order.
    preferred_issuer: Mapped[str | None] = mapped_column(String(64))
    last_error: Mapped[str | None] = mapped_column(Text)
    consecutive_failures: Mapped[int] = mapped_column(default=0)
    # When the scheduler should next start an order for this site (first issue or retry).
    next_attempt_at: Mapped[datetime | None]
    created_at: Mapped[created_at]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # Moved by an operator's change only (pipeline.fleet.sites.update_site), never by the
    # workers' state changes: the API's ETag includes it, and a PUT or DELETE applies only to
    # the version its caller saw (pipeline.fleet.sites.claim_version). Not SQLAlchemy's
    # version_id_col: that would move on every worker's UPDATE too, and fail it (StaleDataError)
    # whenever an API change got in first.
    version: Mapped[int] = mapped_column(default=1, server_default="1")

    names: Mapped[list[SiteName]] = relationship(
        back_populates="site", cascade="all, delete-orphan", order_by="SiteName.id"
    )
    orders: Mapped[list[Order]] = relationship(back_populates="site", cascade="all, delete-orphan")
    certificates: Mapped[list[Certificate]] = relationship(
        back_populates="site", cascade="all, delete-orphan"
    )

    __table_args__ = (
        Index("ix_sites_state_next_attempt_at", "state", "next_attempt_at"),
        Index("ix_sites_consecutive_failures", "consecutive_failures"),
    )

    @property
    def all_names(self) -> list[str]:
        return [n.name for n in self.names]


class SiteName(Base):
    """Every name a site's certificate covers, the primary included: the edge indexes each."""

    __tablename__ = "site_names"

    id: Mapped[intpk]
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)

    site: Mapped[Site] = relationship(back_populates="names")
