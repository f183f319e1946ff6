"""What a review found in delivery: a stale or second copy of a task sending, one receiver
holding the workers, an attempt without an overall deadline, the URL's path echoed back,
internal receivers allowed by default, and events for a site sent out of commit order."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from datetime import datetime, timedelta
from ipaddress import ip_network

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from pipeline.crypto.keys import Keyring, PrivateKey
from pipeline.db import get_engine
from pipeline.models import DeliveryStatus, WebhookDelivery, WebhookEvent, WebhookSubscription
from pipeline.models.base import utcnow
from pipeline.webhooks import delivery, events, subscriptions, transport
from pipeline.webhooks.delivery import RetryPolicy
from tests.support.ports import wait_until
from tests.webhooks.conftest import LOCAL, Store, Subscribe, record_event
from tests.webhooks.receiver import receiving

pytestmark = pytest.mark.usefixtures("nothing_leaves_loopback")


def _claim(store: Store, now: datetime | None = None,
           policy: RetryPolicy = delivery.DEFAULT_POLICY) -> list[delivery.Claim]:  # fmt: skip
    with store() as session:
        return delivery.claim_due(session, now=now or utcnow(), policy=policy)


def _deliver(store: Store, claim: delivery.Claim, keyring: Keyring,
             **options: object) -> delivery.Result:  # fmt: skip
    return delivery.deliver(store, *claim, keyring=keyring, outbound=LOCAL, **options)  # type: ignore[arg-type]


def _listed(store: Store) -> dict[str, object]:
    with store() as session:
        [listed] = subscriptions.listing(session)
    return listed


# --- 1 and 12: only the task holding the current claim sends and records --------------------


def test_a_task_whose_claim_was_taken_over_while_it_sent_records_nothing(
    store: Store, subscribe: Subscribe, keyring: Keyring
) -> None:
    with receiving() as receiver:
        subscribe(receiver.url)
        record_event(store, "a.example.com")
        [claim] = _claim(store)
        calls: list[datetime] = []

        def now() -> datetime:
            calls.append(utcnow())
            if len(calls) == 3:  # the POST is made: the claim is taken over meanwhile
                with store() as session:
                    session.execute(update(WebhookDelivery).values(claim="another-copy-holds-it"))
            return calls[-1]

        result = delivery.deliver(store, *claim, keyring=keyring, outbound=LOCAL, now=now)
        # The other copy's claim: this one's tasks are spent whatever happens to it.
        assert _deliver(store, claim, keyring).outcome is None
    assert result.outcome is None and len(receiver.received) == 1
    with store() as session:
        row = session.scalars(select(WebhookDelivery)).one()
        assert (row.status, row.attempts, row.claim) == (
            DeliveryStatus.PENDING, 0, "another-copy-holds-it",
        )  # fmt: skip
    assert (_listed(store)["delivered"], _listed(store)["failed_attempts"]) == (0, 0)


def test_a_second_copy_of_a_task_sends_nothing(
    store: Store, subscribe: Subscribe, keyring: Keyring
) -> None:
    with receiving([500]) as receiver:
        subscribe(receiver.url)
        record_event(store, "a.example.com")
        [claim] = _claim(store)
        assert _deliver(store, claim, keyring).outcome == "retry"
        # The broker hands the same message out again (acks_late): its claim is used up, and
        # the backoff holds.
        assert _deliver(store, claim, keyring).outcome is None
    assert len(receiver.received) == 1
    assert _listed(store)["failed_attempts"] == 1


# --- 1: one receiver cannot take the workers -------------------------------------------------


def test_claims_per_subscription_are_capped_per_tick_and_in_flight(
    store: Store, subscribe: Subscribe
) -> None:
    busy, _ = subscribe("https://busy.example.com/h")
    for n in range(8):
        record_event(store, f"site{n}.example.com")
    policy = RetryPolicy(per_tick=3, in_flight=5)
    first = _claim(store, policy=policy)
    second = _claim(store, policy=policy)
    assert (len(first), len(second)) == (3, 2)
    assert _claim(store, policy=policy) == []  # five held: none until one is done
    # Another receiver is not held up by the first one's backlog.
    quiet, _ = subscribe("https://quiet.example.com/h", "site.blocked")
    with store() as session:
        events.record(session, event_type=events.SITE_BLOCKED, domain="q.example.com", data={})
    [other] = _claim(store, policy=policy)
    with store() as session:
        assert session.get(WebhookDelivery, other[0]).subscription_id == quiet  # type: ignore[union-attr]
    # Once the leases are over (the tasks died), the claims count no more.
    later = utcnow() + timedelta(seconds=policy.lease + 1)
    again = dict(_claim(store, now=later, policy=policy))
    with store() as session:
        owners = [session.get(WebhookDelivery, d).subscription_id for d in again]  # type: ignore[union-attr]
    assert sorted(owners) == sorted([busy] * 3 + [quiet])


def test_a_failing_receiver_is_backed_off_as_a_whole_then_probed_one_at_a_time(
    store: Store, subscribe: Subscribe, keyring: Keyring
) -> None:
    policy = RetryPolicy(first_delay=30.0, failures_to_pause=2)
    options = {"policy": policy, "rand": lambda: 1.0}
    with receiving([500] * 10) as receiver:
        subscribe(receiver.url)
        for n in range(4):
            record_event(store, f"site{n}.example.com")
        claims = _claim(store, policy=policy)
        assert len(claims) == 4
        assert _deliver(store, claims[0], keyring, **options).outcome == "retry"
        assert _deliver(store, claims[1], keyring, **options).outcome == "retry"
        # Two failures in a row: the receiver is left alone; tasks already sent send nothing.
        assert _deliver(store, claims[2], keyring, **options).outcome is None
        assert _deliver(store, claims[3], keyring, **options).outcome is None
        assert len(receiver.received) == 2
        with store() as session:
            paused_until = session.scalars(select(WebhookSubscription.paused_until)).one()
        assert paused_until is not None
        assert 59 <= (paused_until - utcnow()).total_seconds() <= 61  # delay(2) = 60 s
        # Its deliveries' own retries (30 s) are due before the pause ends: still nothing.
        assert _claim(store, now=utcnow() + timedelta(seconds=45), policy=policy) == []
        # After it, one delivery at a time until one gets a 2xx.
        probe = _claim(store, now=utcnow() + timedelta(seconds=62), policy=policy)
        assert len(probe) == 1
        assert _claim(store, now=utcnow() + timedelta(seconds=63), policy=policy) == []


# --- 2: one deadline for the whole attempt ---------------------------------------------------


def test_a_receiver_trickling_its_answer_fails_at_the_deadline() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def trickle() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            for byte in answer:  # a byte every 0.2 s: each read is quick, the whole is not
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return  # the client gave up
                time.sleep(0.2)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(transport.SendFailed) as caught:
            transport.post(f"http://127.0.0.1:{port}/h", b"{}", {}, policy=LOCAL, timeout=1.0)
    finally:
        thread.join(timeout=15)
        listener.close()
    took = time.monotonic() - started
    assert caught.value.reason == "timeout"
    assert took < 3.0, f"the attempt took {took:.1f} s for a 1 s deadline"


# --- 5: the URL's path is never echoed back into the store or a log --------------------------


def test_a_receiver_echoing_the_path_does_not_leak_it(
    store: Store, subscribe: Subscribe, keyring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    with receiving([404, 404]) as receiver:
        # Receivers echo the path they were sent, decoded or not, without the query.
        receiver.answer = lambda path: f"Cannot POST {path.split('?')[0]}".encode()
        subscribe(f"{receiver.url}/hooks/t0k3n%21?x=1")
        record_event(store, "a.example.com")
        [claim] = _claim(store)
        with caplog.at_level(logging.WARNING):
            assert _deliver(store, claim, keyring).reason == "http_4xx"
        receiver.answer = lambda path: (
            f"Cannot POST {path.split('?')[0].replace('%21', '!')}".encode()
        )
        [again] = _claim(store, now=utcnow() + timedelta(seconds=60))
        assert _deliver(store, again, keyring).reason == "http_4xx"
    with store() as session:
        row = session.scalars(select(WebhookDelivery)).one()
        assert row.last_error == "HTTP 404: Cannot POST …"
    listed = json.dumps(_listed(store), ensure_ascii=False)
    assert "t0k3n" not in listed and "HTTP 404: Cannot POST …" in listed
    assert "t0k3n" not in caplog.text and "Cannot POST …" in caplog.text


def test_an_exception_text_does_not_carry_the_path() -> None:
    # Nothing listens there: the refused connection's error names only scheme, host and port.
    unused = socket.create_server(("127.0.0.1", 0))
    port = unused.getsockname()[1]
    unused.close()
    with pytest.raises(transport.SendFailed) as caught:
        transport.post(f"http://127.0.0.1:{port}/hooks/t0k3n", b"{}", {}, policy=LOCAL)
    assert "t0k3n" not in str(caught.value) and f"127.0.0.1:{port}/…" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://platform.example.com/hooks/a b",
        "https://platform.example.com/hooks/a\nb",
        "https://platform.example.com/hoo\tks",
        "https://platform.example.com/hooks\x00",
    ],
)
def test_a_url_with_whitespace_or_control_characters_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="spaces or control characters"):
        transport.check_url(url)


# --- 6: internal receivers only where the operator allows them ------------------------------


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://127.0.0.1:8080/h", "CERTMAN_WEBHOOK_ALLOWED_NETWORKS"),
        ("http://[::1]/h", "CERTMAN_WEBHOOK_ALLOWED_NETWORKS"),
        ("http://10.1.2.3/h", "CERTMAN_WEBHOOK_ALLOWED_NETWORKS"),
        ("http://192.168.0.9/h", "CERTMAN_WEBHOOK_ALLOWED_NETWORKS"),
        ("http://100.64.0.1/h", "CERTMAN_WEBHOOK_ALLOWED_NETWORKS"),
        ("http://[::ffff:10.0.0.1]/h", "10.0.0.1"),
        ("http://169.254.1.1/h", "link-local"),
        ("http://169.254.169.254/h", "cloud metadata service"),
    ],
)
def test_internal_receivers_are_refused_by_default(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        transport.check_url(url)


def test_allowed_networks_let_internal_receivers_in_but_never_metadata() -> None:
    policy = transport.WebhookPolicy(
        allowed_networks=(ip_network("10.0.0.0/8"), ip_network("169.254.0.0/16"))
    )
    assert transport.check_url("http://10.1.2.3/h", policy) == "http://10.1.2.3/h"
    assert transport.check_url("http://169.254.1.1/h", policy) == "http://169.254.1.1/h"
    with pytest.raises(ValueError, match="cloud metadata service"):
        transport.check_url("http://169.254.169.254/h", policy)
    with pytest.raises(ValueError, match="CERTMAN_WEBHOOK_ALLOWED_NETWORKS"):
        transport.check_url("http://127.0.0.1/h", policy)
    # Public addresses need no setting.
    assert transport.check_url("https://93.184.216.34/h") == "https://93.184.216.34/h"


def test_a_loopback_receiver_is_not_connected_to_unless_allowed() -> None:
    with receiving() as receiver:
        with pytest.raises(transport.SendFailed) as caught:
            transport.post(receiver.url, b"{}", {})
        assert caught.value.reason == "refused_address" and receiver.received == []
        assert transport.post(receiver.url, b"{}", {}, policy=LOCAL).status == 200


def test_the_setting_is_read_as_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.settings import Settings

    monkeypatch.setenv("CERTMAN_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8, ::1/128 10.0.0.0/8")
    assert Settings().webhook_allowed_networks == (  # type: ignore[call-arg]
        ip_network("127.0.0.0/8"), ip_network("::1/128"), ip_network("10.0.0.0/8"),
    )  # fmt: skip
    monkeypatch.setenv("CERTMAN_WEBHOOK_ALLOWED_NETWORKS", "10.0.0.1/8")
    with pytest.raises(ValueError, match="host bits set"):
        Settings()  # type: ignore[call-arg]


# --- 11: events for a site are written one transaction at a time -----------------------------


def test_events_for_one_site_are_written_one_transaction_at_a_time(
    pg_database_url: str, pipeline_key: PrivateKey
) -> None:
    engine = get_engine(pg_database_url)
    domain = "ordered.example.com"
    with Session(engine) as session:
        subscription, _ = subscriptions.add(
            session, "https://platform.example.com/h", ["site.failed"],
            pipeline_key=pipeline_key.public_key(),
        )  # fmt: skip
        session.commit()
        subscription_id = subscription.id
    first, second = Session(engine), Session(engine)
    done = threading.Event()

    def later() -> None:
        events.record(second, event_type=events.SITE_FAILED, domain=domain, data={"step": 2})
        second.commit()
        done.set()

    def waiting_on_the_lock() -> bool:
        with engine.connect() as watcher:
            return bool(
                watcher.execute(
                    text(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                    )
                ).scalar()
            )

    try:
        events.record(first, event_type=events.SITE_FAILED, domain=domain, data={"step": 1})
        thread = threading.Thread(target=later, daemon=True)
        thread.start()
        # The later transaction waits for the earlier one's commit before writing its event.
        wait_until(waiting_on_the_lock, timeout=10, what="the second writer to wait")
        assert not done.is_set()
        first.commit()
        thread.join(timeout=10)
        assert done.is_set()
        with Session(engine) as session:
            steps = [
                event.data["step"]
                for event in session.scalars(
                    select(WebhookEvent)
                    .join(WebhookDelivery, WebhookDelivery.event_id == WebhookEvent.id)
                    .where(WebhookEvent.domain == domain)
                    .order_by(WebhookDelivery.id)
                )
            ]
        assert steps == [1, 2]
    finally:
        first.close()
        second.close()
        with Session(engine) as session:
            session.execute(
                delete(WebhookSubscription).where(WebhookSubscription.id == subscription_id)
            )
            session.execute(delete(WebhookEvent).where(WebhookEvent.domain == domain))
            session.commit()
