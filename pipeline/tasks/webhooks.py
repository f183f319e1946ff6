"""Webhook tasks: thin, over :mod:`pipeline.webhooks.delivery` and :mod:`pipeline.fleet.upkeep`.

``dispatch`` (beat, every few seconds) claims the due deliveries and sends a ``deliver`` for each
after the commit; ``deliver`` sends one and, when it is done, the next in line for the same
receiver and site at once. A failed attempt is not a Celery retry: its next try is a time in
the store, which the dispatcher finds, so that a worker's death loses nothing. Every task is
safe to run twice (a delivery no longer pending or no longer first in line is left alone).
``upkeep`` (beat, every half hour) records ``certificate.expiring`` and deletes old deliveries.
"""

from __future__ import annotations

from celery import Task

from pipeline import runtime
from pipeline.celery import app
from pipeline.crypto.keys import Keyring, load_or_create_pipeline_key
from pipeline.fleet import upkeep
from pipeline.models.base import utcnow
from pipeline.webhooks import delivery

QUEUE = "maintenance"


def _keyring() -> Keyring:
    settings = runtime.current().settings
    return Keyring.of([load_or_create_pipeline_key(settings.effective_pipeline_key)])


def _send(delivery_id: int) -> None:
    deliver.apply_async((delivery_id,), queue=QUEUE)


@app.task(name="certman.webhooks.dispatch", bind=True, acks_late=True, send_events=False)
def dispatch(self: Task) -> int:
    """Claim the due deliveries (first in line for their receiver and site) and send them."""
    process = runtime.current()
    with process.session_scope() as session:
        claimed = delivery.claim_due(session, now=utcnow())
    for delivery_id in claimed:  # after the commit: the task must find the claim
        _send(delivery_id)
    return len(claimed)


@app.task(name="certman.webhooks.deliver", bind=True, acks_late=True)
def deliver(self: Task, delivery_id: int) -> str | None:
    """Send one delivery; its outcome (None: nothing to send)."""
    process = runtime.current()
    result = delivery.deliver(process.session_scope, delivery_id, keyring=_keyring())
    if result.next_id is not None:
        _send(result.next_id)
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
