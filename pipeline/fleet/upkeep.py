"""Fleet upkeep: what beat runs so that the fleet needs nobody — stuck orders, expiry and
failure alerts, the ``certificate.expiring`` webhook event. (When a certificate is renewed, ARI
included, is :mod:`pipeline.fleet.renewal`'s.)

Plain functions over a session; the tasks in pipeline.tasks.maintenance only call them and send
messages after the commit. Every function is a handful of indexed queries whatever the size of
the fleet (the indexes: orders(step, touched_at), certificates(current, not_after)), and safe
to run twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, String, cast, exists, func, literal, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from pipeline.errors import AttemptFailed
from pipeline.fleet.alerts import Alert
from pipeline.fleet.dispatch import UNFINISHED, Started
from pipeline.models import Attempt, Certificate, Order, OrderKind, OrderStep, Site, WebhookEvent
from pipeline.webhooks import events

log = logging.getLogger(__name__)


# --- stuck orders --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StuckOrder:
    order_id: int
    domain: str
    kind: OrderKind
    step: OrderStep
    touched_at: datetime
    step_tries: int
    attempts: int = 0

    def age(self, now: datetime) -> float:
        return (now - self.touched_at).total_seconds()

    def as_dict(self, now: datetime) -> dict[str, Any]:
        """One object of ``certman orders stuck --json``."""
        return {
            "domain": self.domain,
            "order_id": self.order_id,
            "kind": str(self.kind),
            "step": str(self.step),
            "age_seconds": round(self.age(now), 1),
            "touched_at": self.touched_at.isoformat(),
            "step_tries": self.step_tries,
            "attempts": self.attempts,
        }


def find_stuck(
    session: Session,
    *,
    now: datetime,
    stuck_after: float,
    limit: int | None = None,
    with_attempts: bool = False,
) -> list[StuckOrder]:
    """Unfinished orders no task has touched for ``stuck_after`` seconds, oldest first.

    ``touched_at`` is bumped by every task run, retries included, and the longest countdown a
    task gives itself (15 minutes) is well under the default ``stuck_after`` (30 minutes): an
    order waiting on the CA or the rate limiter is never taken for a stuck one.
    """
    cutoff = now - timedelta(seconds=stuck_after)
    rows = session.execute(
        select(
            Order.id,
            Site.domain,
            Order.kind,
            Order.step,
            Order.touched_at,
            Order.step_tries,
            Order.site_id,
        )
        .join(Site, Site.id == Order.site_id)
        .where(Order.step.in_(UNFINISHED), Order.touched_at < cutoff)
        .order_by(Order.touched_at)
        .limit(limit)
    ).all()
    attempts: dict[int, int] = {}
    if with_attempts and rows:
        # Through the indexed site_id: attempts has no index on order_id.
        attempts = {
            order_id: int(n)
            for order_id, n in session.execute(
                select(Attempt.order_id, func.count())
                .where(
                    Attempt.site_id.in_({r.site_id for r in rows}),
                    Attempt.order_id.in_([r.id for r in rows]),
                )
                .group_by(Attempt.order_id)
            ).all()
            if order_id is not None
        }
    return [
        StuckOrder(
            order_id=r.id,
            domain=r.domain,
            kind=OrderKind(r.kind),
            step=OrderStep(r.step),
            touched_at=r.touched_at,
            step_tries=r.step_tries,
            attempts=attempts.get(r.id, 0),
        )
        for r in rows
    ]


@dataclass
class Sweep:
    """What a sweep decided: chains to send again, and orders to give up on."""

    requeue: list[Started] = field(default_factory=list)
    exhausted: list[StuckOrder] = field(default_factory=list)


def count_stuck(session: Session, *, now: datetime, stuck_after: float) -> int:
    """How many orders :func:`find_stuck` would return: for status and metrics."""
    cutoff = now - timedelta(seconds=stuck_after)
    return int(
        session.scalar(
            select(func.count())
            .select_from(Order)
            .where(Order.step.in_(UNFINISHED), Order.touched_at < cutoff)
        )
        or 0
    )


def sweep_stuck(
    session: Session,
    *,
    now: datetime,
    stuck_after: float,
    max_tries: int,
    limit: int = 500,
    count_tries: bool = True,
) -> Sweep:
    """Claim stuck orders: each is re-enqueued at its step, or given up after ``max_tries``.

    ``count_tries`` False: the orders are not at fault (their messages were lost with Redis's
    data), so the re-send neither counts as a try nor gives any order up.

    The claim is a conditional UPDATE (still at that step, still untouched), so two sweepers
    never both take an order, and the bumped ``touched_at`` gives the re-sent chain a full
    ``stuck_after`` to move. The caller sends the chains and fails the exhausted orders only
    after the commit (:func:`fail_exhausted`).
    """
    cutoff = now - timedelta(seconds=stuck_after)
    sweep = Sweep()
    for item in find_stuck(session, now=now, stuck_after=stuck_after, limit=limit):
        exhausted = count_tries and item.step_tries >= max_tries
        claimed = session.execute(
            update(Order)
            .where(Order.id == item.order_id, Order.step == item.step, Order.touched_at < cutoff)
            .values(
                touched_at=now,
                step_tries=Order.step_tries + 1
                if count_tries and not exhausted
                else Order.step_tries,
            )
            .execution_options(synchronize_session=False)
        )
        if not claimed.rowcount:  # type: ignore[attr-defined]
            continue  # it moved meanwhile, or another sweeper has it
        if exhausted:
            sweep.exhausted.append(item)
        else:
            sweep.requeue.append(Started(item.order_id, item.domain, item.kind, item.step))
    return sweep


def fail_exhausted(
    sweep: Sweep, *, max_tries: int, fail_order: Callable[[int, str, AttemptFailed], None]
) -> None:
    """End the attempts the sweeper gave up on: the site backs off like any failed attempt
    (``fail_order``: :meth:`pipeline.issuance.OrderSteps.fail_order`)."""
    for item in sweep.exhausted:
        # The order's step, not the task's name: attempts.step is VARCHAR(16), and
        # "publish_challenges" does not fit on PostgreSQL.
        fail_order(
            item.order_id,
            str(item.step),
            AttemptFailed(
                f"order stuck at step {item.step} after {max_tries} re-enqueues",
                error_type="stuck",
            ),
        )


# --- expiry and failing sites --------------------------------------------------------------------
def _epoch(session: Session, column: InstrumentedAttribute[datetime]) -> ColumnElement[Any]:
    # Portable date arithmetic does not exist: seconds since the epoch, per dialect.
    if session.get_bind().dialect.name == "sqlite":
        return func.julianday(column) * 86400.0
    return func.extract("epoch", column)


def _epoch_of(session: Session, when: datetime) -> float:
    if session.get_bind().dialect.name == "sqlite":
        return when.timestamp() + 2440587.5 * 86400.0  # julianday counts from 4714 BC
    return when.timestamp()


def _expiring(session: Session, *, now: datetime, fraction: float) -> ColumnElement[bool]:
    not_after = _epoch(session, Certificate.not_after)
    not_before = _epoch(session, Certificate.not_before)
    return not_after - _epoch_of(session, now) < (not_after - not_before) * fraction


def count_expiring(session: Session, *, now: datetime, fraction: float) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Certificate)
            .where(Certificate.current, _expiring(session, now=now, fraction=fraction))
        )
        or 0
    )


def expiring_alerts(
    session: Session, *, now: datetime, fraction: float, limit: int = 1000
) -> list[Alert]:
    """Current certificates with less than ``fraction`` of their own lifetime left.

    The lifetime is each certificate's own (a 6-day certificate alerts a day before expiry, a
    90-day one 15 days before), so the test is arithmetic on two columns, per dialect.
    """
    rows = session.execute(
        select(
            Certificate.id,
            Certificate.serial,
            Certificate.not_after,
            Site.domain,
            Site.state,
            Site.last_error,
        )
        .join(Site, Site.id == Certificate.site_id)
        .where(Certificate.current, _expiring(session, now=now, fraction=fraction))
        .order_by(Certificate.not_after)
        .limit(limit)
    ).all()
    alerts = []
    for r in rows:
        left = r.not_after - now
        state = "expired" if left.total_seconds() <= 0 else f"expires in {_human(left)}"
        alerts.append(
            Alert(
                condition="expiring",
                subject=f"certificate:{r.id}",
                domain=r.domain,
                not_after=r.not_after,
                last_error=r.last_error,
                detail=f"certificate {r.serial} {state}, not renewed (site {r.state})",
            )
        )
    return alerts


EXPIRING_KEY = f"{events.CERTIFICATE_EXPIRING}:"


def record_expiring(session: Session, *, now: datetime, fraction: float, limit: int = 1000) -> int:
    """Write a ``certificate.expiring`` event for each current certificate with less than
    ``fraction`` of its lifetime left (the expiry alert's test) that has had none: once per
    certificate, however often beat looks. How many were written.

    A certificate renewal replaced is no longer current, so it is never reported. The
    certificates already reported are left out in the query (their event's ``dedup_key``), so
    that a batch is always new ones however many wait.
    """
    if not events.subscribers(session, events.CERTIFICATE_EXPIRING):
        return 0  # nobody listens: not even the query
    key = literal(EXPIRING_KEY, String) + cast(Certificate.id, String)
    rows = session.execute(
        select(
            Certificate.id,
            Certificate.serial,
            Certificate.not_after,
            Certificate.renew_at,
            Site.domain,
            Site.state,
        )
        .join(Site, Site.id == Certificate.site_id)
        .where(Certificate.current, _expiring(session, now=now, fraction=fraction))
        .where(~exists().where(WebhookEvent.dedup_key == key))
        .order_by(Certificate.not_after)
        .limit(limit)
    ).all()
    # By domain: record() takes a lock per site on PostgreSQL (order per site), held to the
    # commit; taken in one order, two such transactions cannot deadlock.
    for r in sorted(rows, key=lambda row: row.domain):
        events.record(
            session,
            event_type=events.CERTIFICATE_EXPIRING,
            domain=r.domain,
            data={
                "serial": r.serial,
                "not_after": r.not_after.isoformat(),
                "expired": r.not_after <= now,
                "state": str(r.state),
                "renew_at": r.renew_at.isoformat(),
            },
            dedup_key=f"{EXPIRING_KEY}{r.id}",
            now=now,
        )
    return len(rows)


def failing_alerts(session: Session, *, threshold: int, limit: int = 1000) -> list[Alert]:
    """Sites whose last ``threshold`` attempts in a row failed."""
    rows = session.execute(
        select(
            Site.id,
            Site.domain,
            Site.state,
            Site.last_error,
            Site.consecutive_failures,
            Certificate.not_after,
        )
        .outerjoin(Certificate, (Certificate.site_id == Site.id) & Certificate.current)
        .where(Site.consecutive_failures >= threshold)
        .order_by(Site.id)
        .limit(limit)
    ).all()
    return [
        Alert(
            condition="failing",
            subject=f"site:{r.id}",
            domain=r.domain,
            not_after=r.not_after,
            last_error=r.last_error,
            detail=f"{r.consecutive_failures} failed attempts in a row (site {r.state})",
        )
        for r in rows
    ]


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds} s"
