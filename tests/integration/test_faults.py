"""Issuance survives what production throws at it: crashes, flaky CAs, refusals, Redis restarts."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis
from acme import messages
from sqlalchemy import create_engine, text

from tests.support.ports import wait_until
from tests.support.system import System

pytestmark = pytest.mark.integration


def orders_placed(system: System) -> int:
    """Orders the CA created (a POST whose nonce was rejected does not create one)."""
    return system.pebble.log_text().count('Added order "')


def order_rows(system: System) -> list[tuple[str, str | None]]:
    engine = create_engine(str(system.database_url))
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT step, order_url FROM orders ORDER BY id"))
            return [(row[0], row[1]) for row in rows]
    finally:
        engine.dispose()


def test_flaky_nonces_every_domain_still_issued(redis_url: str, redis_client: redis.Redis) -> None:
    names = [f"nonce{i}.example.com" for i in range(4)]
    with System(redis_url=redis_url, pebble_options={"nonce_reject_percent": 30}) as system:
        system.start(workers=1)
        for name in names:
            system.certman("domains", "add", name)
        system.wait_active(names, timeout=120)
        assert "reject 30% of good nonces" in system.pebble.log_text()
        assert orders_placed(system) == len(names)


def test_a_refused_name_is_blocked_and_the_others_unaffected(
    redis_url: str, redis_client: redis.Redis
) -> None:
    with System(
        redis_url=redis_url, pebble_options={"blocklist": ["refused.example.com"]}
    ) as system:
        system.start(workers=1)
        system.certman("domains", "add", "refused.example.com")
        system.certman("domains", "add", "fine.example.com")
        system.wait_active(["fine.example.com"], timeout=90)

        def blocked() -> bool:
            return system.domains()["refused.example.com"]["state"] == "blocked"

        wait_until(blocked, timeout=60, what="the refused site to be blocked", every=0.5)
        error = system.domains()["refused.example.com"]["last_error"]
        assert "rejectedIdentifier" in error and "blocked until someone acts" in error


class _KnowsNoToken(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(404)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_validation_the_ca_fails_backs_off_instead_of_blocking(
    redis_url: str, redis_client: redis.Redis
) -> None:
    # The self-check reaches the edge, but the CA's fetch reaches a server that knows no token,
    # as when an AAAA record points elsewhere: the CA says "unauthorized". The customer can fix
    # that, so the site must try again later, not wait for someone to unblock it.
    elsewhere = ThreadingHTTPServer(("127.0.0.1", 0), _KnowsNoToken)
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
    try:
        with System(redis_url=redis_url) as system:
            system.pebble.http_port = elsewhere.server_address[1]
            system.start(workers=1)
            system.certman("domains", "add", "elsewhere.example.com")

            def ended() -> bool:
                return system.domains()["elsewhere.example.com"]["state"] in ("retrying", "blocked")

            wait_until(ended, timeout=90, what="the attempt to end", every=0.5)
            site = system.domains()["elsewhere.example.com"]
            assert site["state"] == "retrying"
            assert "unauthorized" in site["last_error"]
            assert "blocked" not in site["last_error"]
            assert site["next_attempt_at"] is not None
    finally:
        elsewhere.shutdown()
        elsewhere.server_close()


def test_dns_not_at_the_edge_yet_costs_the_ca_nothing_and_frees_the_slot(
    redis_url: str, redis_client: redis.Redis
) -> None:
    with System(redis_url=redis_url) as system:
        system.start(workers=1, edge=False)
        system.certman(
            "domains", "add", "not-yet.example.com", "--alias", "www.not-yet.example.com"
        )

        def ended() -> bool:
            return system.domains()["not-yet.example.com"]["state"] == "retrying"

        wait_until(ended, timeout=60, what="the pre-flight to end the attempt", every=0.5)
        site = system.domains()["not-yet.example.com"]
        # Every name at once, so that the dealer can fix them all before the next attempt.
        assert "DNS for not-yet.example.com does not reach the edge" in site["last_error"]
        assert "DNS for www.not-yet.example.com does not reach the edge" in site["last_error"]
        # No order, so no pending authorization and no failed validation at the CA; and no
        # order in flight, so a fleet of such sites cannot starve the others of slots.
        assert orders_placed(system) == 0
        assert json.loads(system.certman("status", "--json").stdout)["orders_in_flight"] == 0
        system.start_edge()
        system.certman("domains", "retry", "not-yet.example.com")  # the dealer pointed DNS
        system.wait_active(["not-yet.example.com"], timeout=90)
        assert system.domains()["not-yet.example.com"]["last_error"] is None


def test_worker_killed_mid_chain_the_order_completes_once(
    redis_url: str, redis_client: redis.Redis
) -> None:
    # A short visibility timeout makes the broker hand the killed worker's unacknowledged task
    # to the next worker within seconds (in production: 2 hours, then the sweeper's job). Not
    # too short: kombu also hands out again the live worker's own tasks held longer than it
    # (a retry's countdown, a step queued behind a busy pool on a loaded machine), and each
    # copy then waits on the order lock the other holds.
    visibility = 15
    env = {"CERTMAN_BROKER_VISIBILITY_TIMEOUT": str(visibility)}
    with System(redis_url=redis_url, extra_env=env, pebble_options={"va_sleep": True}) as system:
        system.start(workers=0)
        first = system.start_worker(concurrency=1)
        system.certman("domains", "add", "crash.example.com", "--alias", "www.crash.example.com")

        # Mid-chain with the step's message in the worker's hands (in Redis's unacked set): the
        # case redelivery covers. Between two steps the next one's message is briefly in no
        # list at all (Redis hands it to the worker's waiting BRPOP before the worker records
        # it as unacknowledged): a kill there loses it, and beat's sweep of stuck orders, not
        # redelivery, sends it again (tests/integration/test_renewal.py covers the sweeper).
        def mid_chain() -> bool:
            placed = any(
                step in ("placed", "challenged", "ready") for step, _ in order_rows(system)
            )
            return placed and redis_client.zcard("unacked_index") > 0

        wait_until(
            mid_chain, timeout=60, what="the order to be mid-chain, a step in hand", every=0.02
        )
        system.kill_worker(first, signal.SIGKILL)
        # The dead worker's order lock would expire within 90 s, the redelivered step waiting
        # for it: expire it now, as Redis would then (the step checks where the order stands).
        for key in redis_client.scan_iter(f"{system.redis_prefix}:lock:order:*"):
            redis_client.delete(key)

        # A starting worker restores unacknowledged tasks older than the visibility timeout at
        # once; a younger one only on kombu's periodic pass, a long while later. Start it when
        # the dead worker's task has aged past the timeout (kombu's delivery times).
        def dead_task_due() -> bool:
            oldest = redis_client.zrange("unacked_index", 0, 0, withscores=True)
            return not oldest or time.time() - float(oldest[0][1]) > visibility + 0.5

        wait_until(dead_task_due, timeout=60, what="the dead worker's task to be due again")
        system.start_worker(concurrency=2)
        try:
            system.wait_active(["crash.example.com"], timeout=180)
        except TimeoutError:
            print(system.logs())
            raise
        rows = order_rows(system)
        assert [step for step, _ in rows] == ["done"]
        assert orders_placed(system) == 1


@pytest.fixture
def in_process(system: System, monkeypatch: pytest.MonkeyPatch) -> Iterator[System]:
    """The system's CA, database and Redis, with the steps called here rather than by workers,
    so that a test can stop one between two of its requests."""
    from pipeline import runtime

    system.start(workers=0)
    for key, value in system.env.items():
        monkeypatch.setenv(key, value)
    runtime.reset(close=True, settings=True)
    try:
        yield system
    finally:
        runtime.reset(close=True, settings=True)


def _steps() -> Any:
    """The steps over the process's runtime, run here as a worker runs them."""
    from pipeline import runtime
    from pipeline.issuance import OrderSteps

    return OrderSteps(runtime.current())


def _start_order(name: str) -> int:
    from pipeline.fleet.dispatch import start_due
    from pipeline.fleet.sites import add_site, parse_site
    from tests.support.from_settings import session_scope, site_rules

    with session_scope() as session:
        add_site(session, parse_site(name, rules=site_rules()))
    with session_scope() as session:
        [started] = start_due(session, limit=1)
    return started.order_id


def _order(order_id: int) -> tuple[str, str | None]:
    from pipeline.models import Order
    from tests.support.from_settings import session_scope

    with session_scope() as session:
        order = session.get(Order, order_id)
        assert order is not None
        return order.step, order.order_url


def test_place_order_rerun_after_a_failed_authorization_fetch_resumes_the_ca_order(
    in_process: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import runtime
    from pipeline.errors import RetryLater

    order_id = _start_order("resume.example.com")
    client = runtime.current().acme
    with monkeypatch.context() as patch:

        def unreachable(url: str) -> None:
            raise RetryLater("ACME server unreachable: as if the network blinked", 10)

        patch.setattr(client, "get_authorization", unreachable)
        with pytest.raises(RetryLater):
            _steps().place_order(order_id)
    step, first_url = _order(order_id)
    assert step == "queued" and first_url is not None
    _steps().place_order(order_id)
    assert _order(order_id) == ("placed", first_url)
    assert orders_placed(in_process) == 1


def test_place_order_rerun_replaces_a_ca_order_that_went_invalid(
    in_process: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import runtime
    from pipeline.errors import RetryLater

    order_id = _start_order("expired.example.com")
    client = runtime.current().acme
    fetch = client.get_authorization
    with monkeypatch.context() as patch:

        def deactivate_then_fail(url: str) -> None:
            # Deactivating an authorization makes its order invalid, as expiry would.
            client.acme.deactivate_authorization(
                messages.AuthorizationResource(body=fetch(url), uri=url)
            )
            raise RetryLater("ACME server unreachable: as if the network blinked", 10)

        patch.setattr(client, "get_authorization", deactivate_then_fail)
        with pytest.raises(RetryLater):
            _steps().place_order(order_id)
    _, first_url = _order(order_id)
    _steps().place_order(order_id)
    step, second_url = _order(order_id)
    assert step == "placed" and second_url not in (None, first_url)
    assert orders_placed(in_process) == 2


def test_place_order_rerun_replaces_a_ca_order_the_ca_no_longer_knows(
    in_process: System,
) -> None:
    # As after a CA restart (Pebble keeps nothing) or its clean-up of old orders: the CA
    # answers 404 for the recorded order, so the step places a new one instead of failing.
    from pipeline.models import Order
    from tests.support.from_settings import session_scope

    order_id = _start_order("forgotten.example.com")
    gone = in_process.pebble.directory_url.replace("/dir", "/my-order/forgotten")
    with session_scope() as session:
        order = session.get(Order, order_id)
        assert order is not None
        order.order_url = gone
    _steps().place_order(order_id)
    step, url = _order(order_id)
    assert step == "placed" and url not in (None, gone)
    assert orders_placed(in_process) == 1


def _step_until(step: Callable[[int], None], order_id: int, reached: str) -> None:
    """Run a step as its task would, again after each wait, until the order reaches ``reached``."""
    from pipeline.errors import RetryLater

    def done() -> bool:
        try:
            step(order_id)
        except RetryLater:
            return False
        return _order(order_id)[0] == reached

    wait_until(done, timeout=60, what=f"the order to reach {reached}", every=0.2)


def test_a_certificate_stored_while_redis_fails_is_published_by_the_retry(
    in_process: System, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import runtime
    from pipeline.errors import RetryLater

    order_id = _start_order("unpublished.example.com")
    _step_until(_steps().place_order, order_id, "placed")
    _step_until(_steps().publish_challenges, order_id, "challenged")
    _step_until(_steps().poll_validation, order_id, "ready")
    _step_until(_steps().finalise, order_id, "issued")
    with monkeypatch.context() as patch:

        def redis_gone(record: object) -> None:
            raise redis.ConnectionError("Connection reset by peer")

        patch.setattr(runtime.current().publisher, "publish", redis_gone)
        with pytest.raises(RetryLater, match="not yet published to the edges"):
            _steps().encrypt_and_store(order_id)
    assert _order(order_id)[0] == "done"  # stored: the certificate is not lost
    prefix = in_process.redis_prefix
    assert redis_client.hget(f"{prefix}:index", "unpublished.example.com") is None
    _steps().encrypt_and_store(order_id)  # the task's retry
    entry = redis_client.hget(f"{prefix}:index", "unpublished.example.com")
    assert entry is not None and entry.split(b"\t")[1] == b"1"  # has its certificate


def test_an_edge_that_lacks_the_probe_is_our_outage_not_the_dealers_dns(
    in_process: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    # DNS reaches the edge, but the edge cannot see the probe (as when it lost Redis): wait
    # for that to end, without counting a failure against the site or placing an order.
    from pipeline import runtime
    from pipeline.errors import RetryLater

    order_id = _start_order("our-outage.example.com")
    monkeypatch.setattr(runtime.current().publisher, "set_challenge", lambda *args: None)
    with pytest.raises(RetryLater, match="without the challenge .is it connected to Redis"):
        _steps().place_order(order_id)
    assert _order(order_id) == ("queued", None)
    assert orders_placed(in_process) == 0


class _OverIPv6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _HangsUp(BaseHTTPRequestHandler):
    """Takes the connection, then closes it without an answer."""

    def handle(self) -> None:
        self.connection.close()


@pytest.mark.parametrize(
    ("handler", "found"),
    [
        (_KnowsNoToken, r"\[::1\]:\d+ answered 404"),
        (_HangsUp, r"\[::1\]:\d+ accepted the connection, then"),
    ],  # fmt: skip
)
def test_an_aaaa_record_pointing_elsewhere_is_found_before_ordering(
    in_process: System, handler: type[BaseHTTPRequestHandler], found: str
) -> None:
    # The CA tries IPv6 first and falls back to IPv4 only when no connection is made there;
    # anything else fails the validation. So must the self-check, or a stray AAAA record
    # would cost a failed validation instead of no order at all.
    from pipeline.errors import AttemptFailed

    elsewhere = _OverIPv6(("::1", in_process.http_port), handler)
    threading.Thread(target=elsewhere.serve_forever, daemon=True).start()
    try:
        record = {"host": "six.example.com.", "addresses": ["::1"]}
        urllib.request.urlopen(
            f"http://127.0.0.1:{in_process.pebble.dns_management_port}/add-aaaa",
            json.dumps(record).encode(),
            timeout=10,
        ).close()
        order_id = _start_order("six.example.com")
        with pytest.raises(AttemptFailed, match=found):
            _steps().place_order(order_id)
        assert orders_placed(in_process) == 0
    finally:
        elsewhere.shutdown()
        elsewhere.server_close()


def test_finalise_keeps_the_key_of_the_csr_another_copy_posted_first(
    in_process: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two copies of finalise (one outlived its lock): the other stores its key and posts its
    # CSR while this one is making its own key. The key kept must be the one the CA certifies.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from pipeline import issuance, runtime
    from pipeline.crypto import certificates
    from pipeline.models import Order
    from tests.support.from_settings import session_scope

    order_id = _start_order("two-copies.example.com")
    _step_until(_steps().place_order, order_id, "placed")
    _step_until(_steps().publish_challenges, order_id, "challenged")
    _step_until(_steps().poll_validation, order_id, "ready")
    made = certificates.new_sealed_request

    def while_the_other_copy_posts(*args: Any, **kwargs: Any) -> certificates.SealedRequest:
        theirs = made(*args, **kwargs)
        with session_scope() as session:
            order = session.get(Order, order_id)
            assert order is not None and order.finalize_url is not None
            order.csr_pem, order.key_envelope = theirs.csr_pem, theirs.key_envelope
            finalize_url = order.finalize_url
        csr = x509.load_pem_x509_csr(theirs.csr_pem.encode())
        runtime.current().acme.finalize(finalize_url, csr.public_bytes(serialization.Encoding.DER))
        monkeypatch.setattr(issuance, "new_sealed_request", made)
        return made(*args, **kwargs)  # this copy's own key, made meanwhile

    monkeypatch.setattr(issuance, "new_sealed_request", while_the_other_copy_posts)
    _step_until(_steps().finalise, order_id, "issued")
    _steps().encrypt_and_store(order_id)  # checks the chain against the stored CSR's key
    assert _order(order_id)[0] == "done"


def test_publish_challenges_rerun_after_its_answer_went_out(in_process: System) -> None:
    """The window the SIGKILL test may or may not hit: the challenge answered, the worker gone
    before the step was recorded. The re-run must not fail the order on the CA's refusal of a
    second answer."""
    from pipeline import runtime
    from pipeline.models import Order, OrderStep
    from tests.support.from_settings import session_scope

    order_id = _start_order("rerun.example.com")
    _steps().place_order(order_id)
    _steps().publish_challenges(order_id)

    with session_scope() as session:
        order = session.get(Order, order_id)
        assert order is not None
        [(authz_url, authz)] = (order.authorizations or {}).items()
        order.step = OrderStep.PLACED  # as if the worker died before recording the step
    client = runtime.current().acme

    def answered() -> bool:
        challenges = client.get_authorization(authz_url).challenges
        mine = [c for c in challenges if c.uri == authz["challenge_url"]]
        return bool(mine) and mine[0].status.name != "pending"

    wait_until(answered, timeout=30, what="the CA to take the first answer")
    _steps().publish_challenges(order_id)  # the CA refuses the second answer
    assert _order(order_id)[0] == "challenged"
