"""The outbox: an event is a row written in the transaction of the change that caused it.

So an event is never lost (it commits with the change) and never sent for a change that was
rolled back (it goes with it). :func:`record` writes the event and one pending delivery per
subscription that wants its type; the dispatcher (:mod:`pipeline.webhooks.delivery`) sends
them after the commit. No subscription wants it: nothing is written.

Events for one site are written one transaction at a time (:func:`record` takes a lock per site
held until the commit, on PostgreSQL; SQLite has one writer at a time anyway). Deliveries are
sent in the order of their ids, and without the lock a transaction that wrote an event first
(a lower id) could commit after one that wrote a later event for the same site, whose delivery
would then be sent first.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.models import WebhookDelivery, WebhookEvent, WebhookSubscription
from pipeline.models.base import utcnow

SITE_ACTIVE = "site.active"  # a first certificate or a renewal stored, served from now on
SITE_FAILED = "site.failed"  # an attempt failed; the next one is scheduled
SITE_BLOCKED = "site.blocked"  # the CA refused a name: someone must act
CERTIFICATE_EXPIRING = "certificate.expiring"  # little life left, not renewed (once each)
SITE_REMOVED = "site.removed"

EVENT_TYPES: tuple[str, ...] = (
    SITE_ACTIVE,
    SITE_FAILED,
    SITE_BLOCKED,
    CERTIFICATE_EXPIRING,
    SITE_REMOVED,
)

Data = Mapping[str, Any] | Callable[[], Mapping[str, Any]]


class UnknownEventType(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown event type {name!r}: the types are {', '.join(EVENT_TYPES)}")


def check_type(event_type: str) -> str:
    if event_type not in EVENT_TYPES:
        raise UnknownEventType(event_type)
    return event_type


def new_message_id() -> str:
    # Standard Webhooks' ids look like "msg_<random>": unique, the same on every attempt.
    return f"msg_{uuid.uuid4().hex}"


def subscribers(session: Session, event_type: str) -> list[int]:
    """The subscriptions that want ``event_type`` (a handful of rows: read whole)."""
    rows = session.execute(select(WebhookSubscription.id, WebhookSubscription.events)).all()
    return [sid for sid, wanted in rows if event_type in (wanted or [])]


# The first key of the advisory locks on sites' events: apart from any other advisory lock.
_LOCK_CLASS = 0x77686B  # "whk"


def lock_site(session: Session, domain: str) -> None:
    """Until ``session``'s transaction ends, no other transaction writes events for ``domain``
    (PostgreSQL: a transaction-level advisory lock; other stores serialise writers already)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_LOCK_CLASS, func.hashtext(domain))))


def record(
    session: Session,
    *,
    event_type: str,
    domain: str,
    data: Data,
    dedup_key: str | None = None,
    now: datetime | None = None,
) -> WebhookEvent | None:
    """Write an event and its deliveries in ``session``'s transaction; the event, or None when
    no subscription wants this type.

    ``data`` may be a function: called only when someone subscribes, so that what it reads
    costs nothing otherwise. ``dedup_key``: an event sent at most once per key (a second
    record with the same key fails the transaction on the unique key; callers filter first).
    """
    check_type(event_type)
    wanted = subscribers(session, event_type)
    if not wanted:
        return None
    lock_site(session, domain)
    when = now or utcnow()
    body = dict(data() if callable(data) else data)
    event = WebhookEvent(
        message_id=new_message_id(),
        type=event_type,
        domain=domain,
        data={"domain": domain, **body},
        dedup_key=dedup_key,
        created_at=when,
    )
    session.add(event)
    session.flush()
    for subscription_id in wanted:
        session.add(
            WebhookDelivery(
                event_id=event.id,
                subscription_id=subscription_id,
                domain=domain,
                next_attempt_at=when,
                created_at=when,
            )
        )
    return event
