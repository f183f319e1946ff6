"""Upkeep: what beat runs so that the fleet needs nobody — stuck orders, ARI, expiry, re-seals.

Plain functions over a session; the tasks in pipeline.tasks.maintenance only call them and send
messages after the commit. Every function is a handful of indexed queries whatever the size of
the fleet (the indexes: orders(step, touched_at), certificates(current, renew_at),
certificates(current, not_after), certificates(scheme, key_id)), and safe to run twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import InstrumentedAttribute, Session

from pipeline import renewal
from pipeline.alerts import Alert
from pipeline.dispatch import UNFINISHED, Started
from pipeline.envelope import Scheme
from pipeline.errors import AttemptFailed, RetryLater
from pipeline.models import Attempt, Certificate, Order, OrderKind, OrderStep, Site

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
) -> Sweep:
    """Claim stuck orders: each is re-enqueued at its step, or given up after ``max_tries``.

    The claim is a conditional UPDATE (still at that step, still untouched), so two sweepers
    never both take an order, and the bumped ``touched_at`` gives the re-sent chain a full
    ``stuck_after`` to move. The caller sends the chains and fails the exhausted orders only
    after the commit (:func:`fail_exhausted`).
    """
    cutoff = now - timedelta(seconds=stuck_after)
    sweep = Sweep()
    for item in find_stuck(session, now=now, stuck_after=stuck_after, limit=limit):
        exhausted = item.step_tries >= max_tries
        claimed = session.execute(
            update(Order)
            .where(Order.id == item.order_id, Order.step == item.step, Order.touched_at < cutoff)
            .values(
                touched_at=now,
                step_tries=Order.step_tries if exhausted else Order.step_tries + 1,
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


def fail_exhausted(sweep: Sweep, *, max_tries: int) -> None:
    """End the attempts the sweeper gave up on: the site backs off like any failed attempt."""
    from pipeline.issuance import fail_order

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


# --- ARI -----------------------------------------------------------------------------------------
Window = tuple[datetime, datetime]


@dataclass(frozen=True)
class AriCandidate:
    cert_id: int
    domain: str
    chain_pem: str
    not_before: datetime
    not_after: datetime
    renew_at: datetime
    key_id: str
    failing: bool


def ari_batch_size(total: int, *, interval: float, period: float, floor: int = 10) -> int:
    """Certificates per run so that each is checked about once per ``period`` (seconds)."""
    return max(floor, math.ceil(total * interval / period))


def count_current(session: Session) -> int:
    return int(
        session.scalar(select(func.count()).select_from(Certificate).where(Certificate.current))
        or 0
    )


def ari_due(
    session: Session, *, now: datetime, period: timedelta, limit: int
) -> list[AriCandidate]:
    """Current certificates whose ARI window is oldest (never checked first)."""
    rows = session.execute(
        select(
            Certificate.id,
            Site.domain,
            Certificate.chain_pem,
            Certificate.not_before,
            Certificate.not_after,
            Certificate.renew_at,
            Certificate.key_id,
            Site.consecutive_failures,
        )
        .join(Site, Site.id == Certificate.site_id)
        .where(
            Certificate.current,
            Certificate.ari_id.is_not(None),
            (Certificate.ari_checked_at.is_(None)) | (Certificate.ari_checked_at <= now - period),
        )
        .order_by(Certificate.ari_checked_at.nulls_first(), Certificate.id)
        .limit(limit)
    ).all()
    return [
        AriCandidate(
            cert_id=r.id,
            domain=r.domain,
            chain_pem=r.chain_pem,
            not_before=r.not_before,
            not_after=r.not_after,
            renew_at=r.renew_at,
            key_id=r.key_id,
            failing=r.consecutive_failures > 0,
        )
        for r in rows
    ]


def ari_decision(
    candidate: AriCandidate, window: Window | None, *, now: datetime, edge_key_id: str | None
) -> tuple[Window | None, datetime]:
    """The window worth keeping (None: unusable) and the renewal time it implies.

    - A window that closes before the certificate was even issued, or after it expires, is
      nonsense (Pebble's short certificates): the lifetime rule's time stands.
    - A renewal time already inside the window stays put, so refreshes do not shuffle it.
    - ARI never postpones a retry's backoff, nor a re-seal (a certificate sealed to a key other
      than the current edge key was brought forward on purpose by ``certman renew``).
    """
    if window is None:
        return None, candidate.renew_at
    start, end = window
    at = None
    if end > candidate.not_before:
        at = renewal.ari_renew_at(candidate.domain, window, now=now, not_after=candidate.not_after)
    if at is None:
        return None, candidate.renew_at
    if start <= candidate.renew_at <= end:
        return window, candidate.renew_at
    resealing = edge_key_id is not None and candidate.key_id != edge_key_id
    if candidate.failing:
        at = max(at, candidate.renew_at)
    elif resealing:
        at = min(at, candidate.renew_at)
    return window, at


@dataclass
class AriRefresh:
    checked: int = 0
    moved: int = 0
    errors: int = 0


def refresh_ari(
    session_scope: Callable[[], Any],
    window_for: Callable[[bytes], Window | None],
    *,
    now: datetime,
    period: timedelta,
    limit: int,
    edge_key_id: str | None = None,
) -> AriRefresh:
    """Ask the CA for the window of the ``limit`` stalest certificates and store what it says.

    The CA is asked outside any transaction; the results are written in one bulk UPDATE.
    """
    result = AriRefresh()
    with session_scope() as session:
        candidates = ari_due(session, now=now, period=period, limit=limit)
    updates: list[dict[str, Any]] = []
    for candidate in candidates:
        try:
            window = window_for(candidate.chain_pem.encode("ascii"))
        except RetryLater as exc:
            # The CA is unreachable or busy: the rest of the batch waits for the next run.
            log.warning("ARI refresh stopped at %s: %s", candidate.domain, exc.reason)
            break
        except AttemptFailed as exc:
            # This certificate only (unknown to the CA, say): checked, and left as it is.
            log.warning("ARI refresh for %s failed: %s", candidate.domain, exc.reason)
            result.errors += 1
            window = None
        kept, renew_at = ari_decision(candidate, window, now=now, edge_key_id=edge_key_id)
        result.checked += 1
        result.moved += renew_at != candidate.renew_at
        updates.append(
            {
                "id": candidate.cert_id,
                "ari_checked_at": now,
                "ari_window_start": kept[0] if kept else None,
                "ari_window_end": kept[1] if kept else None,
                "renew_at": renew_at,
            }
        )
    if updates:
        with session_scope() as session:
            session.execute(update(Certificate), updates)  # by primary key, one executemany
    return result


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


# --- re-seal migration ---------------------------------------------------------------------------
def schedule_reseal(
    session: Session,
    *,
    scheme: str | None = None,
    key_id: str | None = None,
    within: timedelta,
    now: datetime,
) -> int:
    """Bring forward the renewal of every current certificate sealed with ``scheme``/``key_id``.

    Renewal times are spread evenly over ``[now, now + within)`` (soonest expiry first), and
    never moved later: a renewal re-seals to the current edge key, so this is how a scheme or
    key is retired without a burst at the CA. Returns how many certificates were scheduled.
    """
    if scheme is None and key_id is None:
        raise ValueError("give a scheme or a key id")
    # scheme IN (every scheme) lets a key-id-only filter use the (scheme, key_id) index.
    schemes: Sequence[str] = [scheme] if scheme else [s.value for s in Scheme]
    query = (
        select(Certificate.id, Certificate.renew_at)
        .where(Certificate.current, Certificate.scheme.in_(schemes))
        .order_by(Certificate.not_after, Certificate.id)
    )
    if key_id:
        query = query.where(Certificate.key_id == key_id)
    rows = session.execute(query).all()
    n = len(rows)
    updates = [
        {"id": cert_id, "renew_at": min(renew_at, now + within * (i / n))}
        for i, (cert_id, renew_at) in enumerate(rows)
    ]
    if updates:
        session.execute(update(Certificate), updates)
    return n
