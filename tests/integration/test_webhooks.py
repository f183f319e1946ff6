"""A real worker, sent by beat's dispatcher, delivers a signed site.active after a real issuance
against Pebble, to a receiver on loopback."""

from __future__ import annotations

import json

import pytest
from standardwebhooks.webhooks import Webhook

from pipeline import db
from pipeline.crypto.keys import load_or_create_pipeline_key
from pipeline.webhooks import subscriptions
from tests.support.ports import wait_until
from tests.support.system import System
from tests.webhooks.conftest import LOCAL
from tests.webhooks.receiver import receiving

pytestmark = pytest.mark.integration


def test_a_worker_delivers_site_active_after_an_issuance(system: System) -> None:
    # The receiver is on loopback: allowed as its operator would allow it.
    system.extra_env["CERTMAN_WEBHOOK_ALLOWED_NETWORKS"] = "127.0.0.0/8"
    system.start(workers=0)
    key = load_or_create_pipeline_key(system.workdir / "pipeline.key")
    with receiving() as receiver:
        with db.session_scope(system.database_url) as session:
            _, secret = subscriptions.add(
                session, f"{receiver.url}/certman", ["site.active", "site.failed"],
                pipeline_key=key.public_key(), policy=LOCAL,
            )  # fmt: skip
        system.start_worker()
        system.start_beat()
        system.certman("domains", "add", "hooked.example.com")
        try:
            system.wait_active(["hooked.example.com"], timeout=120)
            wait_until(lambda: receiver.received, timeout=60, what="the site.active webhook",
                       every=0.5)  # fmt: skip
        except TimeoutError:
            print(system.logs())
            raise
        shown = json.loads(system.certman("domains", "show", "hooked.example.com", "--json").stdout)
    got = receiver.received[0]
    assert got.path == "/certman"
    payload = Webhook(secret).verify(got.body, got.headers)
    assert payload["type"] == "site.active"
    data = payload["data"]
    assert (data["domain"], data["renewal"], data["state"]) == (
        "hooked.example.com",
        False,
        "active",
    )
    assert data["certificate"]["serial"] == shown["certificate"]["serial"]
    # At least once, never another event for it: any repeat is the same message.
    assert {r.headers["webhook-id"] for r in receiver.received} == {got.headers["webhook-id"]}
    with db.session_scope(system.database_url) as session:
        [listed] = subscriptions.listing(session)
    assert (listed["delivered"], listed["pending"], listed["last_status_code"]) == (1, 0, 200)
