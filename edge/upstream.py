"""Keep-alive connections to upstreams for the proxy's HTTP client.

Tornado's ``SimpleAsyncHTTPClient`` opens a connection per request and sends
``Connection: close``. This client keeps a connection whose response was complete and
self-delimited (Content-Length, chunked, or no body) on HTTP/1.1 without ``Connection: close``
in a small per-upstream idle pool, and hands it to the next request to the same host, port and
scheme. An idle connection is used only if it is younger than ``idle_timeout`` (well under the
keep-alive timeouts of common servers: Node 5 s, Caddy/Go 90 s+, nginx 75 s) and the socket shows
neither EOF nor stray bytes; a request that fails on a reused connection before any response
arrived can be retried once by the caller (:attr:`REUSED` tells it), since the upstream may
have closed the connection just as the request left.

Every request of the edge uses the same TLS settings, so the pool key is (host, port, TLS).

Tornado has no public hook for either, so this subclasses its private ``_HTTPConnection``:
pyproject.toml pins Tornado to the minor release this was checked against, and
``tests/edge/test_upstream_contract.py`` fails when the private methods relied on change.

:meth:`KeepAliveHTTPClient.cancel` ends a request at once, in any phase (queued, connecting,
sending, receiving): its connection is closed, never pooled, and its slot among
``max_clients`` is freed. The proxy calls it when its client leaves.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import time
from typing import Any

from tornado.http1connection import HTTP1Connection
from tornado.httpclient import HTTPRequest
from tornado.httputil import HTTPHeaders, RequestStartLine, ResponseStartLine
from tornado.ioloop import IOLoop, PeriodicCallback
from tornado.iostream import IOStream
from tornado.netutil import Resolver
from tornado.simple_httpclient import SimpleAsyncHTTPClient, _HTTPConnection
from tornado.tcpclient import TCPClient

__all__ = ["REUSED", "KeepAliveHTTPClient", "UpstreamCancelled", "UpstreamPool"]

# Set on an HTTPRequest (True/False) once its connection is chosen.
REUSED = "certman_reused_connection"
_KEY = "_certman_pool_key"
_SERVED = "_certman_served"
_CONNECTION = "_certman_connection"
_CANCELLED = "_certman_cancelled"

PoolKey = tuple[str, int, bool]


def _alive(stream: IOStream) -> bool:
    """No EOF, no error and nothing unread on an idle connection (which should be silent)."""
    if stream.closed() or stream._read_buffer_size:
        return False
    sock = stream.socket
    if sock is None:
        return False
    try:
        # The plain socket's recv, also for TLS: peek at the TCP bytes, not at TLS records.
        peeked = socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    del peeked  # b"": EOF; anything else: stray bytes. Either way, not usable.
    return False


class UpstreamPool:
    """Idle keep-alive streams by (host, port, TLS), newest first out."""

    def __init__(self, max_idle_per_upstream: int = 32, idle_timeout: float = 2.0) -> None:
        self.max_idle = max_idle_per_upstream
        self.idle_timeout = idle_timeout
        self._idle: dict[PoolKey, list[tuple[float, IOStream]]] = {}
        self._sweeper: PeriodicCallback | None = None
        self.reused = 0
        self.opened = 0

    def take(self, key: PoolKey) -> IOStream | None:
        streams = self._idle.get(key)
        now = time.monotonic()
        while streams:
            since, stream = streams.pop()
            stream.set_close_callback(None)
            if now - since <= self.idle_timeout and _alive(stream):
                if not streams:
                    del self._idle[key]
                self.reused += 1
                return stream
            stream.close()
        self._idle.pop(key, None)
        return None

    def give(self, key: PoolKey, stream: IOStream) -> None:
        if not _alive(stream) or self.max_idle < 1:
            stream.close()
            return
        streams = self._idle.setdefault(key, [])
        if len(streams) >= self.max_idle:
            streams.pop(0)[1].close()
        streams.append((time.monotonic(), stream))
        stream.set_close_callback(lambda: self._forget(key, stream))
        if self._sweeper is None:
            self._sweeper = PeriodicCallback(self._sweep, self.idle_timeout * 1000)
            self._sweeper.start()

    def discard(self, key: PoolKey) -> None:
        """Close every idle stream to ``key``: one of them turned out dead, the rest may be."""
        for _, stream in self._idle.pop(key, []):
            stream.set_close_callback(None)
            stream.close()

    @staticmethod
    def served_before(stream: IOStream) -> bool:
        """Whether ``stream`` already carried a request (and now carries another)."""
        served = getattr(stream, _SERVED, False)
        setattr(stream, _SERVED, True)
        return bool(served)

    def failed_on_reused(self, request: object) -> bool:
        """After ``request`` failed: whether it had been sent on a reused connection (so the
        upstream may have closed it as the request left). If so, the other idle connections to
        that upstream are closed too, so that a retry opens a fresh one."""
        if not getattr(request, REUSED, False):
            return False
        key = getattr(request, _KEY, None)
        if key is not None:
            self.discard(key)
        return True

    def idle(self) -> int:
        return sum(len(s) for s in self._idle.values())

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()
            self._sweeper = None
        for key in list(self._idle):
            self.discard(key)

    def _forget(self, key: PoolKey, stream: IOStream) -> None:
        streams = self._idle.get(key)
        if streams:
            streams[:] = [(t, s) for t, s in streams if s is not stream]
            if not streams:
                del self._idle[key]

    def _sweep(self) -> None:
        oldest = time.monotonic() - self.idle_timeout
        for key, streams in list(self._idle.items()):
            for since, stream in [(t, s) for t, s in streams if t < oldest]:
                stream.set_close_callback(None)
                stream.close()
                streams.remove((since, stream))
            if not streams:
                del self._idle[key]


class _PooledTCPClient(TCPClient):
    def __init__(self, pool: UpstreamPool, resolver: Resolver | None = None) -> None:
        super().__init__(resolver=resolver)
        self.pool = pool

    async def connect(
        self,
        host: str,
        port: int,
        af: socket.AddressFamily = socket.AF_UNSPEC,
        ssl_options: dict[str, Any] | ssl.SSLContext | None = None,
        max_buffer_size: int | None = None,
        source_ip: str | None = None,
        source_port: int | None = None,
        timeout: float | datetime.timedelta | None = None,
    ) -> IOStream:
        key: PoolKey = (host, port, ssl_options is not None)
        if source_ip is None and source_port is None:
            stream = self.pool.take(key)
            if stream is not None:
                return stream
        stream = await super().connect(
            host, port, af, ssl_options, max_buffer_size, source_ip, source_port, timeout
        )
        setattr(stream, _KEY, key)
        self.pool.opened += 1
        return stream


class UpstreamCancelled(Exception):
    """The request was cancelled by the edge (its client left)."""


class _KeepAliveConnection(_HTTPConnection):
    """Tornado's client connection, but the stream goes back to the pool when it may, and the
    request can be cancelled."""

    _pool: UpstreamPool
    _version = ""

    def __init__(self, client: Any, request: Any, *args: Any, **kwargs: Any) -> None:
        original = getattr(request, "request", request)
        setattr(original, _CONNECTION, self)
        # Tornado's constructor starts the request: a cancel that came while it was queued
        # must be applied after it, when there is something to cancel.
        super().__init__(client, request, *args, **kwargs)
        if getattr(original, _CANCELLED, False):
            self.cancel()

    def cancel(self) -> None:
        """Answer the caller with :class:`UpstreamCancelled` and close the stream, if any. The
        final callback releases the slot; a connect still under way is closed when it
        completes (Tornado checks for a cleared final callback there)."""
        if self.final_callback is not None:
            self._handle_exception(UpstreamCancelled, UpstreamCancelled(), None)

    def _create_connection(self, stream: IOStream) -> HTTP1Connection:
        original = getattr(self.request, "request", self.request)
        setattr(original, REUSED, self._pool.served_before(stream))
        setattr(original, _KEY, getattr(stream, _KEY, None))
        return super()._create_connection(stream)

    async def headers_received(
        self, first_line: ResponseStartLine | RequestStartLine, headers: HTTPHeaders
    ) -> None:
        if isinstance(first_line, ResponseStartLine):
            self._version = first_line.version
        await super().headers_received(first_line, headers)

    def _on_end_request(self) -> None:
        key: PoolKey | None = getattr(self.stream, _KEY, None)
        if key is None or not self._reusable():
            self.stream.close()
            return
        # Tornado's HTTP1Connection still clears its callbacks on this stream after this
        # returns: hand it over on the next loop iteration.
        IOLoop.current().add_callback(self._pool.give, key, self.stream)

    def _reusable(self) -> bool:
        if self._version != "HTTP/1.1" or self.headers is None or self.stream.closed():
            return False
        tokens = [
            *self.request.headers.get_list("Connection"),
            *self.headers.get_list("Connection"),
        ]
        if "close" in {t.strip().lower() for v in tokens for t in v.split(",")}:
            return False
        code = self.code or 0
        return (
            "Content-Length" in self.headers
            or self.headers.get("Transfer-Encoding", "").lower() == "chunked"
            or self.request.method == "HEAD"
            or code in (204, 304)
        )


class KeepAliveHTTPClient(SimpleAsyncHTTPClient):
    """``SimpleAsyncHTTPClient`` with an :class:`UpstreamPool`. Requests must carry
    ``Connection: keep-alive`` (Tornado otherwise adds ``Connection: close``)."""

    def initialize(  # type: ignore[override]
        self,
        pool: UpstreamPool,
        resolver: Resolver | None = None,
        **kwargs: Any,
    ) -> None:
        super().initialize(resolver=resolver, **kwargs)
        self.tcp_client.close()
        self.tcp_client = _PooledTCPClient(pool, resolver=self.resolver)
        self.pool = pool
        self._connection_type = type("Connection", (_KeepAliveConnection,), {"_pool": pool})

    def _connection_class(self) -> type:
        return self._connection_type

    def cancel(self, request: HTTPRequest) -> None:
        """End ``request`` now (see the module docstring); a no-op once it has finished."""
        setattr(request, _CANCELLED, True)
        connection: _KeepAliveConnection | None = getattr(request, _CONNECTION, None)
        if connection is not None:
            connection.cancel()

    def close(self) -> None:
        self.pool.close()
        super().close()
