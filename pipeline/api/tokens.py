"""Bearer tokens of the API: made once and shown once, stored only as a hash, scoped.

A token is 256 random bits (``cmt_`` and 43 URL-safe characters). Only its SHA-256 is stored.
A password hash (bcrypt, argon2) is made slow on purpose to resist guessing a *low-entropy*
secret from a stolen hash; a 256-bit random token cannot be guessed whatever the hash's speed,
so a slow hash would only cost every request tens of milliseconds of CPU. SHA-256 also makes the
hash a lookup key (a unique index), and the stored hash is then compared again in constant
time (``hmac.compare_digest``).

The last use is recorded at most once a minute per token and process (no write per request).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pipeline.db import SessionScope
from pipeline.models import ApiToken
from pipeline.models.base import utcnow

SCOPES = ("sites:read", "sites:write", "sites:operate")
PREFIX = "cmt_"
# How often a token's last use is written, per process.
LAST_USE_EVERY = 60.0
MAX_NAME = 64


class TokenError(ValueError):
    """A token cannot be made or revoked as asked; the message says why."""


@dataclass(frozen=True)
class Caller:
    """Who a request comes from: the token's id, name and scopes (never the token)."""

    token_id: int
    name: str
    scopes: frozenset[str]

    @property
    def actor(self) -> str:
        """What a site's history records for this caller's changes."""
        return f"api:{self.name}"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def check_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise TokenError(f"scopes: {', '.join(unknown) or 'none given'}; "
                         f"use one or more of {', '.join(SCOPES)}")  # fmt: skip
    return tuple(s for s in SCOPES if s in scopes)


def create_token(session: Session, name: str, scopes: list[str] | tuple[str, ...]) -> str:
    """Store a new token's hash under ``name``; returns the token, which is never stored."""
    name = name.strip()
    if not name or len(name) > MAX_NAME or not name.isprintable() or " " in name:
        raise TokenError(f"token name {name!r}: 1 to {MAX_NAME} printable characters, no spaces")
    ordered = check_scopes(scopes)
    if session.scalar(select(ApiToken.id).where(ApiToken.name == name)) is not None:
        raise TokenError(f"a token named {name} exists (names stay taken after a revocation)")
    token = PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, token_hash=hash_token(token), scopes=" ".join(ordered)))
    session.flush()
    return token


def list_tokens(session: Session) -> list[dict[str, Any]]:
    """Every token's name, scopes, creation, last use and revocation (never a hash)."""
    return [
        {
            "name": row.name,
            "scopes": row.scopes.split(),
            "created_at": _iso(row.created_at),
            "last_used_at": _iso(row.last_used_at),
            "revoked_at": _iso(row.revoked_at),
        }
        for row in session.scalars(select(ApiToken).order_by(ApiToken.name))
    ]


def revoke_token(session: Session, name: str, *, now: datetime | None = None) -> bool:
    """Revoke the token ``name``: refused from its next request on. False if it already was."""
    row = session.scalar(select(ApiToken).where(ApiToken.name == name))
    if row is None:
        raise TokenError(f"no token named {name}")
    if row.revoked_at is not None:
        return False
    row.revoked_at = now or utcnow()
    return True


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class Authenticator:
    """Finds the caller of a bearer token, and records its use once a minute."""

    def __init__(self, sessions: SessionScope, *, last_use_every: float = LAST_USE_EVERY) -> None:
        self._sessions = sessions
        self._every = last_use_every
        self._written: dict[int, float] = {}
        self._lock = threading.Lock()

    def caller(self, token: str) -> Caller | None:
        """The token's caller, or None for an unknown or revoked token."""
        if not token.startswith(PREFIX) or len(token) > 100:
            return None
        digest = hash_token(token)
        with self._sessions() as session:
            row = session.execute(
                select(ApiToken.id, ApiToken.name, ApiToken.scopes, ApiToken.token_hash).where(
                    ApiToken.token_hash == digest, ApiToken.revoked_at.is_(None)
                )
            ).first()
            if row is None or not hmac.compare_digest(row.token_hash, digest):
                return None
            if self._due(row.id):
                session.execute(
                    update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=utcnow())
                )
        return Caller(row.id, row.name, frozenset(row.scopes.split()))

    def _due(self, token_id: int) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._written.get(token_id)
            if last is not None and now - last < self._every:
                return False
            self._written[token_id] = now
            return True
