"""Webhook tasks: thin, over :mod:`pipeline.webhooks.delivery` and :mod:`pipeline.fleet.upkeep`.

``dispatch`` (beat, every few seconds) claims the due deliveries and sends a ``deliver`` for each
after the commit, with its claim's token; ``deliver`` sends one if it still holds that claim
and, when it is done, the next in line for the same receiver and site at once. A failed attempt
is not a Celery retry: its next try is a time in the store, which the dispatcher finds, so that
a worker's death loses nothing. Every task is safe to run twice (a claim already used, or a
delivery no longer pending or no longer first in line, is left alone).
``upkeep`` (beat, every half hour) records ``certificate.expiring`` and deletes old deliveries.
"""

from __future__ import annotations

from celery import Task

from pipeline import runtime
from pipeline.celery import app
from pipeline.crypto.keys import Keyring, load_or_create_pipeline_key
from pipeline.fleet import upkeep
from pipeline.models.base import utcnow
from pipeline.webhooks import delivery, transport

QUEUE = "maintenance"
# A deliver task is ended well within its claim's lease, so that the claim is never taken over
# while it may still be sending: its POST has transport.TIMEOUT in all, the rest is two short
# transactions.
DELIVER_SOFT_TIME_LIMIT = 60
DELIVER_TIME_LIMIT = 90


def _keyring() -> Keyring:
    settings = runtime.current().settings
    return Keyring.of([load_or_create_pipeline_key(settings.effective_pipeline_key)])


def _policy() -> transport.WebhookPolicy:
    return transport.WebhookPolicy(
        allowed_networks=tuple(runtime.current().settings.webhook_allowed_networks)
    )


def _send(claim: delivery.Claim) -> None:
    delivery_id, token = claim
    deliver.apply_async((delivery_id, token), queue=QUEUE)


@app.task(name="certman.webhooks.dispatch", bind=True, acks_late=True, send_events=False)
def dispatch(self: Task) -> int:
    """Claim the due deliveries (first in line for their receiver and site) and send them."""
    process = runtime.current()
    with process.session_scope() as session:
        claimed = delivery.claim_due(session, now=utcnow())
    for claim in claimed:  # after the commit: the task must find the claim
        _send(claim)
    return len(claimed)


@app.task(
    name="certman.webhooks.deliver",
    bind=True,
    acks_late=True,
    soft_time_limit=DELIVER_SOFT_TIME_LIMIT,
    time_limit=DELIVER_TIME_LIMIT,
)
def deliver(self: Task, delivery_id: int, claim: str) -> str | None:
    """Send one delivery if ``claim`` is still its claim; its outcome (None: nothing sent)."""
    process = runtime.current()
    result = delivery.deliver(
        process.session_scope, delivery_id, claim, keyring=_keyring(), outbound=_policy()
    )
    if result.next is not None:
        _send(result.next)
    return result.outcome


@app.task(name="certman.webhooks.upkeep", bind=True, acks_late=True)
def upkeep_events(self: Task) -> dict[str, int]:
    """``certificate.expiring`` for the certificates the expiry alert would name (once each),
    and old finished deliveries deleted."""
    process = runtime.current()
    now = utcnow()
    with process.session_scope() as session:
        expiring = upkeep.record_expiring(
            session, now=now, fraction=process.settings.alert_fraction
        )
    with process.session_scope() as session:
        pruned = delivery.prune(session, now=now)
    return {"expiring": expiring, "pruned": pruned}
