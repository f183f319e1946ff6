"""HTTP/2 on a real edge: ALPN, coalescing, streams and their upstream requests, real clients.

The rules both protocols share run on both in the parametrised tests (client_protocol); these
are HTTP/2's own.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import h2.errors
import hpack
import pytest
import redis

from pipeline.distribution.layout import publish_site
from tests.support.h2client import H2Client, RawH2, frame

from .conftest import RunningEdge, Sites, wait_for

pytestmark = pytest.mark.usefixtures("upstream")


def _edge(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
    **overrides: object,
) -> RunningEdge:
    publish_site(
        redis_client, prefix, sites.record("shop.test", "www.shop.test", upstream=upstream)
    )
    publish_site(redis_client, prefix, sites.record("other.test", upstream=upstream))
    edge = start_edge(**overrides)
    edge.wait_ready()
    return edge


def _client(edge: RunningEdge, name: str, **kwargs: object) -> H2Client:
    return H2Client(edge.https_port, name, ctx=edge.pki.client_context(), **kwargs)  # type: ignore[arg-type]


def _metric(edge: RunningEdge, pattern: str) -> float:
    found = re.search(re.escape(pattern) + r" ([0-9.e+]+)", edge.metrics())
    return float(found.group(1)) if found else 0.0


def test_alpn_offers_h2_then_http11_and_many_streams_share_one_connection(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    edge = _edge(redis_client, prefix, sites, upstream, start_edge)
    with edge.tls("shop.test") as plain:
        assert plain.selected_alpn_protocol() is None  # no ALPN: HTTP/1.1 as before
    with _client(edge, "shop.test") as client:
        assert client.alpn == "h2"
        sids = [client.request("GET", f"/n{i}", "shop.test") for i in range(20)]
        responses = [client.wait(sid) for sid in sids]
    assert [r.status for r in responses] == [200] * 20
    assert [r.body.split(b'"path": "')[1].split(b'"')[0] for r in responses] == [
        f"/n{i}".encode() for i in range(20)
    ]
    seen = responses[0].body.decode()
    assert '"Via": "2 ' in seen  # this hop in Via, as HTTP/2


def test_coalescing_onto_another_names_connection_gets_421(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    """A browser reuses a connection for any name the certificate covers; the edge serves
    only the name the handshake was for, and says so (421) so the browser opens another."""
    edge = _edge(redis_client, prefix, sites, upstream, start_edge)
    with _client(edge, "www.shop.test") as client:
        assert client.get("/", "www.shop.test").status == 200
        assert client.get("/", "shop.test").status == 421  # covered by the certificate
        assert client.get("/", "other.test").status == 421
        assert client.get("/", f"www.shop.test:{edge.https_port}").status == 200


def test_an_abandoned_stream_cancels_its_upstream_request(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    from .conftest import slow_request_arrived

    edge = _edge(redis_client, prefix, sites, upstream, start_edge)
    slow_request_arrived.clear()
    with _client(edge, "shop.test") as client:
        sid = client.request("GET", "/slow", "shop.test")
        assert slow_request_arrived.wait(5)
        client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        client.flush()
        wait_for(
            lambda: (
                _metric(edge, 'certman_edge_upstream_cancelled_total{reason="client_left"}') == 1.0
            ),
            what="the upstream request cancelled",
        )
        # The connection and its other streams go on.
        assert client.get("/", "shop.test").status == 200


def test_a_window_that_never_opens_frees_the_upstream_slot(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    edge = _edge(redis_client, prefix, sites, upstream, start_edge, send_timeout=0.5)
    with _client(edge, "shop.test", auto_window=False) as client:
        sid = client.request("GET", "/big", "shop.test")  # 2 MiB; the client never reads
        client.wait_for(lambda: client.responses[sid].reset is not None, timeout=5)
        # No more than the client's window was sent.
        assert len(client.responses[sid].body) <= 65535
    wait_for(
        lambda: (
            _metric(edge, 'certman_edge_upstream_cancelled_total{reason="send_timeout"}') == 1.0
        ),
        what="the send timeout",
    )
    assert edge.edge is not None
    shares = edge.edge.shares
    wait_for(lambda: shares.in_use == 0, what="the slot freed")


def test_fair_shares_count_streams_as_requests(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    from .conftest import slow_request_arrived

    edge = _edge(redis_client, prefix, sites, upstream, start_edge, upstream_per_client=2)
    slow_request_arrived.clear()
    with _client(edge, "shop.test") as client, _client(edge, "shop.test") as other:
        # A connection may open no more streams than the client's share: a browser queues
        # the rest itself.
        client.wait_for(lambda: client.remote_settings.get(3) == 2)
        slow = [client.request("GET", "/slow", "shop.test") for _ in range(2)]
        assert slow_request_arrived.wait(5)
        # The share is the client's, across its connections: one stream more is refused.
        third = other.wait(other.request("GET", "/", "shop.test"))
        assert third.status == 503 and third.header("retry-after") == "1"
        assert [client.wait(sid).status for sid in slow] == [200, 200]
    assert 'certman_edge_requests_rejected_total{reason="share_client"} 1.0' in edge.metrics()


def test_rapid_reset_on_a_real_edge_is_counted_and_ends_the_connection(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    edge = _edge(redis_client, prefix, sites, upstream, start_edge)
    with RawH2(edge.https_port, "shop.test") as raw:
        encoder = hpack.Encoder()
        fields = [(":method", "GET"), (":scheme", "https"), (":authority", "shop.test")]
        burst = b"".join(
            frame(0x1, 0x5, sid, encoder.encode([*fields, (":path", "/slow")]))
            + frame(0x3, 0, sid, struct.pack(">I", 8))
            for sid in range(1, 1000, 2)
        )
        raw.send(burst)
        raw.until(lambda: raw.goaway() is not None)
        assert raw.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert _metric(edge, 'certman_edge_connections_refused_total{reason="h2_resets"}') == 1.0
    # Everyone else is served.
    assert edge.https("shop.test")[0] == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_speaks_http2_to_the_edge(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
    tmp_path: Path,
) -> None:
    edge = _edge(redis_client, prefix, sites, upstream, start_edge)
    ca = tmp_path / "ca.pem"
    ca.write_bytes(edge.pki.ca_pem)
    port = edge.https_port
    args = ["curl", "-sS", "--http2", "--resolve", f"shop.test:{port}:127.0.0.1"]
    args += ["--cacert", str(ca)]
    out = subprocess.run(
        [
            *args,
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            f"https://shop.test:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert out == "2 200"
    # And one refused as the rules say: a name the handshake was not for.
    out = subprocess.run(
        [
            *args,
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "-H",
            "Host: other.test",
            f"https://shop.test:{port}/",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert out == "2 421"


@pytest.mark.skipif(
    shutil.which("h2load") is None, reason="h2load (nghttp2-client) is not installed"
)
def test_h2load_multiplexed_requests_all_succeed(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    edge = _edge(redis_client, prefix, sites, upstream, start_edge)
    # h2load sends no SNI for an IP literal: give it the name and connect to loopback.
    out = subprocess.run(
        [
            "h2load",
            "-n",
            "200",
            "-c",
            "2",
            "-m",
            "10",
            "--connect-to",
            f"127.0.0.1:{edge.https_port}",
            f"https://shop.test:{edge.https_port}/",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    assert "200 succeeded" in out, out
    assert "Application protocol: h2" in out, out


# ---- the hardening rules, as HTTP/2 carries them ----------------------------------------------


def test_oversized_headers_get_431_and_bodies_413(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    edge = _edge(
        redis_client,
        prefix,
        sites,
        upstream,
        start_edge,
        max_header_size=8 * 1024,
        max_body_size=64 * 1024,
    )
    with _client(edge, "shop.test") as client:
        assert client.get("/", "shop.test", headers=[("x-big", "a" * 9000)]).status == 431
        declared = client.request(
            "POST", "/", "shop.test", [("content-length", "1000000")], end=False
        )
        client.send_body(declared, b"z" * 1000, end=False)
        assert client.wait(declared).status == 413
        # No content-length: the DATA past the limit get 413 all the same.
        undeclared = client.request("POST", "/", "shop.test", end=False)
        client.send_body(undeclared, [b"z" * 16384] * 5, end=False)
        assert client.wait(undeclared).status == 413
        ok = client.request("POST", "/", "shop.test", [("content-length", "1000")], b"q" * 1000)
        assert client.wait(ok).status == 200
    assert 'certman_edge_requests_rejected_total{reason="body_too_large"} 2.0' in edge.metrics()


def test_abandoned_bodies_free_their_upstream_slots_at_once(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    from .test_hardening import HoldingUpstream

    holding = HoldingUpstream()
    try:
        publish_site(
            redis_client,
            prefix,
            sites.record("upload.test", upstream=f"http://127.0.0.1:{holding.port}"),
        )
        slots = 4
        edge = _edge(
            redis_client,
            prefix,
            sites,
            upstream,
            start_edge,
            max_upstream_connections=slots,
            upstream_keepalive=0,
        )
        client = _client(edge, "upload.test")
        for i in range(2 * slots):
            length = [("content-length", "100000")] if i % 2 else []
            sid = client.request("POST", "/upload", "upload.test", length, end=False)
            client.send_body(sid, b"x" * 10, end=False)
        wait_for(lambda: holding.open == slots, what="every upstream slot taken")
        client.close()
        # Every upstream request ends with its client's connection, queued ones included.
        wait_for(lambda: holding.open == 0, what="upstream connections closed")
        assert edge.https("other.test")[0] == 200
        assert edge.edge is not None
        wait_for(lambda: edge.edge is not None and edge.edge.lifecycle.in_flight == 0)
    finally:
        holding.close()


def test_a_body_longer_than_its_content_length_cancels_the_upstream_request(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    from .test_hardening import HoldingUpstream

    holding = HoldingUpstream()
    try:
        publish_site(
            redis_client,
            prefix,
            sites.record("upload.test", upstream=f"http://127.0.0.1:{holding.port}"),
        )
        edge = _edge(redis_client, prefix, sites, upstream, start_edge, upstream_keepalive=0)
        with RawH2(edge.https_port, "upload.test") as raw:
            fields = [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "upload.test"),
                (":path", "/"),
                ("content-length", "10"),
            ]
            raw.send(
                frame(0x1, 0x4, 1, hpack.Encoder().encode(fields)) + frame(0x0, 0, 1, b"abcde")
            )
            wait_for(lambda: holding.open == 1, what="upstream request open")
            raw.send(frame(0x0, 0x1, 1, b"0123456789"))  # 15 bytes in all
            raw.until(lambda: raw.goaway() is not None)
            assert raw.goaway() == h2.errors.ErrorCodes.PROTOCOL_ERROR
        wait_for(lambda: holding.open == 0, what="upstream connection closed")
    finally:
        holding.close()
