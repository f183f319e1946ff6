"""The proxy core, independent of the client's protocol: one request in, one response out.

Each client protocol (HTTP/1.1 in :mod:`edge.http1`, HTTP/2 in ``edge.http2``, the :80 Tornado
handler in :mod:`edge.proxy`) is an adapter. For every request it has parsed it builds an
:class:`Exchange` (what was asked, on which connection, a :class:`Body` it feeds, and a
:class:`ResponseSink` it implements) and runs ``await proxy.handle(exchange)`` (one task per
request; :meth:`Proxy.handle` never raises). The core does every check, takes the fair-share
slot, calls the upstream through :mod:`edge.pool`, and answers through the sink: exactly one
``start`` then ``write``\\ s then ``end``, or ``abort`` at any point.

For an adapter's author (HTTP/2 included):

- ``Request.headers`` are the field lines as received, ``(name, value)`` strings (latin-1),
  without pseudo-headers and in order. ``authority`` is ``Host`` (HTTP/1.1) or ``:authority``
  (HTTP/2); ``target`` the raw request-target (``:path``); ``sni`` the server name the TLS
  handshake matched (None on plain HTTP: then no 421 check).
- The body: declare ``body_length`` (a Content-Length, or None when the length is unknown:
  chunked, or HTTP/2 DATA without content-length) and ``has_body``; then call
  :meth:`Body.feed` per chunk, :meth:`Body.finish` at the end, :meth:`Body.fail` when the
  framing broke. ``Body`` calls the adapter's ``pause``/``resume`` to stop reading from the
  client while the upstream is slower (HTTP/2: hold back WINDOW_UPDATE instead).
- The client went away (connection lost, RST_STREAM): cancel the task running
  :meth:`Proxy.handle`; the upstream request is cancelled, its connection closed, its slot
  freed.
- :meth:`ResponseSink.start` gets the status and the response's fields (hop-by-hop fields
  already removed; an HTTP/2 sink lower-cases names and must not add ``connection``), whether
  a body follows (False for HEAD, 204, 304) and whether the connection must close after this
  response (a malformed or oversized request: HTTP/2 may ignore it or end the stream only).
  ``write`` returns None when the chunk was taken, or a future to await when the client is
  not reading (HTTP/1.1: the transport's buffer is full; HTTP/2: the flow-control window is
  closed); the core times that wait out (``send_timeout``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

from tornado.log import access_log

from edge.forwarding import TrustedProxies, forwarding_fields
from edge.headerrules import (
    HOP_BY_HOP,
    BadHeader,
    check_connection,
    check_content_length,
    check_field_names,
    parse_host,
)
from edge.loops import default_pseudonym, has_looped, via_value
from edge.metrics import EdgeMetrics
from edge.pool import (
    ResponseHead,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
)
from edge.shares import Full, Shares, Ticket, client_key
from edge.state import SiteIndex, StatementUnavailable
from edge.targets import ASTERISK, BadTarget, parse_target, upstream_url
from pipeline.outbound import RefusedAddress

__all__ = [
    "HOP_BY_HOP",
    "Body",
    "BodyError",
    "ConnectionClock",
    "Exchange",
    "Lifecycle",
    "Proxy",
    "ProxySettings",
    "Request",
    "ResponseSink",
]

log = logging.getLogger(__name__)

# The HTTP/1.1 adapter answers "Expect: 100-continue" itself; passing it on would make the
# upstream send a second 100 the client never asked for. Host, Via and the framing are the
# edge's own.
_NOT_FORWARDED = HOP_BY_HOP | {"expect", "host", "via", "content-length"}
# What the edge answers for OPTIONS *: the methods it forwards.
_ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# RFC 9110 section 9.2.2: what may be sent again after the connection failed under it.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Request body bytes held for the upstream before the client is paused.
_BODY_BUFFER = 64 * 1024
# Statuses after which the rest of the connection cannot be trusted to be framed as the client
# meant it.
_CLOSING = frozenset({400, 413, 431})

Fields = list[tuple[str, str]]

# Host values repeat (a handful of names per connection, per site): parsed once each. A refused
# value raises again every time (lru_cache keeps results only).
_parse_host = functools.lru_cache(maxsize=8192)(parse_host)


@dataclass
class Lifecycle:
    """In-flight request count, so a graceful shutdown knows when it may close connections."""

    in_flight: int = 0
    draining: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def started(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


@dataclass(frozen=True)
class ProxySettings:
    index: SiteIndex
    metrics: EdgeMetrics
    pool: UpstreamPool
    lifecycle: Lifecycle
    https_port: int  # the public HTTPS port, for redirects
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    max_header_size: int = 32 * 1024
    max_body_size: int = 100 * 1024 * 1024
    # Loop detection: this edge's name in Via (edge.loops).
    pseudonym: str = field(default_factory=default_pseudonym)
    # Fair shares of the upstream concurrency (edge.shares); None: no bound.
    shares: Shares | None = None
    # Longest silence between two chunks of a request body, and the longest wait for the
    # upstream's response header block: bounds on how long one request may hold a slot.
    body_idle_timeout: float = 10.0
    upstream_response_timeout: float = 60.0
    # The least average rate of a request body, in bytes a second, once its first
    # body_idle_timeout seconds are over (Apache's mod_reqtimeout MinRate): a body dripping a
    # byte just within the idle timeout would otherwise hold its slot for ever. 0: off.
    min_body_rate: int = 500
    # Longest wait for the client to take one chunk of the response (a client that stops
    # reading would otherwise hold the upstream request until the request timeout).
    send_timeout: float = 60.0
    # The longest an upstream request may take, whatever progress it makes.
    request_timeout: float = 300.0


class BodyError(Exception):
    """The request body cannot be forwarded: ``reason`` is "too_large", "malformed", "gone"
    or "timeout"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Body:
    """A request body on its way from the client (``feed``) to the upstream (``read``).

    Holds up to 64 KiB, then asks the adapter to stop reading (``pause``) until the upstream
    has taken it (``resume``). Counts what arrives against ``limit``."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_error",
        "_finished",
        "_paused",
        "_pause",
        "_resume",
        "_waiter",
        "limit",
        "on_progress",
        "received",
    )

    def __init__(
        self,
        pause: Callable[[], None] = lambda: None,
        resume: Callable[[], None] = lambda: None,
        limit: int = 1 << 62,
    ) -> None:
        self._pause = pause
        self._resume = resume
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._finished = False
        self._error: BodyError | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.limit = limit
        self.received = 0
        self.on_progress: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        """Whether the client has sent all of it (or it failed)."""
        return self._finished or self._error is not None

    def feed(self, chunk: bytes) -> None:
        if self.done or not chunk:
            return
        self.received += len(chunk)
        if self.received > self.limit:
            self.fail("too_large")
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > _BODY_BUFFER and not self._paused:
            self._paused = True
            self._pause()
        if self.on_progress is not None:
            self.on_progress()
        self._wake()

    def finish(self) -> None:
        self._finished = True
        self._wake()

    def fail(self, reason: str) -> None:
        if self._error is None and not self._finished:
            self._error = BodyError(reason)
            self._chunks.clear()
            self._wake()

    @property
    def error(self) -> BodyError | None:
        return self._error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """The next chunk; b"" at the end. Raises :class:`BodyError`."""
        while True:
            if self._error is not None:
                raise self._error
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered <= _BODY_BUFFER // 2:
                    self._paused = False
                    self._resume()
                return chunk
            if self._finished:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None


class ResponseSink(Protocol):
    """What the core answers through; implemented by each client protocol's adapter."""

    def start(self, status: int, reason: str, headers: Fields, *, body: bool, close: bool) -> None:
        """Send the status line and fields. ``body``: whether a body follows (its framing is
        the adapter's: Content-Length when ``headers`` has one, else chunked or DATA frames)."""

    def write(self, chunk: bytes) -> Awaitable[None] | None:
        """Send a piece of the body; a future to await before the next one, or None."""

    def end(self) -> None:
        """The response is complete."""

    def abort(self) -> None:
        """Cut the response (the client sees a truncation, or a stream reset)."""


@dataclass(slots=True)
class Request:
    method: str
    target: str
    headers: Fields
    authority: str
    scheme: str  # "https" or "http": how the client reached the edge
    client: str  # the peer's address (or the PROXY protocol's client)
    sni: str | None  # the server name the TLS handshake matched; None on plain HTTP
    version: str = "1.1"  # for Via: "1.1", "2"
    header_size: int = 0  # bytes of the request line and field lines
    body_length: int | None = 0  # Content-Length; None: unknown (chunked, DATA frames)
    has_body: bool = False
    started: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class Exchange:
    request: Request
    body: Body
    sink: ResponseSink
    status: int = 0  # the status the client was sent, once it was
    # Counted and logged by the core (False: by the adapter, as Tornado's log_function does).
    log: bool = True
    ticket: Ticket | None = None  # the fair-share slot, while the upstream request runs


class ConnectionClock:
    """A client connection's own deadlines, for both protocols: its first byte (from the accept,
    the TLS handshake included), then idleness, ``idle_timeout`` with nothing ``busy``. One
    timer handle: the idle one is moved on only when it fires, never re-armed per request
    (:meth:`touch` only notes the time).

    ``on_late`` is called if no byte came in time; ``on_idle`` once the connection has been
    idle ``idle_timeout`` since the last :meth:`touch`."""

    __slots__ = ("_busy", "_handle", "_idle", "_loop", "_on_idle", "_on_late", "got_bytes", "mark")

    def __init__(
        self,
        idle_timeout: float,
        busy: Callable[[], bool],
        on_idle: Callable[[], None],
        on_late: Callable[[], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = idle_timeout
        self._busy = busy
        self._on_idle = on_idle
        self._on_late = on_late
        self._handle: asyncio.TimerHandle | None = None
        self.got_bytes = False
        self.mark = 0.0

    def start(self, first_byte_due: float) -> None:
        """``first_byte_due`` on the ``time.monotonic`` clock; 0: none, the idle clock runs."""
        if first_byte_due:
            delay = max(0.0, first_byte_due - time.monotonic())
            self._handle = self._loop.call_later(delay, self._late)
        else:
            self.touch()

    def received(self) -> None:
        """Bytes came: the first ones end the first-byte deadline."""
        if not self.got_bytes:
            self.got_bytes = True
            self.stop()
            self.touch()

    def touch(self) -> None:
        """The idle time counts from now."""
        self.mark = self._loop.time()
        if self._handle is None and self._idle > 0:
            self._handle = self._loop.call_at(self.mark + self._idle, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _late(self) -> None:
        self._handle = None
        if not self.got_bytes:
            self._on_late()

    def _check(self) -> None:
        self._handle = None
        now = self._loop.time()
        if self._busy():
            due = now + self._idle  # something under way: its own deadlines time it
        else:
            due = self.mark + self._idle
            if now >= due:
                self._on_idle()
                return
        self._handle = self._loop.call_at(due, self._check)


class _Deadlines:
    """Every in-flight request's deadlines on one loop, behind one loop timer.

    A loop timer made and cancelled per deadline was most of what the deadlines cost (two per
    request: the request's and the upstream's; uvloop's timers are libuv handles, each made,
    started, stopped and closed). Here one timer is armed for the nearest deadline of all the
    requests, and moved only when a nearer one is armed. A deadline disarmed, or a request
    finished, leaves that timer where it is: when it fires, every request still in flight is
    looked at, those due are cancelled, and the timer is armed again for the nearest left.
    Deadlines are never early and never later than the loop's own timers would be; the timer
    fires about once per shortest timeout (seconds), whatever the request rate.

    The invariant every method keeps: a request's deadlines are all at or after its ``_next``,
    and while any request is :attr:`_live` the timer is armed at or before the least ``_next``
    (so nothing is ever due without a timer to see it)."""

    __slots__ = ("_handle", "_live", "_when", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._live: set[_Timers] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._when = math.inf

    def nearer(self, timers: _Timers, due: float) -> None:
        """``timers`` has a deadline at ``due``, before any it had: see that it is watched."""
        self._live.add(timers)
        if due < self._when:
            if self._handle is not None:
                self._handle.cancel()
            self._when = due
            self._handle = self.loop.call_at(due, self._fire)

    def forget(self, timers: _Timers) -> None:
        self._live.discard(timers)

    def _fire(self) -> None:
        self._handle = None
        self._when = math.inf
        now = self.loop.time()
        nearest = math.inf
        try:
            for timers in list(self._live):
                following = timers.check(now)
                if following < nearest:
                    nearest = following
        finally:
            if nearest < self._when:
                self._when = nearest
                self._handle = self.loop.call_at(nearest, self._fire)


class _Timers:
    """The per-request deadlines, each cancelling the request's task with its name; watched by
    the loop's :class:`_Deadlines` (no loop timer of their own)."""

    __slots__ = ("_deadlines", "_loop", "_next", "_owner", "_task", "fired")

    def __init__(self, owner: _Deadlines) -> None:
        self._owner = owner
        self._loop = owner.loop
        self._task = asyncio.current_task()
        self._deadlines: dict[str, float] = {}
        # At or before every deadline armed (disarming one leaves it earlier, never later);
        # inf: not watched.
        self._next = math.inf
        self.fired: str | None = None

    def arm(self, name: str, delay: float) -> None:
        if delay <= 0:
            self._deadlines.pop(name, None)
            return
        due = self._loop.time() + delay
        self._deadlines[name] = due
        if due < self._next:
            self._next = due
            self._owner.nearer(self, due)

    def arm_at(self, name: str, due: float) -> None:
        """Arm ``name`` for the loop time ``due`` (in the past: at once)."""
        self.arm(name, max(due - self._loop.time(), 1e-6))

    def now(self) -> float:
        return self._loop.time()

    def disarm(self, name: str) -> None:
        self._deadlines.pop(name, None)

    def clear(self) -> None:
        self._deadlines.clear()
        if self._next != math.inf:
            self._next = math.inf
            self._owner.forget(self)

    def check(self, now: float) -> float:
        """Called by the owner as its timer fires: cancel the task if a deadline is due; the
        time of the next one (inf: none left, no longer watched)."""
        deadlines = self._deadlines
        if deadlines and self.fired is None:
            name, due = min(deadlines.items(), key=lambda item: item[1])
            if due > now:
                self._next = due
                return due
            del deadlines[name]
            if self._task is not None:
                self.fired = name
                self._task.cancel()
        # Fired (the task ends and clears them), or nothing armed: not watched any more.
        self._next = math.inf
        self._owner.forget(self)
        return math.inf


class _BodyPace:
    """A request body's deadlines. While the edge waits for the client: silence (``idle``),
    and an average rate under ``rate`` bytes a second once its first ``idle`` seconds are
    over. While it waits for the upstream to accept the body (the client held back meanwhile):
    the upstream's silence (``upstream``), a 504; that time does not count against the client's
    rate."""

    __slots__ = ("_body", "_idle", "_rate", "_since", "_start", "_timers", "_upstream")

    def __init__(
        self, body: Body, timers: _Timers, idle: float, rate: int, upstream: float
    ) -> None:
        self._body = body
        self._timers = timers
        self._idle = idle
        self._rate = rate if idle > 0 else 0
        self._upstream = upstream
        self._start = timers.now()
        self._since: float | None = None

    def progress(self) -> None:
        if self._since is not None:
            return  # the upstream's turn: the client is not the one holding things up
        self._timers.arm("body", self._idle)
        if self._rate > 0:
            due = self._start + self._idle + self._body.received / self._rate
            self._timers.arm_at("body_rate", due)

    def upstream_turn(self) -> None:
        timers = self._timers
        self._since = timers.now()
        timers.disarm("body")
        timers.disarm("body_rate")
        timers.arm("upstream", self._upstream)

    def client_turn(self) -> None:
        since, self._since = self._since, None
        if since is not None:
            self._start += self._timers.now() - since
        self._timers.disarm("upstream")
        self.progress()


class Proxy:
    """The core: :meth:`handle` one exchange at a time per task, any number at once."""

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self._counters = {
            "https": settings.metrics.request_counts("https"),
            "http": settings.metrics.request_counts("http"),
        }
        # The requests' deadlines on the loop this core runs on (made on the first request).
        self._deadlines: _Deadlines | None = None
        # Via for a request that came with none, by protocol version ("1.0", "1.1", "2").
        self._hops: dict[str, str] = {}

    # ---- answers --------------------------------------------------------------------------

    def _count_and_log(self, ex: Exchange) -> None:
        status = ex.status
        klass = status // 100
        self._counters[ex.request.scheme][klass if 0 < klass < 6 else 0] += 1
        level = logging.ERROR if status >= 500 else logging.INFO
        if access_log.isEnabledFor(level):
            req = ex.request
            access_log.log(
                level,
                "%d %s %s (%s) %.2fms",
                status,
                req.method,
                req.target,
                req.client,
                1000.0 * (time.perf_counter() - req.started),
            )

    def _plain(
        self,
        ex: Exchange,
        status: int,
        text: str,
        *,
        extra: Fields | None = None,
        close: bool = False,
    ) -> None:
        body = f"{status} {HTTPStatus(status).phrase}: {text}\n".encode()
        fields: Fields = [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(body))),
            *(extra or ()),
        ]
        ex.status = status
        head = ex.request.method == "HEAD"
        ex.sink.start(status, HTTPStatus(status).phrase, fields, body=not head, close=close)
        if not head:
            ex.sink.write(body)
        ex.sink.end()

    def _reject(
        self, ex: Exchange, status: int, reason: str, text: str, *, retry_after: int | None = None
    ) -> None:
        self.settings.metrics.requests_rejected.labels(reason).inc()
        extra = [("Retry-After", str(retry_after))] if retry_after is not None else None
        self._plain(ex, status, text, extra=extra, close=status in _CLOSING)

    def _empty(self, ex: Exchange, status: int, fields: Fields) -> None:
        ex.status = status
        fields.append(("Content-Length", "0"))
        ex.sink.start(status, HTTPStatus(status).phrase, fields, body=False, close=False)
        ex.sink.end()

    # ---- the request ----------------------------------------------------------------------

    async def handle(self, ex: Exchange) -> None:
        """Answer ``ex`` (never raises but CancelledError, when the client left)."""
        cfg = self.settings
        cfg.lifecycle.started()
        try:
            await self._handle(ex)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("proxying %s %s failed", ex.request.method, ex.request.authority)
            if ex.status == 0:
                self._plain(ex, 500, "the edge failed", close=True)
            else:
                ex.sink.abort()
        finally:
            if ex.ticket is not None and cfg.shares is not None:
                cfg.shares.release(ex.ticket)
                ex.ticket = None
            cfg.lifecycle.finished()
            if ex.status and ex.log:
                self._count_and_log(ex)

    async def _handle(self, ex: Exchange) -> None:
        cfg = self.settings
        req = ex.request
        if req.header_size > cfg.max_header_size:
            self._reject(ex, 431, "header_too_large", "the request's header fields are too large")
            return
        # One pass over the fields for every rule that needs some of them.
        connection: list[str] = []
        lengths: list[str] = []
        vias: list[str] = []
        try:
            for name, value in req.headers:
                lower = name.lower()
                if "_" in lower:
                    check_field_names((name,))
                elif lower == "connection":
                    connection.append(value)
                elif lower == "content-length":
                    lengths.append(value)
                elif lower == "via":
                    vias.append(value)
            if connection:
                check_connection(connection)
            length = check_content_length(lengths)
            host, port = _parse_host(req.authority)
        except BadHeader as exc:
            self._reject(ex, 400, "bad_header", str(exc))
            return
        host_header = host if port is None else f"{host}:{port}"
        if vias and has_looped(vias, cfg.pseudonym):
            self._reject(ex, 508, "loop", "the request has been through this edge before")
            return
        try:
            target = parse_target(req.method, req.target, host)
        except BadTarget as exc:
            self._reject(ex, 400, "bad_target", str(exc))
            return
        if length is None and req.has_body:
            length = req.body_length  # HTTP/2's content-length, or None: the length is unknown
        if length is not None and length > cfg.max_body_size:
            self._reject(ex, 413, "body_too_large", "the request body is too large")
            return
        ex.body.limit = cfg.max_body_size
        if req.scheme == "https" and (req.sni is None or host != req.sni):
            self._reject(ex, 421, "misdirected", "this connection is not for that host")
            return
        try:
            meta = cfg.index.lookup(host)
        except StatementUnavailable:
            # An edge's first fill, with Redis not answering this instant: try again soon.
            self._reject(
                ex, 503, "site_unavailable", "the site is not available yet", retry_after=1
            )
            return
        if meta is None:
            self._reject(ex, 404, "unknown_site", "unknown site")
            return
        if target is ASTERISK:
            self._empty(ex, 200, [("Allow", _ALLOW)])
            return
        if req.scheme == "http" and meta.has_cert:
            # Built from the site's own name and the parsed target: nothing the client sent
            # can move the redirect to another site.
            public = "" if cfg.https_port == 443 else f":{cfg.https_port}"
            status = 301 if req.method in ("GET", "HEAD") else 308
            self._empty(ex, status, [("Location", f"https://{host}{public}{target.uri}")])
            return
        if not meta.upstream:
            self._reject(ex, 404, "no_upstream", "no upstream for this site")
            return
        try:
            url = upstream_url(meta.upstream, target)
        except BadTarget as exc:
            self._reject(ex, 400, "bad_target", str(exc))
            return
        shares = cfg.shares
        if shares is not None:
            client = client_key(self._client(req))
            try:
                try:
                    ex.ticket = shares.try_acquire(meta.domain, client)
                except Full as exc:
                    if exc.reason != "total":
                        raise
                    # Only the total is full: wait in the queue (a coroutine only then).
                    ex.ticket = await shares.acquire(meta.domain, client)
            except Full as exc:
                self._reject(
                    ex,
                    503,
                    f"share_{exc.reason}",
                    "too many requests in flight; try again",
                    retry_after=1,
                )
                return
        fields = self._upstream_fields(req, host_header, length, connection, vias)
        await self._forward(ex, url, fields, host_header, length)

    def _client(self, req: Request) -> str:
        """Who the request is from, for its share: the peer, or behind a trusted HTTP load
        balancer the address it appended to X-Forwarded-For (the last entry, its own view)."""
        peer = req.client
        if not self.settings.trusted_proxies.trusts(peer):
            return peer
        entries = ",".join(v for n, v in req.headers if n.lower() == "x-forwarded-for")
        try:
            return str(ipaddress.ip_address(entries.split(",")[-1].strip()))
        except ValueError:
            return peer

    def _upstream_fields(
        self,
        req: Request,
        host_header: str,
        length: int | None,
        connection: list[str],
        vias: list[str],
    ) -> Fields:
        skip = _NOT_FORWARDED
        if connection:
            skip = skip | {t.strip().lower() for v in connection for t in v.split(",")}
        cfg = self.settings
        fields = [("Host", host_header)]
        fields += forwarding_fields(
            req.headers,
            peer=req.client,
            scheme=req.scheme,
            host=host_header,
            trusted=cfg.trusted_proxies.trusts(req.client),
            skip=skip,
        )
        if vias:
            fields.append(("Via", via_value(vias, cfg.pseudonym, req.version)))
        else:
            # This hop alone, as via_value writes it: one string per protocol version.
            hop = self._hops.get(req.version)
            if hop is None:
                hop = via_value([], cfg.pseudonym, req.version)
                if len(self._hops) < 8:  # the parsers allow a few versions; bounded anyway
                    self._hops[req.version] = hop
            fields.append(("Via", hop))
        if length is not None:
            fields.append(("Content-Length", str(length)))
        elif req.has_body:
            fields.append(("Transfer-Encoding", "chunked"))
        return fields

    # ---- the upstream ---------------------------------------------------------------------

    async def _forward(
        self, ex: Exchange, url: str, fields: Fields, host_header: str, length: int | None
    ) -> None:
        cfg = self.settings
        req = ex.request
        has_body = length is not None and length > 0 or (length is None and req.has_body)
        loop = asyncio.get_running_loop()
        deadlines = self._deadlines
        if deadlines is None or deadlines.loop is not loop:
            deadlines = self._deadlines = _Deadlines(loop)
        timers = _Timers(deadlines)
        conn: UpstreamConnection | None = None
        started = time.perf_counter()
        retried = False
        pace = _BodyPace(
            ex.body,
            timers,
            cfg.body_idle_timeout,
            cfg.min_body_rate,
            cfg.upstream_response_timeout,
        )
        try:
            timers.arm("request", cfg.request_timeout)
            while True:
                if has_body:
                    pace.progress()
                    ex.body.on_progress = pace.progress
                conn = cfg.pool.take_idle(url) or await cfg.pool.acquire(url)
                conn.send_head(req.method, url, fields)
                if not has_body:
                    timers.arm("upstream", cfg.upstream_response_timeout)
                try:
                    if has_body:
                        await self._send_body(ex, conn, length, timers, pace)
                    head = await conn.head()
                except UpstreamError as exc:
                    if (
                        retried
                        or has_body
                        or not conn.reused
                        or conn.got_bytes
                        or req.method not in _IDEMPOTENT
                    ):
                        raise
                    # The upstream closed the reused connection as the request left: once more
                    # on a fresh one (and no other idle one of that upstream).
                    log.debug("retrying %s on a new upstream connection: %s", host_header, exc)
                    retried = True
                    cfg.pool.discard(conn)
                    conn.close()
                    continue
                break
            timers.disarm("upstream")
            timers.disarm("body")
            timers.disarm("body_rate")
            cfg.metrics.upstream_seconds.observe(time.perf_counter() - started)
            await self._relay(ex, conn, head, timers)
            cfg.pool.release(conn)
            conn = None
        except asyncio.CancelledError:
            fired = timers.fired
            if fired is None:
                cfg.metrics.upstream_cancelled.labels("client_left").inc()
                raise
            self._timed_out(ex, fired)
        except BodyError as exc:
            self._body_failed(ex, exc)
        except (UpstreamError, RefusedAddress, OSError) as exc:
            self._upstream_failed(ex, host_header, exc)
        finally:
            timers.clear()
            ex.body.on_progress = None
            if conn is not None:
                conn.close()

    async def _send_body(
        self,
        ex: Exchange,
        conn: UpstreamConnection,
        length: int | None,
        timers: _Timers,
        pace: _BodyPace,
    ) -> None:
        chunked = length is None
        sent = 0
        while chunk := await ex.body.read():
            sent += len(chunk)
            if length is not None and sent > length:
                raise BodyError("malformed")
            # An upstream slow to take the body holds the client back: its silence, not the
            # client's, is what is timed meanwhile.
            pace.upstream_turn()
            await conn.write_body(chunk, chunked)
            pace.client_turn()
        if length is not None and sent != length:
            raise BodyError("malformed")
        if chunked:
            pace.upstream_turn()
            await conn.write_body(b"", True)
        timers.disarm("body")
        timers.disarm("body_rate")
        if not conn.head_received:
            timers.arm("upstream", self.settings.upstream_response_timeout)

    async def _relay(
        self, ex: Exchange, conn: UpstreamConnection, head: ResponseHead, timers: _Timers
    ) -> None:
        cfg = self.settings
        fields = head.headers
        if head.hop_by_hop:
            named = {
                t.strip().lower()
                for n, v in fields
                if n.lower() == "connection"
                for t in v.split(",")
            }
            skip = HOP_BY_HOP | named if named else HOP_BY_HOP
            fields = [(n, v) for n, v in fields if n.lower() not in skip]
        has_body = ex.request.method != "HEAD" and head.status not in (204, 304)
        ex.status = head.status
        ex.sink.start(head.status, head.reason, fields, body=has_body, close=False)
        sink = ex.sink
        send_timeout = cfg.send_timeout
        idle = cfg.upstream_response_timeout
        while True:
            chunk = conn.read_ready()
            if chunk is None:
                # An upstream that goes silent mid-body would hold the slot until the request
                # timeout: the same bound as for its header block, restarted at every chunk.
                timers.arm("upstream", idle)
                chunk = await conn.read()
                timers.disarm("upstream")
            if not chunk:
                break
            waiting = sink.write(chunk)
            if waiting is not None:
                # A client that stops reading holds the upstream request (and its slot) still.
                timers.arm("send", send_timeout)
                await waiting
                timers.disarm("send")
        sink.end()

    # ---- failures -------------------------------------------------------------------------

    def _timed_out(self, ex: Exchange, which: str) -> None:
        cfg = self.settings
        if which in ("body", "body_rate"):
            cfg.metrics.requests_rejected.labels("body_timeout").inc()
            cfg.metrics.upstream_cancelled.labels("body_timeout").inc()
            if ex.status == 0:
                text = "stopped arriving" if which == "body" else "is arriving too slowly"
                self._plain(ex, 408, f"the request body {text}", close=True)
            else:
                ex.sink.abort()
            return
        if which == "send":
            cfg.metrics.upstream_cancelled.labels("send_timeout").inc()
            ex.sink.abort()
            return
        cfg.metrics.upstream_errors.labels("timeout").inc()
        if which == "upstream":
            cfg.metrics.upstream_cancelled.labels("upstream_timeout").inc()
        if ex.status == 0:
            self._plain(ex, 504, "the site's server timed out", close=not ex.body.done)
        else:
            ex.sink.abort()

    def _body_failed(self, ex: Exchange, exc: BodyError) -> None:
        cfg = self.settings
        cfg.metrics.upstream_cancelled.labels(
            "body_too_large" if exc.reason == "too_large" else "client_left"
        ).inc()
        if ex.status != 0:
            ex.sink.abort()
        elif exc.reason == "too_large":
            self._reject(ex, 413, "body_too_large", "the request body is too large")
        elif exc.reason == "malformed":
            self._reject(ex, 400, "bad_body", "the request body is malformed")
        else:
            ex.sink.abort()

    def _upstream_failed(self, ex: Exchange, host: str, exc: Exception) -> None:
        timeout = isinstance(exc, UpstreamTimeout)
        kind = "timeout" if timeout else "refused" if isinstance(exc, RefusedAddress) else "connect"
        self.settings.metrics.upstream_errors.labels(kind).inc()
        log.info("upstream of %s failed: %s", host, exc)
        if ex.status != 0:
            # Too late for an error page: cut the connection so the client sees a truncation.
            ex.sink.abort()
            return
        status = 504 if timeout else 502
        text = "the site's server " + ("timed out" if timeout else "failed")
        self._plain(ex, status, text, close=not ex.body.done)
