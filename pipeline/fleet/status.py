"""What ``certman status`` reports, gathered from the store and Redis."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.acme.ratelimit import RateLimiter
from pipeline.db import SessionScope
from pipeline.fleet.dispatch import in_flight
from pipeline.fleet.sites import counts_by_state
from pipeline.fleet.upkeep import count_stuck
from pipeline.models import Certificate, Order
from pipeline.models.base import utcnow
from pipeline.settings import Settings


def issuer_counts(session: Session, settings: Settings) -> list[dict[str, Any]]:
    """Per configured issuer (most preferred first): current certificates, orders in flight,
    and orders that fell back to it. Rows with no recorded issuer count as the first one's."""
    from pipeline.fleet.dispatch import UNFINISHED

    issuers = settings.issuer_list
    first = issuers[0].name
    certs: dict[str, int] = {}
    for name, n in session.execute(
        select(Certificate.issuer, func.count())
        .where(Certificate.current)
        .group_by(Certificate.issuer)
    ):
        certs[name or first] = certs.get(name or first, 0) + int(n)
    flying: dict[str, int] = {}
    fallbacks: dict[str, int] = {}
    for name, fell_back, n in session.execute(
        select(Order.issuer, Order.fallback_reason.is_not(None), func.count())
        .where(Order.step.in_(UNFINISHED))
        .group_by(Order.issuer, Order.fallback_reason.is_not(None))
    ):
        flying[name or first] = flying.get(name or first, 0) + int(n)
        if fell_back:
            fallbacks[name or first] = fallbacks.get(name or first, 0) + int(n)
    return [
        {
            "name": issuer.name,
            "directory": issuer.directory,
            "eab": issuer.has_eab,
            "certificates": certs.get(issuer.name, 0),
            "orders_in_flight": flying.get(issuer.name, 0),
            "orders_in_flight_by_fallback": fallbacks.get(issuer.name, 0),
        }
        for issuer in issuers
    ]


def envelope_counts(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Certificate.scheme, Certificate.key_id, func.count())
        .where(Certificate.current)
        .group_by(Certificate.scheme, Certificate.key_id)
        .order_by(Certificate.scheme, Certificate.key_id)
    ).all()
    return [{"scheme": s, "key_id": k, "certificates": int(n)} for s, k, n in rows]


@dataclass
class SignerCounts:
    records: int = 0
    tombstones: int = 0


@dataclass
class SigningReport:
    """The signing key in use, and who signed what the edges read (``P:signed``)."""

    path: Path
    in_use: str | None  # key id; None when there is no key yet, or it cannot be read
    error: str | None = None
    signers: dict[str, SignerCounts] = field(default_factory=dict)
    unsigned: int = 0  # sites in the snapshot with no statement an edge could believe

    def rows(self) -> list[dict[str, Any]]:
        """``certman keys status --json``'s signing rows: one per key id (the one in use
        always, ``"in_use": true``), and one with ``"key_id": null`` for unsigned sites."""
        ids = sorted(self.signers.keys() | ({self.in_use} if self.in_use else set()))
        rows: list[dict[str, Any]] = [
            {"scheme": "ed25519", "key_id": key_id, "certificates": 0,
             "records": self.signers.get(key_id, SignerCounts()).records,
             "tombstones": self.signers.get(key_id, SignerCounts()).tombstones,
             "in_use": key_id == self.in_use}
            for key_id in ids
        ]  # fmt: skip
        rows.append(
            {"scheme": "ed25519", "key_id": None, "certificates": 0, "records": self.unsigned,
             "tombstones": 0, "in_use": False, "unsigned": True}
        )  # fmt: skip
        return rows


def signing_report(client: redis.Redis[Any], settings: Settings) -> SigningReport:
    """Count the statements in ``P:signed`` per signing key; never creates a key."""
    from pipeline.crypto.keys import KeyFileError
    from pipeline.crypto.signing import BadSignature, SignedSite
    from pipeline.crypto.signing_key_file import peek_signing_key

    path = settings.effective_signing_key
    try:
        key = peek_signing_key(path)
        report = SigningReport(path, key.key_id if key else None)
    except KeyFileError as exc:
        report = SigningReport(path, None, error=str(exc))
    signed_sites: set[str] = set()
    for raw_domain, raw in client.hscan_iter(f"{settings.redis_prefix}:signed", count=1000):
        try:
            statement = SignedSite.from_json(raw)
        except BadSignature:
            continue
        if not statement.signer or not statement.signature:
            continue
        counts = report.signers.setdefault(statement.signer, SignerCounts())
        if statement.removed:
            counts.tombstones += 1
        else:
            counts.records += 1
            signed_sites.add(raw_domain.decode())
    for raw_domain, _ in client.hscan_iter(f"{settings.redis_prefix}:index", count=1000):
        if raw_domain.decode() not in signed_sites:
            report.unsigned += 1
    return report


def collect(
    sessions: SessionScope, limiter_for: Callable[[str], RateLimiter], settings: Settings
) -> dict[str, Any]:
    """``certman status --json`` and the API's ``GET /v1/status``. ``limiter_for`` gives an
    issuer's limiter (the runtime's :meth:`limiter_for`)."""
    with sessions() as session:
        soonest = session.scalar(select(func.min(Certificate.not_after)).where(Certificate.current))
        stuck = count_stuck(session, now=utcnow(), stuck_after=settings.stuck_after)
        report: dict[str, Any] = {
            "sites": counts_by_state(session),
            "orders_in_flight": in_flight(session),
            "orders_stuck": stuck,
            "soonest_expiry": soonest.isoformat() if soonest else None,
            "envelopes": envelope_counts(session),
            "issuers": issuer_counts(session, settings),
        }
    report["rate_limits"] = _bucket_report(limiter_for, settings)
    _issuer_health(report["issuers"], limiter_for)
    return report


def _bucket_report(
    limiter_for: Callable[[str], RateLimiter], settings: Settings
) -> list[dict[str, Any]]:
    """Every issuer's buckets; each row says its issuer (the first one's are the rows that
    were always there)."""
    rows = []
    for issuer in settings.issuer_list:
        for bucket in limiter_for(issuer.name).status():
            rows.append(bucket.as_dict() | {"issuer": issuer.name})
    return rows


def _issuer_health(rows: list[dict[str, Any]], limiter_for: Callable[[str], RateLimiter]) -> None:
    """Add each issuer's fallback mark: skipped by new orders (why, for how long) or not."""
    for row in rows:
        down = limiter_for(row["name"]).issuer_down()
        row["skipped_for"] = round(down[1], 1) if down else None
        row["skipped_because"] = down[0] if down else None
