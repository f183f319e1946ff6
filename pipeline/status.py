"""What ``certman status`` reports, gathered from the store and Redis."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.models import Certificate, Order, OrderStep
from pipeline.models.base import utcnow
from pipeline.settings import get_settings
from pipeline.sites import counts_by_state

_UNFINISHED = [
    OrderStep.QUEUED,
    OrderStep.PLACED,
    OrderStep.CHALLENGED,
    OrderStep.READY,
    OrderStep.ISSUED,
]


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
        in_flight = session.scalar(
            select(func.count()).select_from(Order).where(Order.step.in_(_UNFINISHED))
        )
        cutoff = utcnow() - timedelta(seconds=get_settings().stuck_after)
        stuck = session.scalar(
            select(func.count())
            .select_from(Order)
            .where(Order.step.in_(_UNFINISHED), Order.touched_at < cutoff)
        )
        report: dict[str, Any] = {
            "sites": counts_by_state(session),
            "orders_in_flight": int(in_flight or 0),
            "orders_stuck": int(stuck or 0),
            "soonest_expiry": soonest.isoformat() if soonest else None,
            "envelopes": envelope_counts(session),
        }
    report["rate_limits"] = _bucket_report()
    return report


def _bucket_report() -> list[dict[str, Any]]:
    from pipeline.connections import get_limiter

    return [bucket.as_dict() for bucket in get_limiter().status()]
