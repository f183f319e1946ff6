"""The site handler shared by both ports: redirect, 421, or a streaming reverse proxy.

Bodies are streamed both ways: the request body flows from ``data_received`` through a small
queue into the upstream request's ``body_producer`` (a full queue stops reading from the
client), and the response body goes out chunk by chunk from ``streaming_callback``, whose
returned flush future makes Tornado wait for a slow client before reading more from upstream.

What a client sends is checked before anything leaves the edge: the request target
(:mod:`edge.targets`: the upstream URL is composed from parts, never concatenated), the size of
its header block (431) and of its body (413), and its forwarding headers
(:mod:`edge.forwarding`). A client that leaves, or whose body turns out malformed, takes its
upstream request with it at once (:meth:`KeepAliveHTTPClient.cancel`): an abandoned request
must not hold an upstream slot until the request timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import tornado.web
from tornado import httputil
from tornado.httpclient import HTTPRequest, HTTPResponse
from tornado.netutil import DefaultLoopResolver
from tornado.simple_httpclient import HTTPTimeoutError

from edge.forwarding import TrustedProxies, forwarding_headers
from edge.headerrules import (
    BadHeader,
    check_connection,
    check_content_length,
    check_field_names,
    parse_host,
)
from edge.loops import default_pseudonym, has_looped, via_value
from edge.metrics import EdgeMetrics
from edge.reach import SelfReach
from edge.shares import Full, Shares, Ticket, client_key
from edge.sni import sni_name
from edge.state import SiteIndex, StatementUnavailable
from edge.targets import ASTERISK, BadTarget, Target, parse_target, upstream_url
from edge.upstream import KeepAliveHTTPClient, UpstreamCancelled, UpstreamPool
from pipeline.outbound import OutboundPolicy, RefusedAddress

__all__ = ["HOP_BY_HOP", "Lifecycle", "LiteralFirstResolver", "ProxySettings", "SiteHandler"]

log = logging.getLogger(__name__)

# RFC 9110 section 7.6.1, plus the non-standard ones proxies have always dropped.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Tornado answers "Expect: 100-continue" itself before reading the body; passing it on would make
# the upstream send a second 100 the client never asked for.
_NOT_FORWARDED = HOP_BY_HOP | {"expect"}
_BODY_QUEUE_CHUNKS = 8
_END = b""
_ABORT = None  # in the body queue: stop producing, the request is cancelled
# What Tornado itself answers for OPTIONS *: the methods the edge forwards.
_ALLOW = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# RFC 9110 section 9.2.2: what may be sent again after the connection failed under it.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class LiteralFirstResolver(DefaultLoopResolver):
    """Upstreams are usually IP literals: answer those at once, without the thread hop of
    ``getaddrinfo`` that Tornado's default resolver takes on every upstream connection.

    Every address, a literal's or a name's, passes the outbound policy and the edge's own
    (:class:`edge.reach.SelfReach`: not loopback, not the edge itself) before the client may
    connect to it: a dealer's upstream name that resolves to a cloud metadata address or to
    127.0.0.1 is refused here, where the connection would be made, not only when the upstream
    was added.
    """

    def initialize(  # Tornado's Configurable
        self, policy: OutboundPolicy | None = None, reach: SelfReach | None = None
    ) -> None:
        self._policy = policy or OutboundPolicy()
        self._reach = reach or SelfReach()

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return self._allowed(await super().resolve(host, port, family), port)
        found = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        if family not in (socket.AF_UNSPEC, found):
            return await super().resolve(host, port, family)  # let getaddrinfo say why not
        self._policy.check_address(ip)
        self._reach.check(ip, port)
        return [(found, (host, port) if ip.version == 4 else (host, port, 0, 0))]

    def _allowed(self, addresses: list[tuple[int, Any]], port: int) -> list[tuple[int, Any]]:
        refused: RefusedAddress | None = None
        allowed = []
        for family, sockaddr in addresses:
            try:
                self._policy.check_address(sockaddr[0])
                self._reach.check(sockaddr[0], port)
            except RefusedAddress as exc:
                refused = exc
                continue
            allowed.append((family, sockaddr))
        if not allowed and refused is not None:
            raise refused
        return allowed


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
    client: KeepAliveHTTPClient
    lifecycle: Lifecycle
    https_port: int  # the public HTTPS port, for redirects
    connect_timeout: float = 5.0
    request_timeout: float = 300.0
    pool: UpstreamPool | None = None  # the client's keep-alive pool, if it has one
    trusted_proxies: TrustedProxies = field(default_factory=TrustedProxies)
    max_header_size: int = 32 * 1024
    max_body_size: int = 100 * 1024 * 1024
    # Loop detection: this edge's name in Via (edge.loops).
    pseudonym: str = field(default_factory=default_pseudonym)
    # Fair shares of the upstream concurrency (edge.shares); None: only Tornado's max_clients.
    shares: Shares | None = None
    # Longest silence between two chunks of a request body, and the longest wait for the
    # upstream's response header block: bounds on how long one request may hold a slot.
    body_idle_timeout: float = 10.0
    upstream_response_timeout: float = 60.0
    # Longest wait for the client to take one chunk of the response (a client that stops
    # reading would otherwise hold the upstream request until the request timeout).
    send_timeout: float = 60.0


def _hop_by_hop(headers: httputil.HTTPHeaders) -> frozenset[str]:
    named = {t.strip().lower() for v in headers.get_list("Connection") for t in v.split(",")}
    return _NOT_FORWARDED | frozenset(named)


def _plain(
    handler: tornado.web.RequestHandler,
    status: int,
    text: str,
    *,
    close: bool = False,
    retry_after: int | None = None,
) -> None:
    handler.clear()
    handler.set_status(status)
    handler.set_header("Content-Type", "text/plain; charset=utf-8")
    if retry_after is not None:
        handler.set_header("Retry-After", str(retry_after))
    if close:
        handler.set_header("Connection", "close")
    handler.finish(f"{status} {HTTPStatus(status).phrase}: {text}\n")


def _header_block_size(request: httputil.HTTPServerRequest) -> int:
    """What the client sent before the body, as near as the parsed form tells: the request
    line and every field line with its separator and CRLF."""
    start = len(request.method or "") + len(request.uri or "") + len(request.version) + 4
    return start + sum(len(name) + len(value) + 4 for name, value in request.headers.get_all())


@tornado.web.stream_request_body
class SiteHandler(tornado.web.RequestHandler):
    def initialize(self, settings: ProxySettings, scheme: str) -> None:
        self._cfg = settings
        self._scheme = scheme
        self._counted = False
        self._queue: asyncio.Queue[bytes | None] | None = None
        self._fetch: asyncio.Future[HTTPResponse] | None = None
        self._response_started = False
        self._pending_headers: list[str] = []
        self._upstream: HTTPRequest | None = None
        self._retried = False
        self._cancelled = False
        self._body_received = 0
        self._upstream_started = 0.0
        self._host_header = ""
        self._ticket: Ticket | None = None
        self._timed_out = False
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def compute_etag(self) -> str | None:
        return None  # the upstream's ETag (if any) passes through untouched

    def _reject(
        self, status: int, reason: str, text: str, *, retry_after: int | None = None
    ) -> None:
        self._cfg.metrics.requests_rejected.labels(reason).inc()
        # After a malformed or oversized request the rest of the connection cannot be trusted
        # to be framed as the client meant it.
        _plain(self, status, text, close=status in (400, 413, 431), retry_after=retry_after)

    # ---- request side -----------------------------------------------------------------------

    async def prepare(self) -> None:
        self._cfg.lifecycle.started()
        self._counted = True
        if self._cfg.lifecycle.draining:
            self.set_header("Connection", "close")
        req = self.request
        if _header_block_size(req) > self._cfg.max_header_size:
            self._reject(431, "header_too_large", "the request's header fields are too large")
            return
        try:
            check_field_names(req.headers.keys())
            check_connection(req.headers.get_list("Connection"))
            length = check_content_length(req.headers.get_list("Content-Length"))
            host, port = parse_host(req.host or "")
        except BadHeader as exc:
            self._reject(400, "bad_header", str(exc))
            return
        self._host_header = host if port is None else f"{host}:{port}"
        if has_looped(req.headers.get_list("Via"), self._cfg.pseudonym):
            self._reject(508, "loop", "the request has been through this edge before")
            return
        try:
            target = parse_target(req.method or "GET", req.uri or "", host)
        except BadTarget as exc:
            self._reject(400, "bad_target", str(exc))
            return
        if length is not None and length > self._cfg.max_body_size:
            # Read no further than this answer: Tornado closes the connection after it rather
            # than read a body nobody wants (its own limit must not answer 400 first).
            req.connection.set_max_body_size(length)  # type: ignore[union-attr]
            self._reject(413, "body_too_large", "the request body is too large")
            return
        # Room for one chunk past the limit, so that data_received (413), not Tornado (400),
        # notices a chunked body that grows too large.
        req.connection.set_max_body_size(self._cfg.max_body_size + 65536)  # type: ignore[union-attr]
        if self._scheme == "https":
            stream = getattr(req.connection, "stream", None)
            sni = sni_name(getattr(stream, "socket", None))
            if sni is None or host != sni:
                self._reject(421, "misdirected", "this connection is not for that host")
                return
        try:
            meta = self._cfg.index.lookup(host)
        except StatementUnavailable:
            # An edge's first fill, with Redis not answering this instant: try again soon.
            self._reject(503, "site_unavailable", "the site is not available yet", retry_after=1)
            return
        if meta is None:
            self._reject(404, "unknown_site", "unknown site")
            return
        if target is ASTERISK:
            self.set_header("Allow", _ALLOW)
            self.set_status(200)
            self.finish()
            return
        if self._scheme == "http" and meta.has_cert:
            # Built from the site's own name and the parsed target: nothing the client sent
            # can move the redirect to another site.
            public = "" if self._cfg.https_port == 443 else f":{self._cfg.https_port}"
            status = 301 if req.method in ("GET", "HEAD") else 308
            self.redirect(f"https://{host}{public}{target.uri}", status=status)
            return
        if not meta.upstream:
            self._reject(404, "no_upstream", "no upstream for this site")
            return
        if not await self._take_slot(meta.domain):
            return
        self._start_upstream(meta.upstream, target, host)

    async def _take_slot(self, site: str) -> bool:
        """A slot of the site's, the client's and the total share, or a 503 at once (the site's
        or client's share is full) or after a bounded wait (the total is)."""
        shares = self._cfg.shares
        if shares is None:
            return True
        client = client_key(self._client_address())
        try:
            self._ticket = await shares.acquire(site, client)
        except Full as exc:
            self._reject(
                503, f"share_{exc.reason}", "too many requests in flight; try again", retry_after=1
            )
            return False
        if self.request.connection is None or self._finished:
            self._release_slot()  # the client left while it waited
            return False
        return True

    def _client_address(self) -> str:
        """Who the request is from, for its share: the peer, or behind a trusted HTTP load
        balancer the address it appended to X-Forwarded-For (the last entry, its own view)."""
        peer = self.request.remote_ip or ""
        if not self._cfg.trusted_proxies.trusts(peer):
            return peer
        entries = ",".join(self.request.headers.get_list("X-Forwarded-For")).split(",")
        try:
            return str(ipaddress.ip_address(entries[-1].strip()))
        except ValueError:
            return peer

    def _release_slot(self) -> None:
        if self._ticket is not None and self._cfg.shares is not None:
            self._cfg.shares.release(self._ticket)
        self._ticket = None

    def _start_upstream(self, upstream: str, target: Target, host: str) -> None:
        req = self.request
        try:
            url = upstream_url(upstream, target)
        except BadTarget as exc:
            self._reject(400, "bad_target", str(exc))
            return
        skip = _hop_by_hop(req.headers)
        headers = httputil.HTTPHeaders()
        for name, value in req.headers.get_all():
            if name.lower() not in skip:
                headers.add(name, value)
        # The Host the edge judged, normalised, whatever the client spelt.
        headers["Host"] = self._host_header or host
        headers["Via"] = via_value(req.headers.get_list("Via"), self._cfg.pseudonym)
        peer = req.remote_ip or ""
        forwarding_headers(
            headers,
            peer=peer,
            scheme=self._scheme,
            host=self._host_header or host,
            trusted=self._cfg.trusted_proxies.trusts(peer),
        )
        if self._cfg.pool is not None:
            headers["Connection"] = "keep-alive"  # else Tornado's client asks for close
        has_body = "Content-Length" in req.headers or "Transfer-Encoding" in req.headers
        if has_body and req.headers.get("Content-Length") != "0":
            self._queue = asyncio.Queue(_BODY_QUEUE_CHUNKS)
            self._arm("body", self._cfg.body_idle_timeout, self._body_stalled)
        upstream_request = HTTPRequest(
            url,
            method=req.method or "GET",
            headers=headers,
            body=b"" if has_body and self._queue is None else None,
            # Tornado's stub says the producer returns a Future; it awaits any awaitable.
            body_producer=self._produce_body if self._queue is not None else None,  # type: ignore[arg-type]
            header_callback=self._on_header_line,
            streaming_callback=self._on_chunk,
            follow_redirects=False,
            decompress_response=False,
            allow_nonstandard_methods=True,
            connect_timeout=self._cfg.connect_timeout,
            request_timeout=self._cfg.request_timeout,
            validate_cert=True,
        )
        self._upstream = upstream_request
        self._send_upstream()

    def _send_upstream(self) -> None:
        assert self._upstream is not None
        self._upstream_started = time.perf_counter()
        if self._queue is None:
            # With a body, the wait for the response starts once the body is all sent.
            self._arm("upstream", self._cfg.upstream_response_timeout, self._upstream_stalled)
        fetch = self._cfg.client.fetch(self._upstream, raise_error=False)
        self._fetch = asyncio.ensure_future(fetch)
        self._fetch.add_done_callback(self._upstream_done)

    def _may_retry(self, exc: Exception) -> bool:
        """Once, for a body-less idempotent request whose reused upstream connection failed
        before any byte of the response: the upstream closed it as the request left."""
        pool = self._cfg.pool
        return (
            pool is not None
            and not self._retried
            and not self._cancelled
            and not isinstance(exc, HTTPTimeoutError | UpstreamCancelled)
            and self._queue is None
            and not self._response_started
            and not self._pending_headers
            and self.request.connection is not None
            and (self.request.method or "GET") in _IDEMPOTENT
            and pool.failed_on_reused(self._upstream)
        )

    def _arm(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        self._disarm(name)
        if delay > 0:
            self._timers[name] = asyncio.get_running_loop().call_later(delay, callback)

    def _disarm(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _body_stalled(self) -> None:
        """The body made no progress (from the client, or into the upstream) for the body idle
        timeout: give up its slot and its connection."""
        self._timers.pop("body", None)
        self._cfg.metrics.requests_rejected.labels("body_timeout").inc()
        self._cancel("body_timeout")
        self._release_slot()
        if not self._response_started and not self._finished:
            _plain(self, 408, "the request body stopped arriving", close=True)
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None:
            stream.close()

    def _send_stalled(self) -> None:
        """The client has not taken a chunk of the response for the send timeout: cut it."""
        self._timers.pop("send", None)
        self._cancel("send_timeout")
        self._release_slot()
        stream = getattr(self.request.connection, "stream", None)
        if stream is not None:
            stream.close()

    def _upstream_stalled(self) -> None:
        """The upstream has not begun its response in time: 504, and its slot back."""
        self._timers.pop("upstream", None)
        if self._response_started or self._pending_headers:
            return
        self._timed_out = True
        self._cancel("upstream_timeout")
        self._release_slot()

    async def data_received(self, chunk: bytes) -> None:
        if self._cancelled:
            return
        if "body" in self._timers:
            self._arm("body", self._cfg.body_idle_timeout, self._body_stalled)
        self._body_received += len(chunk)
        if self._body_received > self._cfg.max_body_size:
            self._cancel("body_too_large")
            if not self._response_started and not self._finished:
                self._reject(413, "body_too_large", "the request body is too large")
            return
        if self._queue is not None and self._fetch is not None and not self._fetch.done():
            await self._queue.put(chunk)

    async def _produce_body(self, write: Callable[[bytes], Awaitable[None]]) -> None:
        assert self._queue is not None
        while chunk := await self._queue.get():  # _END and _ABORT are both falsy
            await write(chunk)
            if "body" in self._timers:
                # Progress on the upstream's side too: a slow upstream, not a stalled client.
                self._arm("body", self._cfg.body_idle_timeout, self._body_stalled)

    def _upstream_done(self, fetch: asyncio.Future[HTTPResponse]) -> None:
        if fetch is self._fetch:
            self._disarm("upstream")
        if not fetch.cancelled():
            fetch.exception()  # retrieved here too, for when the client left before the method ran
        # The upstream gave up early: unblock a data_received waiting on a full queue.
        if self._queue is not None:
            while not self._queue.empty():
                self._queue.get_nowait()

    def _cancel(self, reason: str) -> None:
        """End the upstream request now: the client left, or its body is unusable."""
        if self._cancelled or self._upstream is None or self._fetch is None or self._fetch.done():
            self._cancelled = True
            return
        self._cancelled = True
        self._cfg.metrics.upstream_cancelled.labels(reason).inc()
        self._cfg.client.cancel(self._upstream)
        if self._queue is not None:
            # Wake a producer waiting for the next chunk, so nothing stays suspended.
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(_ABORT)

    # ---- response side ----------------------------------------------------------------------

    def _on_header_line(self, line: str) -> None:
        if line != "\r\n":
            self._pending_headers.append(line)
            return
        if not self._response_started:
            self._cfg.metrics.upstream_seconds.observe(time.perf_counter() - self._upstream_started)
        first, *lines = self._pending_headers
        self._pending_headers = []
        start = httputil.parse_response_start_line(first.strip())
        if 100 <= start.code < 200:
            # An interim response (103 Early Hints, a 100 nobody asked for): dropped, never
            # merged into the final one (Tornado's server cannot send one before the final).
            return
        self._disarm("upstream")
        headers = httputil.HTTPHeaders()
        for raw in lines:
            headers.parse_line(raw.rstrip("\r\n"))
        skip = _hop_by_hop(headers)
        self.clear_header("Content-Type")
        self.clear_header("Server")
        if "Date" in headers:
            self.clear_header("Date")  # the upstream's, not a second one of ours
        self.set_status(start.code, start.reason or None)
        for name, value in headers.get_all():
            if name.lower() not in skip:
                self.add_header(name, value)
        self._response_started = True

    def _on_chunk(self, chunk: bytes) -> Awaitable[None] | None:
        if self.request.connection is None or self._finished or self._cancelled:
            return None
        self.write(chunk)
        flushed = self.flush()
        if not flushed.done() and self._cfg.send_timeout > 0:
            # A client that stops reading holds the upstream request (and its slot) still.
            self._arm("send", self._cfg.send_timeout, self._send_stalled)
            flushed.add_done_callback(lambda _: self._disarm("send"))
        return flushed

    async def _finish_proxy(self) -> None:
        if self._finished or self._fetch is None:
            return
        self._disarm("body")
        if self._queue is not None and not self._fetch.done():
            await self._queue.put(_END)
            if not self._response_started:
                self._arm("upstream", self._cfg.upstream_response_timeout, self._upstream_stalled)
        try:
            try:
                await self._fetch
            except Exception as exc:
                if not self._may_retry(exc):
                    raise
                log.debug("retrying %s on a new upstream connection: %s", self.request.host, exc)
                self._retried = True
                self._send_upstream()
                await self._fetch
        except Exception as exc:
            if self._timed_out and not self._response_started:
                self._cfg.metrics.upstream_errors.labels("timeout").inc()
                _plain(self, 504, "the site's server timed out")
                return
            if self._cancelled or isinstance(exc, UpstreamCancelled):
                return
            # raise_error=False still raises transport failures (refused, reset, timeout, TLS).
            timeout = isinstance(exc, HTTPTimeoutError)
            kind = (
                "timeout"
                if timeout
                else "refused"
                if isinstance(exc, RefusedAddress)
                else "connect"
            )
            self._cfg.metrics.upstream_errors.labels(kind).inc()
            log.info("upstream of %s failed: %s", self.request.host, exc)
            if self._response_started:
                # Too late for an error page: cut the connection so the client sees a truncation.
                stream = getattr(self.request.connection, "stream", None)
                if stream is not None:
                    stream.close()
                return
            status = 504 if timeout else 502
            _plain(self, status, "the site's server " + ("timed out" if timeout else "failed"))
            return
        self.finish()

    get = post = put = patch = delete = options = head = _finish_proxy

    def on_finish(self) -> None:
        self._release()

    def on_connection_close(self) -> None:
        self._cancel("client_left")
        self._release()

    def _release(self) -> None:
        for name in list(self._timers):
            self._disarm(name)
        self._release_slot()
        if self._counted:
            self._counted = False
            self._cfg.lifecycle.finished()
        self._upstream = None
