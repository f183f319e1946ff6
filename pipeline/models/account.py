"""The installation's ACME accounts: one per directory (so one per issuer), the key sealed to the
pipeline's own key, and so is the External Account Binding HMAC key it was registered with."""

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
    issuer: Mapped[str | None] = mapped_column(String(64))  # the issuer's name when registered
    eab_kid: Mapped[str | None] = mapped_column(String(255))
    eab_hmac_envelope: Mapped[str | None] = mapped_column(Text)  # sealed like key_envelope
    created_at: Mapped[created_at]
