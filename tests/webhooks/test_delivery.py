"""Delivery to a real receiver on loopback: signed, in order per site, retried, given up, at
least once with a stable id, under the outbound policy."""

from __future__ import annotations

import json
import ssl
from datetime import datetime, timedelta
from ipaddress import ip_network
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook

from pipeline.crypto.keys import Keyring
from pipeline.models import DeliveryStatus, WebhookDelivery, WebhookEvent
from pipeline.models.base import utcnow
from pipeline.webhooks import delivery, events, subscriptions, transport
from pipeline.webhooks.delivery import RetryPolicy
from tests.support.pki import Pki
from tests.webhooks.conftest import LOCAL, Store, Subscribe, record_event
from tests.webhooks.receiver import receiving

pytestmark = pytest.mark.usefixtures("nothing_leaves_loopback")


def _deliveries(store: Store) -> list[WebhookDelivery]:
    with store() as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def _claim(store: Store, now: datetime | None = None, **policy: float) -> list[delivery.Claim]:
    with store() as session:
        return delivery.claim_due(session, now=now or utcnow(), policy=RetryPolicy(**policy))


def _deliver(store: Store, claim: delivery.Claim | None, keyring: Keyring,
             **options: object) -> delivery.Result:  # fmt: skip
    assert claim is not None
    return delivery.deliver(store, *claim, keyring=keyring, outbound=LOCAL, **options)  # type: ignore[arg-type]


def _count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_delivered_signed_as_the_specification_says(
    store: Store, subscribe: Subscribe, keyring: Keyring
) -> None:
    with receiving() as receiver:
        _, secret = subscribe(f"{receiver.url}/hooks/t0k3n?x=1")
        record_event(store, "dealer.example.com", events.SITE_BLOCKED, error="rejectedIdentifier")
        [claimed] = _claim(store)
        before = _count("certman_webhook_deliveries_total", outcome="delivered")
        result = _deliver(store, claimed, keyring)
    assert result.outcome == "delivered"
    [got] = receiver.received
    assert got.path == "/hooks/t0k3n?x=1"
    assert got.headers["content-type"] == "application/json"
    # The receiver's own check, by the spec authors' verifier (timestamp tolerance included).
    payload = Webhook(secret).verify(got.body, got.headers)
    assert payload["type"] == "site.blocked"
    assert payload["data"] == {"domain": "dealer.example.com", "error": "rejectedIdentifier"}
    assert got.headers["webhook-id"].startswith("msg_")
    [row] = _deliveries(store)
    assert (row.status, row.attempts, row.last_status_code) == (DeliveryStatus.DELIVERED, 1, 200)
    assert _count("certman_webhook_deliveries_total", outcome="delivered") == before + 1
    with store() as session:
        [listed] = subscriptions.listing(session)
    assert (listed["delivered"], listed["pending"], listed["last_status_code"]) == (1, 0, 200)
    assert "t0k3n" not in json.dumps(listed)  # the URL is shown without its path


def test_500_then_200_is_retried_later_with_the_same_id_and_body(
    store: Store, subscribe: Subscribe, keyring: Keyring
) -> None:
    policy = RetryPolicy(first_delay=30.0)
    with receiving([500, 200]) as receiver:
        _, secret = subscribe(receiver.url)
        record_event(store, "dealer.example.com", reason="x")
        [claimed] = _claim(store)
        failures = _count("certman_webhook_delivery_failures_total", reason="http_5xx")
        first = _deliver(store, claimed, keyring, policy=policy)
        assert (first.outcome, first.reason) == ("retry", "http_5xx")
        [row] = _deliveries(store)
        assert row.status == DeliveryStatus.PENDING and row.last_error == "HTTP 500: no"
        # Backoff with jitter: between half and all of the first delay from now.
        wait = (row.next_attempt_at - utcnow()).total_seconds()
        assert 14 <= wait <= 30
        assert _claim(store) == []  # not due yet
        [again] = _claim(store, now=utcnow() + timedelta(seconds=31))
        second = _deliver(store, again, keyring, policy=policy)
    assert second.outcome == "delivered"
    assert _count("certman_webhook_delivery_failures_total", reason="http_5xx") == failures + 1
    first_try, second_try = receiver.received
    assert first_try.headers["webhook-id"] == second_try.headers["webhook-id"]
    assert first_try.body == second_try.body
    for attempt in (first_try, second_try):
        Webhook(secret).verify(attempt.body, attempt.headers)
    [row] = _deliveries(store)
    assert (row.status, row.attempts) == (DeliveryStatus.DELIVERED, 2)
    with store() as session:
        [listed] = subscriptions.listing(session)
    assert (listed["delivered"], listed["failed_attempts"]) == (1, 1)


def test_in_order_per_site_a_later_event_waits_for_the_earlier(
    store: Store, subscribe: Subscribe, keyring: Keyring
) -> None:
    policy = RetryPolicy(first_delay=30.0)
    with receiving([500]) as receiver:
        subscribe(receiver.url)
        record_event(store, "a.example.com", step=1)
        record_event(store, "a.example.com", step=2)
        record_event(store, "b.example.com", step=1)  # another site: not held up by a's
        first_a, second_a, first_b = (d.id for d in _deliveries(store))
        claims = dict(_claim(store))
        assert sorted(claims) == [first_a, first_b]  # a's second is not first in line
        assert _deliver(store, (first_a, claims[first_a]), keyring, policy=policy).outcome == (
            "retry"
        )
        assert _deliver(store, (first_b, claims[first_b]), keyring, policy=policy).outcome == (
            "delivered"
        )
        # A stray task for a's second (a made-up claim, say) sends nothing before a's first.
        assert _deliver(store, (second_a, claims[first_a]), keyring).outcome is None
        [again] = _claim(store, now=utcnow() + timedelta(seconds=31))
        assert again[0] == first_a
        done = _deliver(store, again, keyring, policy=policy)
        assert done.outcome == "delivered" and done.next is not None
        assert done.next[0] == second_a  # claimed for a task now
        assert _deliver(store, done.next, keyring).outcome == "delivered"
    sent = [(json.loads(r.body)["data"]["domain"], json.loads(r.body)["data"]["step"])
            for r in receiver.received]  # fmt: skip
    a_only = [step for domain, step in sent if domain == "a.example.com"]
    assert a_only == [1, 1, 2]


def test_given_up_after_the_bound_and_the_next_one_goes(
    store: Store, subscribe: Subscribe, keyring: Keyring
) -> None:
    policy = RetryPolicy(give_up_after=0.0)
    with receiving([503, 200]) as receiver:
        subscribe(receiver.url)
        record_event(store, "a.example.com", step=1)
        record_event(store, "a.example.com", step=2)
        first, second = (d.id for d in _deliveries(store))
        [claimed] = _claim(store)
        gave_up = _count("certman_webhook_deliveries_total", outcome="gave_up")
        result = _deliver(store, claimed, keyring, policy=policy)
        assert result.outcome == "gave_up" and result.next is not None
        assert result.next[0] == second
        assert _deliver(store, result.next, keyring, policy=policy).outcome == ("delivered")
    assert [d.status for d in _deliveries(store)] == [
        DeliveryStatus.GAVE_UP, DeliveryStatus.DELIVERED,
    ]  # fmt: skip
    assert _count("certman_webhook_deliveries_total", outcome="gave_up") == gave_up + 1
    with store() as session:
        [listed] = subscriptions.listing(session)
    assert (listed["given_up"], listed["delivered"]) == (1, 1)


def test_a_claim_is_a_lease_a_dead_worker_leaves_it_to_the_next_dispatch(
    store: Store, subscribe: Subscribe, keyring: Keyring
) -> None:
    with receiving() as receiver:
        subscribe(receiver.url)
        record_event(store, "a.example.com")
        [claimed] = _claim(store)
        assert _claim(store) == []  # claimed: not sent twice while its task may run
        # The worker died before sending: once the lease is over, it is claimed again.
        lease = RetryPolicy().lease
        [again] = _claim(store, now=utcnow() + timedelta(seconds=lease + 1))
        assert again[0] == claimed[0] and again[1] != claimed[1]
        # The first task, had it only waited in the queue, is stale now: it sends nothing.
        assert _deliver(store, claimed, keyring).outcome is None
        assert _deliver(store, again, keyring).outcome == "delivered"
        # A second copy of the task (redelivered by the broker) sends nothing again.
        assert _deliver(store, again, keyring).outcome is None
    assert len(receiver.received) == 1


def test_a_redirect_is_not_followed(store: Store, subscribe: Subscribe, keyring: Keyring) -> None:
    with receiving([200]) as elsewhere, receiving([302]) as redirector:
        redirector.location = f"{elsewhere.url}/stolen"
        subscribe(redirector.url)
        record_event(store, "a.example.com")
        [claimed] = _claim(store)
        result = _deliver(store, claimed, keyring)
    assert (result.outcome, result.reason) == ("retry", "redirect")
    assert elsewhere.received == [] and len(redirector.received) == 1
    [row] = _deliveries(store)
    assert row.last_error == f"HTTP 302 redirect to {elsewhere.url}/… not followed"


def test_an_address_the_policy_refuses_is_never_connected_to() -> None:
    with receiving() as receiver:
        only_private = transport.WebhookPolicy(allowed_networks=(ip_network("10.0.0.0/8"),))
        with pytest.raises(transport.SendFailed) as caught:
            transport.post(receiver.url, b"{}", {}, policy=only_private)
    assert caught.value.reason == "refused_address"
    assert "127.0.0.1" in str(caught.value) and receiver.received == []


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://169.254.169.254/latest", "cloud metadata service"),
        ("http://169.254.1.1/hook", "link-local"),
        ("ftp://platform.example.com/hook", "http:// or https://"),
        ("https://user:pw@platform.example.com/hook", "user name or password"),
        ("https://0x7f.1/hook", "non-standard form"),
        ("https://platform.example.com/hook#frag", "fragment"),
    ],
)
def test_a_refused_url_is_named_at_add(store: Store, subscribe: Subscribe, url: str,
                                       words: str) -> None:  # fmt: skip
    with pytest.raises(ValueError, match=words) as caught:
        subscribe(url)
    assert "pw" not in str(caught.value) and "latest" not in str(caught.value)
    with store() as session:
        assert subscriptions.listing(session) == []


def test_a_subscription_removed_takes_its_pending_deliveries(
    store: Store, subscribe: Subscribe
) -> None:
    first, _ = subscribe("https://platform.example.com/a")
    second, _ = subscribe("https://platform.example.com/b")
    record_event(store, "a.example.com")
    with store() as session:
        subscriptions.remove(session, first)
    assert [d.subscription_id for d in _deliveries(store)] == [second]
    with store() as session, pytest.raises(ValueError, match=f"no webhook subscription {first}"):
        subscriptions.remove(session, first)


def _server_context(pki: Pki, name: str, tmp_path: Path) -> ssl.SSLContext:
    chain, key, _ = pki.leaf([name])
    (tmp_path / "chain.pem").write_text(chain)
    (tmp_path / "key.pem").write_bytes(key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    return context


def test_over_tls_the_name_is_verified_on_the_checked_address(tmp_path: Path) -> None:
    pki = Pki()
    with receiving(tls=_server_context(pki, "localhost", tmp_path)) as receiver:
        port = receiver.server_address[1]
        # "localhost" may resolve to ::1 first, where nothing listens: the next address is used.
        answer = transport.post(f"https://localhost:{port}/h", b"{}", {}, policy=LOCAL,
                                tls=pki.client_context())  # fmt: skip
        assert answer.status == 200 and len(receiver.received) == 1
        with pytest.raises(transport.SendFailed) as caught:
            # A certificate the client does not trust (the system's roots): no request made.
            transport.post(f"https://localhost:{port}/h", b"{}", {}, policy=LOCAL)
    assert caught.value.reason == "tls" and len(receiver.received) == 1


def test_a_certificate_for_another_name_is_refused(tmp_path: Path) -> None:
    pki = Pki()
    with receiving(tls=_server_context(pki, "elsewhere.example.com", tmp_path)) as receiver:
        port = receiver.server_address[1]
        with pytest.raises(transport.SendFailed) as caught:
            transport.post(f"https://localhost:{port}/h", b"{}", {}, policy=LOCAL,
                           tls=pki.client_context())  # fmt: skip
    assert caught.value.reason == "tls" and receiver.received == []


def test_finished_deliveries_are_pruned_after_a_week_and_their_events_with_them(
    store: Store, subscribe: Subscribe, keyring: Keyring
) -> None:
    with receiving() as receiver:
        subscribe(receiver.url)
        record_event(store, "a.example.com")
        record_event(store, "b.example.com")
        for claimed in _claim(store):
            _deliver(store, claimed, keyring)
    record_event(store, "c.example.com")  # still pending: kept however old
    with store() as session:
        assert delivery.prune(session, now=utcnow() + timedelta(days=6)) == 0
    with store() as session:
        assert delivery.prune(session, now=utcnow() + timedelta(days=8)) == 2
    assert [(d.domain, d.status) for d in _deliveries(store)] == [
        ("c.example.com", DeliveryStatus.PENDING)
    ]
    with store() as session:
        assert list(session.scalars(select(WebhookEvent.domain))) == ["c.example.com"]
