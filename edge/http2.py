"""HTTP/2 on :443 (ALPN ``h2``): one asyncio protocol per connection, one exchange per stream.

The ``h2`` library keeps the protocol's state; this module feeds it, enforces what the edge
enforces on HTTP/1.1, and turns each request stream into the same exchange the HTTP/1.1 path
hands to the proxy core, so every rule the core applies (421 by SNI, targets, forwarding
headers, fair shares per request) holds per stream.

What is HTTP/2's own is checked here, before the core sees a request: pseudo-header fields
(only ``:method``, ``:scheme``, ``:authority``, ``:path``, each once, first), field names in
lower case, values without CR, LF or NUL, no connection-specific fields (``Connection``,
``Transfer-Encoding``, ``Upgrade``, ...; ``TE`` only as ``trailers``), ``Host`` agreeing with
``:authority`` and the decoded size of the header list (431). A malformed request gets a
one-line 400 on its stream (RFC 9113 section 8.1.1), which counts against the connection's reset
budget. ``h2`` itself checks ``content-length`` against the DATA (a mismatch is a connection
error).

Flow control both ways: a request body is acknowledged (WINDOW_UPDATE) only as the core takes
it, so a client can have at most a window's worth in the edge's memory; a response is written
only as far as the client's windows allow, so the core, which awaits each write before it
reads more from upstream, never reads faster than the client takes. A stream whose window
stays closed for the core's send timeout is reset (the core aborts it) and its upstream slot
freed; a stream the client resets (RST_STREAM) has its task cancelled, which ends its upstream
request.

The attacks on HTTP/2 itself (rapid reset, CONTINUATION flood, SETTINGS/PING flood, empty
frames) are bounded by :class:`edge.h2limits.FrameGuard` before ``h2`` parses the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import typing
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from edge.exchange import Body, ConnectionClock, Exchange, Proxy, Request
from edge.h2encoder import FlatEncoder, RepeatDecoder
from edge.h2limits import FrameGuard, H2Limits, TooMuch
from edge.metrics import EdgeMetrics
from edge.sni import sni_name

__all__ = ["H2Limits", "H2Protocol", "H2Server", "H2Stream", "Handler"]

Fields = list[tuple[str, str]]
# The core's Proxy.handle: answers one exchange, raises only CancelledError.
Handler = Callable[[Exchange], Awaitable[None]]

log = logging.getLogger(__name__)

# RFC 9113 section 8.2.2: fields that only mean something to one HTTP/1.1 connection.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
# Not forwarded in a response either: hop-by-hop in HTTP/1.1, meaningless in HTTP/2.
_RESPONSE_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
        "te",
        "trailer",
        "proxy-authenticate",
    }
)
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
# RFC 9110 section 5.1 token characters, lower case only (RFC 9113 section 8.2.1).
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9113 section 6.5.2: each field counts 32 octets beyond its name and value.
_FIELD_OVERHEAD = 32


# What a response field is sent as (None: not sent), kept for short fields: an upstream sends
# the same few again and again. Past this many the map starts again.
_KEPT_FIELDS = 2048
_KEPT_FIELD_LENGTH = 256
_UNSEEN: Any = object()
_response_fields: dict[tuple[str, str], tuple[bytes, bytes] | None] = {}
# Request header lists already checked on a connection, and what they made (see _request_parts):
# at most this many, each of at most this many bytes, so a connection holds at most a few
# dozen KiB of them whatever a client sends.
_KEPT_REQUESTS = 16
_KEPT_REQUEST_SIZE = 2048
# Streams h2 may hold beyond twice the open ones before its walk prunes the closed ones
# (_Connection.open_inbound_streams).
_PRUNE_SLACK = 32


def _response_field(name: str, value: str) -> tuple[bytes, bytes] | None:
    """A response field as sent: bytes, the name lower case; None for a hop-by-hop field and
    one that could not be sent as is."""
    lower = name.lower()
    if lower in _RESPONSE_HOP_BY_HOP:
        return None
    raw_name = lower.encode("latin-1", "replace")
    raw = value.encode("latin-1", "replace").strip(b" \t")
    if b"\r" in raw or b"\n" in raw or b"\0" in raw or not _FIELD_NAME.fullmatch(raw_name):
        return None  # unreachable from a parsed upstream response; never sent as is
    return raw_name, raw


class _Connection(h2.connection.H2Connection):
    """``h2``'s server connection, without a walk over every stream it holds for each new one.

    ``h2`` reads :attr:`open_inbound_streams` once per stream the client opens, to enforce its
    copy of SETTINGS_MAX_CONCURRENT_STREAMS, and that property counts by walking every stream
    ``h2`` still holds, deleting the closed ones as it goes: the cost of a request grew with
    the streams in flight (one in ten of ``h2``'s receiving samples with ten). The streams held,
    open or closed, bound the open ones from above, so while they are fewer than the limit the
    check comes out as it would with the exact count, and the walk is not needed to answer it.
    It still runs, to prune, once as many streams are held as twice the open ones after the
    last walk (plus a slack): the same walk for every ``_PRUNE_SLACK`` or more new streams, and
    never more than about twice the open streams held.
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config=config)
        self._prune_at = _PRUNE_SLACK

    @property
    def open_inbound_streams(self) -> int:
        held = len(self.streams)
        if held < self._prune_at and held < self.local_settings.max_concurrent_streams:
            return held  # an upper bound, and h2's check passes with it as with the count
        count = super().open_inbound_streams  # the walk, which prunes
        self._prune_at = 2 * len(self.streams) + _PRUNE_SLACK
        return count


class _Malformed(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class _StreamBody(Body):
    """The core's :class:`Body`, giving the client's window back only as the core takes each
    chunk: at most one window of a stream's body (and one connection window in all) waits in
    the edge's memory."""

    __slots__ = ("_ack",)

    def __init__(self, ack: Callable[[int], None]) -> None:
        super().__init__()
        self._ack = ack

    async def read(self) -> bytes:
        chunk = await super().read()
        if chunk:
            self._ack(len(chunk))
        return chunk


class H2Stream:
    """One request stream: its exchange's :class:`ResponseSink`, and what the protocol keeps
    of it. A write larger than the client's windows is held (one chunk at most: the core
    awaits the returned future before the next) and sent as WINDOW_UPDATEs arrive."""

    __slots__ = (
        "_conn",
        "_drained",
        "_end_pending",
        "_pending",
        "body",
        "gone",
        "request_ended",
        "response_ended",
        "response_started",
        "stream_id",
        "task",
    )

    def __init__(self, conn: H2Protocol, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.body = _StreamBody(self._consumed)
        self.request_ended = False
        self.response_started = False
        self.response_ended = False
        self.gone = False
        self._pending = b""
        self._end_pending = False
        self._drained: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    def _consumed(self, size: int) -> None:
        self._conn.consumed(self, size)

    # ---- ResponseSink -----------------------------------------------------------------------

    def start(self, status: int, reason: str, headers: Fields, *, body: bool, close: bool) -> None:
        """``close`` means nothing to a stream: the request was malformed, so its body (if any
        is still coming) is refused once the response is sent (:meth:`H2Protocol.finished`).
        A hop-by-hop field is never sent, whoever added it."""
        if self.gone:
            return
        # The core has removed the hop-by-hop fields (and those Connection names). Bytes, lower
        # case, checked here: h2's own outbound validation is off (it cost more than the rest
        # of a request together).
        fields: list[tuple[bytes, bytes]] = [(b":status", b"%d" % status)]
        kept = _response_fields
        for field in headers:
            raw_field = kept.get(field, _UNSEEN)
            if raw_field is _UNSEEN:
                raw_field = _response_field(*field)
                if len(field[1]) <= _KEPT_FIELD_LENGTH:
                    if len(kept) >= _KEPT_FIELDS:
                        kept.clear()
                    kept[field] = raw_field
            if raw_field is not None:
                fields.append(raw_field)
        if not 100 <= status < 200:
            self.response_started = True
        self._conn.send_headers(self, fields, end=not body)
        if not body:
            self.response_ended = True
            self._conn.finished(self)

    def write(self, chunk: bytes) -> Awaitable[None] | None:
        """Taken (None) while what is held fits the client's windows: it goes out at the end
        of this turn of the loop, with the end of the stream if that comes in the same turn.
        Otherwise a future, done once the windows have taken it all."""
        if self.gone or not chunk:
            return None
        self._pending = self._pending + chunk if self._pending else chunk
        self._conn.send_soon(self)
        if len(self._pending) <= self._conn.room(self) and not self._conn.paused:
            return None
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()
        return self._drained

    def end(self) -> None:
        if self.gone or self.response_ended:
            return
        self._end_pending = True
        self._conn.send_soon(self)

    def abort(self) -> None:
        if not self.gone:
            self._conn.reset(self, h2.errors.ErrorCodes.INTERNAL_ERROR)

    # ---- sending ------------------------------------------------------------------------------

    def _send(self) -> None:
        """As much as the windows allow, in frames of the client's maximum size; END_STREAM on
        the last of them (or on an empty one) once nothing is held."""
        frame_size = self._conn.conn.max_outbound_frame_size
        while self._pending and not self.gone:
            room = min(self._conn.room(self), frame_size)
            if room <= 0:
                return
            piece, self._pending = self._pending[:room], self._pending[room:]
            last = self._end_pending and not self._pending
            self._conn.send_data(self, piece, end=last)
            if last:
                self._ended()
                return
        if self.gone:
            return
        if self._end_pending and not self._pending:
            self._conn.end_stream(self)
            self._ended()
            return
        self._wake()

    def _ended(self) -> None:
        self._end_pending = False
        self.response_ended = True
        self._conn.finished(self)
        self._wake()

    def _wake(self) -> None:
        if not self._pending and not self._conn.paused:
            drained = self._drained
            if drained is not None and not drained.done():
                drained.set_result(None)

    def _window(self) -> None:
        if self._pending or self._end_pending:
            self._conn.send_soon(self)
        else:
            self._wake()

    def _gone(self) -> None:
        """The stream is over: a writer waiting is released (the core's task is cancelled
        separately), the body fails if it was still coming."""
        self.gone = True
        self._pending = b""
        self.body.fail("gone")
        drained = self._drained
        if drained is not None and not drained.done():
            drained.set_result(None)


class H2Server(typing.Protocol):
    """What the protocol needs of :class:`edge.https.SiteServer`."""

    @property
    def proxy(self) -> Proxy: ...

    metrics: EdgeMetrics
    connections: set[Any]
    idle_timeout: float
    max_header_size: int
    scheme: str

    def refused(self, reason: str) -> None: ...


class H2Protocol(asyncio.Protocol):
    """One HTTP/2 server connection. Each request stream becomes an
    :class:`~edge.exchange.Exchange` run by the core (``server.proxy.handle``) in its own task.

    Made by :class:`edge.https.SiteServer` for a connection whose ALPN is ``h2``, with the
    client's address, the connection budget's release (called once, when the connection is
    gone) and when the first byte is due (0: no first-byte timeout). The HTTP/2 bounds are
    ``server.h2_limits`` if it has them, else the defaults with the server's header size and
    idle timeout."""

    def __init__(
        self,
        server: H2Server,
        client: str,
        release: Callable[[], None] | None = None,
        first_byte_due: float = 0.0,
    ) -> None:
        self.server = server
        limits = getattr(server, "h2_limits", None)
        if not isinstance(limits, H2Limits):
            # No more streams at once than the client's share of upstream requests: a browser
            # then queues its requests itself instead of getting 503 for the ones past it.
            shares = server.proxy.settings.shares
            streams = H2Limits.max_concurrent_streams
            if shares is not None:
                streams = max(1, min(streams, shares.limits.per_client))
            limits = H2Limits(
                max_concurrent_streams=streams,
                max_header_list_size=server.max_header_size,
                idle_timeout=server.idle_timeout,
            )
        self.limits = limits
        self.handler: Handler = server.proxy.handle
        self.client = client
        self.sni: str | None = None
        self._release = release
        self._first_byte_due = first_byte_due
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            # Checked here instead (_request_parts): a malformed request gets a 400 on its own
            # stream, not a GOAWAY for the whole connection.
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            # H2Stream.start sends fields already lower case and checked.
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.conn = _Connection(config)
        self.conn.encoder = FlatEncoder()
        self.conn.decoder = RepeatDecoder(self.conn.decoder.max_header_list_size)
        self.guard = FrameGuard(self.limits)
        self.streams: dict[int, H2Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.paused = False
        self._closed = False
        self._flush_due = False
        self._goaway_sent = False
        self._sending: set[H2Stream] = set()  # streams with data or an end to send this turn
        self._kept_requests: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self._loop = asyncio.get_running_loop()  # made by the loop's protocol factory
        # Idle: no stream open (a GOAWAY then); a stream's own deadlines are the core's.
        self._clock = ConnectionClock(
            limits.idle_timeout, lambda: bool(self.streams), self.goaway, self._first_byte_late
        )

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # edge.https's TLS layer (or uvloop's transports) need not subclass asyncio.Transport.
        self.transport = typing.cast(asyncio.Transport, transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.sni = sni_name(ssl_object)
        self.server.connections.add(self)
        limits = self.limits
        self.conn.local_settings = _settings(limits, limits.max_concurrent_streams)
        # A hard stop for an HPACK bomb while decoding (GOAWAY ENHANCE_YOUR_CALM); a list
        # between the advertised size and this gets a 431 on its own stream.
        self.conn.decoder.max_header_list_size = 2 * limits.max_header_list_size
        self.conn.initiate_connection()
        if limits.connection_window > 65535:
            self.conn.increment_flow_control_window(limits.connection_window - 65535)
        # h2 enforces its own copy of the stream limit, as a connection error; the advertised
        # one is enforced here, stream by stream (REFUSED_STREAM). Room above it for streams
        # a client opened before our SETTINGS reached it.
        self.conn.local_settings = _settings(limits, 2 * limits.max_concurrent_streams + 100)
        self._flush()
        self._clock.start(self._first_byte_due)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._clock.received()
        try:
            self.guard.feed(data)
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                log.debug("HTTP/2 protocol error from %s: %s", self.client, exc)
                self._flush()  # h2 has queued the GOAWAY
                self._close()
                return
            for event in events:
                self._event(event)
        except TooMuch as exc:
            log.info("HTTP/2 connection from %s ended: %s", self.client, exc)
            self.server.refused(f"h2_{exc.reason}")
            self.goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            return
        self._flush_soon()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for stream in list(self.streams.values()):
            stream._window()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._clock.stop()
        for stream in list(self.streams.values()):
            self._abandon(stream)
        self.streams.clear()
        self.server.connections.discard(self)
        self.transport = None
        release, self._release = self._release, None
        if release is not None:
            release()

    # ---- what the server asks of every client connection --------------------------------------

    def close_when_idle(self) -> None:
        """Shutdown: GOAWAY; the streams in flight finish, then the connection closes."""
        self.goaway()

    def abort(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.abort()

    # ---- events -------------------------------------------------------------------------------

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.StreamEnded):
            self._request_ended(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id == 0:
                for stream in list(self.streams.values()):
                    stream._window()
            elif (one := self.streams.get(event.stream_id or 0)) is not None:
                one._window()
        elif isinstance(event, h2.events.StreamReset):
            # The client abandoned the stream: its upstream request ends with it.
            gone = self.streams.pop(event.stream_id or 0, None)
            if gone is not None:
                self._abandon(gone)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for stream in list(self.streams.values()):
                stream._window()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close()
        elif isinstance(event, h2.events.TrailersReceived) and event.stream_ended is not None:
            # Trailers are not forwarded; they end the request body.
            self._request_ended(event.stream_id)

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if sid is None or event.headers is None:
            return
        if self._goaway_sent:
            # After a graceful GOAWAY (RFC 9113 section 6.8): not processed, may be retried.
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if len(self.streams) >= self.limits.max_concurrent_streams:
            self.server.metrics.requests_rejected.labels("h2_refused_stream").inc()
            self.guard.resets.spend()
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        ended = event.stream_ended is not None
        stream = H2Stream(self, sid)
        stream.request_ended = ended
        self.streams[sid] = stream
        try:
            request = self._request_parts(event.headers)
        except _Malformed as exc:
            # An error the client caused: spends the reset budget as a reset would.
            self.server.metrics.requests_rejected.labels("bad_header").inc()
            self.guard.resets.spend()
            method = "HEAD" if (b":method", b"HEAD") in event.headers else "GET"
            stream.task = self._loop.create_task(self._refuse(stream, method, exc))
            return
        if ended and request.body_length not in (None, 0):
            self.guard.resets.spend()
            self.reset(stream, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        request.scheme = self.server.scheme
        request.client = self.client
        request.sni = self.sni
        request.has_body = not ended
        if ended:
            request.body_length = 0
            stream.body.finish()
        stream.task = self._loop.create_task(self._run(stream, request))

    def _request_parts(self, fields: Any) -> Request:
        """:func:`_request_parts`, once per distinct header list on this connection: a client
        sends much the same request again and again (and :class:`RepeatDecoder` hands back the
        same fields for it)."""
        key = tuple(fields)
        kept = self._kept_requests.get(key)
        if kept is None:
            request = _request_parts(fields, self.limits.max_header_list_size)
            if request.header_size > _KEPT_REQUEST_SIZE:
                return request
            if len(self._kept_requests) >= _KEPT_REQUESTS:
                self._kept_requests.clear()
            self._kept_requests[key] = (
                request.method,
                request.target,
                tuple(request.headers),
                request.authority,
                request.header_size,
                request.body_length,
            )
            return request
        method, target, headers, authority, size, length = kept
        return Request(
            method=method,
            target=target,
            headers=list(headers),
            authority=authority,
            scheme="https",
            client="",
            sni=None,
            version="2",
            header_size=size,
            body_length=length,
        )

    def _data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id or 0
        flow = event.flow_controlled_length or 0
        data = event.data or b""
        stream = self.streams.get(sid)
        if stream is None or stream.body.done:
            # Nobody will read it: the window back at once.
            self._acknowledge(sid, flow)
        else:
            # Padding is acknowledged now, the data as the core takes it. h2 has checked the
            # DATA against content-length (a connection error otherwise).
            self._acknowledge(sid, flow - len(data))
            stream.body.feed(data)
            if stream.body.done:  # over the body size limit: the core answers 413
                self._acknowledge(sid, len(data))
        if event.stream_ended is not None:
            self._request_ended(sid)

    def _request_ended(self, sid: int | None) -> None:
        stream = self.streams.get(sid or 0)
        if stream is not None:
            stream.request_ended = True
            stream.body.finish()

    # ---- streams ------------------------------------------------------------------------------

    async def _run(self, stream: H2Stream, request: Request) -> None:
        await self.handler(Exchange(request, stream.body, stream))
        if not stream.gone and not stream.response_ended and not stream._end_pending:
            # The core always answers; a stream it left open would hang the client.
            self.reset(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)

    async def _refuse(self, stream: H2Stream, method: str, exc: _Malformed) -> None:
        status = exc.status
        text = f"{status} {HTTPStatus(status).phrase}: {exc}\n".encode()
        fields = [("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(text)))]
        stream.start(status, "", fields, body=method != "HEAD", close=True)
        if method != "HEAD":
            stream.write(text)
            stream.end()

    def _abandon(self, stream: H2Stream) -> None:
        """The stream is over for the client: its task (and the upstream request) ends."""
        stream._gone()
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()
        self._maybe_idle()

    def finished(self, stream: H2Stream) -> None:
        """The response is sent. A request body still arriving is not wanted: reset with
        NO_ERROR (RFC 9113 section 8.1)."""
        if not stream.request_ended:
            self.reset(stream, h2.errors.ErrorCodes.NO_ERROR)
            return
        self.streams.pop(stream.stream_id, None)
        stream.gone = True
        self._maybe_idle()

    def reset(self, stream: H2Stream, code: h2.errors.ErrorCodes) -> None:
        if self.streams.pop(stream.stream_id, None) is None and stream.gone:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.reset_stream(stream.stream_id, code)
        self._flush_soon()
        stream._gone()
        task = stream.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
        self._maybe_idle()

    def consumed(self, stream: H2Stream, size: int) -> None:
        if not stream.gone:
            self._acknowledge(stream.stream_id, size)
            self._flush_soon()

    def _acknowledge(self, sid: int, size: int) -> None:
        if size > 0:
            # h2 opens the connection's window even when the stream is gone.
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.conn.acknowledge_received_data(size, sid)

    def room(self, stream: H2Stream) -> int:
        """What the stream's and the connection's windows allow now."""
        if self.paused:
            return 0
        try:
            return self.conn.local_flow_control_window(stream.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            return 0

    def send_soon(self, stream: H2Stream) -> None:
        self._sending.add(stream)
        self._flush_soon()

    def send_headers(
        self, stream: H2Stream, fields: list[tuple[bytes, bytes]], *, end: bool
    ) -> None:
        try:
            self.conn.send_headers(stream.stream_id, fields, end_stream=end)
        except h2.exceptions.StreamClosedError:
            stream._gone()
            return
        except h2.exceptions.ProtocolError as exc:
            # An upstream's field h2 will not send (h2 validates what goes out).
            log.warning("HTTP/2 response on stream %d refused: %s", stream.stream_id, exc)
            self.reset(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        self._flush_soon()

    def send_data(self, stream: H2Stream, data: bytes, *, end: bool = False) -> None:
        try:
            self.conn.send_data(stream.stream_id, data, end_stream=end)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            stream._gone()
            return
        self._flush_soon()

    def end_stream(self, stream: H2Stream) -> None:
        try:
            self.conn.end_stream(stream.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            stream._gone()
            return
        self._flush_soon()

    # ---- connection ---------------------------------------------------------------------------

    def goaway(self, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """GOAWAY: with NO_ERROR (a graceful shutdown, an idle connection) the streams in
        flight finish first and new ones are refused; otherwise the connection ends now."""
        if self._closed:
            return
        if code != h2.errors.ErrorCodes.NO_ERROR:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.close_connection(error_code=code)
            self._flush()
            self._close()
            return
        if not self._goaway_sent:
            # Written here, not by h2: after its own GOAWAY h2 sends nothing more, not even
            # the rest of the responses in flight.
            self._goaway_sent = True
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.conn.highest_inbound_stream_id
            frame.error_code = code
            self._flush()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(frame.serialize())
        if not self.streams:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._clock.stop()
        for stream in list(self.streams.values()):
            self._abandon(stream)
        self.streams.clear()
        if self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        self._flush_due = False
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _flush_soon(self) -> None:
        """At the end of this turn of the loop: the frames of every stream answered in it go
        out in one write (one TLS record, one system call) instead of one per frame."""
        if not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush_later)

    def _flush_later(self) -> None:
        sending, self._sending = self._sending, set()
        for stream in sending:
            stream._send()
        self._flush()

    def _first_byte_late(self) -> None:
        """No preface in time (HTTP/1.1's first-byte timeout, the same budget)."""
        self.server.refused("first_byte_timeout")
        self.abort()

    def _maybe_idle(self) -> None:
        if self.streams or self._closed:
            return
        if self._goaway_sent:
            self._flush()
            self._close()  # a graceful GOAWAY's last stream is done
        else:
            self._clock.touch()


def _settings(limits: H2Limits, max_streams: int) -> h2.settings.Settings:
    codes = h2.settings.SettingCodes
    return h2.settings.Settings(
        client=False,
        initial_values={
            codes.MAX_CONCURRENT_STREAMS: max_streams,
            codes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
            codes.INITIAL_WINDOW_SIZE: limits.stream_window,
            codes.ENABLE_PUSH: 0,
        },
    )


def _request_parts(fields: Any, max_size: int) -> Request:
    """The :class:`Request` of a request header list (``scheme``, ``client`` and ``sni`` are
    the connection's, set by the caller), or :class:`_Malformed` naming the problem."""
    size = 0
    pseudo: dict[bytes, bytes] = {}
    headers: Fields = []
    cookies: list[str] = []
    host: bytes | None = None
    lengths: list[bytes] = []
    regular = False
    for name, value in fields:
        size += len(name) + len(value) + _FIELD_OVERHEAD
        if size > max_size:
            raise _Malformed(431, "the request's header fields are too large")
        if _BAD_VALUE.search(value):
            raise _Malformed(
                400, f"the field {name[:64]!r} has a value with CR, LF, NUL or edge spaces"
            )
        if name.startswith(b":"):
            if regular:
                raise _Malformed(400, "a pseudo-header field follows a regular field")
            if name not in _REQUEST_PSEUDO:
                raise _Malformed(400, f"the pseudo-header field {name[:64]!r} is not allowed")
            if name in pseudo:
                raise _Malformed(400, f"the pseudo-header field {name!r} is repeated")
            pseudo[name] = value
            continue
        regular = True
        if _FIELD_NAME.fullmatch(name) is None:
            raise _Malformed(400, f"the field name {name[:64]!r} is not a lower-case token")
        if name in _CONNECTION_SPECIFIC:
            raise _Malformed(400, f"the connection-specific field {name!r} is not allowed")
        if name == b"te" and value.lower() != b"trailers":
            raise _Malformed(400, "TE may only be 'trailers'")
        if name == b"host":
            if host is not None:
                raise _Malformed(400, "Host is repeated")
            host = value
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"cookie":
            # RFC 9113 section 8.2.3: the crumbs are one field again for HTTP/1.1.
            cookies.append(value.decode("latin-1"))
            continue
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    method = pseudo.get(b":method")
    if method is None or _METHOD.fullmatch(method) is None:
        raise _Malformed(400, ":method is missing or not a token")
    if method == b"CONNECT":
        raise _Malformed(405, "CONNECT is not forwarded")
    scheme, path = pseudo.get(b":scheme"), pseudo.get(b":path")
    if scheme != b"https":
        raise _Malformed(400, ":scheme must be 'https'")
    if not path:
        raise _Malformed(400, ":path is missing or empty")
    authority = pseudo.get(b":authority")
    if authority is not None and host is not None and authority.lower() != host.lower():
        raise _Malformed(400, "Host and :authority differ")
    authority = authority if authority is not None else host
    if authority is None:
        raise _Malformed(400, "the request has no :authority")
    if b"@" in authority:
        raise _Malformed(400, ":authority must not carry user information")
    if cookies:
        headers.append(("cookie", "; ".join(cookies)))
    return Request(
        method=method.decode("ascii"),
        target=path.decode("latin-1"),
        headers=headers,
        authority=authority.decode("latin-1"),
        scheme="https",
        client="",
        sni=None,
        version="2",
        header_size=size,
        # h2 has refused (GOAWAY) a content-length that is not digits only, or that differs.
        body_length=int(lengths[0]) if lengths else None,
    )
