"""Generated request lines, headers and bodies thrown at a running edge on both site ports.

Whatever arrives: nothing reaches any address but the site's upstream (a canary server, whose
port the generated targets and hosts keep naming, must never see a connection), no redirect
leaves the site, and the edge keeps serving other clients. Bounded: a fixed number of
examples, derandomised so CI runs the same ones every time.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.distribution.layout import publish_site

from .conftest import Canary, RunningEdge, Sites, status_of

_VISIBLE = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
_ANY = st.characters(min_codepoint=0x01, max_codepoint=0xFF, exclude_characters="\r\n")


def _targets(canary_port: int) -> st.SearchStrategy[str]:
    steering = st.sampled_from(
        [
            f"@127.0.0.1:{canary_port}/",
            f":{canary_port}/",
            f"127.0.0.1:{canary_port}",
            f"http://127.0.0.1:{canary_port}/",
            f"http://shop.test@127.0.0.1:{canary_port}/",
            f"//127.0.0.1:{canary_port}/",
            f"/\\\\127.0.0.1:{canary_port}/",
            "http://shop.test/",
            "https://shop.test:1/x",
            "*",
            "/",
            "/%2e%2e/",
            "/..%2f",
            "/..;/",
            "/%2E%2e%5c",
            "@evil.test/",
            "//evil.test/",
        ]
    )
    return st.builds(lambda a, b: a + b, steering, st.text(_VISIBLE, max_size=24)) | st.text(
        _VISIBLE, max_size=40
    )


_HOSTS = st.sampled_from(
    [
        "shop.test",
        "plain.test",
        "SHOP.TEST.",
        "shop.test:443",
        "",
        "shop.test:evil",
        "shop.test...",
        "plain.test:",
        "plain.test:0",
    ]
) | st.text(_VISIBLE, max_size=30)
_TOKEN = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":")
_HEADER_NAMES = st.sampled_from(
    [
        "Forwarded",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "X-Real-IP",
        "Expect",
        "Connection",
        "Upgrade",
        "Transfer-Encoding",
        "Content-Length",
        "Host",
        "Cookie",
        "Via",
        "Transfer_Encoding",
        "Content_Length",
        "Client-IP",
        "X-Original-URL",
    ]
) | st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=":"),
    min_size=1,
    max_size=20,
)
_METHODS = st.sampled_from(
    ["GET", "HEAD", "POST", "PUT", "OPTIONS", "CONNECT", "TRACE", "PATCH"]
) | st.text(_VISIBLE, min_size=1, max_size=10)


@st.composite
def requests(draw: st.DrawFn, canary_port: int) -> tuple[bytes, str]:
    method = draw(_METHODS)
    target = draw(_targets(canary_port))
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x"]))
    host = draw(_HOSTS)
    lines = [f"{method} {target} {version}", f"Host: {host}", "Connection: close"]
    for _ in range(draw(st.integers(0, 4))):
        lines.append(f"{draw(_HEADER_NAMES)}: {draw(st.text(_ANY, max_size=40))}")
    body = draw(st.binary(max_size=64))
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        body = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
    else:
        body = b""
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    return raw, draw(st.sampled_from(["http", "https"]))


def _exchange(edge: RunningEdge, raw: bytes, port_kind: str) -> bytes:
    port = edge.http_port if port_kind == "http" else edge.https_port
    sock = socket.create_connection(("127.0.0.1", port), timeout=1.0)
    try:
        if port_kind == "https":
            sock = edge.pki.client_context().wrap_socket(sock, server_hostname="shop.test")
        sock.sendall(raw)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply
    except (TimeoutError, OSError):
        return b""  # no answer, or a reset: both fine, the other clients are what matter
    finally:
        sock.close()


def test_fuzzed_requests_stay_on_the_site(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    canary: Canary,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("shop.test", upstream=upstream))
    publish_site(redis_client, prefix, sites.record("plain.test", upstream=upstream, cert=False))
    publish_site(redis_client, prefix, sites.record("bystander.test", upstream=upstream))
    edge = start_edge()
    edge.wait_ready()
    redirect = f"https://shop.test:{edge.https_port}/".encode()
    sent = 0

    @settings(
        max_examples=250,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests(canary.port))
    def one(request: tuple[bytes, str]) -> None:
        nonlocal sent
        raw, port_kind = request
        reply = _exchange(edge, raw, port_kind)
        sent += 1
        assert canary.hits == [], raw
        head = reply.partition(b"\r\n\r\n")[0]
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"location:"):
                assert line[9:].strip().startswith(redirect), (raw, line)
        assert b"Traceback" not in reply
        if status_of(reply) >= 500:
            assert status_of(reply) in (502, 503, 504, 508), (raw, reply[:300])
        if sent % 50 == 0:
            assert edge.https("bystander.test")[0] == 200

    one()
    assert sent >= 250
    assert edge.https("bystander.test")[0] == 200
    assert edge.health() == 200
