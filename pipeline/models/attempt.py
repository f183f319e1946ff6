"""The history: every step attempt that failed or mattered, with the CA's reason."""

from __future__ import annotations

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from pipeline.models.base import Base, created_at, intpk


class Attempt(Base):
    __tablename__ = "attempts"

    id: Mapped[intpk]
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id", ondelete="CASCADE"), index=True)
    order_id: Mapped[int | None] = mapped_column(ForeignKey("orders.id", ondelete="SET NULL"))
    step: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))  # ok, retry, failed, blocked
    error_type: Mapped[str | None] = mapped_column(String(128))
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[created_at]

    __table_args__ = (Index("ix_attempts_created_at_outcome", "created_at", "outcome"),)
