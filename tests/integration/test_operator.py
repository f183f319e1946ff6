"""Operator commands end to end against Pebble, real workers and the real edge, in one system:
``domains update`` (a new upstream at once, a new name with the old certificate served until
the new one arrives), ``renew NAME --now`` and ``revoke`` through the CA's revokeCert."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography import x509

from tests.integration.test_issuance import fetch_certificate
from tests.support.ports import wait_until
from tests.support.system import System

pytestmark = pytest.mark.integration


def _backend(body: bytes) -> ThreadingHTTPServer:
    class Answer(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def backends() -> Iterator[tuple[str, str]]:
    servers = [_backend(b"backend one"), _backend(b"backend two")]
    yield tuple(f"http://127.0.0.1:{s.server_address[1]}" for s in servers)  # type: ignore[misc]
    for server in servers:
        server.shutdown()
        server.server_close()


def https_get(system: System, name: str) -> bytes:
    """GET / through the edge over HTTPS with SNI ``name``, verified against Pebble's root."""
    context = ssl.create_default_context(cadata=system.pebble.root_pem().decode())
    with (
        socket.create_connection(("127.0.0.1", system.https_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1]


def served(system: System, name: str) -> x509.Certificate:
    return fetch_certificate(system.https_port, name, system.pebble.root_pem())


def sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return set(ext.value.get_values_for_type(x509.DNSName))


def revocation_status(system: System, serial: str) -> str:
    context = ssl.create_default_context(cafile=str(system.pebble.ca_bundle))
    url = f"https://localhost:{system.pebble.management_port}/cert-status-by-serial/{serial}"
    with urllib.request.urlopen(url, context=context, timeout=10) as response:
        return str(json.load(response)["Status"])


def test_update_renew_and_revoke_through_the_edge(
    system: System, backends: tuple[str, str]
) -> None:
    one, two = backends
    system.start(workers=1)
    name, alias = "dealer.example.com", "www.dealer.example.com"
    system.certman("domains", "add", name, "--upstream", one)
    first = system.wait_active([name])[name]["serial"]
    assert https_get(system, name) == b"backend one"

    def show() -> dict[str, Any]:
        return dict(json.loads(system.certman("domains", "show", name, "--json").stdout))

    # A new upstream reaches the edge at once; a new name orders a new certificate, and the old
    # one is served (never nothing) until it arrives.
    system.certman("domains", "update", name, "--upstream", two, "--add-alias", alias)
    wait_until(lambda: https_get(system, name) == b"backend two", timeout=10,
               what="the new upstream on the edge")  # fmt: skip
    seen: set[str] = set()

    def replaced() -> bool:
        cert = served(system, name)
        seen.add(format(cert.serial_number, "x"))
        return alias in sans(cert)

    wait_until(replaced, timeout=90, what="the certificate with the new name", every=0.2)
    second = show()["certificate"]["serial"]
    assert seen <= {first, second} and second != first
    assert served(system, alias).serial_number == int(second, 16)
    assert https_get(system, alias) == b"backend two"

    # A forced renewal: a new certificate, the old one served meanwhile.
    system.certman("renew", name, "--now")
    wait_until(lambda: show()["certificate"]["serial"] not in (first, second), timeout=90,
               what="the forced renewal")  # fmt: skip
    third = show()["certificate"]["serial"]
    wait_until(lambda: format(served(system, name).serial_number, "x") == third, timeout=10,
               what="the renewed certificate on the edge")  # fmt: skip

    # Revocation through the CA's revokeCert, then a new certificate.
    revoked = json.loads(system.certman("revoke", name, "--reason", "superseded", "--json").stdout)
    assert revoked == {"domain": name, "serial": third, "reason": "superseded",
                       "already_revoked": False}  # fmt: skip
    assert revocation_status(system, third) == "Revoked"
    wait_until(lambda: show()["certificate"]["serial"] not in (first, second, third), timeout=90,
               what="the certificate replacing the revoked one")  # fmt: skip
    report = show()
    assert any(a["step"] == "revoke" and third in a["detail"] for a in report["attempts"])
    assert report["state"] in ("active", "renewing") and report["renewal"]["reason"]


def test_domains_show_names_the_bucket_a_real_worker_waits_on(
    redis_url: str, redis_client: object
) -> None:
    """One new order an hour: the second site's place_order waits on the limiter in the worker,
    and ``domains show`` says which bucket and for how long, where the INFO log did before."""
    extra = {"CERTMAN_RATE_LIMITS": "on", "CERTMAN_LIMIT_NEW_ORDERS": "1/1h"}
    with System(redis_url=redis_url, extra_env=extra) as system:
        system.start(workers=1)
        system.certman("domains", "add", "first.example.com")
        system.wait_active(["first.example.com"])
        system.certman("domains", "add", "second.example.com")

        def waiting() -> dict[str, Any] | None:
            report = json.loads(
                system.certman("domains", "show", "second.example.com", "--json").stdout
            )
            order = report["order"]
            return order["rate_limit"] if order is not None else None

        try:
            wait_until(waiting, timeout=60, what="the worker to record the limiter's wait")
        except TimeoutError:
            print(system.logs())
            raise
        limit = waiting()
        assert limit is not None and limit["bucket"].startswith("new-orders:https://")
        assert 3000 < limit["wait_seconds"] <= 3600
        text = system.certman("domains", "show", "second.example.com").stdout
        assert "step queued" in text and "rate limit bucket new-orders:" in text
