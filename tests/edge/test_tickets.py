"""Session tickets: one per full handshake, any worker process resumes any other's, and a
ticket resumes only under the name it was issued for."""

from __future__ import annotations

import socket
import ssl
import time
import urllib.request
from collections.abc import Callable

import pytest
import redis

from edge.tls import listening_context
from pipeline.distribution.layout import publish_site

from .conftest import DEADLINE, Keys, RunningEdge, Sites, start_prefork_edge

NAME = "tickets.test"


def _get(
    ctx: ssl.SSLContext, port: int, session: ssl.SSLSession | None, name: str = NAME
) -> tuple[bool, ssl.SSLSession | None]:
    """GET / on a new connection (offering ``session`` if given): whether the session was
    resumed, and the session holding the ticket the server sent after the handshake."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    tls = ctx.wrap_socket(raw, server_hostname=name, session=session)
    with tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 404"), data[:100]  # no upstream: reached the handler
        return bool(tls.session_reused), tls.session


def _sni_ok(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=DEADLINE) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith('certman_edge_sni_total{outcome="ok"}'):
                return float(line.split()[1])
    return 0.0


def test_listening_context_sends_one_ticket() -> None:
    assert listening_context().num_tickets == 1


def test_tickets_resume_across_worker_processes(
    redis_url: str,
    redis_client: redis.Redis[bytes],
    prefix: str,
    keys: Keys,
    sites: Sites,
) -> None:
    publish_site(redis_client, prefix, sites.record(NAME))
    prefork = start_prefork_edge(
        redis_url, prefix, keys.directory, keys.signer_dir, "--log-level", "WARNING"
    )
    proc, https_port = prefork.proc, prefork.https_port
    workers = prefork.worker_metrics_ports
    try:
        ctx = sites.pki.client_context()
        reused, session = _get(ctx, https_port, None)
        assert not reused
        assert session is not None and session.has_ticket
        # Connections go to either worker; keep resuming until both have served some. The
        # kernel spreads them over the two listeners unevenly: allow far longer than it takes.
        resumed = 0
        end = time.monotonic() + 30
        while time.monotonic() < end and not all(_sni_ok(p) for p in workers):
            reused, _ = _get(ctx, https_port, session)
            assert reused, "a worker did not resume the other's ticket"
            resumed += 1
        assert all(_sni_ok(p) for p in workers), "connections never reached both workers"
        assert resumed >= 1
    finally:
        proc.terminate()
        try:
            proc.wait(DEADLINE)
        finally:
            stderr = prefork.reap()
    assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_a_ticket_resumes_only_under_its_own_name(
    redis_client: redis.Redis[bytes],
    prefix: str,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
    version: ssl.TLSVersion,
) -> None:
    """RFC 6066 section 3, RFC 8446 section 4.6.1: a session is not resumed under another
    server name. OpenSSL alone would resume it (it reads the ticket before the SNI callback,
    and in TLS 1.3 ignores the session's name): a full handshake happens instead."""
    for domain in ("a.tickets.test", "b.tickets.test", "c.tickets.test"):
        publish_site(redis_client, prefix, sites.record(domain))
    edge = start_edge()
    edge.wait_ready()
    ctx = sites.pki.client_context()
    ctx.maximum_version = version
    reused, issued_for_a = _get(ctx, edge.https_port, None, "a.tickets.test")
    assert not reused and issued_for_a is not None and issued_for_a.has_ticket

    reused, _ = _get(ctx, edge.https_port, issued_for_a, "b.tickets.test")
    assert not reused, "a ticket issued for a.tickets.test resumed under b.tickets.test"
    # Case does not make another name.
    reused, _ = _get(ctx, edge.https_port, issued_for_a, "A.Tickets.Test")
    assert reused
    reused, _ = _get(ctx, edge.https_port, issued_for_a, "a.tickets.test")
    assert reused
    reused, _ = _get(ctx, edge.https_port, issued_for_a, "c.tickets.test")
    assert not reused
