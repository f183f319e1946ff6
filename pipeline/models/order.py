"""An ACME order and the step the issuance chain has reached with it."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from pipeline.models.base import Base, created_at, intpk, utcnow

if TYPE_CHECKING:
    from pipeline.models.site import Site


class OrderStep(StrEnum):
    """The chain's steps, in order. A step's task moves the order to the next one."""

    QUEUED = "queued"  # next: place_order
    PLACED = "placed"  # next: publish_challenges
    CHALLENGED = "challenged"  # next: poll_validation
    READY = "ready"  # next: finalise
    ISSUED = "issued"  # next: encrypt_and_store
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (OrderStep.DONE, OrderStep.FAILED, OrderStep.CANCELLED)


class OrderKind(StrEnum):
    ISSUE = "issue"
    RENEW = "renew"


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[intpk]
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    kind: Mapped[OrderKind] = mapped_column(String(8), default=OrderKind.ISSUE)
    step: Mapped[OrderStep] = mapped_column(String(16), default=OrderStep.QUEUED)
    names: Mapped[list[str]] = mapped_column(JSON)
    order_url: Mapped[str | None] = mapped_column(String(2048))
    finalize_url: Mapped[str | None] = mapped_column(String(2048))
    certificate_url: Mapped[str | None] = mapped_column(String(2048))
    # authorization URL -> {"name", "token", "challenge_url", "status"}
    authorizations: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    replaces: Mapped[str | None] = mapped_column(String(255))  # ARI id of the replaced cert
    # A renewal inside the CA's ARI window: exempt from the CA's (and our) issuance limits.
    exempt: Mapped[bool] = mapped_column(default=False)
    profile: Mapped[str | None] = mapped_column(String(64))
    # The issuer (CERTMAN_ISSUERS name) the order is placed with: set when place_order first
    # runs, changed only by a fallback, which says why (None: the preferred issuer was used).
    # None on orders from before issuers were recorded: the first issuer.
    issuer: Mapped[str | None] = mapped_column(String(64))
    fallback_reason: Mapped[str | None] = mapped_column(Text)
    # The new certificate key, sealed to the edge before it ever leaves the finalise task.
    key_envelope: Mapped[str | None] = mapped_column(Text)
    # Kept so that a re-run of finalise can post the same request: the key itself is sealed to
    # the edge by then, and the pipeline can never open it again.
    csr_pem: Mapped[str | None] = mapped_column(Text)
    chain_pem: Mapped[str | None] = mapped_column(Text)
    # The rate limiter bucket the current step waits on, when it lets the step through, and
    # why (our limiter's pacing, or the CA's rateLimited): set when the limiter defers the
    # step, cleared when the step proceeds (certman domains show).
    waiting_bucket: Mapped[str | None] = mapped_column(String(300))
    waiting_until: Mapped[datetime | None]
    waiting_reason: Mapped[str | None] = mapped_column(Text)
    step_tries: Mapped[int] = mapped_column(default=0)  # re-enqueues by the sweeper at this step
    polls: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[created_at]
    step_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Bumped by every task run for this order, retries included: the sweeper's "still alive".
    touched_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    site: Mapped[Site] = relationship(back_populates="orders")

    # The sweeper's query: unfinished orders whose step has not moved for a while.
    __table_args__ = (Index("ix_orders_step_touched_at", "step", "touched_at"),)
