"""The TLS profiles, proven by real handshakes against the edge and against a bare server."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import redis

from edge import openssl
from edge.tls import PROFILES, build_context, listening_context
from pipeline.distribution.layout import publish_site
from tests.support.pki import Pki

from .conftest import DEADLINE, RunningEdge, Sites

NAME = "profile.test"
CBC_SUITES = ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA256")


@contextmanager
def bare_server(pki: Pki, listening: ssl.SSLContext, *, site_ciphers: str = "") -> Iterator[int]:
    """A server that handshakes and closes, switching to a site context by SNI as the edge
    does: where each setting must live shows up here without the rest of the edge."""
    chain, key_pem, _ = pki.leaf([NAME])
    site = build_context(chain.encode(), key_pem)
    if site_ciphers:
        site.set_ciphers(site_ciphers)

    def switch(sslobj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        sslobj.context = site

    listening.sni_callback = switch
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(DEADLINE)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            try:
                with listening.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    try:
        yield port
    finally:
        stop.set()
        # Wakes the accept() so that the thread sees ``stop`` now rather than at its timeout.
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()
        thread.join(DEADLINE)
        sock.close()


def client(
    pki: Pki,
    *,
    tls12: bool = False,
    ciphers: str | None = None,
    groups: str | None = None,
) -> ssl.SSLContext:
    ctx = pki.client_context()
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        ctx.set_ciphers(ciphers)
    if groups:
        # The client's offer limited the same way the server's is (a TLS 1.3 key share).
        openssl.set_groups(ctx, groups)
    return ctx


def handshake(ctx: ssl.SSLContext, port: int) -> tuple[str, str]:
    """The version and suite agreed, or ssl.SSLError if the handshake is refused."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as raw,
        ctx.wrap_socket(raw, server_hostname=NAME) as tls,
    ):
        version, cipher = tls.version(), tls.cipher()
        assert version is not None and cipher is not None
        return version, cipher[0]


@pytest.fixture
def edge_port(
    redis_client: redis.Redis, prefix: str, sites: Sites, start_edge: Callable[..., RunningEdge]
) -> int:
    publish_site(redis_client, prefix, sites.record(NAME))
    edge = start_edge()  # listening_context() with the default profile, as the CLI builds it
    edge.wait_ready()
    return edge.https_port


@pytest.fixture
def default_port(pki: Pki) -> Iterator[int]:
    """OpenSSL's defaults: what each refused client below does get without the profile."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with bare_server(pki, ctx, site_ciphers="DEFAULT") as port:
        yield port


@pytest.mark.parametrize("suite", CBC_SUITES)
def test_intermediate_refuses_tls12_cbc(
    pki: Pki, edge_port: int, default_port: int, suite: str
) -> None:
    ctx = client(pki, tls12=True, ciphers=suite)
    assert handshake(ctx, default_port) == ("TLSv1.2", suite)
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        handshake(ctx, edge_port)


@pytest.mark.parametrize("suite", ["DHE-RSA-AES128-GCM-SHA256", "AES128-GCM-SHA256"])
def test_intermediate_refuses_tls12_without_ecdhe(pki: Pki, edge_port: int, suite: str) -> None:
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        handshake(client(pki, tls12=True, ciphers=suite), edge_port)


@pytest.mark.parametrize("group", ["X448", "P-521", "ffdhe2048"])
def test_intermediate_refuses_other_groups(
    pki: Pki, edge_port: int, default_port: int, group: str
) -> None:
    ctx = client(pki, groups=group)
    assert handshake(ctx, default_port)[0] == "TLSv1.3"
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        handshake(ctx, edge_port)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize(
    ("group", "accepted"), [("X448", False), ("P-521", False), ("X25519", True)]
)
def test_groups_seen_by_openssl_s_client(edge_port: int, group: str, accepted: bool) -> None:
    """Another TLS implementation's view of the same thing, its group named in its output."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{edge_port}", "-servername", NAME,
         "-tls1_3", "-groups", group],
        input=b"", capture_output=True, timeout=DEADLINE * 2, check=False,
    )  # fmt: skip
    text = out.stdout.decode(errors="replace")
    assert ("Server Temp Key: " + group.replace("P-521", "ECDH") in text) is accepted, text[-800:]


@pytest.mark.parametrize("group", ["X25519", "P-256", "P-384"])
def test_intermediate_tls13_groups(pki: Pki, edge_port: int, group: str) -> None:
    assert handshake(client(pki, groups=group), edge_port)[0] == "TLSv1.3"


def test_intermediate_tls12_ecdhe_aead(pki: Pki, edge_port: int) -> None:
    suite = "ECDHE-ECDSA-AES128-GCM-SHA256"
    assert handshake(client(pki, tls12=True, ciphers=suite), edge_port) == ("TLSv1.2", suite)
    for suite in ("ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        assert handshake(client(pki, tls12=True, ciphers=suite), edge_port)[1] == suite


def test_modern_is_tls13_only(pki: Pki, default_port: int) -> None:
    with bare_server(pki, listening_context("modern")) as port:
        assert handshake(client(pki, groups="X25519"), port)[0] == "TLSv1.3"
        suite = "ECDHE-ECDSA-AES128-GCM-SHA256"
        with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
            handshake(client(pki, tls12=True, ciphers=suite), port)
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            handshake(client(pki, groups="X448"), port)


def test_settings_on_the_listening_context_are_enough(pki: Pki) -> None:
    """The SNI callback swaps in a site context; the profile must hold after the swap (the
    site context here is the edge's, so this also shows the split of tls.py's settings)."""
    with bare_server(pki, listening_context()) as port:
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            handshake(client(pki, groups="X448"), port)
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            handshake(client(pki, tls12=True, ciphers="ECDHE-ECDSA-AES128-SHA"), port)


def test_unknown_profile_names_the_valid_ones() -> None:
    assert PROFILES == ("intermediate", "modern")
    with pytest.raises(ValueError, match="intermediate, modern"):
        listening_context("old")


def test_site_contexts_offer_only_aead_suites(pki: Pki) -> None:
    chain, key_pem, _ = pki.leaf([NAME])
    names = {c["name"] for c in build_context(chain.encode(), key_pem).get_ciphers()}
    tls12 = {n for n in names if not n.startswith("TLS_")}
    assert tls12 == {
        "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    }  # fmt: skip


def test_private_layout_is_checked_before_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the SSL_CTX pointer read from CPython's struct stopped agreeing with what the ssl
    module reports, contexts are not created: the edge fails to start, loudly."""
    lib = openssl._libssl()
    ctx = listening_context()
    assert lib.ctx_pointer(ctx)
    real = lib.get_options
    monkeypatch.setattr(lib, "get_options", lambda pointer: real(pointer) ^ 1)
    with pytest.raises(openssl.OpenSSLUnavailable, match="layout"):
        listening_context()
    with pytest.raises(openssl.OpenSSLUnavailable, match="not an ssl.SSLContext"):
        openssl.set_groups(object(), "X25519")  # type: ignore[arg-type]


def test_groups_list_must_be_accepted() -> None:
    with pytest.raises(openssl.OpenSSLUnavailable, match="groups list"):
        openssl.set_groups(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), "X25519:no-such-group")
