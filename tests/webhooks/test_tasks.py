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
from tests.webhooks.receiver import receiving


def test_upkeep_then_dispatch_then_deliver_sends_certificate_expiring(
    certman_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.tasks import webhooks as tasks

    settings = runtime.current().settings
    key = load_or_create_pipeline_key(settings.effective_pipeline_key)
    sent: list[int] = []
    now = utcnow()
    with receiving() as receiver:
        with session_scope() as s:
            _, secret = subscriptions.add(
                s, receiver.url, ["certificate.expiring"], pipeline_key=key.public_key()
            )
            make_cert(s, make_site(s, "expiring.example"), not_before=now - timedelta(days=80),
                      lifetime=timedelta(days=85))  # fmt: skip
        assert tasks.upkeep_events() == {"expiring": 1, "pruned": 0}
        assert tasks.upkeep_events() == {"expiring": 0, "pruned": 0}  # once per certificate
        # The dispatcher's sends, caught instead of going to the broker, then run here.
        monkeypatch.setattr(tasks, "_send", sent.append)
        assert tasks.dispatch() == 1
        assert tasks.deliver(sent[0]) == "delivered"
        assert tasks.deliver(sent[0]) is None  # a second copy of the message: nothing
    [got] = receiver.received
    payload = Webhook(secret).verify(got.body, got.headers)
    assert (payload["type"], payload["data"]["domain"]) == ("certificate.expiring",
                                                            "expiring.example")  # fmt: skip
