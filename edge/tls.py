"""TLS contexts: one listening context per edge, one small context per site.

The listening context carries the session-ticket keys (OpenSSL encrypts tickets with the keys of
the context the connection was accepted on, even after the SNI callback switches context), so
it is created once, before any fork, and shared by every process.

Profiles follow Mozilla's server-side TLS recommendations (version 5.7): ``intermediate`` (the
default) is TLS 1.2 and 1.3, TLS 1.2 with forward-secret AEAD suites only; ``modern`` is TLS 1.3
only. Which context each setting must be on was found by handshaking against both (see
tests/edge/test_tls_profiles.py): OpenSSL negotiates the version and the TLS 1.3 key share on the
connection's first (listening) context, before the SNI callback runs, and picks the TLS 1.2
suite after it, so the cipher list goes on both.
"""

from __future__ import annotations

import os
import ssl

from edge import openssl

__all__ = ["ALPN", "PROFILES", "build_context", "listening_context"]

PROFILES = ("intermediate", "modern")

# What the HTTPS port offers by ALPN, preferred first (edge.https picks the protocol from it).
ALPN = ["h2", "http/1.1"]

# TLS 1.2: ECDHE key exchange and AEAD only (no CBC, no DHE, no RSA key exchange). TLS 1.3's
# three suites are OpenSSL's default and need no setting.
_TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
# OpenSSL 3.0 also accepts X448, P-521 and the FFDHE groups by default.
_GROUPS = "X25519:P-256:P-384"

_MIN_VERSION = {"intermediate": ssl.TLSVersion.TLSv1_2, "modern": ssl.TLSVersion.TLSv1_3}


def _check_profile(profile: str) -> ssl.TLSVersion:
    try:
        return _MIN_VERSION[profile]
    except KeyError:
        raise ValueError(
            f"unknown TLS profile {profile!r}: expected one of {', '.join(PROFILES)}"
        ) from None


def _server_context() -> ssl.SSLContext:
    # Not create_default_context(): for a server it only adds the system trust store (40-60 ms
    # and memory per context) which a server that does not ask for client certificates never uses.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # On both contexts: OpenSSL selects the protocol with the callback of the context the SNI
    # callback switched to.
    ctx.set_alpn_protocols(ALPN)
    return ctx


def build_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context holding one certificate chain and its key.

    ``load_cert_chain`` only reads paths, so the PEM goes through an anonymous in-memory file
    (``memfd_create``): the clear key never touches a filesystem, and the file disappears when
    the descriptor is closed, a few microseconds later.

    It needs no profile: the listening context fixes the version and key exchange before the
    SNI callback switches to this one, and the TLS 1.2 suites allowed are the same in both.
    """
    ctx = _server_context()
    fd = os.memfd_create("certman-tls", os.MFD_CLOEXEC)
    try:
        data = memoryview(b"".join((chain_pem.rstrip(b"\n"), b"\n", key_pem)))
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        del data
        # Also checks that the key matches the leaf certificate.
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        # Zero the pages before they go back to the kernel.
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    return ctx


def listening_context(profile: str = "intermediate") -> ssl.SSLContext:
    """The context the HTTPS port accepts on; the SNI callback swaps in a site's context.

    One TLS 1.3 ticket per full handshake instead of OpenSSL's two: each costs ~0.09 ms of
    server CPU (a fresh session, encrypted and MAC'd through OpenSSL 3's provider lookups), and a
    client that resumes needs only one (Go's crypto/tls, hence Caddy, sends one too).
    ``num_tickets`` is copied into each connection when it is accepted, so the SNI callback's
    context switch does not change it; the ticket keys are this context's as well, and so is
    the ticket callback that keeps a ticket to the server name it was issued for.

    Raises ValueError for an unknown profile, and :class:`edge.openssl.OpenSSLUnavailable` if a
    setting Python has no API for cannot be made.
    """
    minimum = _check_profile(profile)
    ctx = _server_context()
    ctx.minimum_version = minimum
    ctx.num_tickets = 1
    openssl.set_groups(ctx, _GROUPS)
    openssl.bind_tickets_to_server_name(ctx)
    openssl.disable_session_cache(ctx)
    return ctx
