"""Subscriptions: what ``certman api webhooks add|list|remove`` do to the store."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from pipeline.crypto.keys import PublicKey
from pipeline.models import DeliveryStatus, WebhookDelivery, WebhookSubscription
from pipeline.outbound import redact_url
from pipeline.webhooks import events, signing, transport


class SubscriptionError(ValueError):
    """A subscription that cannot be made or found; the message says why."""


def parse_events(raw: str | Iterable[str]) -> list[str]:
    """``"site.active,site.failed"`` (or a list) as the event types, checked, in the order of
    :data:`events.EVENT_TYPES`; ValueError naming an unknown one."""
    items = raw.split(",") if isinstance(raw, str) else list(raw)
    names = {item.strip() for item in items if item.strip()}
    if not names:
        raise SubscriptionError(
            f"no event types given: choose from {', '.join(events.EVENT_TYPES)}"
        )
    for name in sorted(names):
        events.check_type(name)
    return [name for name in events.EVENT_TYPES if name in names]


def add(
    session: Session,
    url: str,
    event_types: list[str],
    *,
    pipeline_key: PublicKey,
    policy: transport.WebhookPolicy = transport.STRICT,
) -> tuple[WebhookSubscription, str]:
    """Store a subscription; it and its secret (the only time the secret is seen in clear)."""
    checked = transport.check_url(url, policy)
    wanted = parse_events(event_types)
    secret = signing.new_secret()
    subscription = WebhookSubscription(
        url_shown=redact_url(checked)[:300], events=wanted, sealed=""
    )
    session.add(subscription)
    session.flush()  # the id the envelope is bound to
    subscription.sealed = signing.seal(
        signing.Receiver(url=checked, secret=secret), pipeline_key, subscription.id
    )
    session.flush()
    return subscription, secret


def remove(session: Session, subscription_id: int) -> WebhookSubscription:
    """Delete a subscription and its deliveries (pending ones are never sent)."""
    subscription = session.get(WebhookSubscription, subscription_id)
    if subscription is None:
        raise SubscriptionError(f"no webhook subscription {subscription_id}")
    session.execute(
        delete(WebhookDelivery).where(WebhookDelivery.subscription_id == subscription_id)
    )
    session.delete(subscription)
    session.flush()
    return subscription


def listing(session: Session) -> list[dict[str, Any]]:
    """Every subscription with its delivery figures (``webhooks list --json``)."""
    pending = dict(
        session.execute(
            select(WebhookDelivery.subscription_id, func.count())
            .where(WebhookDelivery.status == DeliveryStatus.PENDING)
            .group_by(WebhookDelivery.subscription_id)
        )
        .tuples()
        .all()
    )
    rows = session.scalars(select(WebhookSubscription).order_by(WebhookSubscription.id)).all()
    return [
        {
            "id": s.id,
            "url": s.url_shown,
            "events": list(s.events),
            "created_at": s.created_at.isoformat(),
            "delivered": s.delivered,
            "failed_attempts": s.failed_attempts,
            "given_up": s.given_up,
            "pending": int(pending.get(s.id, 0)),
            "last_attempt_at": s.last_attempt_at.isoformat() if s.last_attempt_at else None,
            "last_status_code": s.last_status_code,
            "last_error": s.last_error,
        }
        for s in rows
    ]
