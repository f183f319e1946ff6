"""The outbox: events written in the transaction of the change that caused them, by the state
machine, the failure path of an order, upkeep's expiry check and the removal of a site."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.errors import AttemptFailed, NameRefused
from pipeline.fleet import site_states, upkeep
from pipeline.fleet.sites import add_site, parse_site, remove_site
from pipeline.issuance import OrderSteps
from pipeline.models import (
    Certificate,
    DeliveryStatus,
    Order,
    OrderStep,
    Site,
    SiteState,
    WebhookDelivery,
    WebhookEvent,
)
from pipeline.models.base import utcnow
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from pipeline.webhooks import events
from tests.support.fake_acme import RecordingPublisher
from tests.support.from_settings import site_rules
from tests.webhooks.conftest import Store, Subscribe

URL = "https://platform.example.com/hooks"


def _events(store: Store) -> list[tuple[str, str, dict[str, Any]]]:
    with store() as session:
        rows = session.scalars(select(WebhookEvent).order_by(WebhookEvent.id)).all()
        return [(e.type, e.domain, dict(e.data)) for e in rows]


def _site(session: Session, domain: str, state: SiteState) -> Site:
    site, _ = add_site(session, parse_site(domain, rules=site_rules()))
    site.state = state  # as the dispatcher leaves it
    session.flush()
    return site


def _certificate(site: Site, serial: str, *, days_left: float, lifetime: float = 90) -> Certificate:
    now = utcnow()
    not_after = now + timedelta(days=days_left)
    return Certificate(
        site_id=site.id, chain_pem="-", key_envelope="-", scheme="hpke-x25519", key_id="0" * 16,
        serial=serial, issuer="pebble", not_before=not_after - timedelta(days=lifetime),
        not_after=not_after, renew_at=now + timedelta(days=1), current=True,
    )  # fmt: skip


def test_no_subscription_no_event(store: Store) -> None:
    with store() as session:
        site = _site(session, "quiet.example.com", SiteState.ISSUING)
        site_states.set_state(site, SiteState.RETRYING, error="refused")
    assert _events(store) == []


def test_an_event_commits_with_its_change_and_a_delivery_per_subscriber(
    store: Store, subscribe: Subscribe
) -> None:
    everything, _ = subscribe(URL)
    subscribe(f"{URL}/2", "site.active")  # does not want site.blocked
    with store() as session:
        site = _site(session, "dealer.example.com", SiteState.ISSUING)
        site_states.set_state(site, SiteState.BLOCKED, error="rejectedIdentifier")
    assert _events(store) == [
        ("site.blocked", "dealer.example.com",
         {"domain": "dealer.example.com", "state": "blocked", "error": "rejectedIdentifier"}),
    ]  # fmt: skip
    with store() as session:
        deliveries = session.scalars(select(WebhookDelivery)).all()
        assert [(d.subscription_id, d.status) for d in deliveries] == [
            (everything, DeliveryStatus.PENDING)
        ]


def test_a_change_rolled_back_takes_its_event_with_it(store: Store, subscribe: Subscribe) -> None:
    subscribe(URL)
    with store() as session:
        _site(session, "dealer.example.com", SiteState.ISSUING)
    with pytest.raises(RuntimeError, match="the commit never comes"), store() as session:
        site = session.scalars(select(Site)).one()
        site_states.set_state(site, SiteState.RETRYING, error="refused")
        session.flush()
        assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 1
        raise RuntimeError("the commit never comes")
    with store() as session:
        assert session.scalars(select(Site.state)).one() == SiteState.ISSUING
        assert session.scalar(select(func.count()).select_from(WebhookEvent)) == 0
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 0


def test_site_active_carries_the_certificate_stored_in_the_same_transaction(
    store: Store, subscribe: Subscribe
) -> None:
    subscribe(URL, "site.active")
    with store() as session:
        site = _site(session, "dealer.example.com", SiteState.RENEWING)
        session.add(_certificate(site, "0a1b", days_left=60))  # the order's step adds it
        site_states.set_state(site, SiteState.ACTIVE)
    [(kind, domain, data)] = _events(store)
    assert (kind, domain, data["renewal"], data["names"]) == (
        "site.active", "dealer.example.com", True, ["dealer.example.com"]
    )  # fmt: skip
    assert data["certificate"]["serial"] == "0a1b" and data["certificate"]["issuer"] == "pebble"


def _steps(store: Store, tmp_path: Path) -> OrderSteps:
    settings = Settings(data_dir=tmp_path, edge_public_key=None, self_check=False)
    return OrderSteps(
        Runtime(settings, sessions=store, publisher=RecordingPublisher())  # type: ignore[arg-type]
    )


def _order(store: Store, domain: str, *, with_certificate: bool = False) -> int:
    with store() as session:
        site = _site(session, domain, SiteState.RENEWING if with_certificate else SiteState.ISSUING)
        if with_certificate:
            session.add(_certificate(site, "77", days_left=20))
        order = Order(site_id=site.id, names=site.all_names, step=OrderStep.CHALLENGED)
        session.add(order)
        session.flush()
        return order.id


def test_a_failed_attempt_is_site_failed_with_its_retry_and_a_refusal_site_blocked(
    store: Store, subscribe: Subscribe, tmp_path: Path
) -> None:
    subscribe(URL)
    steps = _steps(store, tmp_path)
    steps.fail_order(_order(store, "a.example.com"), "poll_validation",
                     AttemptFailed("a.example.com: connection refused"))  # fmt: skip
    steps.fail_order(_order(store, "b.example.com"), "poll_validation",
                     NameRefused("b.example.com: rejectedIdentifier"))  # fmt: skip
    # A renewal that failed: the site stays active on its old certificate; not site.active.
    steps.fail_order(_order(store, "c.example.com", with_certificate=True), "finalise",
                     AttemptFailed("c.example.com: serverInternal"))  # fmt: skip
    got = {domain: (kind, data) for kind, domain, data in _events(store)}
    assert got["a.example.com"][0] == "site.failed"
    assert got["a.example.com"][1]["state"] == "retrying"
    assert got["a.example.com"][1]["error"] == "a.example.com: connection refused"
    assert got["a.example.com"][1]["retry_at"] is not None
    assert got["a.example.com"][1]["certificate_served"] is False
    assert got["b.example.com"][0] == "site.blocked"
    assert got["c.example.com"][0] == "site.failed"
    assert got["c.example.com"][1]["state"] == "active"
    assert got["c.example.com"][1]["certificate_served"] is True


def test_certificate_expiring_once_per_certificate_and_never_for_a_replaced_one(
    store: Store, subscribe: Subscribe
) -> None:
    subscribe(URL, "certificate.expiring")
    now = utcnow()
    with store() as session:
        old = _site(session, "old.example.com", SiteState.ACTIVE)
        fresh = _site(session, "fresh.example.com", SiteState.ACTIVE)
        renewed = _site(session, "renewed.example.com", SiteState.ACTIVE)
        session.add_all([
            _certificate(old, "01", days_left=5),
            _certificate(fresh, "02", days_left=80),
        ])  # fmt: skip
        replaced = _certificate(renewed, "03", days_left=5)
        replaced.current = False
        session.add_all([replaced, _certificate(renewed, "04", days_left=85)])
    for _ in range(3):  # beat runs the check again and again
        with store() as session:
            upkeep.record_expiring(session, now=now, fraction=1 / 6)
    assert [(kind, domain, data["serial"]) for kind, domain, data in _events(store)] == [
        ("certificate.expiring", "old.example.com", "01")
    ]
    with store() as session:  # renewed since: a new certificate, which is not expiring
        site = session.scalars(select(Site).where(Site.domain == "old.example.com")).one()
        session.execute(
            Certificate.__table__.update()
            .where(Certificate.site_id == site.id)
            .values(current=False)
        )
        session.add(_certificate(site, "05", days_left=2))  # and then close to expiry too
    with store() as session:
        assert upkeep.record_expiring(session, now=now, fraction=1 / 6) == 1
    assert [data["serial"] for _, _, data in _events(store)] == ["01", "05"]


def test_site_removed_recorded_with_the_removal(store: Store, subscribe: Subscribe) -> None:
    # The command's call (pipeline.fleet.changes.unpublish_and_commit) is this one.
    subscribe(URL, "site.removed")
    with store() as session:
        _site(session, "gone.example.com", SiteState.ACTIVE)
    with store() as session:
        domain = remove_site(session, "gone.example.com").domain
        events.record(session, event_type=events.SITE_REMOVED, domain=domain, data={})
    assert _events(store) == [("site.removed", "gone.example.com", {"domain": "gone.example.com"})]


def test_an_unknown_event_type_is_named(store: Store) -> None:
    with store() as session, pytest.raises(ValueError, match="unknown event type 'site.gone'"):
        events.record(session, event_type="site.gone", domain="x.example.com", data={})
