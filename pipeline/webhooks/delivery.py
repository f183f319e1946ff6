"""Sending the outbox: due deliveries claimed, sent in order per (subscription, site), retried
with backoff and jitter, given up after a bound; at least once, with a stable ``webhook-id``.

A delivery is sent only when it is the *head* of its (subscription, domain): no earlier one is
still pending. A later event for a site is therefore never sent before an earlier one was
delivered or given up.

The claim is a lease with a token: :func:`claim_due` (beat's dispatcher) and :func:`deliver` (for
the next in line) move a head's ``next_attempt_at`` a lease ahead and store a random token in a
conditional UPDATE before a task is sent for it with that token. The task sends only if the
token is still the delivery's claim, exchanging it for one of its own in another conditional
UPDATE (row count checked), and records the answer only while it still holds that one. A worker
that dies mid-way leaves the delivery pending, and the dispatcher claims it again once the lease
runs out: nothing is stranded, and a receiver may see an event twice (with the same
``webhook-id``), never not at all. A stale task (one that waited past its lease while the
delivery was claimed again) and a second copy of a task send nothing.

One receiver cannot hold the workers: the dispatcher claims a bounded number per subscription
per tick and in flight, and a subscription failing again and again backs off as a whole.

The POST is made outside any transaction (:func:`deliver` reads, sends, then writes).
"""

from __future__ import annotations

import json
import logging
import random
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, and_, delete, exists, func, select, update
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
from pipeline.webhooks import metrics, signing, transport

log = logging.getLogger(__name__)

PENDING = DeliveryStatus.PENDING


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, and when to give up (Standard Webhooks suggests retrying
    for about a day; its schedule grows from seconds to hours); how much of the workers one
    receiver may hold."""

    first_delay: float = 5.0
    max_delay: float = 3600.0
    give_up_after: float = 24 * 3600.0
    # Longer than a task's run (its Celery time limit, pipeline.tasks.webhooks): a claim is not
    # taken over while the task holding it may still be sending. A task that waited in the
    # queue past it sends only if nobody claimed the delivery since (the claim's token).
    lease: float = 300.0
    # Claims per subscription per dispatcher tick, and held at once: a receiver with thousands
    # of sites due cannot fill the maintenance queue (renewals' upkeep shares its workers).
    per_tick: int = 20
    in_flight: int = 20
    # Failed attempts in a row before the whole subscription backs off: it is left alone for the
    # backoff of its failures, then tried one delivery at a time until a 2xx.
    failures_to_pause: int = 5

    def delay(self, attempts: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds before the next try after ``attempts`` failed ones: half fixed, half random
        ("equal jitter"), so that a fleet's retries after an outage do not arrive together."""
        base = min(self.max_delay, self.first_delay * 2.0 ** max(0, attempts - 1))
        return float(base / 2 + rand() * base / 2)


DEFAULT_POLICY = RetryPolicy()

Claim = tuple[int, str]  # a delivery's id and the token of its claim: a task's arguments


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
) -> list[Claim]:
    """Claim the due heads (a lease and a token each), at most ``policy.per_tick`` per
    subscription and no more than ``policy.in_flight`` held at once (one while the subscription
    is failing), none for a subscription backing off; the claims, for a task each after the
    commit."""
    claimed: list[Claim] = []
    subscriptions = session.execute(
        select(
            WebhookSubscription.id,
            WebhookSubscription.consecutive_failures,
            WebhookSubscription.paused_until,
        ).order_by(WebhookSubscription.id)
    ).all()
    for subscription_id, failures, paused_until in subscriptions:
        if paused_until is not None and paused_until > now:
            continue
        cap = 1 if failures >= policy.failures_to_pause else policy.in_flight
        held = session.scalar(
            select(func.count())
            .select_from(WebhookDelivery)
            .where(
                WebhookDelivery.subscription_id == subscription_id,
                WebhookDelivery.status == PENDING,
                WebhookDelivery.claim.is_not(None),
                WebhookDelivery.next_attempt_at > now,
            )
        )
        room = min(policy.per_tick, cap - int(held or 0), limit - len(claimed))
        if room <= 0:
            continue
        due = session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.subscription_id == subscription_id,
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at <= now,
            )
            .where(_is_head_clause())
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
            .limit(room)
        ).all()
        for delivery_id in due:
            token = _claim(session, delivery_id, now=now, policy=policy)
            if token is not None:
                claimed.append((delivery_id, token))
    return claimed


def _claim(session: Session, delivery_id: int, *, now: datetime,
           policy: RetryPolicy) -> str | None:  # fmt: skip
    """A new claim on a due delivery (its token), or None when it is not due or not pending."""
    return _new_claim(session, delivery_id, WebhookDelivery.next_attempt_at <= now,
                      now=now, policy=policy)  # fmt: skip


def _new_claim(session: Session, delivery_id: int, held: ColumnElement[bool], *,
               now: datetime, policy: RetryPolicy) -> str | None:  # fmt: skip
    """A new claim token with a fresh lease on the pending delivery, where ``held`` is true of
    it; None where it is not (another run's claim stands)."""
    token = secrets.token_hex(16)
    claimed = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING, held)
        .values(next_attempt_at=now + timedelta(seconds=policy.lease), claim=token)
        .execution_options(synchronize_session=False)
    )
    return token if claimed.rowcount else None  # type: ignore[attr-defined]


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
    attempts: int  # failed attempts before this one
    token: str  # this attempt's own claim: recording needs it still to be the current one
    receiver: signing.Receiver | None  # None: the sealed URL and secret would not open
    problem: str | None = None


def _take(session: Session, delivery_id: int, claim: str, *, now: datetime,
          policy: RetryPolicy) -> str | None:  # fmt: skip
    """Exchange the task's claim for this attempt's own, with a fresh lease: the attempt's
    token, or None when ``claim`` is not the delivery's current claim (the task is stale, or
    another copy of it took the claim first)."""
    return _new_claim(session, delivery_id, WebhookDelivery.claim == claim,
                      now=now, policy=policy)  # fmt: skip


def _prepare(session: Session, delivery_id: int, claim: str, keyring: Keyring, *,
             now: datetime, policy: RetryPolicy) -> Attempt | None:  # fmt: skip
    delivery = session.get(WebhookDelivery, delivery_id)
    if delivery is None or delivery.status != PENDING or delivery.claim != claim:
        return None  # done, removed, or claimed again since this task was sent
    if not _is_head(session, delivery):
        return None  # an earlier one for the site is still pending
    event = session.get(WebhookEvent, delivery.event_id)
    subscription = session.get(WebhookSubscription, delivery.subscription_id)
    if event is None or subscription is None:
        return None
    if subscription.paused_until is not None and subscription.paused_until > now:
        # The receiver began failing after this was claimed: it waits with the others.
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.claim == claim)
            .values(next_attempt_at=subscription.paused_until, claim=None)
            .execution_options(synchronize_session=False)
        )
        return None
    token = _take(session, delivery_id, claim, now=now, policy=policy)
    if token is None:
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
        attempts=delivery.attempts,
        token=token,
        receiver=receiver,
        problem=problem,
    )


@dataclass(frozen=True)
class Result:
    """What :func:`deliver` did: ``outcome`` is None when there was nothing to send."""

    outcome: str | None
    reason: str | None = None
    next: Claim | None = None  # the next in line for this receiver and site, claimed


def _send(attempt: Attempt, *, now: datetime, outbound: transport.WebhookPolicy,
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
    claim: str,
    *,
    keyring: Keyring,
    now: Callable[[], datetime] = utcnow,
    policy: RetryPolicy = DEFAULT_POLICY,
    outbound: transport.WebhookPolicy = transport.STRICT,
    timeout: float = transport.TIMEOUT,
    rand: Callable[[], float] = random.random,
) -> Result:
    """Send one delivery if ``claim`` is still its claim and it is the head of its site's line;
    record the answer; claim the next in line when this one is done."""
    with sessions() as session:
        attempt = _prepare(session, delivery_id, claim, keyring, now=now(), policy=policy)
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
    attempts = attempt.attempts + 1
    values: dict[str, object] = {
        "attempts": attempts,
        "last_status_code": status,
        "last_error": error,
        "claim": None,
    }
    if outcome == "retry":
        values["next_attempt_at"] = finished + timedelta(seconds=policy.delay(attempts, rand))
    else:
        values["status"] = (
            DeliveryStatus.DELIVERED if outcome == "delivered" else DeliveryStatus.GAVE_UP
        )
        values["finished_at"] = finished
    following: Claim | None = None
    with sessions() as session:
        # Only while this attempt still holds the claim: two copies of a task never both record
        # (nor count) an attempt, whatever the database.
        recorded = session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.status == PENDING,
                WebhookDelivery.claim == attempt.token,
            )
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if not recorded.rowcount:  # type: ignore[attr-defined]
            return Result(None)
        # Locked (on PostgreSQL): deliveries for other sites record their counts at once too.
        subscription = session.get(
            WebhookSubscription, attempt.subscription_id, with_for_update=True
        )
        paused = False
        if subscription is not None:
            subscription.last_attempt_at = finished
            subscription.last_status_code = status
            subscription.last_error = error
            if outcome == "delivered":
                subscription.delivered += 1
                subscription.consecutive_failures = 0
                subscription.paused_until = None
            else:
                subscription.failed_attempts += 1
                subscription.given_up += int(outcome == "gave_up")
                subscription.consecutive_failures += 1
                failures = subscription.consecutive_failures
                if failures >= policy.failures_to_pause:
                    # As long as a delivery's own backoff after as many failures, and growing.
                    wait = policy.delay(failures, rand)
                    subscription.paused_until = finished + timedelta(seconds=wait)
                    paused = True
        if outcome != "retry" and not paused:
            session.flush()
            following = _claim_next(session, attempt, now=finished, policy=policy)
    metrics.observe(outcome, reason)
    if outcome != "delivered":
        log.warning("webhook %s for %s to subscription %d: %s (%s)", attempt.message_id,
                    attempt.domain, attempt.subscription_id, error,
                    "gave up" if outcome == "gave_up" else "will retry")  # fmt: skip
    return Result(outcome, reason, following)


def _claim_next(session: Session, attempt: Attempt, *, now: datetime,
                policy: RetryPolicy) -> Claim | None:  # fmt: skip
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
    if following is None:
        return None
    token = _claim(session, following, now=now, policy=policy)
    return None if token is None else (following, token)


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
