"""Issuance end to end against a real Pebble, with real Celery workers and the real edge."""

from __future__ import annotations

import socket
import ssl

import pytest
from cryptography import x509

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


def test_sites_issued_end_to_end_and_served(system: System) -> None:
    system.start(workers=1)
    system.certman(
        "domains", "add", "dealer-one.example.com", "--alias", "www.dealer-one.example.com"
    )
    system.certman("domains", "add", "dealer-two.example.org")
    system.certman("domains", "add", "dealer-three.example.net")
    names = ["dealer-one.example.com", "dealer-two.example.org", "dealer-three.example.net"]
    try:
        rows = system.wait_active(names, timeout=120)
    except TimeoutError:
        print(system.logs())
        raise
    root = system.pebble.root_pem()
    for name in [*names, "www.dealer-one.example.com"]:
        cert = fetch_certificate(system.https_port, name, root)  # verifies the chain to the root
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert name in sans.get_values_for_type(x509.DNSName)
    one = rows["dealer-one.example.com"]
    assert one["aliases"] == ["www.dealer-one.example.com"]
    assert one["not_after"] is not None and one["last_error"] is None
