"""Scanners' ClientHellos: each refused quietly, counted by reason, the edge still serving."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import redis
from tornado.log import gen_log

from edge import handshakes
from edge.metrics import EdgeMetrics
from pipeline.distribution.layout import publish_site

from .conftest import DEADLINE, RunningEdge, Sites, serial_of


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def _ext(kind: int, data: bytes) -> bytes:
    return _u16(kind) + _u16(len(data)) + data


def client_hello(server_name: bytes | None, *, version: int = 0x0303) -> bytes:
    """A ClientHello offering TLS ``version`` (1.2 by default) with this raw server name."""
    exts = b""
    if server_name is not None:
        entry = b"\x00" + _u16(len(server_name)) + server_name
        exts += _ext(0, _u16(len(entry)) + entry)
    exts += _ext(10, _u16(4) + _u16(0x001D) + _u16(0x0017))  # x25519, P-256
    exts += _ext(11, b"\x01\x00")  # uncompressed points
    exts += _ext(13, _u16(6) + _u16(0x0403) + _u16(0x0804) + _u16(0x0401))
    suites = _u16(0xC02B) + _u16(0xC02F) + _u16(0xC013)
    body = _u16(version) + os.urandom(32) + b"\x00" + _u16(len(suites)) + suites + b"\x01\x00"
    body += _u16(len(exts)) + exts
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16" + _u16(min(version, 0x0301)) + _u16(len(handshake)) + handshake


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``; what the server answers before it closes (or until the deadline)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except (ConnectionResetError, TimeoutError):
            pass  # a server that accepted waits for the client's next flight
        return reply


# Case -> (what is sent, the reason it is counted under).
SCANS: dict[str, tuple[bytes, str]] = {
    "utf8_name": (client_hello("bücher.test".encode()), handshakes.SERVER_NAME_NOT_ASCII),
    "latin1_name": (client_hello(b"\xff\xfe.known.test"), handshakes.SERVER_NAME_NOT_ASCII),
    "bad_punycode": (client_hello(b"xn--zz.test"), "CALLBACK_FAILED"),
    "overlong_label": (client_hello(b"a" * 64 + b".wild.test"), "CALLBACK_FAILED"),
    "overlong_name": (client_hello(b"a." * 130 + b"test"), "BAD_EXTENSION"),
    "empty_label": (client_hello(b"a..known.test"), "CALLBACK_FAILED"),
    "empty_wildcard_label": (client_hello(b".wild.test"), "CALLBACK_FAILED"),
    "ip_literal": (client_hello(b"127.0.0.1"), "CALLBACK_FAILED"),
    "ipv6_literal": (client_hello(b"[::1]"), "CALLBACK_FAILED"),
    "trailing_dot": (client_hello(b"known.test."), "CALLBACK_FAILED"),
    "with_port": (client_hello(b"known.test:443"), "CALLBACK_FAILED"),
    "with_space": (client_hello(b" known.test"), "CALLBACK_FAILED"),
    "nul_byte": (client_hello(b"known\x00.test"), "BAD_EXTENSION"),
    "no_sni": (client_hello(None), "CALLBACK_FAILED"),
    "sslv3": (client_hello(b"known.test", version=0x0300), "VERSION_TOO_LOW"),
    "tls10": (client_hello(b"known.test", version=0x0301), "UNSUPPORTED_PROTOCOL"),
    "garbage": (bytes(range(256)) * 4, "WRONG_VERSION_NUMBER"),
    # SSLv2's record format: a two-byte length with the top bit set, then CLIENT-HELLO.
    "sslv2": (bytes.fromhex("801c0100020003000000100700c0") + os.urandom(16), "UNKNOWN_PROTOCOL"),
    "plain_http": (b"GET / HTTP/1.1\r\nHost: known.test\r\n\r\n", "HTTP_REQUEST"),
}


def _failures(edge: RunningEdge, reason: str) -> float:
    match = re.search(
        rf'^certman_edge_tls_failures_total{{reason="{reason}"}} (\S+)$', edge.metrics(), re.M
    )
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def quiet_edge(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[RunningEdge]:
    publish_site(redis_client, prefix, sites.record("known.test"))
    publish_site(redis_client, prefix, sites.record("*.wild.test"))
    edge = start_edge()
    assert edge.edge is not None
    # Until edge.app installs edge.handshakes instead, its older filter (added by the edge)
    # would drop the CALLBACK_FAILED records before these are counted.
    monkeypatch.setattr(
        gen_log, "filters", [f for f in gen_log.filters if type(f).__name__ != "QuietRefusals"]
    )
    handshakes.install(edge.edge.metrics)
    edge.wait_ready()
    yield edge
    handshakes.uninstall(edge.edge.metrics)


@pytest.mark.parametrize("case", list(SCANS))
def test_scanner_hello_refused_quietly_and_counted(
    case: str,
    quiet_edge: RunningEdge,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    data, reason = SCANS[case]
    before = _failures(quiet_edge, reason)
    for _ in range(2):
        reply = exchange(quiet_edge.https_port, data)
        # An alert record or nothing; never a ServerHello (a handshake record, 0x16).
        assert not reply.startswith(b"\x16"), f"{case}: handshake went on: {reply[:16].hex()}"
    counted = [line for line in quiet_edge.metrics().splitlines() if "tls_failures_total{" in line]
    assert _failures(quiet_edge, reason) == before + 2, counted
    known = quiet_edge.peer_cert("known.test")
    assert serial_of(known)
    assert quiet_edge.peer_cert("x.wild.test")
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Exception ignored" not in out + err, err
    loud = [r for r in caplog.records if r.levelno >= logging.INFO and r.name != "tornado.access"]
    assert not loud, [r.getMessage() for r in loud]


def test_install_is_idempotent_and_other_unraisables_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[object] = []

    def previous(unraisable: object) -> None:
        seen.append(unraisable)

    monkeypatch.setattr(sys, "unraisablehook", previous)
    monkeypatch.setattr(gen_log, "filters", list(gen_log.filters))
    metrics = EdgeMetrics()
    handshakes.install(metrics)
    handshakes.install(metrics)
    handshakes.install(EdgeMetrics())
    assert sum(type(f).__name__ == "_SslErrorFilter" for f in gen_log.filters) == 1
    hook = sys.unraisablehook
    assert getattr(hook, "__wrapped__", None) is previous
    # Anything but the server-name decode failure goes on to the hook that was there.
    other = SimpleNamespace(
        exc_type=UnicodeDecodeError,
        exc_value=UnicodeDecodeError("ascii", b"\xff", 0, 1, "x"),
        exc_traceback=None,
        err_msg=None,
        object=b"\xff",
    )
    hook(other)
    assert seen == [other]
    handshakes.uninstall(metrics)
