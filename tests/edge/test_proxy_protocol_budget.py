"""Behind an L4 balancer (--proxy-protocol) connections go through the same budget as without
it: a per-address cap by the client the PROXY header names, a total cap that also counts
connections still sending their header, and the first-byte timeout."""

from __future__ import annotations

import re
import select
import socket
from collections.abc import Callable

import redis

from pipeline.distribution.layout import publish_site

from .conftest import DEADLINE, RunningEdge, Sites, raw_exchange, status_of, wait_for


def _proxied(port: int, client: str, *, header: bool = True) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    if header:
        sock.sendall(f"PROXY TCP4 {client} 127.0.0.1 5555 80\r\n".encode())
    return sock


def _closed(socks: list[socket.socket]) -> int:
    """How many of ``socks`` the edge has closed or reset."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLRDHUP)
    return len(poller.poll(0))


def _refused(edge: RunningEdge, reason: str) -> float:
    match = re.search(
        rf'^certman_edge_connections_refused_total{{reason="{reason}"}} (\S+)$',
        edge.metrics(),
        re.MULTILINE,
    )
    return float(match.group(1)) if match else 0.0


def _get(edge: RunningEdge, client: str) -> int:
    request = (
        f"PROXY TCP4 {client} 127.0.0.1 5555 80\r\n"
        "GET / HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n"
    )
    try:
        return status_of(raw_exchange(edge.http_port, request.encode()))
    except ConnectionResetError:  # refused at accept: the reset can come before the request
        return 0


def test_proxy_protocol_per_address_cap_and_first_byte_timeout(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("plain.test", upstream=upstream, cert=False))
    edge = start_edge(proxy_protocol=True, max_connections_per_address=5, first_byte_timeout=1.0)
    edge.wait_ready()
    # Ten idle connections of one client, all through the balancer's one address.
    held = [_proxied(edge.http_port, "203.0.113.9") for _ in range(10)]
    try:
        wait_for(lambda: _closed(held) == 5, what="five over the client's cap refused")
        assert _refused(edge, "per_address") == 5
        # Another client behind the same balancer is not affected.
        assert _get(edge, "203.0.113.10") == 200
        # The five admitted never send a byte of HTTP: closed by the first-byte timeout.
        wait_for(lambda: _closed(held) == 10, what="idle ones closed")
        assert _refused(edge, "first_byte_timeout") == 5
        assert _get(edge, "203.0.113.9") == 200
    finally:
        for sock in held:
            sock.close()


def test_proxy_protocol_total_cap_counts_connections_before_their_header(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("plain.test", upstream=upstream, cert=False))
    edge = start_edge(proxy_protocol=True, max_connections=6)
    edge.wait_ready()
    silent = [_proxied(edge.http_port, "", header=False) for _ in range(3)]
    idle = [_proxied(edge.http_port, f"203.0.113.{i}") for i in range(1, 4)]
    try:
        # Six open: the next connection is refused at once, whoever it is from.
        wait_for(lambda: edge.edge is not None and edge.edge.connections.open == 6, what="6 open")
        assert _get(edge, "203.0.113.50") == 0
        assert _refused(edge, "total") == 1
    finally:
        for sock in silent + idle:
            sock.close()
    wait_for(lambda: edge.edge is not None and edge.edge.connections.open == 0, what="released")
    assert _get(edge, "203.0.113.50") == 200
