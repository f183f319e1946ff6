"""Renewals, ARI, re-seal migration and stuck orders, end to end against Pebble.

Beat's intervals are minutes (celery.conf.py); where a test cannot wait for them it sends the
beat task itself with ``celery call``, to the real worker, as beat would.
"""

from __future__ import annotations

import json
import re
import signal
import ssl
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from sqlalchemy import select, update

from pipeline.crypto.envelope import Scheme
from pipeline.crypto.keys import generate_keypair
from pipeline.models import Certificate, Order, OrderKind, OrderStep
from pipeline.models.base import utcnow
from tests.integration.test_issuance import fetch_certificate
from tests.support.from_settings import session_scope
from tests.support.ports import wait_until
from tests.support.system import System

pytestmark = pytest.mark.integration


@pytest.fixture
def make_system(redis_url: str, redis_client: redis.Redis) -> Iterator[Any]:
    systems: list[System] = []

    def make(**kwargs: Any) -> System:
        system = System(redis_url=redis_url, **kwargs)
        systems.append(system)
        return system

    yield make
    for system in systems:
        system.close()


def served_serial(system: System, name: str) -> str:
    cert = fetch_certificate(system.https_port, name, system.pebble.root_pem())
    return format(cert.serial_number, "x")


def current_cert(system: System, domain: str) -> Certificate:
    with session_scope(system.database_url) as s:
        cert = s.scalar(
            select(Certificate)
            .join(Certificate.site)
            .where(Certificate.current, Certificate.site.has(domain=domain))
        )
        assert cert is not None
        return cert


def directory(system: System) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(system.pebble.ca_bundle))
    url = system.pebble.directory_url
    with urllib.request.urlopen(url, context=context, timeout=30) as response:
        return dict(json.load(response))


def test_short_certificates_renewed_by_beat_at_two_thirds(make_system: Any) -> None:
    """60-second certificates: beat renews them on the lifetime rule, with ``replaces``."""
    system = make_system(pebble_options={"validity_seconds": 60})
    system.start(workers=1)
    system.start_beat()
    name = "short-lived.example.com"
    system.certman("domains", "add", name)
    try:
        first = system.wait_active([name], timeout=90)[name]
        old = current_cert(system, name)
        # The lifetime rule: 2/3 of the certificate's own 60 s, minus at most 10 % spread.
        lifetime = old.not_after - old.not_before
        assert old.not_before + lifetime * 0.56 <= old.renew_at <= old.not_before + lifetime * 0.67
        # The pipeline publishes to Redis after its commit: the edge may not have it yet.
        wait_until(lambda: served_serial(system, name) == first["serial"], timeout=30,
                   what="the edge to serve the certificate")  # fmt: skip

        def renewed() -> bool:
            row = system.domains()[name]
            return row["state"] == "active" and row["serial"] != first["serial"]

        wait_until(renewed, timeout=150, what="beat to renew the certificate", every=0.5)
        new = system.domains()[name]
        wait_until(lambda: served_serial(system, name) == new["serial"], timeout=30,
                   what="the edge to serve the new certificate")  # fmt: skip
    except (TimeoutError, AssertionError):
        print(system.logs())
        raise
    assert "renewalInfo" in directory(system)  # so new_order sent ``replaces``
    with session_scope(system.database_url) as s:
        order = s.scalar(select(Order).where(Order.kind == OrderKind.RENEW))
        assert order is not None and order.step == OrderStep.DONE
        assert order.replaces == old.ari_id and order.replaces is not None
    # Pebble's ARI windows for such short certificates are nonsense: never stored as usable.
    renewed_cert = current_cert(system, name)
    assert renewed_cert.ari_window_start is None


def test_ari_refresh_moves_renewal_into_the_window(make_system: Any) -> None:
    """A normal 90-day certificate: refresh_ari stores the CA's window and renews inside it."""
    system = make_system(pebble_options={"validity_seconds": 90 * 86400})
    system.start(workers=1)
    name = "ari.example.com"
    system.certman("domains", "add", name)
    try:
        system.wait_active([name], timeout=90)
        before = current_cert(system, name)
        assert before.ari_checked_at is None
        system.call_task("certman.maintenance.refresh_ari")
        wait_until(lambda: current_cert(system, name).ari_checked_at is not None, timeout=60,
                   what="refresh_ari to check the certificate")  # fmt: skip
    except (TimeoutError, AssertionError):
        print(system.logs())
        raise
    cert = current_cert(system, name)
    assert cert.ari_window_start is not None and cert.ari_window_end is not None
    assert cert.not_before < cert.ari_window_start < cert.ari_window_end < cert.not_after
    assert cert.ari_window_start <= cert.renew_at <= cert.ari_window_end


def test_reseal_migration_from_legacy_rsa(make_system: Any) -> None:
    """Issue sealed to legacy-rsa, switch the pipeline to hpke-x25519, ``certman renew``."""
    system = make_system()
    system.start(workers=0, edge=False)
    legacy_id = generate_keypair(system.key_dir, Scheme.LEGACY_RSA)
    # The edge's key directory holds both keys; the pipeline seals to the legacy one first.
    system.extra_env["CERTMAN_EDGE_PUBLIC_KEY"] = str(system.key_dir / f"{legacy_id}.pub")
    system.start_edge()
    worker = system.start_worker()
    names = ["legacy-one.example.com", "legacy-two.example.net"]
    for name in names:
        system.certman("domains", "add", name)
    try:
        before = system.wait_active(names, timeout=90)
        status = json.loads(system.certman("keys", "status", "--json").stdout)
        envelopes = [r for r in status if r["purpose"] == "envelope"]  # signing rows follow
        assert [(r["scheme"], r["certificates"]) for r in envelopes] == [("legacy-rsa", 2)]

        system.extra_env["CERTMAN_EDGE_PUBLIC_KEY"] = str(system.edge_public_key)
        system.kill_worker(worker, signal.SIGTERM)
        system.start_worker()
        system.start_beat()
        out = system.certman("renew", "--scheme", "legacy-rsa", "--within", "1m").stdout
        assert out.startswith("2 certificates")

        def resealed() -> bool:
            rows = json.loads(system.certman("keys", "status", "--json").stdout)
            envelopes = [r for r in rows if r["purpose"] == "envelope"]
            return [(r["scheme"], r["certificates"]) for r in envelopes] == [("hpke-x25519", 2)]

        wait_until(resealed, timeout=150, what="both sites re-sealed to hpke-x25519", every=0.5)
        after = system.wait_active(names, timeout=60)
        for name in names:
            assert after[name]["serial"] != before[name]["serial"]
            wait_until(lambda n=name: served_serial(system, n) == after[n]["serial"], timeout=30,
                       what=f"the edge to serve the re-sealed {name}")  # fmt: skip
    except (TimeoutError, AssertionError):
        print(system.logs())
        raise


def test_stuck_order_found_and_completed_by_the_sweeper(
    make_system: Any, redis_client: redis.Redis
) -> None:
    """A worker SIGKILLed while holding the order's retry: the message is lost; the sweeper
    re-sends the chain from the order's step and the site is issued."""
    system = make_system()
    system.start(workers=0)
    # The store is new, so the first order is order 1. Holding its lock makes every run of its
    # first step wait on a retry countdown, a message the worker holds until it is due.
    lock = f"{system.redis_prefix}:lock:order:1"
    redis_client.set(lock, "the test", ex=300)
    worker = system.start_worker()
    name = "stuck.example.com"
    system.certman("domains", "add", name)

    def order() -> Order | None:
        with session_scope(system.database_url) as s:
            return s.scalar(select(Order).where(Order.kind == OrderKind.ISSUE))

    try:
        waiting = re.compile(r"certman\.issue\.place_order\[[^]]+\] retry: Retry in")
        wait_until(lambda: waiting.search(system.log_text()), timeout=60,
                   what="the first step to wait on a retry")  # fmt: skip
        system.kill_worker(worker)  # SIGKILL: its retry message dies with it (acked late,
        # but the Redis transport only redelivers after the 2-hour visibility timeout)
        stuck = order()
        assert stuck is not None and stuck.id == 1 and stuck.step == OrderStep.QUEUED
        redis_client.delete(lock)
        with session_scope(system.database_url) as s:  # as if CERTMAN_STUCK_AFTER had passed
            s.execute(
                update(Order)
                .where(Order.id == stuck.id)
                .values(touched_at=utcnow() - timedelta(hours=1))
            )
        listed = json.loads(system.certman("orders", "stuck", "--json").stdout)
        assert [(r["domain"], r["order_id"], r["step"]) for r in listed] == [
            (name, stuck.id, "queued")
        ]
        system.start_worker()
        system.call_task("certman.maintenance.sweep_stuck_orders")
        system.wait_active([name], timeout=120)
    except (TimeoutError, AssertionError):
        print(system.logs())
        raise
    assert f"order {stuck.id} for {name} stuck at queued: sent again" in system.log_text()
    assert json.loads(system.certman("orders", "stuck", "--json").stdout) == []
    serial = system.domains()[name]["serial"]
    wait_until(lambda: served_serial(system, name) == serial, timeout=30,
               what="the edge to serve the certificate")  # fmt: skip


# --- ARI renewals and the rate limiter ------------------------------------------------------------
def spent_buckets(client: redis.Redis, prefix: str = "certman") -> dict[str, dict[bytes, bytes]]:
    """Every issuance bucket of the limiter in Redis with its state (request pacing left out:
    every request paces, exempt or not)."""
    return {
        key.decode().split(":rl:b:", 1)[1]: client.hgetall(key)
        for key in client.scan_iter(f"{prefix}:rl:b:*")
        if ":rl:b:pace:" not in key.decode()
    }


def renew_as_dispatched_at(system: System, domain: str, at: datetime) -> Order:
    """Start the site's renewal as beat's dispatcher would at ``at`` (a moment this test cannot
    wait for: the middle of a 90-day certificate's life) and have the chain sent by the
    sweeper, as for an order nobody touched; the steps run now, against Pebble."""
    from pipeline.fleet.dispatch import start_due

    with session_scope(system.database_url) as s:
        [started] = start_due(s, limit=10, now=at)
        assert started.domain == domain and started.kind == OrderKind.RENEW
        s.execute(update(Order).where(Order.id == started.order_id)
                  .values(touched_at=utcnow() - timedelta(hours=1)))  # fmt: skip
    system.call_task("certman.maintenance.sweep_stuck_orders")

    def renewed() -> bool:
        with session_scope(system.database_url) as s:
            return s.scalar(select(Order.step).where(Order.id == started.order_id)) == "done"

    wait_until(renewed, timeout=120, what="the renewal to be issued")
    with session_scope(system.database_url) as s:
        order = s.get(Order, started.order_id)
        assert order is not None
        s.expunge(order)
        return order


def test_a_renewal_inside_the_ari_window_with_replaces_spends_no_tokens(
    make_system: Any, redis_client: redis.Redis
) -> None:
    """90-day certificates (Pebble's windows are sensible for them): the CA's window is stored,
    and a renewal inside it carries ``replaces`` and leaves every issuance bucket as it was."""
    system = make_system(pebble_options={"validity_seconds": 90 * 86400},
                         extra_env={"CERTMAN_RATE_LIMITS": "on"})  # fmt: skip
    system.start(workers=1)
    name = "exempt.example.com"
    system.certman("domains", "add", name)
    try:
        system.wait_active([name], timeout=90)
        spent = spent_buckets(redis_client)
        # The first certificate was counted, as every new order is.
        assert {b.split(":")[0] for b in spent} >= {"new-orders", "certs-per-domain",
                                                     "duplicate-certs"}  # fmt: skip
        system.call_task("certman.maintenance.refresh_ari")
        wait_until(lambda: current_cert(system, name).ari_checked_at is not None, timeout=60,
                   what="refresh_ari to check the certificate")  # fmt: skip
        old = current_cert(system, name)
        assert old.ari_status == "window" and old.ari_window_start and old.ari_window_end
        assert old.ari_window_start <= old.renew_at < old.ari_window_end
        show = json.loads(system.certman("domains", "show", name, "--json").stdout)
        assert show["renewal"]["ari"]["status"] == "window"
        order = renew_as_dispatched_at(system, name, old.renew_at + timedelta(seconds=1))
    except (TimeoutError, AssertionError):
        print(system.logs())
        raise
    assert order.exempt and order.replaces == old.ari_id is not None
    assert current_cert(system, name).serial != old.serial
    # Not one token, in any issuance bucket: none new and none changed (a bucket's state changes
    # only when a token is taken). One may be gone: its key expires once the bucket is full
    # again (36 s for new-orders), which is no spending; a slow run gets there.
    after = spent_buckets(redis_client)
    assert set(after) <= set(spent), set(after) - set(spent)
    assert {key: after[key] for key in after} == {key: spent[key] for key in after}


def test_short_certificates_get_a_window_past_expiry_so_their_renewals_are_counted(
    make_system: Any, redis_client: redis.Redis
) -> None:
    """Why a renewal of a 240 s Pebble certificate carries ``replaces`` yet spends tokens, with
    no window stored: Pebble's window is 2/3 of the lifetime +/- 24 hours, so for a short
    certificate it ends a day after expiry, which certman ignores (lifetime rule, no
    exemption). The certificates' length, not a bug: 90-day ones are exempt (above)."""
    system = make_system(pebble_options={"validity_seconds": 240},
                         extra_env={"CERTMAN_RATE_LIMITS": "on"})  # fmt: skip
    system.start(workers=1)
    name = "short-ari.example.com"
    system.certman("domains", "add", name)
    try:
        system.wait_active([name], timeout=90)
        system.call_task("certman.maintenance.refresh_ari")
        wait_until(lambda: current_cert(system, name).ari_checked_at is not None, timeout=60,
                   what="refresh_ari to check the certificate")  # fmt: skip
        old = current_cert(system, name)
        spent = spent_buckets(redis_client)
        order = renew_as_dispatched_at(system, name, old.renew_at)
    except (TimeoutError, AssertionError):
        print(system.logs())
        raise
    assert (old.ari_status, old.ari_window_start, old.ari_window_end) == (
        "ends_after_expiry", None, None)  # fmt: skip
    assert old.ari_detail is not None
    start, end = (datetime.fromisoformat(t) for t in old.ari_detail.split(" - "))
    assert end - old.not_after > timedelta(hours=23) and start < old.not_before
    assert not order.exempt and order.replaces == old.ari_id is not None
    after = spent_buckets(redis_client)
    changed = sorted(b.split(":")[0] for b in after if after[b] != spent.get(b))
    assert changed == ["certs-per-domain", "duplicate-certs", "new-orders"]
