"""No loops, no reaching home: loopback and the edge's own ports refused as upstreams (also by
a name resolving to them), and Via with the edge's pseudonym stopping a loop with 508."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import redis

from edge.loops import default_pseudonym, has_looped, via_value
from edge.reach import SelfReach
from pipeline.distribution.layout import publish_site
from pipeline.outbound import RefusedAddress

from .conftest import DEADLINE, Canary, RunningEdge, Sites, serving


def test_self_reach_rules() -> None:
    strict = SelfReach(allow_loopback=False)
    for address in ("127.0.0.1", "127.8.9.1", "::1", "::ffff:127.0.0.1"):
        with pytest.raises(RefusedAddress) as refused:
            strict.check(address, 8080)
        assert refused.value.kind == "loopback"
    strict.check("10.0.0.5", 8080)
    with socket.create_server(("127.0.0.1", 0)) as wildcard_port_holder:
        port = wildcard_port_holder.getsockname()[1]
    allowed = SelfReach(True, {("127.0.0.1", 8443), ("0.0.0.0", port)})
    allowed.check("127.0.0.1", 9000)
    for address, own in (("127.0.0.1", 8443), ("127.0.0.1", port), ("127.0.0.2", port)):
        with pytest.raises(RefusedAddress) as refused:
            allowed.check(address, own)
        assert refused.value.kind == "self"
    allowed.check("10.0.0.5", port)  # not an address of this host


def test_via_rules() -> None:
    me = default_pseudonym("edge-7.example")
    assert me == default_pseudonym("edge-7.example") != default_pseudonym("edge-8.example")
    assert "edge-7" not in me
    assert via_value([], me) == f"1.1 {me}"
    assert via_value(["1.0 fred, 1.1 p.example (Apache)"], me) == (
        f"1.0 fred, 1.1 p.example (Apache), 1.1 {me}"
    )
    assert has_looped([f"1.1 other, HTTP/1.1 {me.upper()}"], me)
    assert not has_looped(["1.1 other", f"1.1 {me}x"], me)


def test_loopback_upstreams_refused_at_connect_time(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    canary: Canary,
    start_edge: Callable[..., RunningEdge],
) -> None:
    """By literal and by a name that resolves to loopback, unless loopback is allowed."""
    for name, host in (("literal.test", "127.0.0.1"), ("named.test", "localhost")):
        upstream = f"http://{host}:{canary.port}"
        publish_site(redis_client, prefix, sites.record(name, upstream=upstream, cert=False))
    edge = start_edge(allow_loopback_upstream=False)
    edge.wait_ready()
    for name in ("literal.test", "named.test"):
        status, _, body = edge.http(name)
        assert status == 502, (name, body)
    assert canary.hits == []
    assert 'certman_edge_upstream_errors_total{kind="refused"} 2.0' in edge.metrics()


def test_the_edge_is_never_its_own_upstream(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
) -> None:
    """Even with loopback allowed: its own ports (by literal or name) are refused, one request
    stays one request."""
    edge = start_edge()
    edge.wait_ready()
    own = (
        ("self.test", "127.0.0.1", edge.http_port),
        ("selfname.test", "localhost", edge.http_port),
        ("selftls.test", "127.0.0.1", edge.https_port),
        ("selfmetrics.test", "127.0.0.1", edge.metrics_port),
    )
    for name, host, port in own:
        upstream = f"http://{host}:{port}"
        publish_site(redis_client, prefix, sites.record(name, upstream=upstream, cert=False))
    for name, _, _ in own:
        status, _, body = _wait_known(edge, name)
        assert status == 502, (name, body)
    metrics = edge.metrics()
    assert 'certman_edge_upstream_errors_total{kind="refused"} 4.0' in metrics
    # Only the four answered requests the test made: none came back in through the edge.
    assert 'certman_edge_requests_total{scheme="http",status_class="5xx"} 4.0' in metrics
    assert 'certman_edge_requests_rejected_total{reason="loop"}' not in metrics


def _wait_known(edge: RunningEdge, name: str) -> tuple[int, Any, bytes]:
    """The first answer for ``name`` that is not a 404 (the site not yet synced)."""
    end = time.monotonic() + DEADLINE
    while True:
        status, headers, body = edge.http(name)
        if status != 404 or time.monotonic() > end:
            return status, headers, body
        time.sleep(0.05)


class _Relay(BaseHTTPRequestHandler):
    """Another proxy that passes every request, headers and all, back to the edge."""

    protocol_version = "HTTP/1.1"
    edge_port = 0
    arrivals: list[str] = []

    def do_GET(self) -> None:
        type(self).arrivals.append(self.headers.get("Via", ""))
        conn = http.client.HTTPConnection("127.0.0.1", self.edge_port, timeout=DEADLINE)
        try:
            conn.request("GET", self.path, headers=dict(self.headers.items()))
            resp = conn.getresponse()
            body = resp.read()
            status = resp.status
        finally:
            conn.close()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_loop_through_another_proxy_ends_with_508(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    edge = start_edge(via_pseudonym="edge-under-test")
    _Relay.edge_port = edge.http_port
    _Relay.arrivals = []
    with serving(_Relay) as relay:
        publish_site(redis_client, prefix, sites.record("loop.test", upstream=relay, cert=False))
        publish_site(redis_client, prefix, sites.record("echo.test", upstream=upstream, cert=False))
        edge.wait_ready()
        status, _, body = _wait_known(edge, "loop.test")
    # The relay passed it back once; the edge saw its own pseudonym and stopped it there.
    assert status == 508, body
    assert _Relay.arrivals == ["1.1 edge-under-test"]
    # A normal site's upstream sees the edge's Via; a client claiming it gets 508 at once.
    status, _, body = edge.http("echo.test")
    assert status == 200 and json.loads(body)["headers"]["Via"] == "1.1 edge-under-test"
    conn = http.client.HTTPConnection("127.0.0.1", edge.http_port, timeout=DEADLINE)
    conn.request("GET", "/", headers={"Host": "echo.test", "Via": "1.0 edge-under-test"})
    assert conn.getresponse().status == 508
    conn.close()
    assert 'certman_edge_requests_rejected_total{reason="loop"} 2.0' in edge.metrics()
