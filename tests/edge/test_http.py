"""Port 80 (HTTP-01, redirects, plain proxy) and the HTTPS reverse proxy."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import redis

from edge.pool import UpstreamPool
from edge.reach import SelfReach
from pipeline.crypto.signing import SignedChallenge
from pipeline.distribution.layout import publish_site, remove_challenge, set_challenge

from .conftest import Keys, RunningEdge, Sites, serving, wait_for

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
KEY_AUTH = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


def _challenge(edge: RunningEdge, token: str) -> tuple[int, str, bytes]:
    status, headers, body = edge.http("anything.test", f"/.well-known/acme-challenge/{token}")
    return status, headers.get("Content-Type", ""), body


def test_challenge_from_memory_after_the_event(
    keys: Keys, redis_client: redis.Redis, prefix: str, start_edge: Callable[..., RunningEdge]
) -> None:
    edge = start_edge()
    edge.wait_ready()
    set_challenge(redis_client, prefix, TOKEN, KEY_AUTH, ttl=60, signer=keys.signer)
    wait_for(lambda: 'certman_edge_sync_events_total{type="challenge"} 1.0' in edge.metrics())
    # Gone from Redis, still answered: it came from the event.
    redis_client.delete(f"{prefix}:challenge:{TOKEN}")
    status, ctype, body = _challenge(edge, TOKEN)
    assert (status, ctype, body) == (200, "application/octet-stream", KEY_AUTH.encode())
    remove_challenge(redis_client, prefix, TOKEN)
    wait_for(lambda: _challenge(edge, TOKEN)[0] == 404, what="removed challenge")


def test_challenge_from_redis_when_the_event_was_missed(
    keys: Keys, redis_client: redis.Redis, prefix: str, start_edge: Callable[..., RunningEdge]
) -> None:
    edge = start_edge()
    edge.wait_ready()
    signed = keys.signer.sign_challenge(SignedChallenge(TOKEN, KEY_AUTH, int(time.time()) + 60))
    redis_client.set(f"{prefix}:challenge:{TOKEN}", KEY_AUTH, ex=60)
    redis_client.set(f"{prefix}:challenge-signed:{TOKEN}", signed.to_json(), ex=60)
    assert _challenge(edge, TOKEN) == (200, "application/octet-stream", KEY_AUTH.encode())
    assert _challenge(edge, "unknown-token")[0] == 404
    assert _challenge(edge, "bad%20token")[0] == 404


def test_port_80_redirects_proxies_or_404s(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("secure.test", upstream=upstream))
    publish_site(redis_client, prefix, sites.record("pending.test", upstream=upstream, cert=False))
    edge = start_edge()
    edge.wait_ready()
    status, headers, _ = edge.http("secure.test", "/a/b?c=d")
    assert status == 301
    assert headers["Location"] == f"https://secure.test:{edge.https_port}/a/b?c=d"
    status, headers, body = edge.http("pending.test", "/x")
    assert status == 200 and headers["X-Upstream"] == "yes"
    seen = json.loads(body)
    assert seen["headers"]["X-Forwarded-Proto"] == "http"
    assert seen["headers"]["Host"] == "pending.test"
    assert edge.http("nobody.test")[0] == 404


@pytest.mark.usefixtures("client_protocol")
def test_https_proxy_streams_bodies_with_forwarded_headers(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(
        redis_client, prefix, sites.record("shop.test", "www.shop.test", upstream=upstream)
    )
    edge = start_edge()
    edge.wait_ready()
    payload = bytes(range(256)) * 4096  # 1 MiB
    status, headers, body = edge.https(
        "www.shop.test",
        "POST",
        "/big?q=1",
        body=payload,
        headers={
            # HTTP/2 has no Connection field (a request with one is malformed: test_http2.py).
            **({"Connection": "keep-alive, X-Client-Hop"} if edge.protocol == "http/1.1" else {}),
            "X-Client-Hop": "must not pass",
            "X-Forwarded-For": "6.6.6.6",
            "X-Custom": "passes",
        },
    )
    assert status == 200
    meta, _, rest = body.partition(b"}x")
    seen = json.loads(meta + b"}")
    assert len(rest) + 1 == 2 * 1024 * 1024, "whole response body streamed back"
    assert seen["method"] == "POST" and seen["path"] == "/big?q=1"
    assert seen["body_len"] == len(payload)
    # Field names as the upstream got them: HTTP/2's arrive in lower case.
    sent = {name.title(): value for name, value in seen["headers"].items()}
    assert sent["X-Forwarded-For"] == "127.0.0.1"
    assert sent["X-Forwarded-Proto"] == "https"
    # The client's Host header (http.client adds the port) passes through unchanged.
    assert sent["X-Forwarded-Host"] == f"www.shop.test:{edge.https_port}"
    assert sent["Host"] == f"www.shop.test:{edge.https_port}"
    assert sent["X-Custom"] == "passes"
    if edge.protocol == "http/1.1":
        assert "X-Client-Hop" not in sent
    assert headers["X-Upstream"] == "yes"
    assert "X-Upstream-Hop" not in headers
    # Chunked request body (no Content-Length) arrives whole too.
    status, _, body = edge.https(
        "shop.test", "PUT", "/", body=iter([b"abc", b"defg"]), headers={"Content-Type": "x/y"}
    )
    assert status == 200 and json.loads(body)["body_len"] == 7
    status, headers, body = edge.https("shop.test", "HEAD", "/")
    assert status == 200 and body == b""


@pytest.mark.usefixtures("client_protocol")
def test_https_421_and_upstream_failures(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("one.test", upstream=upstream))
    publish_site(redis_client, prefix, sites.record("two.test", upstream=upstream))
    dead = "http://127.0.0.1:1"  # nothing listens on port 1 (a free port may be taken since)
    publish_site(redis_client, prefix, sites.record("down.test", upstream=dead))
    edge = start_edge(request_timeout=0.5)
    edge.wait_ready()
    status, _, body = edge.https("one.test", headers={"Host": "two.test"})
    assert status == 421 and body.startswith(b"421")
    status, headers, body = edge.https("down.test", "POST", "/", body=b"x" * 100_000)
    assert status == 502 and headers["Content-Type"].startswith("text/plain")
    status, _, _ = edge.https("one.test", path="/slow")
    assert status == 504
    assert 'certman_edge_upstream_errors_total{kind="timeout"} 1.0' in edge.metrics()


def test_upstream_resolver_answers_ip_literals_itself() -> None:
    async def resolve_all() -> list[list[tuple[int, Any]]]:
        pool = UpstreamPool(reach=SelfReach(allow_loopback=True))
        try:
            return [
                await pool.resolve("127.0.0.1", 8080),
                await pool.resolve("::1", 8080),
                await pool.resolve("localhost", 8080),
            ]
        finally:
            pool.close()

    v4, v6, named = asyncio.run(resolve_all())
    assert v4 == [(socket.AF_INET, ("127.0.0.1", 8080))]
    assert v6 == [(socket.AF_INET6, ("::1", 8080))]
    assert (socket.AF_INET, ("127.0.0.1", 8080)) in named  # names still go to getaddrinfo


class _HopByHop(BaseHTTPRequestHandler):
    """Answers ``/<field>`` with that hop-by-hop field, and no Connection field naming it."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header(self.path[1:], "1")
        self.send_header("X-End-To-End", "passes")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.usefixtures("client_protocol")
def test_a_hop_by_hop_response_field_is_dropped_without_connection_naming_it(
    redis_client: redis.Redis, prefix: str, sites: Sites, start_edge: Callable[..., RunningEdge]
) -> None:
    # The core forwards an upstream's fields as they are when the pool saw no hop-by-hop one
    # among them while parsing (ResponseHead.hop_by_hop): each must still be seen alone.
    with serving(_HopByHop) as upstream:
        publish_site(redis_client, prefix, sites.record("shop.test", upstream=upstream))
        edge = start_edge()
        edge.wait_ready()
        hops = ("Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade", "TE", "Proxy-Connection")
        for field in hops:
            status, headers, body = edge.https("shop.test", path=f"/{field}")
            assert (status, body) == (200, b"ok")
            assert field not in headers, field
            assert headers["X-End-To-End"] == "passes"
