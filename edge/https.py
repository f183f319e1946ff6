"""The HTTPS port's connections: TLS by the event loop, then HTTP/1.1 or HTTP/2 by ALPN.

The edge's accept loop (:mod:`edge.connections`, or the PROXY protocol's reader) hands each
accepted socket to :meth:`SiteServer.handle_socket`, which gives it to the loop with
``connect_accepted_socket(ssl=listening context)``: uvloop's (or asyncio's) ``SSLObject``-based
TLS, where the listening context's SNI callback sets the site's context on the ``SSLObject``
(:mod:`edge.sni`) as it does on a socket. The handshake must be done within the connection's
first-byte timeout. A handshake that fails is counted by reason (:func:`edge.handshakes.failed`);
one that completes is timed (``certman_edge_tls_handshake_seconds``) and the protocol ALPN
chose takes the connection: ``h2`` -> ``edge.http2.H2Protocol``, anything else (or no ALPN)
-> :class:`edge.http1.H1Protocol`. Both are made with ``(server, client address, release,
first byte due)`` and add themselves to :attr:`SiteServer.connections` while open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol

from edge import handshakes
from edge.exchange import Lifecycle, Proxy
from edge.http1 import H1Protocol
from edge.metrics import EdgeMetrics
from edge.sni import sni_started

__all__ = ["ClientConnection", "SiteServer"]

log = logging.getLogger(__name__)

# Without a first-byte timeout, still a bound on a handshake that never finishes.
_HANDSHAKE_TIMEOUT = 60.0


class ClientConnection(Protocol):
    """What a client protocol offers the server (for shutdown)."""

    def close_when_idle(self) -> None: ...

    def abort(self) -> None: ...


def _once(release: Callable[[], None] | None) -> Callable[[], None] | None:
    if release is None:
        return None
    done = False

    def once() -> None:
        nonlocal done
        if not done:
            done = True
            release()

    return once


class _Dispatch(asyncio.Protocol):
    """The protocol the loop holds until the handshake is done: then ALPN picks the real one."""

    __slots__ = ("_client", "_due", "_release", "_server", "_switched")

    def __init__(
        self, server: SiteServer, client: str, release: Callable[[], None] | None, due: float
    ) -> None:
        self._server = server
        self._client = client
        self._release = release
        self._due = due
        self._switched = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        server = self._server
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = None
        if ssl_object is not None:
            started = sni_started(ssl_object)
            if started is not None and server.on_handshake is not None:
                server.on_handshake(time.perf_counter() - started)
            alpn = ssl_object.selected_alpn_protocol()
        protocol: asyncio.Protocol
        if alpn == "h2":
            from edge.http2 import H2Protocol  # type: ignore[import-not-found,unused-ignore]

            protocol = H2Protocol(server, self._client, self._release, self._due)
        else:
            protocol = H1Protocol(server, self._client, self._release, self._due)
        self._switched = True
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._switched and self._release is not None:
            self._release()


class SiteServer:
    """The HTTPS port of one edge process (see the module docstring)."""

    def __init__(
        self,
        proxy: Proxy,
        tls: ssl.SSLContext,
        metrics: EdgeMetrics,
        lifecycle: Lifecycle,
        *,
        idle_timeout: float = 60.0,
        max_header_size: int = 32 * 1024,
        first_byte_timeout: float = 10.0,
        scheme: str = "https",
    ) -> None:
        self.proxy = proxy
        self.tls = tls
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.idle_timeout = idle_timeout
        self.max_header_size = max_header_size
        self.first_byte_timeout = first_byte_timeout
        self.scheme = scheme
        self.connections: set[Any] = set()
        self.on_handshake: Callable[[float], None] | None = None
        self._handshaking: set[asyncio.Task[None]] = set()

    def refused(self, reason: str) -> None:
        self.metrics.connections_refused.labels(reason).inc()

    def handle_socket(
        self, conn: socket.socket, address: Any, release: Callable[[], None] | None
    ) -> None:
        """Serve an accepted connection; ``release`` (if any) is called once when it is gone."""
        client = address[0] if isinstance(address, tuple) else ""
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = asyncio.get_running_loop().create_task(self._serve(conn, client, _once(release)))
        self._handshaking.add(task)
        task.add_done_callback(self._handshaking.discard)

    async def _serve(
        self, conn: socket.socket, client: str, release: Callable[[], None] | None
    ) -> None:
        timeout = self.first_byte_timeout if self.first_byte_timeout > 0 else _HANDSHAKE_TIMEOUT
        due = time.monotonic() + self.first_byte_timeout if self.first_byte_timeout > 0 else 0.0
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: _Dispatch(self, client, release, due),
                conn,
                ssl=self.tls,
                ssl_handshake_timeout=timeout,
            )
        except asyncio.CancelledError:
            conn.close()
            if release is not None:
                release()
            raise
        except Exception as exc:
            if due and time.monotonic() >= due - 0.01:
                self.refused("first_byte_timeout")
            elif isinstance(exc, ssl.SSLError):
                handshakes.failed(exc, client)
            else:
                log.debug("connection from %s ended in its handshake: %s", client, exc)
            conn.close()
            if release is not None:
                release()

    def stop(self) -> None:
        """Shutdown begins: idle connections close now, busy ones after their response."""
        for connection in list(self.connections):
            connection.close_when_idle()

    async def close_all_connections(self) -> None:
        for task in list(self._handshaking):
            task.cancel()
        for connection in list(self.connections):
            connection.abort()
