"""Issuance end to end against a real Pebble, with real Celery workers and the real edge."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.request
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.support.ports import free_port, port_open, wait_until
from tests.support.system import System

pytestmark = pytest.mark.integration


def fetch_certificate(port: int, name: str, root_pem: bytes) -> x509.Certificate:
    """Handshake with the edge sending SNI ``name``, verifying against Pebble's root."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=root_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def flower_tasks(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/tasks", timeout=5) as response:
        tasks: dict[str, Any] = json.load(response)
    return tasks


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_sites_issued_end_to_end_and_served(system: System) -> None:
    system.start(workers=0)
    metrics_port = free_port()
    system.start_worker(metrics_port=metrics_port)
    flower_port = free_port()
    system.start_flower(flower_port)
    wait_until(lambda: port_open(flower_port), timeout=30, what="Flower to listen")

    # Flower listens before its event receiver has subscribed, and events sent before that are
    # lost to it: send a harmless task (an expiry check with nothing issued; not the dispatch,
    # which sends no events) until Flower shows one, so that it sees every step of the
    # issuance that follows.
    def flower_sees_events() -> bool:
        system.call_task("certman.maintenance.check_expiry")
        return any(
            task.get("name") == "certman.maintenance.check_expiry"
            for task in flower_tasks(flower_port).values()
        )

    wait_until(flower_sees_events, timeout=60, what="Flower to receive task events", every=0.5)
    system.certman(
        "domains", "add", "dealer-one.example.com", "--alias", "www.dealer-one.example.com"
    )
    system.certman("domains", "add", "dealer-two.example.org")
    system.certman("domains", "add", "dealer-three.example.net", "--key-type", "rsa-2048")
    names = ["dealer-one.example.com", "dealer-two.example.org", "dealer-three.example.net"]
    try:
        rows = system.wait_active(names, timeout=120)
    except TimeoutError:
        print(system.logs())
        raise
    root = system.pebble.root_pem()
    for name in [*names, "www.dealer-one.example.com"]:
        # The pipeline publishes to Redis after its commit: the edge may not have the site yet.
        wait_until(lambda n=name: fetch_certificate(system.https_port, n, root), timeout=30,
                   what=f"the edge to serve {name}")  # fmt: skip
        cert = fetch_certificate(system.https_port, name, root)  # verifies the chain to the root
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert name in sans.get_values_for_type(x509.DNSName)
    rsa_cert = fetch_certificate(system.https_port, "dealer-three.example.net", root)
    assert isinstance(rsa_cert.public_key(), rsa.RSAPublicKey)
    ec_cert = fetch_certificate(system.https_port, names[0], root)
    assert isinstance(ec_cert.public_key(), ec.EllipticCurvePublicKey)
    one = rows["dealer-one.example.com"]
    assert one["aliases"] == ["www.dealer-one.example.com"]
    assert one["not_after"] is not None and one["last_error"] is None

    # Flower shows each step by name with the domain among its arguments.
    steps = {
        "place_order",
        "publish_challenges",
        "poll_validation",
        "finalise",
        "encrypt_and_store",
    }

    def every_step_seen() -> bool:
        seen = {
            task["name"].rsplit(".", 1)[1]
            for task in flower_tasks(flower_port).values()
            if task.get("name", "").startswith("certman.issue.")
            and "dealer-two.example.org" in task.get("args", "")
        }
        return seen == steps

    wait_until(every_step_seen, timeout=30, what="Flower to show every step for dealer-two")

    # The worker host's /metrics sums its pool children: every step of three orders, and the
    # requests to the CA, with no domain in any label.
    text = scrape(metrics_port)
    for step in steps:
        line = f'certman_issuance_steps_total{{error_class="none",outcome="ok",step="{step}"}}'
        assert any(row.startswith(line) and float(row.split()[-1]) >= 3 for row in
                   text.splitlines()), f"{step} not counted:\n{text}"  # fmt: skip
    assert 'certman_acme_request_duration_seconds_count{endpoint="new-order",method="POST"}' in text
    assert "certman_build_info{" in text
    assert not any(name in text for name in names)
