"""Upkeep on both stores: the stuck-order sweeper, ARI refresh, alerts, re-seals, the exporter."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline import issuance, runtime
from pipeline.errors import AttemptFailed, RetryLater
from pipeline.fleet import renewal, upkeep
from pipeline.models import (
    Attempt,
    Certificate,
    Order,
    OrderKind,
    OrderStep,
    Site,
    SiteState,
)
from pipeline.models.base import utcnow
from tests.support.factories import NOW, make_cert, make_site
from tests.support.from_settings import session_scope
from tests.support.http_servers import running


def make_order(
    session: Session,
    site: Site,
    *,
    step: OrderStep,
    touched: timedelta,
    kind: OrderKind = OrderKind.ISSUE,
    step_tries: int = 0,
) -> Order:
    order = Order(
        site_id=site.id,
        kind=kind,
        step=step,
        names=[site.domain],
        step_tries=step_tries,
        step_changed_at=NOW - touched,
        touched_at=NOW - touched,
    )
    session.add(order)
    session.flush()
    return order


# --- stuck orders --------------------------------------------------------------------------------
def test_sweeper_takes_only_untouched_unfinished_orders(certman_env: dict[str, str]) -> None:
    with session_scope() as s:
        old = timedelta(hours=2)
        fresh = make_order(s, make_site(s, "fresh.example"), step=OrderStep.PLACED,
                           touched=timedelta(minutes=5))  # fmt: skip
        placed = make_order(s, make_site(s, "placed.example"), step=OrderStep.PLACED, touched=old)
        renew = make_order(s, make_site(s, "renew.example"), step=OrderStep.QUEUED, touched=old,
                           kind=OrderKind.RENEW)  # fmt: skip
        issued = make_order(s, make_site(s, "issued.example"), step=OrderStep.ISSUED, touched=old)
        for step in (OrderStep.DONE, OrderStep.FAILED, OrderStep.CANCELLED):
            make_order(s, make_site(s, f"{step}.example"), step=step, touched=old)
        ids = {"fresh": fresh.id, "placed": placed.id, "renew": renew.id, "issued": issued.id}

    with session_scope() as s:
        sweep = upkeep.sweep_stuck(s, now=NOW, stuck_after=1800, max_tries=3)
    got = {(i.order_id, i.domain, i.step, i.queue) for i in sweep.requeue}
    assert got == {
        (ids["placed"], "placed.example", OrderStep.PLACED, "issuance"),
        (ids["renew"], "renew.example", OrderStep.QUEUED, "renewals"),
        (ids["issued"], "issued.example", OrderStep.ISSUED, "issuance"),
    }
    assert sweep.exhausted == []
    with session_scope() as s:
        rows = {o.id: o for o in s.scalars(select(Order))}
        assert rows[ids["placed"]].step_tries == 1 and rows[ids["placed"]].touched_at == NOW
        assert rows[ids["fresh"]].step_tries == 0
        # Claimed: a second sweeper (or the next run) leaves them to the re-sent chain.
        again = upkeep.sweep_stuck(s, now=NOW + timedelta(minutes=2), stuck_after=1800,
                                   max_tries=3)  # fmt: skip
    assert again.requeue == [] and again.exhausted == []


def test_sweep_task_reenqueues_by_step_after_commit(
    certman_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.tasks import maintenance

    with session_scope() as s:
        order = make_order(s, make_site(s, "lost.example"), step=OrderStep.CHALLENGED,
                           touched=timedelta(days=1))  # fmt: skip
        order_id = order.id
    sent: list[tuple[Any, ...]] = []

    def enqueue(*args: Any) -> None:
        with session_scope() as s:  # the claim is committed before the message goes
            assert s.get(Order, order_id).step_tries == 1  # type: ignore[union-attr]
        sent.append(args)

    monkeypatch.setattr(maintenance, "enqueue_chain", enqueue)
    assert maintenance.sweep_stuck_orders() == {"requeued": 1, "failed": 0}
    assert sent == [(order_id, "lost.example", OrderStep.CHALLENGED, "issuance")]


def test_sweeper_fails_an_order_after_max_tries(certman_env: dict[str, str]) -> None:
    with session_scope() as s:
        new = make_site(s, "new.example", state=SiteState.ISSUING)
        first = make_order(s, new, step=OrderStep.PLACED, touched=timedelta(hours=1), step_tries=3)
        served = make_site(s, "served.example", state=SiteState.RENEWING)
        cert = make_cert(s, served, renew_at=NOW - timedelta(days=1))
        renewal_order = make_order(s, served, step=OrderStep.READY, touched=timedelta(hours=1),
                                   kind=OrderKind.RENEW, step_tries=3)  # fmt: skip
        ids = (first.id, renewal_order.id, cert.id)
    with session_scope() as s:
        sweep = upkeep.sweep_stuck(s, now=NOW, stuck_after=1800, max_tries=3)
    assert sweep.requeue == []
    assert {i.order_id for i in sweep.exhausted} == set(ids[:2])
    steps = issuance.OrderSteps(runtime.current())
    upkeep.fail_exhausted(sweep, max_tries=3, fail_order=steps.fail_order)
    with session_scope() as s:
        first_row, renewal_row = s.get(Order, ids[0]), s.get(Order, ids[1])
        assert first_row is not None and renewal_row is not None
        assert first_row.step == renewal_row.step == OrderStep.FAILED
        assert "stuck at step placed" in (first_row.error or "")
        new_site = s.scalar(select(Site).where(Site.domain == "new.example"))
        assert new_site is not None and new_site.state == SiteState.RETRYING
        assert new_site.next_attempt_at is not None
        # A failed renewal keeps the old certificate served and backs off.
        served_site = s.scalar(select(Site).where(Site.domain == "served.example"))
        assert served_site is not None and served_site.state == SiteState.ACTIVE
        cert_row = s.get(Certificate, ids[2])
        assert cert_row is not None and cert_row.current and cert_row.renew_at > utcnow()
        steps = s.scalars(select(Attempt.step).where(Attempt.error_type == "stuck")).all()
        assert sorted(steps) == ["placed", "ready"]


# --- renewal times -------------------------------------------------------------------------------
def test_renewal_times_of_a_bulk_onboarding_are_spread(certman_env: dict[str, str]) -> None:
    """1,000 certificates issued in the same minute do not come back as one renewal burst."""
    lifetime = timedelta(days=90)
    fraction, spread = 2 / 3, 0.1
    with session_scope() as s:
        for i in range(1000):
            site = make_site(s, f"dealer-{i}.example")
            not_before = NOW + timedelta(seconds=i * 60 / 1000)
            at = renewal.lifetime_renew_at(
                site.domain, not_before, not_before + lifetime, fraction=fraction, spread=spread
            )
            make_cert(s, site, not_before=not_before, lifetime=lifetime, renew_at=at)
    with session_scope() as s:
        times = sorted(s.scalars(select(Certificate.renew_at)).all())
    start = NOW + lifetime * (fraction - spread)
    end = NOW + lifetime * fraction + timedelta(minutes=1)
    window = (end - start).total_seconds()
    assert start <= times[0] and times[-1] <= end
    assert (times[-1] - times[0]).total_seconds() > 0.95 * window
    slices = [0] * 100
    for t in times:
        slices[min(99, int((t - start).total_seconds() / window * 100))] += 1
    assert max(slices) <= 30, slices  # 1 % of the window never holds more than 3 % of them
    assert sum(1 for n in slices if n == 0) <= 2


def test_reseal_spreads_renewals_evenly_and_never_later(certman_env: dict[str, str]) -> None:
    with session_scope() as s:
        for i in range(200):
            make_cert(s, make_site(s, f"legacy-{i}.example"), scheme="legacy-rsa", key_id="old",
                      not_before=NOW - timedelta(days=i % 30))  # fmt: skip
        early = make_cert(s, make_site(s, "early.example"), scheme="legacy-rsa", key_id="old",
                          renew_at=NOW + timedelta(minutes=1))  # fmt: skip
        for i in range(20):
            make_cert(s, make_site(s, f"new-{i}.example"))
        early_id = early.id
    with session_scope() as s:
        before_new = dict(
            s.execute(
                select(Certificate.id, Certificate.renew_at).where(
                    Certificate.scheme == "hpke-x25519"
                )
            )
            .tuples()
            .all()  # fmt: skip
        )
        n = renewal.schedule_reseal(s, scheme="legacy-rsa", within=timedelta(days=7), now=NOW)
    assert n == 201
    with session_scope() as s:
        rows = s.execute(select(Certificate.id, Certificate.renew_at, Certificate.scheme)).all()
    legacy = sorted(at for cid, at, scheme in rows if scheme == "legacy-rsa" and cid != early_id)
    assert all(NOW <= at < NOW + timedelta(days=7) for at in legacy)
    step = timedelta(days=7) / 201
    gaps = [b - a for a, b in zip(legacy, legacy[1:], strict=False)]
    assert all(step * 0.99 <= g <= step * 2.01 for g in gaps)  # one slot is the early one's
    assert dict((cid, at) for cid, at, _ in rows)[early_id] == NOW + timedelta(minutes=1)
    assert {cid: at for cid, at, scheme in rows if scheme == "hpke-x25519"} == before_new

    with session_scope() as s:  # by key id: the same, through the (scheme, key_id) index
        assert renewal.schedule_reseal(s, key_id="old", within=timedelta(hours=1), now=NOW) == 201
        assert renewal.schedule_reseal(s, key_id="nope", within=timedelta(hours=1), now=NOW) == 0


# --- ARI -----------------------------------------------------------------------------------------
def test_ari_refresh_moves_renewal_into_usable_windows_only(certman_env: dict[str, str]) -> None:
    nb = NOW - timedelta(days=10)
    with session_scope() as s:
        good = make_cert(s, make_site(s, "good.example"), not_before=nb,
                         renew_at=nb + timedelta(days=50))  # fmt: skip
        nonsense = make_cert(s, make_site(s, "nonsense.example"), not_before=nb)
        after_expiry = make_cert(s, make_site(s, "late.example"), not_before=nb)
        reseal = make_cert(s, make_site(s, "reseal.example"), not_before=nb, key_id="old-key",
                           renew_at=NOW + timedelta(hours=1))  # fmt: skip
        failing = make_cert(s, make_site(s, "failing.example", failures=2), not_before=nb,
                            renew_at=NOW + timedelta(days=70))  # fmt: skip
        ids = {c.chain_pem.split()[-1]: (c.id, c.renew_at) for c in
               (good, nonsense, after_expiry, reseal, failing)}  # fmt: skip
    window = (nb + timedelta(days=59), nb + timedelta(days=61))
    answers: dict[str, tuple[datetime, datetime]] = {
        "good.example": window,
        "nonsense.example": (nb - timedelta(days=2), nb - timedelta(days=1)),  # before issuance
        "late.example": (nb + timedelta(days=91), nb + timedelta(days=92)),  # after expiry
        "reseal.example": window,
        "failing.example": window,
    }
    asked: list[str] = []

    def window_for(chain: bytes) -> tuple[datetime, datetime]:
        asked.append(chain.decode().split()[-1])
        return answers[asked[-1]]

    result = renewal.refresh_ari(session_scope, window_for, now=NOW, period=timedelta(hours=12),
                                limit=10, edge_key_id="edge-new")  # fmt: skip
    assert result.checked == 5 and sorted(asked) == sorted(answers)
    with session_scope() as s:
        certs = {c.chain_pem.split()[-1]: c for c in s.scalars(select(Certificate))}
    g = certs["good.example"]
    assert (g.ari_window_start, g.ari_window_end) == window
    assert window[0] <= g.renew_at <= window[1] and g.ari_checked_at == NOW
    for name in ("nonsense.example", "late.example"):  # the lifetime rule stands
        assert certs[name].ari_window_start is None and certs[name].ari_checked_at == NOW
        assert certs[name].renew_at == ids[name][1]
    assert certs["reseal.example"].renew_at == NOW + timedelta(hours=1)  # never postponed
    assert certs["failing.example"].renew_at == NOW + timedelta(days=70)  # backoff kept

    # All checked: nothing is due again before the refresh period has passed.
    asked.clear()
    renewal.refresh_ari(session_scope, window_for, now=NOW + timedelta(hours=1),
                       period=timedelta(hours=12), limit=10)  # fmt: skip
    assert asked == []


def test_ari_refresh_is_batched_and_stops_when_the_ca_is_away(
    certman_env: dict[str, str],
) -> None:
    with session_scope() as s:
        for i in range(30):
            make_cert(s, make_site(s, f"d{i}.example"))
    calls = 0

    def flaky(chain: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise AttemptFailed("unknown certificate")
        if calls == 6:
            raise RetryLater("ACME server unreachable", 10)
        return None

    result = renewal.refresh_ari(session_scope, flaky, now=NOW, period=timedelta(hours=12),
                                limit=10)  # fmt: skip
    assert (result.checked, result.errors, calls) == (5, 1, 6)
    with session_scope() as s:
        checked = s.scalars(select(Certificate).where(Certificate.ari_checked_at.is_not(None)))
        assert len(checked.all()) == 5
    assert renewal.ari_batch_size(100_000, interval=600, period=12 * 3600) == 1389
    assert renewal.ari_batch_size(3, interval=600, period=12 * 3600) == 10


# --- alerts --------------------------------------------------------------------------------------
@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A real HTTP receiver on a loopback port, collecting the JSON bodies posted to it."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers["Content-Length"])
            received.append(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with running(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received


def test_expiry_alert_fires_once_and_reaches_the_webhook(
    certman_env: dict[str, str],
    redis_client: Any,  # flushed: deduplication keys from another run must not hide this one
    monkeypatch: pytest.MonkeyPatch,
    webhook: tuple[str, list[dict[str, Any]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pipeline.fleet import alerts
    from pipeline.tasks.maintenance import send_alert_webhook

    url, received = webhook
    monkeypatch.setenv("CERTMAN_ALERT_WEBHOOK", url)
    runtime.reset(close=True, settings=True)
    now = utcnow()
    with session_scope() as s:
        # 85-day certificate with 5 days left (< 1/6 of its life): alert.
        make_cert(s, make_site(s, "expiring.example", failures=1),
                  not_before=now - timedelta(days=80), lifetime=timedelta(days=85))  # fmt: skip
        # A 6-day certificate with 2 days left (1/3 of its life): no alert yet.
        make_cert(s, make_site(s, "short.example"), not_before=now - timedelta(days=4),
                  lifetime=timedelta(days=6))  # fmt: skip
        make_cert(s, make_site(s, "healthy.example"), not_before=now - timedelta(days=1))
    queued: list[dict[str, Any]] = []
    with caplog.at_level(logging.ERROR, logger="pipeline.fleet.alerts"):
        for _ in range(3):  # beat runs the check every half hour: one alert a day
            with session_scope() as s:
                found = upkeep.expiring_alerts(s, now=now, fraction=1 / 6)
            assert [a.domain for a in found] == ["expiring.example"]
            process = runtime.current()
            alerts.raise_alerts(
                found, client=process.redis, settings=process.settings, send=queued.append
            )
    assert len(queued) == 1
    [line] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "expiring.example" in line and "boom" in line
    assert (now + timedelta(days=5)).date().isoformat() in line
    # Delivery: the task's body, run here as the worker would run it.
    send_alert_webhook(queued[0])
    assert len(received) == 1
    body = received[0]
    assert body["domain"] == "expiring.example" and body["condition"] == "expiring"
    assert body["last_error"] == "boom" and body["not_after"].startswith(
        (now + timedelta(days=5)).date().isoformat()
    )
    process = runtime.current()
    counts = alerts.AlertCountCollector(process.redis, process.settings.redis_prefix)
    [family] = list(counts.collect())
    assert {s.labels["condition"]: s.value for s in family.samples if s.name.endswith("_total")} \
        == {"expiring": 1.0, "failing": 0.0}  # fmt: skip


def test_failing_sites_alert_and_unreachable_webhook_retries(certman_env: dict[str, str]) -> None:
    from pipeline.fleet import alerts

    with session_scope() as s:
        make_site(s, "flaky.example", state=SiteState.RETRYING, failures=5)
        make_site(s, "fine.example", state=SiteState.RETRYING, failures=1)
    with session_scope() as s:
        found = upkeep.failing_alerts(s, threshold=5)
    assert [(a.domain, a.condition) for a in found] == [("flaky.example", "failing")]
    with pytest.raises(alerts.WebhookUnavailable):
        alerts.post_webhook("http://127.0.0.1:9/nothing-listens", found[0].payload(), timeout=2)


# --- exporter and CLI ----------------------------------------------------------------------------
def test_exporter_reports_the_inventory(certman_env: dict[str, str], redis_client: Any) -> None:
    from prometheus_client import generate_latest

    from pipeline.exporter import build_registry

    now = utcnow()
    with session_scope() as s:
        make_cert(s, make_site(s, "soon.example"), not_before=now - timedelta(days=85),
                  lifetime=timedelta(days=90))  # fmt: skip
        make_cert(s, make_site(s, "later.example"), not_before=now - timedelta(days=80),
                  lifetime=timedelta(days=90))  # fmt: skip
        make_site(s, "new.example", state=SiteState.PENDING)
        stuck_site = make_site(s, "stuck.example", state=SiteState.ISSUING)
        order = make_order(s, stuck_site, step=OrderStep.PLACED, touched=timedelta(days=1))
        order.touched_at = now - timedelta(hours=2)
        s.add(Attempt(site_id=stuck_site.id, step="poll_validation", outcome="failed"))
    process = runtime.current()
    registry = build_registry(process.settings, process.redis, process.limiter)
    text = generate_latest(registry).decode()
    metrics = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert metrics["certman_store_up"] == 1
    assert metrics['certman_sites{state="active"}'] == 2
    assert metrics['certman_sites{state="pending"}'] == 1
    assert metrics['certman_certificates_expiring{within="7d"}'] == 1
    assert metrics['certman_certificates_expiring{within="14d"}'] == 2
    assert metrics["certman_certificates_alerting"] == 2  # under 15 days left of 90
    assert metrics["certman_orders_stuck"] == 1
    assert metrics["certman_attempts_failed_last_hour"] == 1
    soonest = metrics["certman_certificate_soonest_expiry_timestamp_seconds"]
    assert abs(soonest - (now + timedelta(days=5)).timestamp()) < 1
    assert any(k.startswith("certman_ratelimit_") for k in metrics) or "ratelimit" in text


def test_cli_orders_stuck_and_renew(certman_env: dict[str, str]) -> None:
    from pipeline.cli.commands import main

    with session_scope() as s:
        site = make_site(s, "stuck.example", state=SiteState.ISSUING)
        order = make_order(s, site, step=OrderStep.CHALLENGED, touched=timedelta(0))
        order.touched_at = utcnow() - timedelta(hours=1)
        order_id = order.id
        make_cert(s, make_site(s, "legacy.example"), scheme="legacy-rsa", key_id="old",
                  not_before=utcnow() - timedelta(days=1))  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(main, ["orders", "stuck", "--json"])
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    assert row["domain"] == "stuck.example" and row["order_id"] == order_id
    assert row["step"] == "challenged" and 3500 < row["age_seconds"] < 3700
    assert row["step_tries"] == 0 and row["attempts"] == 0
    result = runner.invoke(main, ["orders", "stuck", "--older-than", "2h", "--json"])
    assert json.loads(result.output) == []

    result = runner.invoke(main, ["renew", "--scheme", "legacy-rsa", "--within", "7d"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("1 certificates")
    with session_scope() as s:
        assert s.scalar(select(Certificate.renew_at)) <= utcnow()  # type: ignore[operator]
    result = runner.invoke(main, ["renew", "--scheme", "rot13", "--within", "7d"])
    assert result.exit_code == 1 and "unknown scheme" in result.output


def test_after_redis_lost_its_data_every_order_in_flight_is_sent_again_without_a_try(
    certman_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """sweep_stuck_orders(lost=True), which beat sends when Redis came back empty: whatever
    their age, and even at max_tries, orders in flight are re-sent, none counted or failed."""
    from pipeline.tasks import maintenance

    with session_scope() as s:
        young = make_order(s, make_site(s, "young.example"), step=OrderStep.PLACED,
                           touched=timedelta(seconds=1))  # fmt: skip
        tried = make_order(s, make_site(s, "tried.example"), step=OrderStep.READY,
                           touched=timedelta(hours=1), step_tries=3)  # fmt: skip
        make_order(s, make_site(s, "done.example"), step=OrderStep.DONE, touched=timedelta(0))
        ids = {young.id: 0, tried.id: 3}
    sent: list[tuple[Any, ...]] = []
    monkeypatch.setattr(maintenance, "enqueue_chain", lambda *args: sent.append(args))
    assert maintenance.sweep_stuck_orders(lost=True) == {"requeued": 2, "failed": 0}
    assert sorted(args[1] for args in sent) == ["tried.example", "young.example"]
    with session_scope() as s:
        for order_id, tries in ids.items():
            row = s.get(Order, order_id)
            assert row is not None and row.step_tries == tries and row.step != OrderStep.FAILED
