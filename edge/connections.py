"""Client connections as a budgeted resource: the edge's own accept loop.

Tornado's accept loop (``tornado.netutil.add_accept_handler``) lets every ``accept`` error but
"no more waiting" escape into the event loop, which logs it with a traceback and calls the
handler again at once: at the open-file limit (EMFILE) that is a busy loop writing megabytes of
tracebacks a second, while the connections that caused it stay open. And it accepts whatever
comes, from whoever, for as long as the peer likes to stay silent. So the site ports accept here
instead, and:

- a connection is refused (closed at once) beyond ``total`` open connections of this process, or
  beyond ``per_address`` from one client (an IPv4 address, or an IPv6 /64);
- a connection must deliver its first request byte within ``first_byte_timeout`` of being
  accepted (TLS handshake included), or it is closed: separate from, and much shorter than, the
  keep-alive idle timeout between requests;
- when ``accept`` fails for want of resources (EMFILE, ENFILE, ENOBUFS, ENOMEM) accepting on that
  socket pauses (50 ms, doubling up to 1 s) instead of spinning, counted in a metric and logged
  as one line a minute at most (:class:`edge.ratelog.RateLimitedLog`).

The connection is handed over as a socket to a server with ``handle_socket(conn, address,
release)`` (the HTTPS port's :class:`edge.https.SiteServer`, which runs TLS and the first-byte
timeout itself and calls ``release`` once the connection is gone), or as
``tornado.tcpserver.TCPServer`` does it: an ``IOStream`` given to its documented
``handle_stream`` (the plain port's Tornado server).
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream, SSLIOStream
from tornado.netutil import ssl_wrap_socket

from edge.ratelog import RateLimitedLog
from edge.shares import client_key

__all__ = [
    "BudgetedAcceptor",
    "ConnectionBudget",
    "ConnectionLimits",
    "SocketServer",
    "accept_error_log",
    "default_total",
]

log = logging.getLogger(__name__)

# accept() errors that mean "no resources now": back off, the next try may succeed.
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
_BACKOFF_FIRST = 0.05
_BACKOFF_MAX = 1.0
# Accepts per readable event, so that a flood does not starve the requests already in.
_BATCH = 64


def accept_error_log() -> RateLimitedLog:
    """Where accept failures are logged: one line a minute, however many there are."""
    return RateLimitedLog(log, logging.WARNING, 60.0)


def default_total() -> int:
    """Half the open-file limit: the other half is for upstream connections, Redis, the mirror."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 32768
    return max(16, soft // 2)


@dataclass(frozen=True)
class ConnectionLimits:
    total: int = 0  # 0: default_total()
    per_address: int = 128
    first_byte_timeout: float = 10.0


class SocketServer(Protocol):
    """A server that takes accepted sockets itself (edge.https.SiteServer)."""

    def handle_socket(
        self, conn: socket.socket, address: Any, release: Callable[[], None] | None
    ) -> None: ...


class ConnectionBudget:
    """Open client connections of one process: in total and by client."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.total = limits.total or default_total()
        self.per_address = limits.per_address
        self.first_byte_timeout = limits.first_byte_timeout
        self.open = 0
        self._by_client: dict[str, int] = {}

    def admit(self, client: str, *, per_address: bool = True) -> str | None:
        """Count a new connection from ``client``, or say why not ("total" or "per_address").
        ``per_address`` False: a trusted load balancer's, which carries many clients."""
        if self.open >= self.total:
            return "total"
        held = self._by_client.get(client, 0)
        if per_address and held >= self.per_address:
            return "per_address"
        self.open += 1
        self._by_client[client] = held + 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        left = self._by_client.get(client, 1) - 1
        if left > 0:
            self._by_client[client] = left
        else:
            self._by_client.pop(client, None)


class _Watch:
    """What a budgeted stream carries: its release (once) and whether a byte arrived."""

    __slots__ = ("got_bytes", "release")

    def __init__(self, release: Callable[[], None] | None) -> None:
        self.release = release
        self.got_bytes = False

    def closed(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            release()


class _Watched(IOStream):
    """A stream that tells its :class:`_Watch` of its first bytes and of its close."""

    certman_watch: _Watch

    def read_from_fd(self, buf: bytearray | memoryview) -> int | None:
        n = super().read_from_fd(buf)
        if n:
            self.certman_watch.got_bytes = True
        return n

    def close(self, exc_info: Any = False) -> None:
        super().close(exc_info)
        self.certman_watch.closed()


class _Stream(_Watched):
    pass


class _TlsStream(_Watched, SSLIOStream):
    pass


class BudgetedAcceptor:
    """Accepts on ``sockets`` for ``server`` within ``budget`` (None: no budget, no first-byte
    timeout; the accept back-off still applies). ``hand_over``, if given, takes each accepted
    socket instead (the PROXY protocol's header reader, which makes the stream itself).
    ``balancer`` says which peers are trusted HTTP load balancers, exempt from the per-address
    cap (each of their connections carries other clients)."""

    def __init__(
        self,
        server: HTTPServer | SocketServer,
        sockets: list[socket.socket],
        tls: ssl.SSLContext | None,
        budget: ConnectionBudget | None,
        *,
        on_refused: Callable[[str], None] = lambda reason: None,
        on_accept_error: Callable[[str], None] = lambda reason: None,
        hand_over: Callable[[socket.socket, Any], None] | None = None,
        balancer: Callable[[str], bool] = lambda address: False,
        error_log: RateLimitedLog | None = None,
    ) -> None:
        self._hand_over = hand_over
        self._balancer = balancer
        self._server = server
        self._sockets = sockets
        self._tls = tls
        self._budget = budget
        self._on_refused = on_refused
        self._on_accept_error = on_accept_error
        self._loop = IOLoop.current()
        self._backoff: dict[int, float] = {}
        self._paused: set[int] = set()
        # Shared by a process's acceptors (one line a minute for all its ports), if given.
        self._log = error_log or accept_error_log()
        self._running = False

    def start(self) -> None:
        self._running = True
        for sock in self._sockets:
            sock.setblocking(False)
            self._listen(sock)

    def stop(self) -> None:
        self._running = False
        for sock in self._sockets:
            if sock.fileno() != -1 and sock.fileno() not in self._paused:
                self._loop.remove_handler(sock.fileno())
            sock.close()

    def _listen(self, sock: socket.socket) -> None:
        self._loop.add_handler(sock, lambda s, _: self._accept(sock), IOLoop.READ)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(_BATCH):
            try:
                conn, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._pause(sock, exc)
                return
            self._backoff.pop(sock.fileno(), None)
            if self._hand_over is not None:
                self._hand_over(conn, address)
            else:
                self.admit(conn, address)

    def _pause(self, sock: socket.socket, exc: OSError) -> None:
        """Stop accepting on ``sock`` for a while: the error repeats until resources free up."""
        code = exc.errno or 0
        name = errno.errorcode.get(code, "other") if code in _EXHAUSTED else "other"
        self._on_accept_error(name)
        fd = sock.fileno()
        delay = min(self._backoff.get(fd, _BACKOFF_FIRST / 2) * 2, _BACKOFF_MAX)
        self._backoff[fd] = delay
        self._log.log(
            "accept on %s failed: %s; pausing accepts (%d connections open)",
            sock.getsockname(),
            exc.strerror or exc,
            self._budget.open if self._budget is not None else -1,
        )
        self._loop.remove_handler(fd)
        self._paused.add(fd)
        self._loop.call_later(delay, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._paused.discard(sock.fileno())
        if self._running and sock.fileno() != -1:
            self._listen(sock)
            self._accept(sock)

    def admit(self, conn: socket.socket, address: Any) -> None:
        """Count ``conn`` from ``address`` in the budget (or refuse it) and serve it: called
        for each connection accepted here, and by the PROXY header reader with the client's
        address the header gave."""
        release: Callable[[], None] | None = None
        budget = self._budget
        if budget is not None:
            peer = address[0] if isinstance(address, tuple) else ""
            client = client_key(peer)
            refusal = budget.admit(client, per_address=not self._balancer(peer))
            if refusal is not None:
                self._on_refused(refusal)
                # A reset, not a FIN: the refused connection leaves no TIME_WAIT here.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
            release = lambda: budget.release(client)  # noqa: E731
        if not isinstance(self._server, HTTPServer):
            self._server.handle_socket(conn, address, release)
            return
        watch = _Watch(release)
        try:
            stream = self._stream(conn, watch)
        except (OSError, ssl.SSLError):
            watch.closed()
            conn.close()
            return
        if budget is not None and budget.first_byte_timeout > 0:
            self._loop.call_later(budget.first_byte_timeout, self._first_byte_due, stream)
        self._server.handle_stream(stream, address)

    def _stream(self, conn: socket.socket, watch: _Watch) -> _Stream | _TlsStream:
        server = self._server
        assert isinstance(server, HTTPServer)
        stream: _Stream | _TlsStream
        if self._tls is not None:
            wrapped = ssl_wrap_socket(
                conn, self._tls, server_side=True, do_handshake_on_connect=False
            )
            stream = _TlsStream(
                wrapped,
                max_buffer_size=server.max_buffer_size,
                read_chunk_size=server.read_chunk_size,
            )
        else:
            stream = _Stream(
                conn, max_buffer_size=server.max_buffer_size, read_chunk_size=server.read_chunk_size
            )
        stream.certman_watch = watch
        return stream

    def _first_byte_due(self, stream: _Stream | _TlsStream) -> None:
        if not stream.closed() and not stream.certman_watch.got_bytes:
            self._on_refused("first_byte_timeout")
            stream.close()
