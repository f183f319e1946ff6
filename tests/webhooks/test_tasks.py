"""The tasks' bodies, run here as a worker runs them, on the process's runtime."""

from __future__ import annotations

from datetime import timedelta

import pytest
from standardwebhooks.webhooks import Webhook

from pipeline import runtime
from pipeline.crypto.keys import load_or_create_pipeline_key
from pipeline.models.base import utcnow
from pipeline.webhooks import subscriptions
from tests.support.factories import make_cert, make_site
from tests.support.from_settings import session_scope
from tests.webhooks.conftest import LOCAL
from tests.webhooks.receiver import receiving


def test_upkeep_then_dispatch_then_deliver_sends_certificate_expiring(
    certman_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.tasks import webhooks as tasks

    # The receiver is on loopback: the worker's setting allows it (the subscription's own
    # check is given the same policy below).
    monkeypatch.setenv("CERTMAN_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    runtime.reset(close=True, settings=True)
    settings = runtime.current().settings
    key = load_or_create_pipeline_key(settings.effective_pipeline_key)
    sent: list[tuple[int, str]] = []
    now = utcnow()
    with receiving() as receiver:
        with session_scope() as s:
            _, secret = subscriptions.add(
                s, receiver.url, ["certificate.expiring"], pipeline_key=key.public_key(),
                policy=LOCAL,
            )  # fmt: skip
            make_cert(s, make_site(s, "expiring.example"), not_before=now - timedelta(days=80),
                      lifetime=timedelta(days=85))  # fmt: skip
        assert tasks.upkeep_events() == {"expiring": 1, "pruned": 0}
        assert tasks.upkeep_events() == {"expiring": 0, "pruned": 0}  # once per certificate
        # The dispatcher's sends, caught instead of going to the broker, then run here.
        monkeypatch.setattr(tasks, "_send", sent.append)
        assert tasks.dispatch() == 1
        assert tasks.deliver(*sent[0]) == "delivered"
        assert tasks.deliver(*sent[0]) is None  # a second copy of the message: nothing
    [got] = receiver.received
    payload = Webhook(secret).verify(got.body, got.headers)
    assert (payload["type"], payload["data"]["domain"]) == ("certificate.expiring",
                                                            "expiring.example")  # fmt: skip


def test_a_deliver_task_ends_well_before_its_claim_could_be_taken_over() -> None:
    from pipeline.tasks import webhooks as tasks
    from pipeline.webhooks import delivery, transport

    # Killed by Celery (time_limit) before the lease runs out: no second copy sends meanwhile.
    assert tasks.deliver.time_limit is not None and tasks.deliver.soft_time_limit is not None
    assert transport.TIMEOUT < tasks.deliver.soft_time_limit < tasks.deliver.time_limit
    assert tasks.deliver.time_limit < delivery.DEFAULT_POLICY.lease
