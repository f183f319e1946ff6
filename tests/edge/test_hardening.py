"""The edge as an attacker meets it: request targets, abandoned bodies, forwarding headers,
PROXY protocol, size limits, malformed events in Redis, and a sync loop that must not die."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from edge.proxy_protocol import ProxyHeaderError, parse_proxy_header
from edge.targets import BadTarget, parse_target, upstream_url
from pipeline.distribution.layout import channel, publish_site, set_challenge
from pipeline.redis_tls import RedisTls
from tests.support.redis_tls_server import TlsRedisServer, make_ca

from .conftest import (
    DEADLINE,
    Canary,
    Keys,
    RunningEdge,
    Sites,
    h2_exchange,
    raw_exchange,
    status_of,
    wait_for,
)

# ---- request targets: unit level -----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "raw", "expected"),
    [
        ("GET", "/a/b?c=d", ("/a/b", "c=d")),
        ("GET", "//double/slash", ("//double/slash", "")),
        ("GET", "http://shop.test/x?y", ("/x", "y")),
        ("GET", "HTTPS://shop.test:8443", ("/", "")),
        ("OPTIONS", "*", ("*", "")),
    ],
)
def test_targets_accepted(method: str, raw: str, expected: tuple[str, str]) -> None:
    assert tuple(parse_target(method, raw, "shop.test")) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "@127.0.0.1:6379/x",
        ":6379/x",
        "127.0.0.1:6379",
        "shop.test:443",
        "http://evil.test/x",
        "http://shop.test@evil.test/",
        "http://user@shop.test/",
        "http://shop.test:99999/",
        "ftp://shop.test/",
        "http:shop.test/x",
        "*",
        "/a#frag",
        "/a\\b",
        "/caf\xe9",
        "",
    ],
)
def test_targets_refused(raw: str) -> None:
    with pytest.raises(BadTarget):
        parse_target("GET", raw, "shop.test")


def test_upstream_url_keeps_the_upstream_origin() -> None:
    up = "http://10.0.0.5:8080/prefix"
    assert upstream_url(up, parse_target("GET", "/a?b=c", "s.test")) == (
        "http://10.0.0.5:8080/prefix/a?b=c"
    )
    assert upstream_url(up, parse_target("GET", "//evil.test/x", "s.test")) == (
        "http://10.0.0.5:8080/prefix//evil.test/x"
    )
    assert (
        upstream_url("https://[::1]:9/", parse_target("GET", "//x", "s.test"))
        == "https://[::1]:9//x"
    )


# ---- request targets: through a real edge --------------------------------------------------


def test_no_request_target_leaves_the_sites_upstream(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    canary: Canary,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("shop.test", upstream=upstream))
    publish_site(redis_client, prefix, sites.record("plain.test", upstream=upstream, cert=False))
    edge = start_edge()
    edge.wait_ready()
    c = canary.port
    bad = [
        f"@127.0.0.1:{c}/anything",
        f":{c}/anything",
        f"127.0.0.1:{c}",
        f"http://127.0.0.1:{c}/",
        f"http://shop.test@127.0.0.1:{c}/",
        "@evil.example/",
    ]
    for target in bad:
        for port, tls, host in (
            (edge.https_port, "shop.test", "shop.test"),
            (edge.http_port, None, "plain.test"),
            (edge.http_port, None, "shop.test"),  # the redirect path
        ):
            request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            reply = raw_exchange(port, request, tls_name=tls, pki=edge.pki)
            assert status_of(reply) == 400, (target, port, reply[:200])
            assert b"SECRET" not in reply and b"evil" not in reply.split(b"\r\n\r\n")[0]
        # The same target as HTTP/2's :path.
        reply = h2_exchange(edge, "shop.test", target)
        assert status_of(reply) == 400, (target, "h2", reply[:200])
    # Absolute-form naming the site itself is reduced to origin-form.
    request = b"GET http://shop.test/p?q=1 HTTP/1.1\r\nHost: shop.test\r\n\r\n"
    reply = raw_exchange(edge.https_port, request, tls_name="shop.test", pki=edge.pki)
    assert status_of(reply) == 200
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["path"] == "/p?q=1"
    # OPTIONS * is answered by the edge.
    reply = raw_exchange(
        edge.https_port,
        b"OPTIONS * HTTP/1.1\r\nHost: shop.test\r\n\r\n",
        tls_name="shop.test",
        pki=edge.pki,
    )
    assert status_of(reply) == 200 and b"Allow: " in reply
    reply = h2_exchange(edge, "shop.test", "*", method="OPTIONS")
    assert status_of(reply) == 200 and b"allow: " in reply
    assert canary.hits == []
    assert 'certman_edge_requests_rejected_total{reason="bad_target"}' in edge.metrics()


def test_redirects_stay_on_the_site(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("shop.test", upstream=upstream))
    edge = start_edge()
    edge.wait_ready()
    for target, location in (
        ("//evil.example/x", f"https://shop.test:{edge.https_port}//evil.example/x"),
        ("http://shop.test/a?b", f"https://shop.test:{edge.https_port}/a?b"),
    ):
        reply = raw_exchange(
            edge.http_port, f"GET {target} HTTP/1.1\r\nHost: shop.test\r\n\r\n".encode()
        )
        assert status_of(reply) == 301
        assert f"\r\nLocation: {location}\r\n".encode() in reply


# ---- clients that leave -----------------------------------------------------------------


class HoldingUpstream:
    """An upstream that accepts, reads whatever comes and never answers: every request to it
    stays open for as long as the edge keeps it. Counts the connections still open."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.open = 0
        self.accepted = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.open += 1
                self.accepted += 1
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        with conn:
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass
        with self._lock:
            self.open -= 1

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_abandoned_bodies_free_their_upstream_slots_at_once(
    framing: str,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    holding = HoldingUpstream()
    try:
        publish_site(
            redis_client,
            prefix,
            sites.record("upload.test", upstream=f"http://127.0.0.1:{holding.port}"),
        )
        publish_site(redis_client, prefix, sites.record("other.test", upstream=upstream))
        slots = 4
        edge = start_edge(max_upstream_connections=slots, upstream_keepalive=0)
        edge.wait_ready()
        head = "POST /upload HTTP/1.1\r\nHost: upload.test\r\n"
        if framing == "content-length":
            request = (head + "Content-Length: 100000\r\n\r\n").encode() + b"x" * 10
        else:
            request = (
                head + "Transfer-Encoding: chunked\r\n\r\n"
            ).encode() + b"a\r\n0123456789\r\n"
        clients = []
        for _ in range(2 * slots):
            sock = edge.pki.client_context().wrap_socket(
                socket.create_connection(("127.0.0.1", edge.https_port), timeout=DEADLINE),
                server_hostname="upload.test",
            )
            sock.sendall(request)
            clients.append(sock)
        wait_for(lambda: holding.open == slots, what="every upstream slot taken")
        for sock in clients:
            sock.close()
        # Every upstream request ends with its client, queued ones included.
        wait_for(lambda: holding.open == 0, what="upstream connections closed")
        status, _, _ = edge.https("other.test", path="/after")
        assert status == 200
        # And the slots are free: as many requests as there are slots, at once, all answered.
        results: list[int] = []
        threads = [
            threading.Thread(target=lambda: results.append(edge.https("other.test")[0]))
            for _ in range(slots)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        assert results == [200] * slots
        metrics = edge.metrics()
        assert 'certman_edge_upstream_cancelled_total{reason="client_left"}' in metrics
        assert edge.edge is not None and edge.edge.lifecycle.in_flight == 0
    finally:
        holding.close()


def test_a_malformed_body_cancels_the_upstream_request(
    redis_client: redis.Redis, prefix: str, sites: Sites, start_edge: Callable[..., RunningEdge]
) -> None:
    holding = HoldingUpstream()
    try:
        publish_site(
            redis_client,
            prefix,
            sites.record("upload.test", upstream=f"http://127.0.0.1:{holding.port}"),
        )
        edge = start_edge(upstream_keepalive=0)
        edge.wait_ready()
        sock = edge.pki.client_context().wrap_socket(
            socket.create_connection(("127.0.0.1", edge.https_port), timeout=DEADLINE),
            server_hostname="upload.test",
        )
        with sock:
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: upload.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nabcde\r\n"
            )
            wait_for(lambda: holding.open == 1, what="upstream request open")
            sock.sendall(b"zz-not-a-size\r\n")
            reply = b""
            with contextlib.suppress(ssl.SSLError, ConnectionResetError):
                while chunk := sock.recv(4096):
                    reply += chunk
        assert status_of(reply) == 400
        wait_for(lambda: holding.open == 0, what="upstream connection closed")
    finally:
        holding.close()


# ---- forwarding headers ----------------------------------------------------------------------

SPOOFED = {
    "Forwarded": "for=6.6.6.6;proto=https",
    "X-Forwarded-For": "6.6.6.6",
    "X-Forwarded-Host": "evil.test",
    "X-Forwarded-Proto": "ftp",
    "X-Real-IP": "6.6.6.6",
    "True-Client-IP": "6.6.6.6",
    "X-Client-IP": "6.6.6.6",
    "X_Forwarded_For": "6.6.6.6",
    "X-Real_IP": "6.6.6.6",
}


@pytest.mark.usefixtures("client_protocol")
def test_forwarding_headers_are_the_edges(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("shop.test", upstream=upstream))
    edge = start_edge()
    edge.wait_ready()
    status, headers, body = edge.https("shop.test", headers=dict(SPOOFED))
    assert status == 200
    sent = json.loads(body)["headers"]
    assert "6.6.6.6" not in json.dumps(sent) and "evil.test" not in json.dumps(sent)
    assert sent["X-Forwarded-For"] == "127.0.0.1"
    assert sent["X-Forwarded-Proto"] == "https"
    assert sent["Forwarded"] == f'for=127.0.0.1;host="shop.test:{edge.https_port}";proto=https'
    assert len(headers.get_all("Date") or []) == 1


@pytest.mark.usefixtures("client_protocol")
def test_a_trusted_proxy_keeps_its_forwarding_headers(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("shop.test", upstream=upstream))
    edge = start_edge(trusted_proxies=("127.0.0.0/8",))
    edge.wait_ready()
    _, _, body = edge.https(
        "shop.test", headers={"X-Forwarded-For": "203.0.113.9", "Forwarded": "for=203.0.113.9"}
    )
    sent = json.loads(body)["headers"]
    assert sent["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert sent["Forwarded"].startswith("for=203.0.113.9, for=127.0.0.1;")


# ---- PROXY protocol ------------------------------------------------------------------------


def test_proxy_header_parsing() -> None:
    assert parse_proxy_header(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 80\r\nGET") == (
        41,
        ("203.0.113.7", 5555),
    )
    assert parse_proxy_header(b"PROXY TCP4 203.0.113.7 10.0") is None
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n") == (15, None)
    v2 = proxy_v2("2001:db8::7", 4444)
    assert parse_proxy_header(v2 + b"\x16\x03") == (len(v2), ("2001:db8::7", 4444))
    assert parse_proxy_header(v2[:20]) is None
    for bad in (
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1\r\n",
        b"PROXY " + b"x" * 200,
    ):
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(bad)


def proxy_v2(source: str, port: int) -> bytes:
    ip = ipaddress.ip_address(source)
    if ip.version == 4:
        body = ip.packed + bytes(4) + struct.pack("!HH", port, 443)
        return b"\r\n\r\n\x00\r\nQUIT\n" + struct.pack("!BBH", 0x21, 0x11, len(body)) + body
    body = ip.packed + bytes(16) + struct.pack("!HH", port, 443)
    return b"\r\n\r\n\x00\r\nQUIT\n" + struct.pack("!BBH", 0x21, 0x21, len(body)) + body


def test_proxy_protocol_on_both_ports(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("shop.test", upstream=upstream))
    publish_site(redis_client, prefix, sites.record("plain.test", upstream=upstream, cert=False))
    edge = start_edge(proxy_protocol=True)
    edge.wait_ready()
    # Port 80, v1.
    request = (
        b"PROXY TCP4 203.0.113.7 127.0.0.1 5555 80\r\n"
        b"GET /v1 HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n"
    )
    reply = raw_exchange(edge.http_port, request)
    assert status_of(reply) == 200
    assert (
        json.loads(reply.partition(b"\r\n\r\n")[2])["headers"]["X-Forwarded-For"] == "203.0.113.7"
    )
    # Port 443, v2 (IPv6 client), then TLS on the same connection.
    sock = socket.create_connection(("127.0.0.1", edge.https_port), timeout=DEADLINE)
    sock.sendall(proxy_v2("2001:db8::7", 4444))
    tls = edge.pki.client_context().wrap_socket(sock, server_hostname="shop.test")
    with tls:
        tls.sendall(b"GET /v2 HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    sent = json.loads(reply.partition(b"\r\n\r\n")[2])["headers"]
    assert sent["X-Forwarded-For"] == "2001:db8::7"
    assert sent["Forwarded"].startswith('for="[2001:db8::7]";')
    # Without a header: closed, answered with nothing.
    assert raw_exchange(edge.http_port, b"GET / HTTP/1.1\r\nHost: plain.test\r\n\r\n") == b""
    wait_for(lambda: "proxy_protocol_malformed" in edge.metrics(), what="refusal counted")


# ---- limits ----------------------------------------------------------------------------------


def test_oversized_headers_get_431_and_bodies_413(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("shop.test", upstream=upstream))
    edge = start_edge(max_header_size=8 * 1024, max_body_size=64 * 1024)
    edge.wait_ready()
    big = "X-Big: " + "a" * 9000 + "\r\n"
    reply = raw_exchange(
        edge.https_port,
        f"GET / HTTP/1.1\r\nHost: shop.test\r\n{big}\r\n".encode(),
        tls_name="shop.test",
        pki=edge.pki,
    )
    assert status_of(reply) == 431
    reply = raw_exchange(
        edge.https_port,
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 1000000\r\n\r\n",
        tls_name="shop.test",
        pki=edge.pki,
    )
    assert status_of(reply) == 413 and reply.count(b"HTTP/1.1") == 1
    chunk = b"8000\r\n" + b"z" * 0x8000 + b"\r\n"
    reply = raw_exchange(
        edge.https_port,
        b"POST / HTTP/1.1\r\nHost: shop.test\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3,
        tls_name="shop.test",
        pki=edge.pki,
    )
    assert status_of(reply) == 413
    assert edge.https("shop.test", "POST", body=b"q" * 1000)[0] == 200


# ---- sync ------------------------------------------------------------------------------------


def test_malformed_events_do_not_stop_sync(
    keys: Keys,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    edge = start_edge()
    edge.wait_ready()
    for bad in (
        '{"type":"challenge"}',
        "not json",
        "[1, 2]",
        '{"type":"challenge","token":"../x","key_authorization":"a","ttl":1}',
        '{"type":"challenge","token":"abc","key_authorization":"zz","ttl":1,"signed":5}',
        '{"type":"site","version":"7","record":{}}',
        '{"type":"site","version":1,"record":5}',
        '{"type":"site_removed","version":1,"domain":["x"]}',
        '{"type":42}',
    ):
        redis_client.publish(channel(prefix), bad)
    wait_for(
        lambda: "certman_edge_sync_malformed_events_total 9.0" in edge.metrics(),
        what="every malformed event counted",
    )
    publish_site(redis_client, prefix, sites.record("later.test", upstream=upstream))
    wait_for(lambda: edge.https("later.test")[0] == 200, what="a site added afterwards served")
    assert edge.health() == 200
    # The self-check's probe answers with a random value, not token.thumbprint: a valid event.
    set_challenge(
        redis_client, prefix, "probe-token", "RandomProbeValue_-x", ttl=60, signer=keys.signer
    )
    wait_for(lambda: edge.http("x.test", "/.well-known/acme-challenge/probe-token")[0] == 200)
    redis_client.delete(f"{prefix}:challenge:probe-token")
    assert (
        edge.http("x.test", "/.well-known/acme-challenge/probe-token")[2] == b"RandomProbeValue_-x"
    )
    assert "certman_edge_sync_malformed_events_total 9.0" in edge.metrics()


def test_health_says_when_sync_has_been_down_too_long(
    redis_client: redis.Redis, prefix: str, start_edge: Callable[..., RunningEdge]
) -> None:
    edge = start_edge(sync_down_limit=1.0)
    edge.wait_ready()
    # A version key that is not a number: every snapshot read fails, the loop keeps going.
    redis_client.set(f"{prefix}:version", "garbage")
    redis_client.publish(channel(prefix), json.dumps({"type": "resync"}))
    wait_for(lambda: edge.health() == 503, what="healthz 503 once sync is down")
    assert "certman_edge_sync_failures_total" in edge.metrics()
    redis_client.set(f"{prefix}:version", "0")
    wait_for(lambda: edge.health() == 200, timeout=2 * DEADLINE, what="healthz back to 200")


# ---- Redis over TLS ------------------------------------------------------------------------


def test_the_edge_verifies_a_tls_redis(
    tmp_path: Path, sites: Sites, upstream: str, start_edge: Callable[..., RunningEdge]
) -> None:
    server = TlsRedisServer(tmp_path / "redis")
    client = server.start()
    try:
        publish_site(client, "tlsedge", sites.record("shop.test", upstream=upstream))
        wrong = make_ca(tmp_path / "wrong", "not the redis CA")
        for tls in (RedisTls(ca_file=wrong.file), RedisTls()):  # the system store: no either
            refused = start_edge(redis_url=server.url, prefix="tlsedge", redis_tls=tls)
            wait_for(
                lambda e=refused: "certman_edge_sync_connection_errors_total 2.0" in e.metrics(),
                what="connection attempts failing",
            )
            assert refused.health() == 503
            with pytest.raises(ssl.SSLError):
                refused.tls("shop.test").close()
        edge = start_edge(
            redis_url=server.url, prefix="tlsedge", redis_tls=RedisTls(ca_file=server.ca.file)
        )
        edge.wait_ready()
        assert edge.https("shop.test")[0] == 200
    finally:
        server.stop()
