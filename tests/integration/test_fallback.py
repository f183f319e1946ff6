"""Two CAs end to end: a second Pebble requiring External Account Binding takes over while the
first is stopped, renewals return to the first once it is back, a wrong EAB key gives a clear
error and no certificate, and a name the first refuses is not tried at the second.

The first Pebble sits behind a TCP proxy that can refuse connections ("stopped") and accept
them again ("back"): a restarted Pebble would forget its accounts and its root.
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy import select, update

from pipeline.models import Account, Certificate, Order, OrderStep
from pipeline.models.base import utcnow
from tests.integration.test_issuance import fetch_certificate
from tests.support.from_settings import session_scope
from tests.support.pebble import Pebble
from tests.support.ports import wait_until
from tests.support.system import System
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

HMAC = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
WRONG = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
BLOCKED = "refused.example.com"


@pytest.fixture
def fleet(redis_url: str, redis_client: redis.Redis) -> Iterator[tuple[System, Pebble, TcpProxy]]:
    system = System(redis_url=redis_url, pebble_options={"blocklist": [BLOCKED]})
    second = Pebble(http_port=system.http_port, eab_keys={"kid-1": HMAC})
    proxy = TcpProxy(system.pebble.port)
    system.extra_env.update(
        {
            "CERTMAN_ISSUERS": "primary,backup",
            "CERTMAN_ISSUER_PRIMARY_DIRECTORY": f"https://localhost:{proxy.port}/dir",
            "CERTMAN_ISSUER_PRIMARY_CA_BUNDLE": str(system.pebble.workdir / "ca.pem"),
            "CERTMAN_ISSUER_BACKUP_DIRECTORY": second.directory_url,
            "CERTMAN_ISSUER_BACKUP_CA_BUNDLE": str(second.workdir / "ca.pem"),
            "CERTMAN_ISSUER_BACKUP_EAB_KID": "kid-1",
            "CERTMAN_ISSUER_BACKUP_EAB_HMAC_KEY": WRONG,
            "CERTMAN_FALLBACK_RECHECK": "3",
        }
    )
    with second:
        try:
            yield system, second, proxy
        finally:
            proxy.stop()
            system.close()


def orders(system: System, domain: str) -> list[Order]:
    with session_scope(system.database_url) as s:
        rows = list(
            s.scalars(select(Order).where(Order.site.has(domain=domain)).order_by(Order.id))
        )
        s.expunge_all()
        return rows


def test_fallback_to_a_second_ca_with_eab_and_back(
    fleet: tuple[System, Pebble, TcpProxy],
) -> None:
    system, second, proxy = fleet
    system.start(workers=0)  # the primary is "stopped": its proxy is not listening
    worker = system.start_worker()

    # A wrong EAB key: a clear error, no certificate from the second CA.
    system.certman("domains", "add", "wrong-eab.example.com")

    def failed() -> bool:
        return any(o.step == OrderStep.FAILED for o in orders(system, "wrong-eab.example.com"))

    wait_until(failed, timeout=60, what="the order to fail on the EAB refusal", every=0.3)
    [order] = orders(system, "wrong-eab.example.com")
    assert order.issuer == "backup" and order.error and "refused our new account" in order.error
    assert "kid-1" in order.error and WRONG not in order.error and WRONG not in system.logs()
    with session_scope(system.database_url) as s:
        assert s.scalar(select(Certificate.id)) is None

    # The right key: the site is issued by the second CA and served by the edge.
    system.kill_worker(worker)
    system.extra_env["CERTMAN_ISSUER_BACKUP_EAB_HMAC_KEY"] = HMAC
    system.start_worker()
    name = "fallback.example.com"
    system.certman("domains", "add", name)
    system.wait_active([name], timeout=60)
    [order] = orders(system, name)
    assert order.issuer == "backup" and order.fallback_reason
    assert order.fallback_reason.startswith(("unavailable", "marked-down"))
    served = fetch_certificate(system.https_port, name, second.root_pem())
    with session_scope(system.database_url) as s:
        account = s.scalar(select(Account).where(Account.issuer == "backup"))
        assert account is not None and account.eab_kid == "kid-1"
        assert account.eab_hmac_envelope and HMAC not in account.eab_hmac_envelope
    status = json.loads(system.certman("status", "--json").stdout)
    assert {i["name"]: i["certificates"] for i in status["issuers"]} == {"primary": 0, "backup": 1}

    # The primary is back: the next renewal returns to it.
    proxy.start()
    with session_scope(system.database_url) as s:
        s.execute(update(Certificate).values(renew_at=utcnow() - timedelta(seconds=1)))

    def renewed() -> bool:
        system.call_task("certman.maintenance.dispatch")
        rows = orders(system, name)
        return len(rows) == 2 and rows[-1].step == OrderStep.DONE

    wait_until(renewed, timeout=60, what="the renewal to be issued", every=1.0)
    renewal = orders(system, name)[-1]
    assert renewal.issuer == "primary" and renewal.fallback_reason is None
    wait_until(
        lambda: (
            fetch_certificate(system.https_port, name, system.pebble.root_pem()).serial_number
            != served.serial_number
        ),
        timeout=20,
        what="the edge to serve the primary's certificate",
    )

    # A name the primary refuses is not tried at the second.
    system.certman("domains", "add", BLOCKED)
    wait_until(lambda: system.domains()[BLOCKED]["state"] == "blocked", timeout=30, what="blocked")
    [order] = orders(system, BLOCKED)
    assert order.issuer == "primary" and order.fallback_reason is None
