"""HTTP/1.1 for the HTTPS port: an ``asyncio.Protocol`` on httptools' C parser (llhttp).

Each request parsed becomes an :class:`edge.exchange.Exchange` run by the proxy core; this
module only frames. Keep-alive, and pipelining made safe: requests are answered one at a time,
in order, and reading stops while a request waits behind another. What llhttp refuses
(``Content-Length`` with ``Transfer-Encoding``, a ``Transfer-Encoding`` other than chunked, a
bad chunk, control characters in a field) is answered with a bare 400 and the connection
closed, as is anything after a response that leaves the framing in doubt (400, 413, 431, or a
request body the core did not read to its end).

Timeouts: the first request byte must come within the connection budget's first-byte timeout
of the accept (the TLS handshake included: :mod:`edge.https`), then a connection may stay idle
(between requests, or in the middle of a header block) for ``idle_timeout``. The core times the
body, the upstream and the client's reading.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

import httptools

from edge.exchange import Body, ConnectionClock, Exchange, Request
from edge.sni import sni_name

if TYPE_CHECKING:
    from edge.https import SiteServer

__all__ = ["H1Protocol"]

_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_HEADER_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n"
    b"Connection: close\r\n\r\n"
)
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Requests read ahead of their turn before the connection is closed as abusive.
_MAX_PIPELINED = 64

_date_cache: tuple[int, str] = (0, "")


def _date() -> str:
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _Response:
    """The sink of one request: frames the core's answer on the connection."""

    __slots__ = (
        "_chunked",
        "_conn",
        "_ended",
        "_head",
        "body",
        "keep_alive",
        "method",
        "started",
        "version",
    )

    def __init__(self, conn: H1Protocol, method: str, version: str, keep_alive: bool) -> None:
        self._conn = conn
        self.method = method
        self.version = version
        self.keep_alive = keep_alive
        self._head = b""
        self._chunked = False
        self._ended = False
        self.started = False
        self.body: Body | None = None

    def start(
        self, status: int, reason: str, headers: list[tuple[str, str]], *, body: bool, close: bool
    ) -> None:
        conn = self._conn
        request_body = self.body
        if (
            close
            or conn.closing
            or conn.server.lifecycle.draining
            or (request_body is not None and not request_body.done)
        ):
            self.keep_alive = False
        lines = [f"HTTP/1.1 {status} {reason or _phrase(status)}"]
        has_length = has_date = False
        for name, value in headers:
            lower = name.lower()
            if lower == "content-length":
                has_length = True
            elif lower == "date":
                has_date = True
            lines.append(f"{name}: {value}")
        if not has_date:
            lines.append(f"Date: {_date()}")
        if body and not has_length and status >= 200:
            if self.version == "1.1":
                self._chunked = True
                lines.append("Transfer-Encoding: chunked")
            else:
                self.keep_alive = False  # delimited by the connection's close
        if not self.keep_alive:
            lines.append("Connection: close")
        elif self.version == "1.0":
            lines.append("Connection: keep-alive")
        lines.append("\r\n")
        self._head = "\r\n".join(lines).encode("latin-1")
        self.started = True

    def write(self, chunk: bytes) -> asyncio.Future[None] | None:
        if self._ended or not chunk:
            return None
        if self._chunked:
            chunk = b"%s%x\r\n%s\r\n" % (self._head, len(chunk), chunk)
        elif self._head:
            chunk = self._head + chunk
        self._head = b""
        return self._conn.send(chunk)

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        tail = b"0\r\n\r\n" if self._chunked else b""
        if self._head or tail:
            self._conn.send(self._head + tail)
            self._head = b""
        self._conn.response_done(self)

    def abort(self) -> None:
        self._ended = True
        self.keep_alive = False
        self._conn.abort()


class H1Protocol(asyncio.Protocol):
    """One client connection speaking HTTP/1.x (see the module docstring).

    Made by :class:`edge.https.SiteServer` for a connection whose ALPN is not ``h2``, with the
    client's address and the budget's release (called once, when the connection is gone)."""

    def __init__(
        self,
        server: SiteServer,
        client: str,
        release: Callable[[], None] | None,
        first_byte_due: float = 0.0,
    ) -> None:
        self.server = server
        self.client = client
        self._release = release
        self._first_byte_due = first_byte_due
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self.sni: str | None = None
        self.closing = False
        self._clock = ConnectionClock(
            server.idle_timeout, self._busy, self._idle, self._first_byte_late
        )
        self._pauses: set[str] = set()
        # What each request's Body calls to hold the client back (made once per connection).
        self._pause_body = functools.partial(self._pause, "body")
        self._resume_body = functools.partial(self._resume, "body")
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # The request being parsed, and those waiting for their turn (the first is answering).
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._header_bytes = 0
        self._in_headers = False
        self._parsing: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        self._task: asyncio.Task[None] | None = None

    # ---- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.sni = sni_name(ssl_object)
        self.server.connections.add(self)
        self._clock.start(self._first_byte_due)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._transport = None
        self._clock.stop()
        self.server.connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()
        for ex in (self._parsing, *self._queue):
            if ex is not None:
                ex.body.fail("gone")
        self._queue.clear()
        self._parsing = None
        drain = self._drain
        if drain is not None and not drain.done():
            drain.cancel()
        release, self._release = self._release, None
        if release is not None:
            release()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self._clock.received()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # CONNECT, or an Upgrade the edge does not do (the field is hop-by-hop): the request
            # was dispatched as it is; nothing after it on this connection is read.
            del exc
            if self._parsing is not None:
                self._parsing.body.finish()
                self._parsing = None
            self.closing = True
            self._pause("closing")
        except httptools.HttpParserError:
            if self._parsing is not None:
                self._parsing.body.fail("malformed")
                self._parsing = None
                self.closing = True
                self._pause("closing")
            else:
                self._refuse(_BAD_REQUEST)
            return
        if self._in_headers:
            # A header block still open: llhttp holds no limit of its own. Far past the one the
            # core answers 431 at, answer now and read no further.
            self._header_bytes += len(data)
            if self._header_bytes > 2 * self.server.max_header_size:
                self._refuse(_HEADER_TOO_LARGE)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)
        self._drain = None

    # ---- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._header_bytes = 0
        self._url = b""
        self._headers = []
        self._in_headers = True
        self._clock.touch()  # the header block is timed from its start

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._in_headers = False
        parser = self._parser
        method = parser.get_method().decode("latin-1")
        version = parser.get_http_version()
        headers = self._headers
        url = self._url.decode("latin-1")
        size = len(method) + len(url) + len(version) + 9
        authority = ""
        length: int | None = 0
        chunked = False
        expect = False
        hosts = 0
        for name, value in headers:
            size += len(name) + len(value) + 4
            lower = name.lower()
            if lower == "host":
                authority = value
                hosts += 1
            elif lower == "content-length":
                if value.strip().isdecimal():
                    length = int(value.strip())
            elif lower == "transfer-encoding":
                chunked = True
            elif lower == "expect" and value.strip().lower() == "100-continue":
                expect = True
        if hosts > 1:
            authority = ", ".join(v for n, v in headers if n.lower() == "host")
        if chunked:
            length = None
        response = _Response(self, method, version, parser.should_keep_alive())
        body = Body(self._pause_body, self._resume_body, self.server.proxy.settings.max_body_size)
        response.body = body
        request = Request(
            method,
            url,
            headers,
            authority,
            self.server.scheme,
            self.client,
            self.sni,
            version,
            size,
            length,
            chunked or bool(length),
        )
        ex = Exchange(request, body, response)
        if expect and version == "1.1" and request.has_body:
            self.send(_CONTINUE)
        self._parsing = ex
        self._queue.append(ex)
        if len(self._queue) == 1:
            self._start(ex)
        elif len(self._queue) > _MAX_PIPELINED:
            self._refuse(b"")
        else:
            # One request at a time: the next ones are read once this one is answered.
            self._pause("pipeline")

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.body.feed(body)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing.body.finish()
            self._parsing = None

    # ---- answering ------------------------------------------------------------------------

    def _start(self, ex: Exchange) -> None:
        self._task = self._loop.create_task(self._answer(ex))

    async def _answer(self, ex: Exchange) -> None:
        """The request's task. What follows the core's answer is done here, not in a done
        callback (one more loop callback per request)."""
        try:
            await self.server.proxy.handle(ex)
        finally:
            response = ex.sink
            assert isinstance(response, _Response)
            if not response._ended:
                # The core gave up without a complete answer (or the client left, and the task
                # was cancelled): nothing more on this connection.
                self.abort()

    def response_done(self, response: _Response) -> None:
        if not self._queue or self._queue[0].sink is not response:
            return
        self._queue.popleft()
        if not response.keep_alive or self.closing:
            self.closing = True
            if self._transport is not None:
                self._transport.close()
            return
        if len(self._queue) <= 1:
            self._resume("pipeline")
        if self._queue:
            self._start(self._queue[0])
            return
        self._clock.touch()

    def send(self, data: bytes) -> asyncio.Future[None] | None:
        transport = self._transport
        if transport is None:
            return None
        transport.write(data)
        if not self._write_paused:
            return None
        if self._drain is None:
            self._drain = self._loop.create_future()
        return self._drain

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    def close_when_idle(self) -> None:
        """Shutdown: close now if no request is under way, else after its response."""
        self.closing = True
        if not self._queue and self._parsing is None and self._transport is not None:
            self._transport.close()

    def _refuse(self, answer: bytes) -> None:
        """Answer ``answer`` and close; behind a request still being answered, just close
        after its response (nothing more is read)."""
        self.closing = True
        transport = self._transport
        if transport is None:
            return
        if self._queue:
            self._pause("closing")
            return
        transport.write(answer)
        transport.close()

    # ---- flow and timers ------------------------------------------------------------------

    def _pause(self, reason: str) -> None:
        if not self._pauses and self._transport is not None:
            self._transport.pause_reading()
        self._pauses.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self._pauses:
            return
        self._pauses.discard(reason)
        if not self._pauses and self._transport is not None and not self.closing:
            self._transport.resume_reading()

    def _busy(self) -> bool:
        """A request under way, past its header block: the core times it."""
        return bool(self._queue) and not self._in_headers

    def _first_byte_late(self) -> None:
        self.server.refused("first_byte_timeout")
        self.abort()

    def _idle(self) -> None:
        if self._transport is not None:
            self.abort()
