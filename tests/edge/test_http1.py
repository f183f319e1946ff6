"""The HTTPS port's HTTP/1.1 (edge.https, edge.http1) over real TLS sockets: ALPN, the alert a
refused handshake sends, pipelining answered in order, 100-continue, HTTP/1.0, framing errors,
a chunked body forwarded, and a reader that pauses."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from pipeline.distribution.layout import publish_site

from .conftest import DEADLINE, RunningEdge, Sites, wait_for

NAME = "shop.test"


@pytest.fixture
def edge(
    redis_client: redis.Redis[bytes],
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> RunningEdge:
    publish_site(redis_client, prefix, sites.record(NAME, upstream=upstream))
    running = start_edge()
    running.wait_ready()
    return running


def _connect(edge: RunningEdge, alpn: list[str] | None = None) -> ssl.SSLSocket:
    ctx = edge.pki.client_context()
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", edge.https_port), timeout=DEADLINE)
    return ctx.wrap_socket(raw, server_hostname=NAME)


def _read_response(sock: ssl.SSLSocket, buf: bytes) -> tuple[bytes, bytes, bytes]:
    """(head, body, what follows) of one Content-Length response."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a response: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        rest += chunk
    return head, rest[:length], rest[length:]


def _read_all(sock: ssl.SSLSocket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return data


def test_alpn_offers_http11_and_no_alpn_works_too(edge: RunningEdge) -> None:
    with _connect(edge, ["h2", "http/1.1"]) as sock:
        assert sock.selected_alpn_protocol() == "h2"  # preferred (tests/edge/test_http2.py)
    with _connect(edge, ["http/1.1"]) as sock:
        assert sock.selected_alpn_protocol() == "http/1.1"
    status, _, _ = edge.https(NAME)
    assert status == 200


def test_a_refused_name_gets_its_alert(edge: RunningEdge) -> None:
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        edge.tls("unknown.test").close()
    assert 'certman_edge_tls_failures_total{reason="CALLBACK_FAILED"}' in edge.metrics() or (
        "certman_edge_tls_failures_total" in edge.metrics()
    )


def test_pipelined_requests_are_answered_in_order(edge: RunningEdge) -> None:
    paths = ["/one", "/two?x=1", "/three"]
    with _connect(edge) as sock:
        sock.sendall(b"".join(f"GET {p} HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode() for p in paths))
        buf = b""
        seen = []
        for _ in paths:
            head, body, buf = _read_response(sock, buf)
            assert head.startswith(b"HTTP/1.1 200")
            seen.append(json.loads(body)["path"])
    assert seen == paths


def test_expect_100_continue_gets_an_interim_answer_then_the_body_is_forwarded(
    edge: RunningEdge,
) -> None:
    with _connect(edge) as sock:
        sock.sendall(
            f"POST /up HTTP/1.1\r\nHost: {NAME}\r\nContent-Length: 5\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        head, body, _ = _read_response(sock, interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :])
    seen = json.loads(body)
    assert head.startswith(b"HTTP/1.1 200")
    assert seen["body_len"] == 5 and "Expect" not in seen["headers"]


def test_http10_is_answered_and_closed(edge: RunningEdge) -> None:
    with _connect(edge) as sock:
        sock.sendall(f"GET /old HTTP/1.0\r\nHost: {NAME}\r\n\r\n".encode())
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 200")
    assert b"\r\nConnection: close\r\n" in reply


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 3\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: gzip",
        "Content-Length: 1, 2",
    ],
)
def test_ambiguous_framing_is_a_400_and_the_connection_closes(
    edge: RunningEdge, framing: str
) -> None:
    with _connect(edge) as sock:
        sock.sendall(f"POST / HTTP/1.1\r\nHost: {NAME}\r\n{framing}\r\n\r\nabc".encode())
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:80]


def test_a_chunked_body_reaches_the_upstream_whole(edge: RunningEdge) -> None:
    chunks = [b"a" * 10, b"b" * 70000, b"c"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    with _connect(edge) as sock:
        sock.sendall(
            f"PUT /c HTTP/1.1\r\nHost: {NAME}\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + body
        )
        head, reply, _ = _read_response(sock, b"")
    seen = json.loads(reply)
    assert head.startswith(b"HTTP/1.1 200")
    assert seen["body_len"] == sum(map(len, chunks))
    assert seen["headers"].get("Transfer-Encoding") == "chunked"


def test_a_reader_that_stops_for_a_while_then_gets_it_all(edge: RunningEdge) -> None:
    with _connect(edge) as sock:
        sock.sendall(f"GET /big HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
        time.sleep(0.3)  # a client busy elsewhere: nothing read for a while
        head, body, _ = _read_response(sock, b"")
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) > 2 * 1024 * 1024


def test_a_keepalive_connection_serves_many_requests(edge: RunningEdge) -> None:
    with _connect(edge) as sock:
        buf = b""
        for i in range(20):
            sock.sendall(f"GET /n{i} HTTP/1.1\r\nHost: {NAME}\r\n\r\n".encode())
            head, body, buf = _read_response(sock, buf)
            assert json.loads(body)["path"] == f"/n{i}"
    wait_for(lambda: edge.edge is not None and edge.edge.lifecycle.in_flight == 0)


def test_an_https_upstream_is_verified(
    redis_client: redis.Redis[bytes],
    prefix: str,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
    tmp_path: Path,
) -> None:
    """An upstream whose certificate no trusted CA signed (the test CA is not the system's)
    is never spoken to: 502, and the upstream sees no request."""
    chain, key_pem, _ = sites.pki.leaf(["127.0.0.1", "localhost"])
    pem = tmp_path / "upstream.pem"
    pem.write_bytes(chain.encode() + b"\n" + key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pem)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    requests: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError, ssl.SSLError):
                tls = server_ctx.wrap_socket(conn, server_side=True)
                requests.append(tls.recv(65536))

    threading.Thread(target=serve, daemon=True).start()
    try:
        upstream = f"https://localhost:{port}"
        publish_site(redis_client, prefix, sites.record(NAME, upstream=upstream))
        edge = start_edge()
        edge.wait_ready()
        status, _, body = edge.https(NAME)
        assert status == 502, body
        assert requests == []
        assert 'certman_edge_upstream_errors_total{kind="connect"} 1.0' in edge.metrics()
    finally:
        listener.close()
