"""What ``certman status`` reports, gathered from the store and Redis."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.dispatch import in_flight
from pipeline.models import Certificate
from pipeline.models.base import utcnow
from pipeline.settings import get_settings
from pipeline.sites import counts_by_state
from pipeline.upkeep import count_stuck


def envelope_counts(session: Session) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Certificate.scheme, Certificate.key_id, func.count())
        .where(Certificate.current)
        .group_by(Certificate.scheme, Certificate.key_id)
        .order_by(Certificate.scheme, Certificate.key_id)
    ).all()
    return [{"scheme": s, "key_id": k, "certificates": int(n)} for s, k, n in rows]


def collect() -> dict[str, Any]:
    from pipeline.db import session_scope

    with session_scope() as session:
        soonest = session.scalar(select(func.min(Certificate.not_after)).where(Certificate.current))
        stuck = count_stuck(session, now=utcnow(), stuck_after=get_settings().stuck_after)
        report: dict[str, Any] = {
            "sites": counts_by_state(session),
            "orders_in_flight": in_flight(session),
            "orders_stuck": stuck,
            "soonest_expiry": soonest.isoformat() if soonest else None,
            "envelopes": envelope_counts(session),
        }
    report["rate_limits"] = _bucket_report()
    return report


def _bucket_report() -> list[dict[str, Any]]:
    from pipeline.connections import get_limiter

    return [bucket.as_dict() for bucket in get_limiter().status()]
