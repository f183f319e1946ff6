"""TLS contexts: one listening context per edge, one small context per site.

The listening context carries the session-ticket keys (OpenSSL encrypts tickets with the keys of
the context the connection was accepted on, even after the SNI callback switches context), so
it is created once, before any fork, and shared by every process.
"""

from __future__ import annotations

import os
import ssl

__all__ = ["build_context", "listening_context"]

_MIN_VERSION = ssl.TLSVersion.TLSv1_2


def _server_context() -> ssl.SSLContext:
    # Not create_default_context(): for a server it only adds the system trust store (40-60 ms
    # and memory per context) which a server that does not ask for client certificates never uses.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _MIN_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def build_context(chain_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context holding one certificate chain and its key.

    ``load_cert_chain`` only reads paths, so the PEM goes through an anonymous in-memory file
    (``memfd_create``): the clear key never touches a filesystem, and the file disappears when
    the descriptor is closed, a few microseconds later.
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


def listening_context() -> ssl.SSLContext:
    """The context the HTTPS port accepts on; the SNI callback swaps in a site's context.

    One TLS 1.3 ticket per full handshake instead of OpenSSL's two: each costs ~0.09 ms of
    server CPU (a fresh session, encrypted and MAC'd through OpenSSL 3's provider lookups), and a
    client that resumes needs only one (Go's crypto/tls, hence Caddy, sends one too).
    ``num_tickets`` is copied into each connection when it is accepted, so the SNI callback's
    context switch does not change it; the ticket keys are this context's as well.
    """
    ctx = _server_context()
    ctx.num_tickets = 1
    return ctx
