"""The installation's ACME account: one per directory, its key sealed to the pipeline's own key."""

from __future__ import annotations

from sqlalchemy import String, Text
from sqlalchemy.orm import Mapped, mapped_column

from pipeline.models.base import Base, created_at, intpk


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[intpk]
    directory_url: Mapped[str] = mapped_column(String(2048), unique=True)
    key_envelope: Mapped[str] = mapped_column(Text)
    registration_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[created_at]
