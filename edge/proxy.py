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
from edge.metrics import EdgeMetrics
from edge.sni import sni_name
from edge.state import SiteIndex, StatementUnavailable, normalize_host
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

    Every address, a literal's or a name's, passes the outbound policy before the client may
    connect to it: a dealer's upstream name that resolves to a cloud metadata address is
    refused here, where the connection would be made, not only when the upstream was added.
    """

    def initialize(self, policy: OutboundPolicy | None = None) -> None:  # Tornado's Configurable
        self._policy = policy or OutboundPolicy()

    async def resolve(
        self, host: str, port: int, family: socket.AddressFamily = socket.AF_UNSPEC
    ) -> list[tuple[int, Any]]:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return self._allowed(await super().resolve(host, port, family))
        found = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        if family not in (socket.AF_UNSPEC, found):
            return await super().resolve(host, port, family)  # let getaddrinfo say why not
        self._policy.check_address(ip)
        return [(found, (host, port) if ip.version == 4 else (host, port, 0, 0))]

    def _allowed(self, addresses: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        refused: RefusedAddress | None = None
        allowed = []
        for family, sockaddr in addresses:
            try:
                self._policy.check_address(sockaddr[0])
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


def _hop_by_hop(headers: httputil.HTTPHeaders) -> frozenset[str]:
    named = {t.strip().lower() for v in headers.get_list("Connection") for t in v.split(",")}
    return _NOT_FORWARDED | frozenset(named)


def _plain(
    handler: tornado.web.RequestHandler, status: int, text: str, *, close: bool = False
) -> None:
    handler.clear()
    handler.set_status(status)
    handler.set_header("Content-Type", "text/plain; charset=utf-8")
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

    def compute_etag(self) -> str | None:
        return None  # the upstream's ETag (if any) passes through untouched

    def _reject(self, status: int, reason: str, text: str) -> None:
        self._cfg.metrics.requests_rejected.labels(reason).inc()
        # After a malformed or oversized request the rest of the connection cannot be trusted
        # to be framed as the client meant it.
        _plain(self, status, text, close=status in (400, 413, 431))

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
        host = normalize_host(req.host or "")
        try:
            target = parse_target(req.method or "GET", req.uri or "", host)
        except BadTarget as exc:
            self._reject(400, "bad_target", str(exc))
            return
        length = req.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self._cfg.max_body_size:
            # Read no further than this answer: Tornado closes the connection after it rather
            # than read a body nobody wants (its own limit must not answer 400 first).
            req.connection.set_max_body_size(int(length))  # type: ignore[union-attr]
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
            self.set_header("Retry-After", "1")
            self._reject(503, "site_unavailable", "the site is not available yet")
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
            port = "" if self._cfg.https_port == 443 else f":{self._cfg.https_port}"
            status = 301 if req.method in ("GET", "HEAD") else 308
            self.redirect(f"https://{host}{port}{target.uri}", status=status)
            return
        if not meta.upstream:
            self._reject(404, "no_upstream", "no upstream for this site")
            return
        self._start_upstream(meta.upstream, target, host)

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
        peer = req.remote_ip or ""
        forwarding_headers(
            headers,
            peer=peer,
            scheme=self._scheme,
            host=req.host or host,
            trusted=self._cfg.trusted_proxies.trusts(peer),
        )
        if self._cfg.pool is not None:
            headers["Connection"] = "keep-alive"  # else Tornado's client asks for close
        has_body = "Content-Length" in req.headers or "Transfer-Encoding" in req.headers
        if has_body and req.headers.get("Content-Length") != "0":
            self._queue = asyncio.Queue(_BODY_QUEUE_CHUNKS)
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

    async def data_received(self, chunk: bytes) -> None:
        if self._cancelled:
            return
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

    def _upstream_done(self, fetch: asyncio.Future[HTTPResponse]) -> None:
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
        return self.flush()

    async def _finish_proxy(self) -> None:
        if self._finished or self._fetch is None:
            return
        if self._queue is not None and not self._fetch.done():
            await self._queue.put(_END)
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
        if self._counted:
            self._counted = False
            self._cfg.lifecycle.finished()
        self._upstream = None
