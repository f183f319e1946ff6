"""An issued certificate: the public chain in clear, the private key only as a sealed envelope."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pipeline.models.base import Base, created_at, intpk

if TYPE_CHECKING:
    from pipeline.models.site import Site


class Certificate(Base):
    __tablename__ = "certificates"

    id: Mapped[intpk]
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    order_id: Mapped[int | None] = mapped_column(
        ForeignKey("orders.id", ondelete="SET NULL"), unique=True
    )
    chain_pem: Mapped[str] = mapped_column(Text)
    key_envelope: Mapped[str] = mapped_column(Text)
    scheme: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(64))
    serial: Mapped[str] = mapped_column(String(64))
    ari_id: Mapped[str | None] = mapped_column(String(255))
    # The issuer that issued it: ARI and ``replaces`` go to that issuer only. None: issued
    # before issuers were recorded, by the first issuer.
    issuer: Mapped[str | None] = mapped_column(String(64))
    not_before: Mapped[datetime]
    not_after: Mapped[datetime]
    # Fixed at issuance (lifetime rule + per-domain spread); moved by ARI refreshes.
    renew_at: Mapped[datetime]
    ari_checked_at: Mapped[datetime | None]
    ari_window_start: Mapped[datetime | None]
    ari_window_end: Mapped[datetime | None]
    # What the last ARI refresh made of the CA's answer (pipeline.fleet.renewal.AriStatus; None: not
    # asked yet), and the window as the CA offered it where it was not used, or the error.
    ari_status: Mapped[str | None] = mapped_column(String(32))
    ari_detail: Mapped[str | None] = mapped_column(Text)
    current: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[created_at]

    site: Mapped[Site] = relationship(back_populates="certificates")

    __table_args__ = (
        # A site's current certificate, by its site (what every listing joins on).
        Index("ix_certificates_site_id_current", "site_id", "current"),
        Index("ix_certificates_current_renew_at", "current", "renew_at"),
        Index("ix_certificates_current_not_after", "current", "not_after"),
        Index("ix_certificates_scheme_key_id", "scheme", "key_id"),
        Index("ix_certificates_current_ari_checked_at", "current", "ari_checked_at"),
    )
