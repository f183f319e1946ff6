"""The plain-HTTP port's site handler: a Tornado adapter onto the proxy core.

Port 80 stays a Tornado application (ACME challenges, redirects to HTTPS). Every other request
there (a redirect, or a site without a certificate yet, proxied) is handed to the same core as
the HTTPS port's (:class:`edge.exchange.Proxy`): this handler turns Tornado's request into an
:class:`~edge.exchange.Exchange`, feeds it the body Tornado streams in (``data_received``
waits while the core holds a full buffer, so Tornado stops reading), and is the exchange's
response sink (``write`` returns Tornado's flush future, so a slow client pauses the upstream).
A client that leaves cancels the core's task, and with it the upstream request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import tornado.web
from tornado import httputil

from edge.exchange import HOP_BY_HOP, Body, Exchange, Lifecycle, Proxy, ProxySettings, Request

__all__ = ["HOP_BY_HOP", "Lifecycle", "ProxySettings", "SiteHandler"]


def _header_block_size(request: httputil.HTTPServerRequest) -> int:
    """What the client sent before the body, as near as the parsed form tells: the request
    line and every field line with its separator and CRLF."""
    start = len(request.method or "") + len(request.uri or "") + len(request.version) + 4
    return start + sum(len(name) + len(value) + 4 for name, value in request.headers.get_all())


@tornado.web.stream_request_body
class SiteHandler(tornado.web.RequestHandler):
    def initialize(self, proxy: Proxy, scheme: str) -> None:
        self._proxy = proxy
        self._scheme = scheme
        self._task: asyncio.Task[None] | None = None
        self._body: Body | None = None
        self._readable: asyncio.Event | None = None

    def compute_etag(self) -> str | None:
        return None  # the upstream's ETag (if any) passes through untouched

    async def prepare(self) -> None:
        req = self.request
        cfg: ProxySettings = self._proxy.settings
        lengths = req.headers.get_list("Content-Length")
        chunked = "Transfer-Encoding" in req.headers
        length: int | None = 0
        if chunked:
            length = None
        elif lengths and lengths[0].strip().isdecimal():
            length = int(lengths[0].strip())
        # Room for one chunk past the limit, so that the core (413), not Tornado (400),
        # notices a body that is too large; a declared length above it is read no further
        # than the core's 413.
        limit = cfg.max_body_size + 65536
        req.connection.set_max_body_size(max(limit, length or 0))  # type: ignore[union-attr]
        self._readable = asyncio.Event()
        self._readable.set()
        readable = self._readable
        self._body = Body(readable.clear, readable.set)
        request = Request(
            req.method or "GET",
            req.uri or "",
            list(req.headers.get_all()),
            req.headers.get("Host", ""),
            self._scheme,
            req.remote_ip or "",
            None,
            req.version.removeprefix("HTTP/"),
            _header_block_size(req),
            length,
            chunked or bool(length),
        )
        ex = Exchange(request, self._body, _HandlerSink(self), log=False)
        # Not awaited here: Tornado reads the body (and notices a client that leaves) only
        # once prepare has returned; the method handler awaits the answer.
        self._task = asyncio.ensure_future(self._proxy.handle(ex))
        # A data_received waiting for the core to take a full buffer must not wait for ever
        # once the core is done (a 504 or 408 in mid-body): Tornado would read no further.
        self._task.add_done_callback(lambda _: readable.set())
        if not (chunked or length):
            self._body.finish()

    async def data_received(self, chunk: bytes) -> None:
        if self._body is None or self._task is None or self._task.done():
            return
        self._body.feed(chunk)
        if self._readable is not None and not self._readable.is_set():
            await self._readable.wait()

    async def _finish_proxy(self) -> None:
        if self._body is not None:
            self._body.finish()
        if self._task is not None:
            await asyncio.shield(self._task)

    get = post = put = patch = delete = options = head = _finish_proxy

    def on_connection_close(self) -> None:
        # Tornado's own resolves the request's body future: without it, _execute waits on
        # that future for ever, holding this handler, its exchange and its body.
        super().on_connection_close()
        if self._body is not None:
            self._body.fail("gone")
        if self._task is not None and not self._task.done():
            self._task.cancel()


class _HandlerSink:
    """The exchange's response sink, on a Tornado handler."""

    __slots__ = ("_handler",)

    def __init__(self, handler: SiteHandler) -> None:
        self._handler = handler

    def start(
        self, status: int, reason: str, headers: list[tuple[str, str]], *, body: bool, close: bool
    ) -> None:
        handler = self._handler
        handler.clear()
        handler.clear_header("Content-Type")
        handler.clear_header("Server")
        if any(name.lower() == "date" for name, _ in headers):
            handler.clear_header("Date")  # the upstream's, not a second one of ours
        handler.set_status(status, reason or None)
        for name, value in headers:
            handler.add_header(name, value)
        if close:
            handler.set_header("Connection", "close")

    def write(self, chunk: bytes) -> Awaitable[None] | None:
        handler = self._handler
        if handler._finished or handler.request.connection is None:
            return None
        handler.write(chunk)
        flushed = handler.flush()
        return None if flushed.done() else flushed

    def end(self) -> None:
        if not self._handler._finished:
            self._handler.finish()

    def abort(self) -> None:
        stream = getattr(self._handler.request.connection, "stream", None)
        if stream is not None:
            stream.close()
