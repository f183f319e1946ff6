"""Several issuers: the settings, the choice of issuer, and fallback, at the service level.

Two in-memory CAs (``tests/support/fake_acme.py``) stand for the preferred issuer and the
next one; the steps run as in ``test_order_states.py``. Pebble's two-CA run is
``tests/integration/test_fallback.py``.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from pipeline.acme.client import _replaces_refused
from pipeline.errors import AttemptFailed, RateLimited, RetryLater
from pipeline.issuance import OrderSteps
from pipeline.models import Attempt, Certificate, OrderStep, Site, SiteState
from pipeline.models.base import utcnow
from pipeline.runtime import Runtime
from pipeline.settings import Settings, SettingsError, load_settings
from tests.pipeline.test_order_states import DOMAIN, Store, World
from tests.support.fake_acme import FakeCA, FakeLimiter
from tests.support.from_settings import site_rules

HMAC = base64.urlsafe_b64encode(b"k" * 32).decode().rstrip("=")


@pytest.fixture
def two_issuers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTMAN_ISSUERS", "primary,backup")
    monkeypatch.setenv("CERTMAN_ISSUER_PRIMARY_DIRECTORY", "https://primary.test/dir")
    monkeypatch.setenv("CERTMAN_ISSUER_BACKUP_DIRECTORY", "https://backup.test/dir")
    monkeypatch.setenv("CERTMAN_ISSUER_BACKUP_EAB_KID", "kid-1")
    monkeypatch.setenv("CERTMAN_ISSUER_BACKUP_EAB_HMAC_KEY", HMAC)
    monkeypatch.setenv("CERTMAN_ISSUER_BACKUP_RATE_LIMITS", "new_orders=100/1h,pace_acme=20/1s")


class Fleet(World):
    """A world with two CAs, ``primary`` (preferred) and ``backup``."""

    def __init__(self, store: Store, config: Settings, **primary: Any) -> None:
        super().__init__(store, config, **primary)
        self.ca.issuer = "primary"
        self.backup = FakeCA(self.crashes, issuer="backup")
        self.limiters = {"primary": self.limiter, "backup": FakeLimiter()}
        self.runtime = Runtime(
            config,
            sessions=self.runtime._sessions,
            acmes={"primary": self.ca, "backup": self.backup},  # type: ignore[dict-item]
            limiters=self.limiters,  # type: ignore[arg-type]
            publisher=self.publisher,  # type: ignore[arg-type]
        )
        self.steps = OrderSteps(self.runtime)


@pytest.fixture
def one_issuer(tmp_path: Path, edge_public_key: Path) -> Settings:
    return Settings(data_dir=tmp_path, edge_public_key=edge_public_key, self_check=False)


@pytest.fixture
def fleet_settings(two_issuers: None, tmp_path: Path, edge_public_key: Path) -> Settings:
    return Settings(data_dir=tmp_path, edge_public_key=edge_public_key, self_check=False)


# --- settings ------------------------------------------------------------------------------------
def test_without_issuers_the_acme_settings_are_the_one_issuer(tmp_path: Path) -> None:
    config = Settings(data_dir=tmp_path, acme_directory="https://ca.test/dir", acme_profile="p")
    [issuer] = config.issuer_list
    assert (issuer.name, issuer.profile) == ("default", "p")
    assert issuer.directory == "https://ca.test/dir"
    assert not issuer.has_eab and config.issuer(None) is issuer


def test_issuers_in_order_with_eab_and_limits(fleet_settings: Settings) -> None:
    primary, backup = fleet_settings.issuer_list
    assert (primary.name, backup.name) == ("primary", "backup")
    assert backup.has_eab and backup.eab_kid == "kid-1"
    # A secret: never in a repr or str of the settings.
    assert HMAC not in repr(fleet_settings.issuer_list) and HMAC not in str(backup)
    assert dict(backup.limit_overrides) == {"new_orders": "100/1h", "pace_acme": "20/1s"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CERTMAN_ISSUERS": "primary,backup,zerossl"},
         "CERTMAN_ISSUER_ZEROSSL_DIRECTORY: missing"),
        ({"CERTMAN_ISSUER_ZEROSLL_DIRECTORY": "https://x.test/dir"},
         "CERTMAN_ISSUER_ZEROSLL_DIRECTORY: no such setting"),
        ({"CERTMAN_ISSUER_BACKUP_EAB_HMAC_KEY": "not base64url!"},
         "CERTMAN_ISSUER_BACKUP_EAB_HMAC_KEY: not base64url"),
        ({"CERTMAN_ISSUER_BACKUP_EAB_HMAC_KEY": ""},
         "CERTMAN_ISSUER_BACKUP_EAB_HMAC_KEY: missing"),
        ({"CERTMAN_ISSUER_BACKUP_RATE_LIMITS": "orders=1/s"},
         "CERTMAN_ISSUER_BACKUP_RATE_LIMITS"),
        ({"CERTMAN_ISSUERS": "Bad-Name"}, "CERTMAN_ISSUERS"),
    ],
)  # fmt: skip
def test_a_bad_issuer_setting_is_named_in_one_line(
    two_issuers: None, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=message) as caught:
        load_settings()
    assert "\n" not in str(caught.value) and HMAC not in str(caught.value)


def test_the_hmac_key_may_come_from_a_file(
    two_issuers: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CERTMAN_ISSUER_BACKUP_EAB_HMAC_KEY")
    (tmp_path / "hmac").write_text(HMAC + "\n")
    monkeypatch.setenv("CERTMAN_ISSUER_BACKUP_EAB_HMAC_KEY_FILE", str(tmp_path / "hmac"))
    backup = load_settings().issuer("backup")
    assert backup.eab_hmac_key is not None and backup.eab_hmac_key.get_secret_value() == HMAC


# --- fallback ------------------------------------------------------------------------------------
@pytest.mark.parametrize("outage", ["connection", "5xx", "rateLimited"])
def test_the_ca_failing_on_its_side_sends_the_order_to_the_next_issuer(
    store: Store, fleet_settings: Settings, outage: str
) -> None:
    fleet = Fleet(store, fleet_settings, outage=outage, retry_after=3600)
    order_id = fleet.start(DOMAIN)
    fleet.run(order_id)
    order = fleet.order()
    assert order.step == OrderStep.DONE and order.issuer == "backup"
    cause = "rate-limited" if outage == "rateLimited" else "unavailable"
    assert order.fallback_reason is not None and order.fallback_reason.startswith(cause)
    [cert] = fleet.certificates()
    assert cert.issuer == "backup" and fleet.backup.issued and not fleet.ca.issued
    # The primary is skipped by new orders for a while, without being asked.
    assert fleet.limiters["primary"].issuer_down() is not None
    with store() as session:
        assert session.scalar(select(Attempt.detail).where(Attempt.step == "fallback"))


def test_a_short_retry_after_is_waited_for_not_fallen_back_from(
    store: Store, fleet_settings: Settings
) -> None:
    fleet = Fleet(store, fleet_settings, outage="rateLimited", retry_after=30)
    order_id = fleet.start(DOMAIN)
    with pytest.raises(RateLimited):
        fleet.steps.place_order(order_id)
    assert fleet.order().issuer == "primary" and fleet.order().fallback_reason is None


def test_a_name_the_ca_refuses_is_not_tried_elsewhere(
    store: Store, fleet_settings: Settings
) -> None:
    fleet = Fleet(store, fleet_settings, refuses={DOMAIN: "rejectedIdentifier"})
    order_id = fleet.start(DOMAIN)
    fleet.run(order_id)
    order = fleet.order()
    assert order.step == OrderStep.FAILED and order.issuer == "primary"
    assert order.fallback_reason is None and fleet.backup.requests == 0
    assert fleet.site().state == SiteState.BLOCKED


def test_renewals_return_to_the_preferred_issuer_without_replaces_from_another(
    store: Store, fleet_settings: Settings
) -> None:
    fleet = Fleet(store, fleet_settings, outage="connection")
    fleet.run(fleet.start(DOMAIN))
    assert fleet.order().issuer == "backup"
    # The primary is healthy again, and its mark lapsed: the renewal goes back to it.
    fleet.ca.outage = None
    fleet.limiters["primary"].clear_issuer_down()
    with store() as session:
        session.execute(update(Certificate).values(renew_at=utcnow() - timedelta(seconds=1)))
    renewal = fleet.dispatch()
    fleet.run(renewal)
    order = fleet.order()
    assert (order.id, order.step, order.issuer) == (renewal, OrderStep.DONE, "primary")
    assert order.fallback_reason is None and order.replaces is not None
    # ARI's replaces names a certificate the backup issued: never sent to the primary.
    [ca_order] = fleet.ca.orders.values()
    assert ca_order.replaces is None
    current = [c for c in fleet.certificates() if c.current]
    assert [c.issuer for c in current] == ["primary"]


def test_replaces_goes_to_the_issuer_of_the_replaced_certificate(
    store: Store, fleet_settings: Settings
) -> None:
    fleet = Fleet(store, fleet_settings)
    fleet.run(fleet.start(DOMAIN))
    [first] = fleet.certificates()
    assert first.issuer == "primary" and first.ari_id is not None
    with store() as session:
        session.execute(update(Certificate).values(renew_at=utcnow() - timedelta(seconds=1)))
    renewal = fleet.dispatch()
    fleet.run(renewal)
    order = fleet.order()
    assert (order.id, order.step, order.issuer) == (renewal, OrderStep.DONE, "primary")
    # The primary issued the certificate, so the primary is asked, naming it.
    assert order.replaces == first.ari_id
    assert [o.replaces for o in fleet.ca.orders.values()] == [None, first.ari_id]
    assert fleet.backup.requests == 0
    # A renewal the site now orders from the backup does not send the primary's ARI id there.
    second = next(c for c in fleet.certificates() if c.current)
    with store() as session:
        session.execute(update(Site).values(preferred_issuer="backup"))
        session.execute(update(Certificate).values(renew_at=utcnow() - timedelta(seconds=1)))
    fleet.run(fleet.dispatch())
    assert fleet.order().issuer == "backup" and fleet.order().replaces == second.ari_id
    assert [o.replaces for o in fleet.backup.orders.values()] == [None]
    assert len(fleet.ca.orders) == 2


def test_an_issuer_marked_down_is_skipped_without_a_request(
    store: Store, fleet_settings: Settings
) -> None:
    fleet = Fleet(store, fleet_settings)
    fleet.limiters["primary"].mark_issuer_down(60, "unavailable: earlier order")
    fleet.run(fleet.start(DOMAIN))
    order = fleet.order()
    assert order.issuer == "backup" and order.step == OrderStep.DONE
    assert order.fallback_reason is not None and order.fallback_reason.startswith("marked-down")
    assert fleet.ca.requests == 0


def test_a_site_may_prefer_an_issuer(store: Store, fleet_settings: Settings) -> None:
    fleet = Fleet(store, fleet_settings)
    with store() as session:
        from pipeline.fleet.sites import add_site, parse_site

        add_site(session, parse_site(DOMAIN, (), rules=site_rules()))
        session.execute(update(Site).values(preferred_issuer="backup"))
    fleet.run(fleet.dispatch())
    assert fleet.order().issuer == "backup" and fleet.order().fallback_reason is None


def test_with_one_issuer_an_outage_is_only_waited_for(store: Store, one_issuer: Settings) -> None:
    world = World(store, one_issuer, outage="5xx")
    order_id = world.start(DOMAIN)
    with pytest.raises(RetryLater):
        world.steps.place_order(order_id)
    assert world.order().issuer == "default" and world.order().fallback_reason is None


# --- replaces refused ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("problem", "refused"),
    [
        (RetryLater("serverInternal: could not find an order for the given certificate", 5), True),
        (AttemptFailed("malformed: replaces field is bad", error_type="malformed"), True),
        (AttemptFailed("x", error_type="alreadyReplaced", already_replaced=True), True),
        (RetryLater("serverInternal: database down", 5), False),
        (RetryLater("ACME server unreachable: connection refused", 10), False),
        (RateLimited("rate limited by the CA: replace later", 5, by_ca=True), False),
    ],
)
def test_which_refusals_are_about_replaces(problem: Any, refused: bool) -> None:
    assert _replaces_refused(problem) is refused
