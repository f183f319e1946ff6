"""Sending the outbox: due deliveries claimed, sent in order per (subscription, site), retried
with backoff and jitter, given up after a bound; at least once, with a stable ``webhook-id``.

A delivery is sent only when it is the *head* of its (subscription, domain): no earlier one is
still pending. A later event for a site is therefore never sent before an earlier one was
delivered or given up.

The claim is a lease: :func:`claim_due` (beat's dispatcher) and :func:`deliver` (for the next in
line) move a head's ``next_attempt_at`` a lease ahead in a conditional UPDATE before a task is
sent for it. A worker that dies mid-way leaves the delivery pending, and the dispatcher claims it
again once the lease runs out: nothing is stranded, and a receiver may see an event twice
(with the same ``webhook-id``), never not at all. Every step is safe to run twice: a delivery
no longer pending, or no longer the head, is left alone.

The POST is made outside any transaction (:func:`deliver` reads, sends, then writes).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, exists, select, update
from sqlalchemy.orm import Session, aliased

from pipeline.crypto.envelope import EnvelopeError
from pipeline.crypto.keys import Keyring
from pipeline.db import SessionScope
from pipeline.models import (
    DeliveryStatus,
    WebhookDelivery,
    WebhookEvent,
    WebhookSubscription,
)
from pipeline.models.base import utcnow
from pipeline.outbound import OutboundPolicy
from pipeline.webhooks import metrics, signing, transport

log = logging.getLogger(__name__)

PENDING = DeliveryStatus.PENDING


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, and when to give up (Standard Webhooks suggests retrying
    for about a day; its schedule grows from seconds to hours)."""

    first_delay: float = 5.0
    max_delay: float = 3600.0
    give_up_after: float = 24 * 3600.0
    # Longer than a task's wait in the queue plus its POST: a claimed delivery is not claimed
    # again while its task may still run.
    lease: float = 300.0

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds before the next try after ``attempts`` failed ones: half fixed, half random
        ("equal jitter"), so that a fleet's retries after an outage do not arrive together."""
        base = min(self.max_delay, self.first_delay * 2.0 ** max(0, attempts - 1))
        return float(base / 2 + rand() * base / 2)


DEFAULT_POLICY = RetryPolicy()


def _is_head_clause() -> ColumnElement[bool]:
    """No earlier delivery to the same receiver for the same site is still pending."""
    earlier = aliased(WebhookDelivery)
    return ~exists().where(
        and_(
            earlier.subscription_id == WebhookDelivery.subscription_id,
            earlier.domain == WebhookDelivery.domain,
            earlier.status == PENDING,
            earlier.id < WebhookDelivery.id,
        )
    )


def claim_due(
    session: Session, *, now: datetime, limit: int = 500, policy: RetryPolicy = DEFAULT_POLICY
) -> list[int]:
    """Claim the due heads (a lease each); their ids, for a task each after the commit."""
    due = session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now)
        .where(_is_head_clause())
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
    ).all()
    return [d for d in due if _claim(session, d, now=now, policy=policy)]


def _claim(session: Session, delivery_id: int, *, now: datetime, policy: RetryPolicy) -> bool:
    claimed = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == PENDING,
            WebhookDelivery.next_attempt_at <= now,
        )
        .values(next_attempt_at=now + timedelta(seconds=policy.lease))
        .execution_options(synchronize_session=False)
    )
    return bool(claimed.rowcount)  # type: ignore[attr-defined]


def _is_head(session: Session, delivery: WebhookDelivery) -> bool:
    earlier = session.scalar(
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.subscription_id == delivery.subscription_id,
            WebhookDelivery.domain == delivery.domain,
            WebhookDelivery.status == PENDING,
            WebhookDelivery.id < delivery.id,
        )
        .limit(1)
    )
    return earlier is None


def body_of(event: WebhookEvent) -> bytes:
    """The JSON body: the same bytes on every attempt (Standard Webhooks' payload shape)."""
    payload = {
        "type": event.type,
        "timestamp": event.created_at.isoformat(),
        "data": event.data,
    }
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Attempt:
    delivery_id: int
    subscription_id: int
    domain: str
    message_id: str
    body: bytes
    created_at: datetime
    receiver: signing.Receiver | None  # None: the sealed URL and secret would not open
    problem: str | None = None


def _prepare(session: Session, delivery_id: int, keyring: Keyring) -> Attempt | None:
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.status != PENDING or not _is_head(session, delivery):
        return None  # done, removed, or an earlier one for the site is still pending
    event = session.get(WebhookEvent, delivery.event_id)
    subscription = session.get(WebhookSubscription, delivery.subscription_id)
    if event is None or subscription is None:
        return None
    receiver: signing.Receiver | None = None
    problem = None
    try:
        receiver = signing.open_sealed(subscription.sealed, keyring, subscription.id)
    except EnvelopeError as exc:
        problem = f"the subscription's URL and secret cannot be opened: {exc.reason}"
    return Attempt(
        delivery_id=delivery.id,
        subscription_id=delivery.subscription_id,
        domain=delivery.domain,
        message_id=event.message_id,
        body=body_of(event),
        created_at=delivery.created_at,
        receiver=receiver,
        problem=problem,
    )


@dataclass(frozen=True)
class Result:
    """What :func:`deliver` did: ``outcome`` is None when there was nothing to send."""

    outcome: str | None
    reason: str | None = None
    next_id: int | None = None  # the next in line for this receiver and site, claimed


def _send(attempt: Attempt, *, now: datetime, outbound: OutboundPolicy,
          timeout: float) -> tuple[int | None, str | None, str | None]:  # fmt: skip
    """(status code, failure reason, error) of one POST."""
    if attempt.receiver is None:
        return None, "unreadable_secret", attempt.problem
    headers = signing.headers(attempt.receiver.secret, attempt.message_id, now, attempt.body)
    try:
        answer = transport.post(
            attempt.receiver.url, attempt.body, headers, policy=outbound, timeout=timeout
        )
    except transport.SendFailed as exc:
        return None, exc.reason, str(exc)
    if answer.ok:
        return answer.status, None, None
    if 300 <= answer.status < 400:
        where = answer.location or "(no Location)"
        return answer.status, "redirect", f"HTTP {answer.status} redirect to {where} not followed"
    reason = (
        "http_5xx"
        if answer.status >= 500 or answer.status == 429
        else "http_4xx"
        if answer.status >= 400
        else "http_other"
    )
    text = answer.body.strip().splitlines()
    return answer.status, reason, f"HTTP {answer.status}" + (f": {text[0]}" if text else "")


def deliver(
    sessions: SessionScope,
    delivery_id: int,
    *,
    keyring: Keyring,
    now: Callable[[], datetime] = utcnow,
    policy: RetryPolicy = DEFAULT_POLICY,
    outbound: OutboundPolicy = transport.WEBHOOK_POLICY,
    timeout: float = transport.TIMEOUT,
    rand: Callable[[], float] = random.random,
) -> Result:
    """Send one delivery if it is still pending and the head of its site's line; record the
    answer; claim the next in line when this one is done."""
    with sessions() as session:
        attempt = _prepare(session, delivery_id, keyring)
    if attempt is None:
        return Result(None)
    sent_at = now()
    status, reason, error = _send(attempt, now=sent_at, outbound=outbound, timeout=timeout)
    finished = now()
    if reason is None:
        outcome = "delivered"
    elif (finished - attempt.created_at).total_seconds() >= policy.give_up_after:
        outcome = "gave_up"
    else:
        outcome = "retry"
    next_id = None
    with sessions() as session:
        # Locked (on PostgreSQL), so that two copies of the task finishing together record once.
        delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
        if delivery is None or delivery.status != PENDING:
            return Result(None)  # another copy of this task recorded it first
        delivery.attempts += 1
        delivery.last_status_code = status
        delivery.last_error = error
        subscription = session.get(WebhookSubscription, attempt.subscription_id)
        if subscription is not None:
            subscription.last_attempt_at = finished
            subscription.last_status_code = status
            subscription.last_error = error
        if outcome == "retry":
            wait = policy.delay(delivery.attempts, rand)
            delivery.next_attempt_at = finished + timedelta(seconds=wait)
            if subscription is not None:
                subscription.failed_attempts += 1
        else:
            delivery.status = (
                DeliveryStatus.DELIVERED if outcome == "delivered" else DeliveryStatus.GAVE_UP
            )
            delivery.finished_at = finished
            if subscription is not None:
                if outcome == "delivered":
                    subscription.delivered += 1
                else:
                    subscription.failed_attempts += 1
                    subscription.given_up += 1
            session.flush()
            next_id = _claim_next(session, attempt, now=finished, policy=policy)
    metrics.observe(outcome, reason)
    if outcome != "delivered":
        log.warning("webhook %s for %s to subscription %d: %s (%s)", attempt.message_id,
                    attempt.domain, attempt.subscription_id, error,
                    "gave up" if outcome == "gave_up" else "will retry")  # fmt: skip
    return Result(outcome, reason, next_id)


def _claim_next(session: Session, attempt: Attempt, *, now: datetime,
                policy: RetryPolicy) -> int | None:  # fmt: skip
    following = session.scalar(
        select(WebhookDelivery.id)
        .where(
            WebhookDelivery.subscription_id == attempt.subscription_id,
            WebhookDelivery.domain == attempt.domain,
            WebhookDelivery.status == PENDING,
        )
        .order_by(WebhookDelivery.id)
        .limit(1)
    )
    if following is None or not _claim(session, following, now=now, policy=policy):
        return None
    return following


# Delivered and given-up deliveries are kept this long (for `webhooks list` and a look at what
# was sent), then deleted with the events no delivery refers to any more.
KEEP_FINISHED = timedelta(days=7)


def prune(session: Session, *, now: datetime, keep: timedelta = KEEP_FINISHED,
          limit: int = 5000) -> int:  # fmt: skip
    """Delete finished deliveries older than ``keep``, a bounded batch, and then the events
    left without any delivery. An event with a ``dedup_key`` is kept (it is what makes
    ``certificate.expiring`` once per certificate). How many deliveries were deleted."""
    cutoff = now - keep
    old = session.scalars(
        select(WebhookDelivery.id)
        .where(WebhookDelivery.status != PENDING, WebhookDelivery.finished_at < cutoff)
        .limit(limit)
    ).all()
    if old:
        session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(old)))
    session.execute(
        delete(WebhookEvent)
        .where(
            WebhookEvent.created_at < cutoff,
            WebhookEvent.dedup_key.is_(None),
            ~exists().where(WebhookDelivery.event_id == WebhookEvent.id),
        )
        .execution_options(synchronize_session=False)
    )
    return len(old)
