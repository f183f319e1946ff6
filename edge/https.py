"""The HTTPS port's connections: TLS, then HTTP/1.1 or HTTP/2 by ALPN.

The edge's accept loop (:mod:`edge.connections`, or the PROXY protocol's reader) hands each
accepted socket to :meth:`SiteServer.handle_socket`, which gives it to the loop as a plain TCP
transport (``connect_accepted_socket``: uvloop's or asyncio's) under a :class:`TlsConnection`:
TLS with an ``SSLObject`` over memory BIOs, where the listening context's SNI callback sets the
site's context on the ``SSLObject`` (:mod:`edge.sni`) as it would on a socket. The handshake
must be done within the connection's first-byte timeout. A handshake that fails is counted by
reason (:func:`edge.handshakes.failed`) and its alert sent; one that completes is timed
(``certman_edge_tls_handshake_seconds``), and the protocol ALPN chose takes the connection, with
the :class:`TlsConnection` as its transport: ``h2`` -> ``edge.http2.H2Protocol``, anything else
(or no ALPN) -> :class:`edge.http1.H1Protocol`. Both are made with ``(server, client address,
release, first byte due)``, add themselves to :attr:`SiteServer.connections` while open (with
``close_when_idle()`` and ``abort()`` for shutdown) and call ``release`` once when gone; the
core they run requests on is ``server.proxy`` (:class:`edge.exchange.Proxy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from edge import handshakes
from edge.exchange import Lifecycle, Proxy
from edge.http1 import H1Protocol
from edge.metrics import EdgeMetrics
from edge.sni import sni_started

__all__ = ["ClientConnection", "SiteServer"]

log = logging.getLogger(__name__)


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


# A lingering close (TlsConnection.close) reads and drops at most this much, for at most this
# long: enough for a request body in flight, too little for a client to hold a connection open.
LINGER_SECONDS = 2.0
LINGER_BYTES = 256 * 1024


class TlsConnection(asyncio.Protocol):
    """TLS over the loop's plain TCP transport (``SSLObject`` and memory BIOs), and the
    transport the HTTP protocol above it writes to.

    Not the loop's own TLS (``connect_accepted_socket(ssl=...)``): both asyncio's and uvloop's
    close the socket without sending the alert a refused handshake wrote (an SNI callback's
    ``unrecognized_name``: the client would see a bare EOF), and here the handshake's end is
    where ALPN picks the protocol, with nothing in between."""

    def __init__(
        self, server: SiteServer, client: str, release: Callable[[], None] | None, due: float
    ) -> None:
        self._server = server
        self._client = client
        self._release = release
        self._due = due
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = server.tls.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._raw: asyncio.Transport | None = None
        self._app: asyncio.Protocol | None = None
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        # After close(): the bytes the client may still send before the connection is dropped.
        self._linger_left: int | None = None

    # ---- from the loop --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = cast(asyncio.Transport, transport)  # uvloop's do not subclass it
        self._server.handshaking.add(self)
        if self._due:
            delay = max(0.0, self._due - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        if self._app is None and self._raw is not None:
            self._server.refused("first_byte_timeout")
            self._raw.abort()

    def data_received(self, data: bytes) -> None:
        if self._linger_left is not None:
            self._linger_left -= len(data)  # read and dropped: see close()
            if self._linger_left < 0 and self._raw is not None:
                self._raw.abort()
            return
        self._incoming.write(data)
        if self._app is None and not self._handshake():
            return
        sslobj = self._ssl
        chunks = []
        try:
            while True:
                chunk = sslobj.read(32768)  # at most one record (16 KiB) a call anyway
                if not chunk:
                    break  # close_notify
                chunks.append(chunk)
                if not self._incoming.pending and not sslobj.pending():
                    break
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._closing = True
        except ssl.SSLError as exc:
            log.debug("TLS error from %s: %s", self._client, exc)
            self.abort()
            return
        if self._outgoing.pending and self._raw is not None:
            self._raw.write(self._outgoing.read())  # a post-handshake message (a ticket)
        app = self._app
        if app is None:
            return
        if chunks:
            app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if self._closing and self._raw is not None:
            self.close()

    def _handshake(self) -> bool:
        """Drive the handshake; True once it is done and the HTTP protocol is in place."""
        server = self._server
        raw = self._raw
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            if self._outgoing.pending and raw is not None:
                raw.write(self._outgoing.read())
            return False
        except ssl.SSLError as exc:
            handshakes.failed(exc, self._client)
            if raw is not None:
                if self._outgoing.pending:
                    raw.write(self._outgoing.read())  # the alert, which says why
                raw.close()
            return False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        server.handshaking.discard(self)
        if self._outgoing.pending and raw is not None:
            raw.write(self._outgoing.read())
        started = sni_started(self._ssl)
        if started is not None and server.on_handshake is not None:
            server.on_handshake(time.perf_counter() - started)
        app: asyncio.Protocol
        if self._ssl.selected_alpn_protocol() == "h2":
            from edge.http2 import H2Protocol  # type: ignore[import-not-found,unused-ignore]

            app = H2Protocol(server, self._client, self._release, self._due)
        else:
            app = H1Protocol(server, self._client, self._release, self._due)
        self._app = app
        app.connection_made(cast(asyncio.Transport, self))
        return True

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._raw = None
        self._server.handshaking.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._app is not None:
            self._app.connection_lost(exc)
        elif self._release is not None:
            self._release()

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    # ---- the transport the HTTP protocol sees ---------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raw = self._raw
        if raw is None or self._closing:
            return
        view = memoryview(data)
        sslobj = self._ssl
        while view:
            written = sslobj.write(view)
            view = view[written:]
        raw.write(self._outgoing.read())

    def close(self) -> None:
        raw = self._raw
        if raw is None or self._linger_left is not None:
            return
        self._closing = True
        with contextlib.suppress(ssl.SSLError):
            self._ssl.unwrap()  # close_notify
        if self._outgoing.pending:
            raw.write(self._outgoing.read())
        if not raw.can_write_eof():
            raw.close()
            return
        # A lingering close, as Apache and nginx do: a client still sending (a body the edge
        # answered early: 413, 502, 408) would get a reset for the bytes left unread, and a
        # reset can overtake the answer in the client's TCP stack, which then never sees it. So
        # the edge half-closes, and reads and drops what still comes for a moment before it
        # lets go: until the client closes too, LINGER_BYTES arrive, or LINGER_SECONDS pass.
        self._linger_left = LINGER_BYTES
        try:
            raw.write_eof()
        except OSError:  # the client is gone already (reset): nothing to linger for
            raw.abort()
            return
        raw.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, raw.abort)

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def pause_reading(self) -> None:
        if self._raw is not None and self._linger_left is None:  # lingering reads go on
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._raw is not None:
            self._raw.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)


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
        self.handshaking: set[TlsConnection] = set()  # connections still in their handshake
        self.on_handshake: Callable[[float], None] | None = None
        self._accepting: set[asyncio.Task[None]] = set()

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
        self._accepting.add(task)
        task.add_done_callback(self._accepting.discard)

    async def _serve(
        self, conn: socket.socket, client: str, release: Callable[[], None] | None
    ) -> None:
        due = time.monotonic() + self.first_byte_timeout if self.first_byte_timeout > 0 else 0.0
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: TlsConnection(self, client, release, due), conn
            )
        except asyncio.CancelledError:
            conn.close()
            if release is not None:
                release()
            raise
        except OSError as exc:
            log.debug("connection from %s failed: %s", client, exc)
            conn.close()
            if release is not None:
                release()

    def stop(self) -> None:
        """Shutdown begins: idle connections close now, busy ones after their response."""
        for connection in list(self.connections):
            connection.close_when_idle()

    async def close_all_connections(self) -> None:
        for task in list(self._accepting):
            task.cancel()
        for pending in list(self.handshaking):
            pending.abort()
        for connection in list(self.connections):
            connection.abort()
