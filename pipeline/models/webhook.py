"""Webhooks to the platform: subscriptions, the outbox of events, and each event's delivery to
each subscription (pipeline.webhooks)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from pipeline.models.base import Base, created_at, intpk


class WebhookSubscription(Base):
    """A receiver and the event types it wants. Its URL (receivers put tokens in the path) and
    its signing secret are kept only sealed to the pipeline's key, together in ``sealed``;
    ``url_shown`` is the URL as a log line may show it (``scheme://host[:port]/…``)."""

    __tablename__ = "webhook_subscriptions"

    id: Mapped[intpk]
    url_shown: Mapped[str] = mapped_column(String(300))
    events: Mapped[list[str]] = mapped_column(JSON)
    sealed: Mapped[str] = mapped_column(Text)
    created_at: Mapped[created_at]
    # What the last attempt to this receiver did: for `certman api webhooks list`.
    last_attempt_at: Mapped[datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered: Mapped[int] = mapped_column(default=0)
    failed_attempts: Mapped[int] = mapped_column(default=0)
    given_up: Mapped[int] = mapped_column(default=0)
    # Failed attempts in a row (a 2xx resets it): past a few, the whole subscription backs off
    # until ``paused_until`` and then sends one delivery at a time until one succeeds, so that
    # a receiver that is down does not hold the workers (pipeline.webhooks.delivery).
    consecutive_failures: Mapped[int] = mapped_column(default=0)
    paused_until: Mapped[datetime | None]


class WebhookEvent(Base):
    """One event, written in the transaction of the change that caused it (the outbox)."""

    __tablename__ = "webhook_events"

    id: Mapped[intpk]
    # The Standard Webhooks ``webhook-id``: the same on every attempt, to every receiver.
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    type: Mapped[str] = mapped_column(String(64))
    domain: Mapped[str] = mapped_column(String(253))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Events sent once per subject (certificate.expiring: once per certificate).
    dedup_key: Mapped[str | None] = mapped_column(String(128), unique=True)
    created_at: Mapped[created_at]


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # not delivered yet: due at next_attempt_at
    DELIVERED = "delivered"  # the receiver answered 2xx
    GAVE_UP = "gave_up"  # no 2xx before the give-up bound


class WebhookDelivery(Base):
    """An event to one subscription: sent in order per (subscription, domain), at least once."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[intpk]
    event_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_events.id", ondelete="CASCADE"), index=True
    )
    subscription_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_subscriptions.id", ondelete="CASCADE")
    )
    domain: Mapped[str] = mapped_column(String(253))  # the event's: the order is per site
    status: Mapped[DeliveryStatus] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(default=0)
    # When it is due; while a task has it, the end of that task's lease.
    next_attempt_at: Mapped[datetime]
    # The claim's token while a task has it (random, in the task's arguments): only the task
    # holding the current claim sends and records, so a stale copy of a task does nothing.
    claim: Mapped[str | None] = mapped_column(String(32))
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None]
    created_at: Mapped[created_at]

    __table_args__ = (
        # The dispatcher's query: pending deliveries that are due.
        Index("ix_webhook_deliveries_status_next_attempt_at", "status", "next_attempt_at"),
        # "Is an earlier one for this receiver and site still pending?"
        Index("ix_webhook_deliveries_subscription_id_domain_id", "subscription_id", "domain", "id"),
    )
