"""The proxy's upstream client: keep-alive HTTP/1.1 connections on asyncio transports.

One :class:`UpstreamConnection` (an ``asyncio.Protocol`` with httptools' C response parser)
carries one request at a time. When its response was complete and self-delimited
(Content-Length, chunked, or no body) on HTTP/1.1 without ``Connection: close``, it goes back to
the :class:`UpstreamPool`'s idle list for its (scheme, host, port), newest first out, for at most
``idle_timeout`` seconds (well under the keep-alive timeouts of common servers: Node 5 s,
Caddy/Go 90 s+, nginx 75 s). An idle connection the upstream closes, or that receives stray
bytes, is dropped the moment the loop sees it. A request that fails on a reused connection
before any byte of the response can be sent once more on a new one (:attr:`reused`,
:attr:`got_bytes` tell the caller), since the upstream may have closed it as the request left.

Every address is checked where the connection is made: the outbound policy
(:mod:`pipeline.outbound`) and the edge's own (:class:`edge.reach.SelfReach`: not loopback,
not the edge itself), for an IP literal and for every address a name resolves to. HTTPS
upstreams are verified (the system's trust store, the upstream's host name).

Bodies stream both ways with back-pressure: a request body waits for the upstream's socket to
drain, and a response body held beyond 256 KiB pauses reading from the upstream until the
client has taken it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import ssl
import struct
import time
from collections import deque
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from edge.headerrules import HOP_BY_HOP
from edge.reach import SelfReach
from pipeline.outbound import OutboundPolicy, RefusedAddress

__all__ = [
    "ResponseHead",
    "UpstreamConnection",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamTimeout",
]

Fields = list[tuple[str, str]]
PoolKey = tuple[str, str, int]

# Response bytes held for a slow client before the upstream is paused.
_HIGH_WATER = 256 * 1024

# SO_LINGER on, 0 s: close() resets the connection.
_RESET = struct.pack("ii", 1, 0)


class UpstreamError(Exception):
    """The upstream request failed (connect, reset, malformed response); the message says how."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time (connect)."""


class ResponseHead:
    """A response's status line and fields. ``hop_by_hop``: whether any field is hop-by-hop
    (:data:`edge.headerrules.HOP_BY_HOP`), which the proxy must then remove (with those
    ``Connection`` names); False lets it forward ``headers`` as they are."""

    __slots__ = ("headers", "hop_by_hop", "reason", "status", "version")

    def __init__(
        self, status: int, reason: str, headers: Fields, version: str, *, hop_by_hop: bool = True
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.version = version
        self.hop_by_hop = hop_by_hop


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream; see the module docstring."""

    def __init__(self, pool: UpstreamPool, key: PoolKey) -> None:
        self._pool = pool
        self.key = key
        self.reused = False
        self.got_bytes = False
        self.head_received = False
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self._idle = False
        self._parser: httptools.HttpResponseParser | None = None
        self._method = ""
        self._head_waiter: asyncio.Future[ResponseHead] | None = None
        self._head: ResponseHead | None = None
        self._fields: Fields = []
        self._reason = b""
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._reading_paused = False
        self._complete = False
        self._error: UpstreamError | None = None
        self._body_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._framed = False
        self._keep_alive = False

    # ---- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete:
            # Bytes on an idle connection, or after a complete response: never trust it again.
            self.close()
            return
        self.got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed response from the upstream: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._transport = None
        if self._idle:
            self._pool._forget(self)
            return
        if self._head is not None and not self._complete and not self._framed:
            # A body delimited by the connection's close: this is its end.
            self._complete = True
            self._wake_body()
        elif not self._complete:
            self._fail(UpstreamError(f"the upstream closed the connection ({exc or 'EOF'})"))
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_exception(UpstreamError("the upstream closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    # ---- httptools callbacks --------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        status = parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (103 Early Hints, a 100 nobody asked for): dropped, never
            # merged into the final one.
            self._fields = []
            self._reason = b""
            return
        fields = self._fields
        self._fields = []
        self.head_received = True
        framed = hop_by_hop = False
        for name, value in fields:
            lower = name.lower()
            if lower == "content-length":
                framed = True
            elif lower in HOP_BY_HOP:
                hop_by_hop = True
                if lower == "transfer-encoding" and value.strip().lower() == "chunked":
                    framed = True
        no_body = self._method == "HEAD" or status in (204, 304)
        self._framed = framed or no_body
        self._keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        head = ResponseHead(
            status,
            self._reason.decode("latin-1"),
            fields,
            parser.get_http_version(),
            hop_by_hop=hop_by_hop,
        )
        self._head = head
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(head)
        if no_body:
            # httptools cannot be told a HEAD response has no body: it is complete here.
            self._complete = True
            self._parser = None
            self._wake_body()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused and self._transport:
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake_body()

    def on_message_complete(self) -> None:
        if self._head is None:
            return  # the end of an interim response
        self._complete = True
        self._wake_body()

    # ---- the caller's side ----------------------------------------------------------------

    def send_head(self, method: str, url: str, fields: Fields) -> None:
        """Send the request line and ``fields`` for ``url``'s path and query."""
        transport = self._transport
        if transport is None:
            raise UpstreamError("the upstream closed the connection")
        self._method = method
        self._parser = httptools.HttpResponseParser(self)
        end = url.find("/", url.find("//") + 2)
        path = url[end:] if end >= 0 else "/"
        lines = [f"{method} {path} HTTP/1.1"]
        lines += [f"{name}: {value}" for name, value in fields]
        lines.append("\r\n")
        transport.write("\r\n".join(lines).encode("latin-1"))

    async def write_body(self, chunk: bytes, chunked: bool) -> None:
        """Send a piece of the request body (b"" with ``chunked``: the last chunk)."""
        transport = self._transport
        if self._error is not None:
            raise self._error
        if transport is None:
            raise UpstreamError("the upstream closed the connection")
        if chunked:
            transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunk else b"0\r\n\r\n")
        else:
            transport.write(chunk)
        if self._write_paused:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    async def head(self) -> ResponseHead:
        if self._head is not None:
            return self._head
        if self._error is not None:
            raise self._error
        self._head_waiter = self._loop.create_future()
        try:
            return await self._head_waiter
        finally:
            self._head_waiter = None

    def read_ready(self) -> bytes | None:
        """The next piece of the response body if it is here (b"" at its end), without
        waiting; None when :meth:`read` would wait. Raises :class:`UpstreamError`."""
        if self._chunks:
            chunk = self._chunks.popleft()
            self._buffered -= len(chunk)
            if self._reading_paused and self._buffered < _HIGH_WATER // 2:
                self._reading_paused = False
                if self._transport is not None:
                    self._transport.resume_reading()
            return chunk
        if self._complete:
            return b""
        if self._error is not None:
            raise self._error
        return None

    async def read(self) -> bytes:
        """The next piece of the response body; b"" at its end."""
        while True:
            chunk = self.read_ready()
            if chunk is not None:
                return chunk
            self._body_waiter = self._loop.create_future()
            try:
                await self._body_waiter
            finally:
                self._body_waiter = None

    @property
    def reusable(self) -> bool:
        return (
            self._complete
            and self._framed
            and self._keep_alive
            and not self._closed
            and self._error is None
            and not self._chunks
        )

    def close(self) -> None:
        if self._transport is not None:
            if self._complete:
                self._transport.close()
            else:
                # A reset, not a FIN queued behind body bytes an upstream may never read: the
                # upstream learns at once, and no orphaned socket holds them in the kernel.
                sock = self._transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                self._transport.abort()
            self._transport = None
        self._closed = True

    # ---- internals ------------------------------------------------------------------------

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self._wake_body()

    def _wake_body(self) -> None:
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _reset_for_reuse(self) -> None:
        self.reused = True
        self.got_bytes = False
        self.head_received = False
        self._parser = None
        self._head = None
        self._reason = b""
        self._complete = False
        self._framed = False
        self._keep_alive = False


class UpstreamPool:
    """Idle keep-alive connections by (scheme, host, port); connects within the edge's rules."""

    def __init__(
        self,
        max_idle_per_upstream: int = 32,
        idle_timeout: float = 2.0,
        *,
        connect_timeout: float = 5.0,
        policy: OutboundPolicy | None = None,
        reach: SelfReach | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.max_idle = max_idle_per_upstream
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.policy = policy or OutboundPolicy()
        self.reach = reach or SelfReach()
        self._tls = tls
        self._idle: dict[PoolKey, list[UpstreamConnection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._keys: dict[str, PoolKey] = {}
        self.reused = 0
        self.opened = 0

    def key_of(self, url: str) -> PoolKey:
        """``url``'s (scheme, host, port)."""
        end = url.find("/", url.find("//") + 2)
        base = url if end < 0 else url[:end]
        key = self._keys.get(base)
        if key is None:
            parts = urlsplit(base)
            scheme = parts.scheme.lower()
            key = (scheme, parts.hostname or "", parts.port or (443 if scheme == "https" else 80))
            if len(self._keys) > 4096:
                self._keys.clear()
            self._keys[base] = key
        return key

    async def acquire(self, url: str) -> UpstreamConnection:
        """A connection to ``url``'s upstream: an idle one, or a new one."""
        conn = self.take_idle(url)
        if conn is not None:
            return conn
        return await self._connect(self.key_of(url))

    def take_idle(self, url: str) -> UpstreamConnection | None:
        """An idle connection to ``url``'s upstream if one is kept (:meth:`acquire` without
        the coroutine, for the usual case), else None."""
        key = self.key_of(url)
        conns = self._idle.get(key)
        if conns:
            now = time.monotonic()
            while conns:
                conn = conns.pop()
                conn._idle = False
                if not conn._closed and now - conn.idle_since <= self.idle_timeout:
                    if not conns:
                        del self._idle[key]
                    self.reused += 1
                    return conn
                conn.close()
            self._idle.pop(key, None)
        return None

    async def _connect(self, key: PoolKey) -> UpstreamConnection:
        scheme, host, port = key
        loop = asyncio.get_running_loop()
        addresses = await self.resolve(host, port)
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            tls = self._tls_context()
        last: Exception | None = None
        for family, address in addresses:
            try:
                _, protocol = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: UpstreamConnection(self, key),
                        address[0],
                        address[1],
                        family=family,
                        ssl=tls,
                        server_hostname=host if tls is not None else None,
                    ),
                    self.connect_timeout,
                )
            except TimeoutError:
                last = UpstreamTimeout(f"connecting to {host}:{port} timed out")
                continue
            except (OSError, ssl.SSLError) as exc:
                last = UpstreamError(f"connecting to {host}:{port} failed: {exc}")
                continue
            self.opened += 1
            conn = protocol
            sock = conn._transport.get_extra_info("socket") if conn._transport else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        raise last or UpstreamError(f"no address for {host}")

    async def resolve(self, host: str, port: int) -> list[tuple[int, Any]]:
        """``(family, (address, port))`` to connect to for ``host``, each allowed: an IP
        literal at once, without the thread hop of ``getaddrinfo``; a name's addresses."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            self.policy.check_address(ip)
            self.reach.check(ip, port)
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            return [(family, (host, port))]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise UpstreamError(f"resolving {host} failed: {exc}") from None
        refused: RefusedAddress | None = None
        allowed: list[tuple[int, Any]] = []
        for family, _, _, _, sockaddr in infos:
            try:
                self.policy.check_address(str(sockaddr[0]))
                self.reach.check(str(sockaddr[0]), port)
            except RefusedAddress as exc:
                refused = exc
                continue
            allowed.append((family, (sockaddr[0], port)))
        if not allowed:
            if refused is not None:
                raise refused
            raise UpstreamError(f"no address for {host}")
        return allowed

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            # Loaded once, on the first HTTPS upstream: the system's store (40-60 ms).
            self._tls = ssl.create_default_context()
        return self._tls

    def release(self, conn: UpstreamConnection) -> None:
        """``conn``'s response was read to its end: keep it if it may carry another."""
        if not conn.reusable or self.max_idle < 1:
            conn.close()
            return
        conn._reset_for_reuse()
        conn._idle = True
        conn.idle_since = time.monotonic()
        conns = self._idle.setdefault(conn.key, [])
        if len(conns) >= self.max_idle:
            oldest = conns.pop(0)
            oldest._idle = False
            oldest.close()
        conns.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout, self._sweep)

    def discard(self, conn: UpstreamConnection) -> None:
        """Close every idle connection to ``conn``'s upstream: one turned out dead, the rest
        may be."""
        for idle in self._idle.pop(conn.key, []):
            idle._idle = False
            idle.close()

    def idle(self) -> int:
        return sum(len(c) for c in self._idle.values())

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in self._idle.values():
            for conn in conns:
                conn._idle = False
                conn.close()
        self._idle.clear()

    def _forget(self, conn: UpstreamConnection) -> None:
        conns = self._idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._idle[conn.key]

    def _sweep(self) -> None:
        self._sweeper = None
        oldest = time.monotonic() - self.idle_timeout
        for key, conns in list(self._idle.items()):
            for conn in [c for c in conns if c.idle_since < oldest]:
                conn._idle = False
                conn.close()
                conns.remove(conn)
            if not conns:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(self.idle_timeout, self._sweep)
