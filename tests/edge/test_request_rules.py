"""Paths and headers as the upstream will read them: dot-segments, encoded separators,
Connection, Content-Length, underscore spellings, Host, client-IP claims, 1xx responses."""

from __future__ import annotations

import json
import posixpath
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.forwarding import CLIENT_CLAIMS, is_client_claim
from edge.headerrules import (
    BadHeader,
    check_connection,
    check_content_length,
    check_field_names,
    parse_host,
)
from edge.paths import BadPath, normalize_path
from pipeline.distribution.layout import publish_site

from .conftest import (
    RunningEdge,
    Sites,
    h2_exchange,
    raw_exchange,
    refused_as_malformed,
    status_of,
)

# ---- pure rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/a/b", "/a/b"),
        ("/", "/"),
        ("//double/slash", "//double/slash"),
        ("/../b/secret", "/b/secret"),
        ("/x/../../b", "/b"),
        ("/%2e%2e/b/secret", "/b/secret"),
        ("/%2E%2e/%2e/b", "/b"),
        ("/a/./b/.", "/a/b/"),
        ("/a/b/..", "/a/"),
        ("/%7Euser/%41", "/~user/A"),
        ("/a%2fb", "/a%2Fb"),  # kept encoded: a reserved character
        ("/a/..%2fb", "/a/..%2Fb"),  # stays inside the root even if %2F is decoded
        ("/%25", "/%25"),
    ],
)
def test_paths_normalised(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["/..%2fb/secret", "/%2e%2e%2Finternal/admin", "/..%5cb", "/..;/b", "/a/..%2f..%2fb", "/..\\b"],
)
def test_encoded_climbs_refused(raw: str) -> None:
    with pytest.raises(BadPath):
        normalize_path(raw)


_SEGMENTS = st.sampled_from(
    ["a", "b", ".", "..", "%2e", "%2E%2e", "%2e.", "%2f", "..%2f", "%5c", "..;", ";x", "", "%7E"]
)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(st.lists(st.lists(_SEGMENTS, max_size=3).map("".join), max_size=8))
def test_no_normalised_path_leaves_the_prefix(segments: list[str]) -> None:
    raw = "/" + "/".join(segments)
    try:
        path = normalize_path(raw)
    except BadPath:
        return
    assert path.startswith("/")
    assert normalize_path(path) == path  # normalised once and for all
    # As an upstream that decodes everything and resolves dot-segments reads it, under a prefix.
    decoded = path.replace("%2F", "/").replace("%5C", "/").replace("%2E", ".")
    decoded = "/".join(s.split(";", 1)[0] for s in decoded.split("/"))
    resolved = posixpath.normpath("/dealers/a" + decoded)
    assert resolved == "/dealers/a" or resolved.startswith("/dealers/a/"), (raw, path)


def test_header_rules() -> None:
    check_connection(["keep-alive, X-Custom", "close"])
    for named in ("Host", "content-length", " Transfer-Encoding", "Cookie"):
        with pytest.raises(BadHeader, match="end-to-end"):
            check_connection([f"keep-alive, {named}"])
    assert check_content_length([]) is None
    assert check_content_length(["42"]) == 42
    assert check_content_length(["7, 7"]) == 7
    for bad in (["\xb2"], ["٣"], ["-1"], ["+1"], ["1 2"], ["0x10"], [""], ["3", "4"]):
        with pytest.raises(BadHeader):
            check_content_length(bad)
    check_field_names(["X_Custom_Thing", "Content-Length", "Host", "Host_"])  # "host-": no field
    for name in ("Transfer_Encoding", "Content_Length", "CONTENT_LENGTH", "Proxy_Connection"):
        with pytest.raises(BadHeader):
            check_field_names([name])
    assert parse_host("A.TEST") == ("a.test", None)
    assert parse_host("a.test.") == ("a.test", None)
    assert parse_host("a.test:8080") == ("a.test", 8080)
    assert parse_host("[::1]:443") == ("[::1]", 443)
    for bad_host in ("a.test:evil", "a.test...", "a.test:", "a.test:99999", "a..test", "", "a b"):
        with pytest.raises(BadHeader):
            parse_host(bad_host)


def test_client_claims_are_one_list_with_common_spellings() -> None:
    for name in (
        "Client-IP",
        "X-Originating-IP",
        "X-Remote-Addr",
        "X-Forwarded",
        "Forwarded-For",
        "X-Forwarded-Prefix",
        "X-Original-URL",
        "X-Rewrite-URL",
        "X-Cluster-Client-IP",
        "X_Forwarded_For",
        "client_ip",
        "True-Client-IP",
    ):
        assert is_client_claim(name), name
    assert all(c == c.lower() and "_" not in c for c in CLIENT_CLAIMS)
    assert not is_client_claim("X-Request-ID")


# ---- through a real edge --------------------------------------------------------------------


@pytest.fixture
def plain_edge(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
    client_protocol: str,
) -> RunningEdge:
    """An edge proxying plain.test to a prefixed upstream: over HTTP/1.1 with no certificate
    (served on :80), over HTTP/2 with one (HTTP/2 is on :443 only)."""
    publish_site(
        redis_client,
        prefix,
        sites.record("plain.test", upstream=f"{upstream}/dealers/a", cert=client_protocol == "h2"),
    )
    edge = start_edge()
    edge.wait_ready()
    return edge


def _seen(reply: bytes) -> dict[str, object]:
    assert status_of(reply) == 200, reply[:300]
    body = reply.split(b"\r\n\r\n", 1)[1]
    seen: dict[str, object] = json.loads(body)
    return seen


def _send(edge: RunningEdge, target: str, *headers: str, host: str = "plain.test") -> bytes:
    if edge.protocol == "h2":
        return h2_exchange(edge, "plain.test", target, headers, authority=host)
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", *headers, "Connection: close", "", ""]
    return raw_exchange(edge.http_port, "\r\n".join(lines).encode("latin-1"))


def test_dot_segments_never_leave_the_upstream_prefix(plain_edge: RunningEdge) -> None:
    for target, path in (
        ("/../b/secret", "/dealers/a/b/secret"),
        ("/%2e%2e/%2E%2E/internal/admin", "/dealers/a/internal/admin"),
        ("/x/./y/../z?q=/../", "/dealers/a/x/z?q=/../"),
        ("/%7Eme", "/dealers/a/~me"),
    ):
        assert _seen(_send(plain_edge, target))["path"] == path, target
    for target in ("/..%2fb/secret", "/%2e%2e%2finternal/admin", "/..;/b", "/..%5Cb"):
        reply = _send(plain_edge, target)
        assert status_of(reply) == 400, (target, reply[:200])


def test_framing_and_host_tricks_refused(plain_edge: RunningEdge) -> None:
    for header in (
        "Connection: Host",
        "Connection: keep-alive, Content-Length",
        "Connection: Transfer-Encoding",
        "Content-Length: \xb2",
        "Transfer_Encoding: chunked",
        "Content_Length: 5",
    ):
        reply = _send(plain_edge, "/", header)
        assert refused_as_malformed(reply), (header, reply[:200])
        assert b"Traceback" not in reply
    for host in ("plain.test:evil", "plain.test...", "plain.test:"):
        reply = _send(plain_edge, "/", host=host)
        assert status_of(reply) == 400, (host, reply[:200])
    metrics = plain_edge.metrics()
    assert 'certman_edge_requests_rejected_total{reason="bad_header"}' in metrics
    assert 'certman_edge_requests_total{scheme="http",status_class="5xx"} 0.0' in metrics


def test_host_is_forwarded_normalised(plain_edge: RunningEdge) -> None:
    for host, forwarded in (
        ("PLAIN.TEST", "plain.test"),
        ("plain.test.", "plain.test"),
        ("Plain.Test.:80", "plain.test:80"),
    ):
        headers = _seen(_send(plain_edge, "/", host=host))["headers"]
        assert isinstance(headers, dict)
        assert headers["Host"] == forwarded, host
        assert headers["X-Forwarded-Host"] == forwarded


def test_client_ip_claims_are_removed(plain_edge: RunningEdge) -> None:
    claims = [
        "Client-IP: 10.9.9.9",
        "X-Originating-IP: 10.9.9.9",
        "X-Remote-Addr: 10.9.9.9",
        "X-Forwarded: for=10.9.9.9",
        "Forwarded-For: 10.9.9.9",
        "X-Forwarded-Prefix: /admin",
        "X-Original-URL: /admin",
        "X-Rewrite-URL: /admin",
        "X-Cluster-Client-IP: 10.9.9.9",
        "X_Real_IP: 10.9.9.9",
        "Client_IP: 10.9.9.9",
    ]
    seen = _seen(_send(plain_edge, "/", *claims, "X-Request-ID: kept"))
    headers = seen["headers"]
    assert isinstance(headers, dict)
    text = json.dumps(headers)
    assert "10.9.9.9" not in text and "/admin" not in text, text
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["x-request-id"] == "kept"
    assert lower["x-forwarded-for"] == "127.0.0.1"


class _EarlyHints:
    """An upstream answering 103 Early Hints (with a Link and a cookie) before its 200."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n"
                    b"Set-Cookie: interim=1\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nfinal"
                )

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def early_hints() -> Iterator[_EarlyHints]:
    server = _EarlyHints()
    yield server
    server.close()


def test_interim_response_headers_are_not_merged(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    early_hints: _EarlyHints,
    start_edge: Callable[..., RunningEdge],
) -> None:
    upstream = f"http://127.0.0.1:{early_hints.port}"
    publish_site(redis_client, prefix, sites.record("hints.test", upstream=upstream, cert=False))
    edge = start_edge()
    edge.wait_ready()
    reply = _send(edge, "/", host="hints.test")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:300]
    assert body == b"final"
    assert b"link:" not in head.lower() and b"interim" not in head.lower(), head
