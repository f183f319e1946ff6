"""Keep-alive connections to upstreams: reused, never when unsafe, retried once when stale."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis

from pipeline.distribution.layout import publish_site
from tests.support.http_servers import running

from .conftest import RunningEdge, Sites

NAME = "pooled.test"


class _KeepAlive(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive; one handler instance per connection."""

    protocol_version = "HTTP/1.1"
    connections: list[int]  # the client port of each connection, set per server below
    served = 0

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.served == 0:
            self.connections.append(self.client_address[1])
        self.served += 1
        if self.path == "/vanish" and self.served > 1:
            # As if the keep-alive timeout fired just as the request arrived: no response.
            self.close_connection = True
            return
        reply = json.dumps({"conn": self.client_address[1], "body": len(body)}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(reply)

    do_GET = do_POST = do_HEAD = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def keepalive_upstream() -> Iterator[tuple[str, list[int]]]:
    connections: list[int] = []
    handler = type("Handler", (_KeepAlive,), {"connections": connections})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    with running(server):
        yield f"http://127.0.0.1:{server.server_address[1]}", connections


def _conn(edge: RunningEdge, path: str = "/", body: bytes | None = None) -> int:
    status, _, raw = edge.https(NAME, "POST" if body else "GET", path, body=body)
    assert status == 200, raw
    return int(json.loads(raw)["conn"])


def test_upstream_connections_are_reused(
    start_edge: Callable[..., RunningEdge],
    redis_client: redis.Redis[bytes],
    prefix: str,
    sites: Sites,
    keepalive_upstream: tuple[str, list[int]],
) -> None:
    url, connections = keepalive_upstream
    publish_site(redis_client, prefix, sites.record(NAME, upstream=url))
    # Pooled connections idle for 2 s are dropped, which a slow machine can take between two
    # requests here: these tests are about reuse, not the idle timeout.
    edge = start_edge(upstream_idle_timeout=60.0)
    edge.wait_ready()
    first = _conn(edge)
    assert [_conn(edge) for _ in range(5)] == [first] * 5
    assert _conn(edge, body=b"x" * 100_000) == first  # a body, then more on the same connection
    assert _conn(edge) == first
    assert len(connections) == 1
    # The upstream says close: that connection is not reused.
    assert _conn(edge, "/close") == first
    second = _conn(edge)
    assert second != first and _conn(edge) == second
    assert len(connections) == 2


def test_stale_upstream_connection_is_retried_once_for_idempotent_requests(
    start_edge: Callable[..., RunningEdge],
    redis_client: redis.Redis[bytes],
    prefix: str,
    sites: Sites,
    keepalive_upstream: tuple[str, list[int]],
) -> None:
    url, connections = keepalive_upstream
    publish_site(redis_client, prefix, sites.record(NAME, upstream=url))
    # Pooled connections idle for 2 s are dropped, which a slow machine can take between two
    # requests here: these tests are about reuse, not the idle timeout.
    edge = start_edge(upstream_idle_timeout=60.0)
    edge.wait_ready()
    first = _conn(edge)
    # GET on the pooled connection gets no answer: sent again on a new one.
    assert _conn(edge, "/vanish") != first
    assert len(connections) == 2
    # A POST is not idempotent: the failure is the client's answer, not a second POST.
    status, _, _ = edge.https(NAME, "POST", "/vanish", body=b"once")
    assert status == 502
    assert len(connections) == 2


def test_keepalive_off(
    start_edge: Callable[..., RunningEdge],
    redis_client: redis.Redis[bytes],
    prefix: str,
    sites: Sites,
    keepalive_upstream: tuple[str, list[int]],
) -> None:
    url, connections = keepalive_upstream
    publish_site(redis_client, prefix, sites.record(NAME, upstream=url))
    edge = start_edge(upstream_keepalive=0)
    edge.wait_ready()
    assert len({_conn(edge) for _ in range(3)}) == 3
    assert len(connections) == 3
