"""The platform's way in, end to end: a batch onboarded, a site updated, renewed, revoked and
removed through the HTTP API only (``certman api serve`` as the unit runs it), against Pebble,
real workers, beat and the real edge, which is checked to serve each change; the platform's
receiver gets every event, signed, in order per site."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from tests.integration.test_operator import backends, https_get, revocation_status, sans, served
from tests.support.ports import free_port, wait_until
from tests.support.system import BIN, System
from tests.webhooks.receiver import Receiver, receiving

pytestmark = pytest.mark.integration
__all__ = ["backends"]  # the fixture, imported for its use here

A, B = "dealer.example.com", "other.example.com"
ALIAS = "www.dealer.example.com"


class Platform:
    """The platform's client: a bearer token and the API's address."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.http.request(method, self.url + path, timeout=30, **kwargs)

    def site(self, domain: str) -> dict[str, Any]:
        response = self.call("GET", f"/v1/sites/{domain}")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def serial(self, domain: str) -> str | None:
        cert = self.site(domain)["certificate"]
        return None if cert is None else str(cert["serial"])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as listening:
        yield listening


@pytest.fixture
def platform(system: System) -> Iterator[Platform]:
    # The platform's receiver in this test is on loopback: an internal address, which webhooks
    # refuse unless the operator allows it, as the operator of a private receiver would.
    system.extra_env["CERTMAN_WEBHOOK_ALLOWED_NETWORKS"] = "127.0.0.0/8"
    system.start(workers=1)
    system.start_beat()  # its dispatcher sends the webhooks
    made = system.certman("api", "tokens", "create", "--name", "platform", "--scope",
                          "sites:read", "--scope", "sites:write", "--scope", "sites:operate",
                          "--json")  # fmt: skip
    token = json.loads(made.stdout)["token"]
    port = free_port()
    api = system._spawn("api.log", [str(BIN / "certman"), "api", "serve", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(url + "/healthz", timeout=2).status_code == 200,
                   timeout=30, what="the API to answer /healthz")  # fmt: skip
        client = Platform(url, token)
        yield client
        client.http.close()
    finally:
        api.terminate()
        api.wait(10)
        assert token not in (system.workdir / "api.log").read_text()


def test_the_platform_drives_sites_through_the_api(
    system: System, platform: Platform, backends: tuple[str, str], receiver: Receiver
) -> None:
    one, two = backends
    events = "site.active,site.failed,site.blocked,site.removed"
    subscribed = system.certman("api", "webhooks", "add", f"{receiver.url}/hooks", "--events",
                                events, "--json")  # fmt: skip
    secret = json.loads(subscribed.stdout)["secret"]
    # Onboard a batch: both sites answered, stored, published, issued and served.
    batch = platform.call("POST", "/v1/sites/batch", json={"sites": [
        {"domain": A, "upstream": one}, {"domain": B, "upstream": one}]})  # fmt: skip
    assert batch.status_code == 200, batch.text
    assert [r["outcome"] for r in batch.json()["results"]] == ["added", "added"]

    def active() -> bool:
        page = platform.call("GET", "/v1/sites", params={"state": "active"}).json()
        return {row["domain"] for row in page["sites"]} == {A, B}

    try:
        wait_until(active, timeout=120, what="the batch to be issued", every=0.5)
    except TimeoutError:
        print(system.logs())
        raise
    first = platform.serial(A)
    platform_serial_b = platform.serial(B)
    assert https_get(system, A) == b"backend one" and https_get(system, B) == b"backend one"
    assert format(served(system, A).serial_number, "x") == first

    # An update in place, guarded by its ETag: the new upstream at once, the new name with a
    # new certificate (the old one served meanwhile).
    etag = platform.call("GET", f"/v1/sites/{A}").headers["ETag"]
    updated = platform.call("PUT", f"/v1/sites/{A}", headers={"If-Match": etag},
                            json={"upstream": two, "aliases": [ALIAS]})  # fmt: skip
    assert updated.status_code == 200, updated.text
    stale = platform.call("PUT", f"/v1/sites/{A}", headers={"If-Match": etag},
                          json={"upstream": one})  # fmt: skip
    assert stale.status_code == 412
    wait_until(lambda: https_get(system, A) == b"backend two", timeout=10,
               what="the new upstream on the edge")  # fmt: skip
    wait_until(lambda: ALIAS in sans(served(system, A)), timeout=90,
               what="the certificate with the new name", every=0.2)  # fmt: skip
    second = platform.serial(A)
    assert second != first and https_get(system, ALIAS) == b"backend two"

    # A renewal now: a new certificate, served by the edge.
    renewed = platform.call("POST", f"/v1/sites/{A}/renew")
    assert renewed.status_code == 202 and renewed.json()["serial"] == second
    wait_until(lambda: platform.serial(A) not in (first, second), timeout=90,
               what="the renewal")  # fmt: skip
    third = platform.serial(A)
    wait_until(lambda: format(served(system, A).serial_number, "x") == third, timeout=10,
               what="the renewed certificate on the edge")  # fmt: skip

    # A revocation at the CA, then the replacement on the edge.
    revoked = platform.call("POST", f"/v1/sites/{A}/revoke", json={"reason": "superseded"})
    assert revoked.status_code == 200, revoked.text
    assert revoked.json() == {"domain": A, "serial": third, "reason": "superseded",
                              "already_revoked": False}  # fmt: skip
    assert revocation_status(system, third or "") == "Revoked"
    wait_until(lambda: platform.serial(A) not in (first, second, third), timeout=90,
               what="the certificate replacing the revoked one")  # fmt: skip
    fourth = platform.serial(A)
    wait_until(lambda: format(served(system, A).serial_number, "x") == fourth, timeout=10,
               what="the replacement on the edge")  # fmt: skip

    # A removal: the signed tombstone reaches the edge, which stops serving the site.
    gone = platform.call("DELETE", f"/v1/sites/{B}")
    assert gone.status_code == 202

    def not_served() -> bool:
        try:
            served(system, B)
        except (OSError, AssertionError):
            return True
        return False

    wait_until(not_served, timeout=10, what="the edge to drop the removed site")
    assert platform.call("GET", f"/v1/sites/{B}").status_code == 404
    assert https_get(system, A) == b"backend two"

    history = platform.site(A)["history"]
    assert [h["action"] for h in history] == ["revoke", "renew", "update", "add"]
    assert {h["actor"] for h in history} == {"api:platform"}

    # The events, each verified with the subscription's secret: every certificate became
    # site.active in the order it was issued, and B's removal came after its activation.
    def delivered() -> dict[str, list[tuple[str, str | None]]]:
        seen: set[str] = set()
        per_site: dict[str, list[tuple[str, str | None]]] = {}
        for got in list(receiver.received):
            payload = Webhook(secret).verify(got.body, got.headers)
            if got.headers["webhook-id"] in seen:
                continue  # at least once: a repeat is the same message
            seen.add(got.headers["webhook-id"])
            data = payload["data"]
            serial = (data.get("certificate") or {}).get("serial")
            per_site.setdefault(data["domain"], []).append((payload["type"], serial))
        return per_site

    expected = {
        A: [("site.active", first), ("site.active", second), ("site.active", third),
            ("site.active", fourth)],
        B: [("site.active", platform_serial_b), ("site.removed", None)],
    }  # fmt: skip
    try:
        wait_until(lambda: delivered() == expected, timeout=60, what="every event", every=0.5)
    except TimeoutError:
        print(delivered())
        raise
