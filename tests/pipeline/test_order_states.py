"""The order state machine at the service level: the five steps against an in-memory CA.

The steps get their dependencies from a :class:`pipeline.runtime.Runtime` built here: the store
in a transaction rolled back after each test, a CA that speaks RFC 8555's states
(``tests/support/fake_acme.py``), a limiter that never refuses and a publisher that records.
Every step is re-run after every point where a worker can die (before and after each request
to the CA, each commit, each publish), as the broker's redelivery re-runs it, and the order
must end as it would have without the crash. Pebble stays for the integration tier
(``tests/integration``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.crypto.envelope import spki_fingerprint
from pipeline.errors import AttemptFailed, RetryLater
from pipeline.fleet.chain import STEPS
from pipeline.fleet.dispatch import start_due
from pipeline.fleet.sites import add_site, parse_site
from pipeline.issuance import OrderSteps
from pipeline.models import Attempt, Certificate, Order, OrderStep, Site, SiteState
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from tests.support.fake_acme import (
    Crash,
    Crashes,
    FakeCA,
    FakeLimiter,
    RecordingPublisher,
    crashing_sessions,
)
from tests.support.from_settings import site_rules

Store = Callable[[], AbstractContextManager[Session]]
DOMAIN = "dealer.example.com"
ALIAS = "www.dealer.example.com"


@pytest.fixture
def settings(tmp_path: Path, edge_public_key: Path) -> Settings:
    # The self-check fetches from the dealer's address: tested on its own, off here.
    return Settings(data_dir=tmp_path, edge_public_key=edge_public_key, self_check=False)


class World:
    """One test's CA, store, publisher and crash schedule, and the steps wired to them."""

    def __init__(self, store: Store, settings: Settings, crash_at: int = 0, **ca: Any) -> None:
        self.crashes = Crashes(at=crash_at)
        self.store = store
        self.ca = FakeCA(self.crashes, **ca)
        self.publisher = RecordingPublisher(self.crashes)
        self.limiter = FakeLimiter()
        self.runtime = Runtime(
            settings,
            sessions=crashing_sessions(store, self.crashes),
            limiter=self.limiter,  # type: ignore[arg-type]
            acme=self.ca,  # type: ignore[arg-type]
            publisher=self.publisher,  # type: ignore[arg-type]
        )
        self.steps = OrderSteps(self.runtime)
        self.retries: list[str] = []

    def start(self, *names: str) -> int:
        """Add a site and let the dispatcher start its order (no crash points: not a step)."""
        with self.store() as session:
            add_site(session, parse_site(names[0], names[1:], rules=site_rules()))
        return self.dispatch()

    def dispatch(self) -> int:
        with self.store() as session:
            [started] = start_due(session, limit=10)
        return started.order_id

    def order(self) -> Order:
        with self.store() as session:
            order = session.scalars(select(Order).order_by(Order.id.desc())).first()
            assert order is not None
            session.expunge(order)
            return order

    def run(self, order_id: int, *, budget: int = 60) -> None:
        """Drive the order as the workers would: each step's task until it returns, run again
        when it crashed (redelivery) or asked to wait (retry), its failure recorded as the
        task records it; the next step is the one the order's step says (as the chain or,
        after a lost race, the sweeper sends it)."""
        for _ in range(budget):
            at = OrderStep(self.order().step)
            if at.finished and at != OrderStep.DONE:
                return
            step = next((s for s in STEPS if s.at == at), STEPS[-1])
            try:
                self.steps.run(step, order_id)
            except Crash:
                continue  # redelivered: the same step again
            except RetryLater as problem:
                self.retries.append(f"{step.name}: {problem.reason}")
                continue
            except AttemptFailed as problem:
                try:
                    self.steps.fail_order(order_id, step.name, problem)
                except Crash:
                    continue  # redelivered: the step runs again and fails again
                return
            if step.ends_order:
                return
        raise AssertionError(f"order {order_id} did not finish: {self.order().step}")

    def site(self) -> Site:
        with self.store() as session:
            site = session.scalars(select(Site)).one()
            session.expunge(site)
            return site

    def certificates(self) -> list[Certificate]:
        with self.store() as session:
            certs = list(session.scalars(select(Certificate).order_by(Certificate.id)))
            session.expunge_all()
            return certs

    def failures(self) -> list[tuple[str, str | None]]:
        with self.store() as session:
            rows = session.execute(
                select(Attempt.outcome, Attempt.error_type).where(Attempt.outcome != "ok")
            )
            return [(outcome, error_type) for outcome, error_type in rows]


def _issued_for_our_key(world: World) -> None:
    [cert] = [c for c in world.certificates() if c.current]
    leaf = x509.load_pem_x509_certificates(cert.chain_pem.encode())[0]
    order = world.order()
    assert order.csr_pem is not None
    csr = x509.load_pem_x509_csr(order.csr_pem.encode())
    assert spki_fingerprint(leaf.public_key()) == spki_fingerprint(csr.public_key())


# --- the way through -----------------------------------------------------------------------------
def test_an_order_goes_through_every_state(store: Store, settings: Settings) -> None:
    world = World(store, settings, validation_polls=2, issue_polls=1)
    order_id = world.start(DOMAIN, ALIAS)
    with store() as session:
        assert session.get(Site, world.order().site_id).state == SiteState.ISSUING  # type: ignore[union-attr]
    world.run(order_id)

    order = world.order()
    assert order.step == OrderStep.DONE and order.finished_at is not None
    assert order.key_envelope is None  # the certificate holds the envelope now
    site = world.site()
    assert (site.state, site.last_error, site.consecutive_failures) == (SiteState.ACTIVE, None, 0)
    _issued_for_our_key(world)
    [ca_order] = world.ca.orders.values()
    assert ca_order.status == "valid"
    assert [a.status for a in ca_order.authzs] == ["valid", "valid"]
    # Waiting is a retry with a countdown, never a sleep: twice for validation, once to issue.
    assert sum("validate" in r for r in world.retries) == 2
    assert sum("issue" in r for r in world.retries) == 1
    # On the edges: the site with its certificate, and no challenge left behind.
    record = world.publisher.sites[DOMAIN]
    assert record.chain_pem and record.envelope and set(record.names) == {DOMAIN, ALIAS}
    assert world.publisher.challenges == {}
    assert world.failures() == []


def test_the_steps_are_no_ops_out_of_turn(store: Store, settings: Settings) -> None:
    """Each step checks where the order stands first: a stray copy talks to nobody."""
    world = World(store, settings)
    order_id = world.start(DOMAIN)
    for step in STEPS[1:]:
        world.steps.run(step, order_id)
    assert world.ca.orders == {} and world.order().step == OrderStep.QUEUED
    world.run(order_id)
    before = world.crashes.seen
    for step in STEPS[:-1]:
        world.steps.run(step, order_id)
    # Four reads of the order, and nothing else: no request to the CA, no publish.
    assert world.crashes.labels[before:] == ["before a commit", "after a commit"] * 4
    assert len(world.ca.issued) == 1


# --- every crash point ---------------------------------------------------------------------------
def _crash_points(store: Store, settings: Settings, **ca: Any) -> list[str]:
    """The crash points of one run without a crash, in order."""
    world = World(store, settings, **ca)
    world.run(world.start(DOMAIN, ALIAS))
    with store() as session:  # the next run starts from an empty store again
        for table in (Attempt, Certificate, Order, Site):
            session.query(table).delete()
    return world.crashes.labels


def test_every_step_survives_a_crash_at_every_point(store: Store, settings: Settings) -> None:
    points = _crash_points(store, settings)
    assert len(points) > 40, points
    for k, label in enumerate(points, start=1):
        world = World(store, settings, crash_at=k)
        order_id = world.start(DOMAIN, ALIAS)
        world.run(order_id)
        where = f"crash {k} ({label})"
        assert world.crashes.crashed == label, where
        assert world.order().step == OrderStep.DONE, where
        assert world.site().state == SiteState.ACTIVE, where
        # One certificate, for the key whose CSR was posted; the CA issued once.
        assert len(world.ca.issued) == 1, where
        assert len(world.certificates()) == 1, where
        _issued_for_our_key(world)
        # The CA order is recorded as soon as the CA makes it: only a crash in the instant
        # between its answer and that commit leaves one unused order at the CA.
        lost_answer = label == "after CA new-order" or (
            label == "before a commit" and points[k - 2] == "after CA new-order"
        )
        assert len(world.ca.orders) == (2 if lost_answer else 1), where
        assert DOMAIN in world.publisher.sites and world.publisher.sites[DOMAIN].chain_pem, where
        assert world.publisher.challenges == {}, where
        assert world.failures() == [], where
        with store() as session:
            for table in (Attempt, Certificate, Order, Site):
                session.query(table).delete()


def test_a_failed_validation_survives_a_crash_at_every_point(
    store: Store, settings: Settings
) -> None:
    points = _crash_points(store, settings, fails={ALIAS: "unauthorized"})
    for k, label in enumerate(points, start=1):
        world = World(store, settings, crash_at=k, fails={ALIAS: "unauthorized"})
        world.run(world.start(DOMAIN, ALIAS))
        where = f"crash {k} ({label})"
        assert world.order().step == OrderStep.FAILED, where
        site = world.site()
        assert (site.state, site.consecutive_failures) == (SiteState.RETRYING, 1), where
        assert world.failures() == [("failed", "unauthorized")], where
        assert world.ca.issued == [], where
        with store() as session:
            for table in (Attempt, Certificate, Order, Site):
                session.query(table).delete()


# --- what each failure means (pipeline.errors.ACME_ERRORS) -----------------------------------
@pytest.mark.parametrize(
    ("code", "state", "outcome"),
    [
        # The CA fetched the token and found it missing or wrong: the dealer can fix that.
        ("unauthorized", SiteState.RETRYING, "failed"),
        ("connection", SiteState.RETRYING, "failed"),
        ("dns", SiteState.RETRYING, "failed"),
        ("incorrectResponse", SiteState.RETRYING, "failed"),
        # The CA will not issue for the name whatever is served.
        ("caa", SiteState.BLOCKED, "blocked"),
        ("rejectedIdentifier", SiteState.BLOCKED, "blocked"),
    ],
)
def test_a_validation_failure_backs_off_or_blocks_as_the_table_says(
    store: Store, settings: Settings, code: str, state: SiteState, outcome: str
) -> None:
    world = World(store, settings, fails={ALIAS: code})
    world.run(world.start(DOMAIN, ALIAS))
    site = world.site()
    assert site.state == state
    assert (site.next_attempt_at is None) == (state == SiteState.BLOCKED)
    assert world.failures() == [(outcome, code)]
    assert world.limiter.authz_failures == [ALIAS]  # counted against the name's limit
    assert world.publisher.challenges == {}  # the answers are taken off the edges


@pytest.mark.parametrize("code", ["rejectedIdentifier", "caa", "unauthorized"])
def test_a_name_refused_when_ordering_blocks_the_site(
    store: Store, settings: Settings, code: str
) -> None:
    world = World(store, settings, refuses={ALIAS: code})
    world.run(world.start(DOMAIN, ALIAS))
    site = world.site()
    assert site.state == SiteState.BLOCKED and site.next_attempt_at is None
    assert site.last_error is not None and "blocked until someone acts" in site.last_error
    assert world.failures() == [("blocked", code)]
    assert world.ca.orders == {}


# --- resuming a CA order -------------------------------------------------------------------------
@pytest.mark.parametrize("lost", ["expired", "forgotten"])
def test_a_recorded_ca_order_that_cannot_be_used_is_replaced(
    store: Store, settings: Settings, lost: str
) -> None:
    world = World(store, settings)
    order_id = world.start(DOMAIN)
    world.crashes.on = "before CA get-authz"  # the CA order is made and its URL committed
    with pytest.raises(Crash):
        world.steps.place_order(order_id)
    first = world.order().order_url
    assert first is not None and world.order().step == OrderStep.QUEUED
    (world.ca.expire if lost == "expired" else world.ca.forget)(first)
    world.run(order_id)
    assert world.order().step == OrderStep.DONE
    assert world.order().order_url not in (None, first)


# --- renewals ------------------------------------------------------------------------------------
def _make_due(world: World) -> None:
    with world.store() as session:
        cert = session.scalars(select(Certificate).where(Certificate.current)).one()
        cert.renew_at = cert.not_before


def test_a_renewal_replaces_the_certificate_and_names_it_to_the_ca(
    store: Store, settings: Settings
) -> None:
    world = World(store, settings)
    world.run(world.start(DOMAIN))
    _make_due(world)
    order_id = world.dispatch()
    assert world.site().state == SiteState.RENEWING
    world.run(order_id)
    assert world.site().state == SiteState.ACTIVE
    old, new = world.certificates()
    assert not old.current and new.current
    renewal = world.ca.orders[world.order().order_url]  # type: ignore[index]
    assert renewal.replaces == old.ari_id is not None


def test_a_failed_renewal_keeps_the_old_certificate_served(
    store: Store, settings: Settings
) -> None:
    world = World(store, settings)
    world.run(world.start(DOMAIN))
    _make_due(world)
    world.ca.fails[DOMAIN] = "connection"
    world.run(world.dispatch())
    site = world.site()
    assert site.state == SiteState.ACTIVE and site.consecutive_failures == 1
    [cert] = world.certificates()
    assert cert.current and cert.renew_at > cert.not_before  # tried again after the backoff
    with store() as session:
        assert session.scalar(select(func.count()).select_from(Order)) == 2
