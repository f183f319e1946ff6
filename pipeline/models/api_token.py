"""A bearer token of the HTTP API (``certman api tokens create``): stored only as a hash."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from pipeline.models.base import Base, created_at, intpk


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[intpk]
    # The name the platform knows it by: what a site's history says did a change.
    name: Mapped[str] = mapped_column(String(64), unique=True)
    # SHA-256 of the token, hex (pipeline.api.tokens says why not a password hash).
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # Space-separated scopes: sites:read, sites:write, sites:operate.
    scopes: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[created_at]
    # Recorded at most once a minute per token and process: no write per request.
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
