"""HTTP/2 on :443 (ALPN ``h2``): one asyncio protocol per connection, one exchange per stream.

The ``h2`` library keeps the protocol's state; this module feeds it, enforces what the edge
enforces on HTTP/1.1, and turns each request stream into the same exchange the HTTP/1.1 path
hands to the proxy core, so every rule the core applies (421 by SNI, targets, forwarding
headers, fair shares per request) holds per stream.

What is HTTP/2's own is checked here, before the core sees a request: pseudo-header fields
(only ``:method``, ``:scheme``, ``:authority``, ``:path``, each once, first), field names in
lower case, values without CR, LF or NUL, no connection-specific fields (``Connection``,
``Transfer-Encoding``, ``Upgrade``, ...; ``TE`` only as ``trailers``), ``Host`` agreeing with
``:authority``, the decoded size of the header list (431) and ``content-length`` against the
DATA that came (a mismatch resets the stream). A malformed request gets a one-line 400 and its
stream is closed (RFC 9113 section 8.1.1).

Flow control both ways: a request body is acknowledged (WINDOW_UPDATE) only as the core takes
it, so a client can have at most a window's worth in the edge's memory; a response is written
only as far as the client's windows allow, so the core, which awaits each write before it
reads more from upstream, never reads faster than the client takes. A stream whose window
stays closed for the send timeout is reset and its upstream request ends with it, as does a
stream the client resets (RST_STREAM): the stream's task is cancelled.

The attacks on HTTP/2 itself (rapid reset, CONTINUATION flood, SETTINGS/PING flood, empty
frames) are bounded by :class:`edge.h2limits.FrameGuard` before ``h2`` parses the bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from edge.h2limits import FrameGuard, H2Limits, TooMuch

__all__ = ["H2Exchange", "H2Handler", "H2Limits", "H2Protocol", "StreamGone"]

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


class StreamGone(ConnectionError):
    """The stream can take no more: the client reset it, its window stayed closed, or the
    connection ended. Raised by a response write; the core lets go of the upstream request."""


class _Malformed(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class H2Exchange:
    """One request stream, as the core sees it: the request's parts, its body as it arrives,
    and a response sink. Header fields are HTTP/1.1-style: ``host`` carries ``:authority``."""

    protocol = "HTTP/2"

    def __init__(
        self,
        conn: H2Protocol,
        stream_id: int,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        content_length: int | None,
    ) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.method = method
        self.target = target
        self.headers = headers
        self.peer = conn.peer
        self.sni = conn.sni
        self.content_length = content_length
        self.request_ended = False
        self._chunks: deque[tuple[bytes, int]] = deque()
        self._arrived = asyncio.Event()
        self.response_started = False
        self.response_ended = False
        self.gone = False
        self._window_open = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    # ---- request body -------------------------------------------------------------------------

    async def receive(self) -> bytes:
        """The next chunk of the request body, b"" at its end. Taking a chunk opens the
        client's window for as much again. Raises :class:`StreamGone` if the body stops
        arriving for the body idle timeout or the stream ends."""
        while not self._chunks:
            if self.request_ended:
                return b""
            if self.gone:
                raise StreamGone("the stream was closed")
            self._arrived.clear()
            try:
                await asyncio.wait_for(
                    self._arrived.wait(), self._conn.limits.body_idle_timeout or None
                )
            except TimeoutError:
                self._conn.reset(self, h2.errors.ErrorCodes.CANCEL)
                raise StreamGone("the request body stopped arriving") from None
        data, flow = self._chunks.popleft()
        self._conn.consumed(self, flow)
        return data

    def _body(self, data: bytes, flow: int) -> None:
        self._chunks.append((data, flow))
        self._arrived.set()

    def _ended(self) -> None:
        self.request_ended = True
        self._arrived.set()

    # ---- response -----------------------------------------------------------------------------

    async def start_response(
        self,
        status: int,
        headers: list[tuple[str, str]],
        *,
        end: bool = False,
    ) -> None:
        """Sends the response header block; hop-by-hop fields (and those ``Connection`` names)
        are left out, names are sent in lower case."""
        if self.gone:
            raise StreamGone("the stream was closed")
        named = {
            token.strip().lower()
            for name, value in headers
            if name.lower() == "connection"
            for token in value.split(",")
        }
        fields: list[tuple[str, str]] = [(":status", str(status))]
        for name, value in headers:
            lower = name.lower()
            if lower in _RESPONSE_HOP_BY_HOP or lower in named:
                continue
            fields.append((lower, value))
        if not 100 <= status < 200:
            self.response_started = True
        self._conn.send_headers(self, fields, end)
        if end:
            self._finished()

    async def write(self, data: bytes) -> None:
        """Sends ``data`` as far as the client's windows allow, waiting for them to open (at
        most the send timeout for each wait), and for the transport to drain."""
        view = memoryview(data)
        while view:
            if self.gone:
                raise StreamGone("the stream was closed")
            room = self._conn.room(self)
            if room <= 0:
                self._window_open.clear()
                try:
                    await asyncio.wait_for(
                        self._window_open.wait(), self._conn.limits.send_timeout or None
                    )
                except TimeoutError:
                    self._conn.window_stalled(self)
                    raise StreamGone("the client's window stayed closed") from None
                continue
            self._conn.send_data(self, view[:room])
            view = view[room:]
            await self._conn.drained()

    async def end(self, data: bytes = b"") -> None:
        """Writes ``data`` (if any) and ends the response."""
        if data:
            await self.write(data)
        if self.gone or self.response_ended:
            return
        self._conn.end_stream(self)
        self._finished()

    def abort(self) -> None:
        """Ends the stream at once (the upstream failed mid-response): the client sees a
        truncation, never a response that looks whole."""
        if not self.gone:
            self._conn.reset(self, h2.errors.ErrorCodes.INTERNAL_ERROR)

    async def respond(self, status: int, text: str, headers: list[tuple[str, str]] = []) -> None:  # noqa: B006 - never mutated
        """A short plain-text answer from the edge itself."""
        body = f"{status} {HTTPStatus(status).phrase}: {text}\n".encode()
        fields = [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(body))),
            *headers,
        ]
        if self.method == "HEAD":
            await self.start_response(status, fields, end=True)
            return
        await self.start_response(status, fields)
        await self.end(body)

    def _finished(self) -> None:
        self.response_ended = True
        self._conn.response_done(self)

    def _window(self) -> None:
        self._window_open.set()

    def _gone(self) -> None:
        self.gone = True
        self._window_open.set()
        self._arrived.set()


H2Handler = Callable[[H2Exchange], Awaitable[None]]


class H2Protocol(asyncio.Protocol):
    """One HTTP/2 server connection. ``handler`` is called once per request stream, in its
    own task; when it returns without ending the response, the stream is ended (a 502 if
    nothing was sent). ``sni`` and ``peer`` are the connection's, as the HTTP/1.1 path takes
    them (the SNI callback's matched name, the PROXY protocol's or the socket's address)."""

    def __init__(
        self,
        handler: H2Handler,
        limits: H2Limits | None = None,
        *,
        sni: str | None = None,
        peer: str | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits or H2Limits()
        self.sni = sni
        self.peer = peer or ""
        self._on_close = on_close
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            # Checked here instead: a malformed request gets a 400 on its own stream, not a
            # GOAWAY for the whole connection.
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.guard = FrameGuard(self.limits)
        self.streams: dict[int, H2Exchange] = {}
        self.transport: asyncio.Transport | None = None
        self._paused = False
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = False
        self._idle: asyncio.TimerHandle | None = None

    # ---- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.peer:
            peername = transport.get_extra_info("peername")
            self.peer = peername[0] if peername else ""
        limits = self.limits
        codes = h2.settings.SettingCodes
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                codes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                codes.INITIAL_WINDOW_SIZE: limits.stream_window,
                codes.ENABLE_PUSH: 0,
            },
        )
        # A hard stop for an HPACK bomb while decoding (GOAWAY ENHANCE_YOUR_CALM); a list
        # between the advertised size and this gets a 431 on its own stream.
        self.conn.decoder.max_header_list_size = 2 * limits.max_header_list_size
        self.conn.initiate_connection()
        if limits.connection_window > 65535:
            self.conn.increment_flow_control_window(limits.connection_window - 65535)
        # h2 enforces its own copy of the stream limit as a connection error; the advertised
        # one is enforced here, stream by stream (REFUSED_STREAM). Room above it for the
        # streams a client opened before our SETTINGS reached it.
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: 2 * limits.max_concurrent_streams + 100,
                codes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
                codes.INITIAL_WINDOW_SIZE: limits.stream_window,
                codes.ENABLE_PUSH: 0,
            },
        )
        self._flush()
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            self.guard.feed(data)
        except TooMuch as exc:
            log.info("HTTP/2 connection from %s ended: %s", self.peer, exc)
            self.goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            return
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.debug("HTTP/2 protocol error from %s: %s", self.peer, exc)
            self._flush()  # h2 has queued the GOAWAY
            self._close()
            return
        try:
            for event in events:
                self._event(event)
        except TooMuch as exc:
            log.info("HTTP/2 connection from %s ended: %s", self.peer, exc)
            self.goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
            return
        self._flush()

    def pause_writing(self) -> None:
        self._paused = True
        self._drained.clear()

    def resume_writing(self) -> None:
        self._paused = False
        self._drained.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._drained.set()
        if self._idle is not None:
            self._idle.cancel()
        for stream in list(self.streams.values()):
            self._abandon(stream)
        self.streams.clear()
        if self._on_close is not None:
            self._on_close()

    # ---- events -------------------------------------------------------------------------------

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.StreamEnded):
            self._request_ended(event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.pop(event.stream_id, None)
            if stream is not None:
                self._abandon(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            targets = (
                self.streams.values()
                if event.stream_id == 0
                else filter(None, [self.streams.get(event.stream_id)])
            )
            for stream in targets:
                stream._window()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for stream in self.streams.values():
                stream._window()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close()
        elif isinstance(event, h2.events.TrailersReceived) and event.stream_ended is not None:
            # Trailers are not forwarded; they end the request body.
            self._request_ended(event.stream_id)

    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if event.stream_id is None or event.headers is None:
            return
        if len(self.streams) >= self.limits.max_concurrent_streams:
            self.guard.resets.spend()
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        ended = event.stream_ended is not None
        try:
            method, target, headers, length = _request_parts(
                event.headers, self.limits.max_header_list_size
            )
        except _Malformed as exc:
            stream = H2Exchange(self, sid, "GET", "/", [], None)
            stream.request_ended = ended
            self.streams[sid] = stream
            # An error the client caused: spends the reset budget like a reset would.
            self.guard.resets.spend()
            stream.task = asyncio.ensure_future(self._refuse(stream, exc.status, str(exc)))
            return
        if ended and length not in (None, 0):
            self.guard.resets.spend()
            self.conn.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        stream = H2Exchange(self, sid, method, target, headers, length)
        stream.request_ended = ended
        self.streams[sid] = stream
        self._disarm_idle()
        stream.task = asyncio.ensure_future(self._run(stream))

    def _data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id
        flow = event.flow_controlled_length or 0
        stream = self.streams.get(sid) if sid is not None else None
        if stream is None or stream.response_ended or stream.gone:
            # Nobody will read it: give the window back at once.
            if flow and sid is not None:
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.conn.acknowledge_received_data(flow, sid)
            return
        # h2 has checked the DATA against content-length (a connection error otherwise).
        stream._body(event.data or b"", flow)
        if event.stream_ended is not None:
            self._request_ended(sid)

    def _request_ended(self, sid: int | None) -> None:
        stream = self.streams.get(sid) if sid is not None else None
        if stream is not None:
            stream._ended()

    # ---- streams ------------------------------------------------------------------------------

    async def _run(self, stream: H2Exchange) -> None:
        try:
            await self.handler(stream)
        except StreamGone:
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("HTTP/2 stream %d of %s failed", stream.stream_id, self.peer)
            if not stream.response_started and not stream.gone:
                with contextlib.suppress(StreamGone):
                    await stream.respond(502, "the edge failed to handle this request")
                return
        if stream.gone or stream.response_ended:
            return
        if not stream.response_started:
            with contextlib.suppress(StreamGone):
                await stream.respond(502, "no response")
            return
        with contextlib.suppress(StreamGone):
            await stream.end()

    async def _refuse(self, stream: H2Exchange, status: int, text: str) -> None:
        with contextlib.suppress(StreamGone):
            await stream.respond(status, text)

    def _abandon(self, stream: H2Exchange) -> None:
        """The stream is over for the client: its task (and the upstream request) ends."""
        stream._gone()
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()
        self._maybe_idle()

    def response_done(self, stream: H2Exchange) -> None:
        """The response is sent. A request still arriving is not wanted: reset with NO_ERROR
        (RFC 9113 section 8.1) and its window returned."""
        if not stream.request_ended and not stream.gone:
            self.reset(stream, h2.errors.ErrorCodes.NO_ERROR)
            return
        self.streams.pop(stream.stream_id, None)
        stream._gone()
        self._maybe_idle()

    def reset(self, stream: H2Exchange, code: h2.errors.ErrorCodes) -> None:
        if stream.gone and stream.stream_id not in self.streams:
            return
        self.streams.pop(stream.stream_id, None)
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.conn.reset_stream(stream.stream_id, code)
        self._flush()
        current = asyncio.current_task()
        stream._gone()
        if stream.task is not None and stream.task is not current and not stream.task.done():
            stream.task.cancel()
        self._maybe_idle()

    def window_stalled(self, stream: H2Exchange) -> None:
        log.info("HTTP/2 stream %d of %s: window closed too long", stream.stream_id, self.peer)
        self.reset(stream, h2.errors.ErrorCodes.CANCEL)

    def consumed(self, stream: H2Exchange, flow: int) -> None:
        if flow and not stream.gone:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.conn.acknowledge_received_data(flow, stream.stream_id)
            self._flush()

    def room(self, stream: H2Exchange) -> int:
        try:
            window = self.conn.local_flow_control_window(stream.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            stream._gone()
            return 0
        return min(window, self.conn.max_outbound_frame_size)

    def send_headers(self, stream: H2Exchange, fields: list[tuple[str, str]], end: bool) -> None:
        try:
            self.conn.send_headers(stream.stream_id, fields, end_stream=end)
        except h2.exceptions.StreamClosedError:
            stream._gone()
            raise StreamGone("the stream was closed") from None
        except h2.exceptions.ProtocolError as exc:
            log.warning("HTTP/2 response on stream %d refused: %s", stream.stream_id, exc)
            self.reset(stream, h2.errors.ErrorCodes.INTERNAL_ERROR)
            raise StreamGone(str(exc)) from None
        self._flush()

    def send_data(self, stream: H2Exchange, data: memoryview) -> None:
        try:
            self.conn.send_data(stream.stream_id, bytes(data))
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            stream._gone()
            raise StreamGone("the stream was closed") from None
        self._flush()

    def end_stream(self, stream: H2Exchange) -> None:
        try:
            self.conn.end_stream(stream.stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            stream._gone()
            raise StreamGone("the stream was closed") from None
        self._flush()

    async def drained(self) -> None:
        if self._paused:
            await self._drained.wait()

    # ---- connection ---------------------------------------------------------------------------

    def goaway(self, code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.NO_ERROR) -> None:
        """GOAWAY and close: with NO_ERROR the streams in flight finish first (a graceful
        shutdown), otherwise they end now."""
        if self._closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(error_code=code)
        self._flush()
        if code != h2.errors.ErrorCodes.NO_ERROR or not self.streams:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for stream in list(self.streams.values()):
            self._abandon(stream)
        self.streams.clear()
        if self.transport is not None:
            self.transport.close()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _arm_idle(self) -> None:
        self._disarm_idle()
        if self.limits.idle_timeout > 0 and not self._closed:
            loop = asyncio.get_running_loop()
            self._idle = loop.call_later(self.limits.idle_timeout, self.goaway)

    def _disarm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _maybe_idle(self) -> None:
        if not self.streams:
            if self.conn.state_machine.state == h2.connection.ConnectionState.CLOSED:
                self._close()
            else:
                self._arm_idle()


def _request_parts(
    fields: list[tuple[bytes, bytes]] | Any, max_size: int
) -> tuple[str, str, list[tuple[str, str]], int | None]:
    """(method, target, HTTP/1.1-style header fields, content-length) of a request header
    list, or :class:`_Malformed` naming the problem."""
    size = 0
    pseudo: dict[bytes, bytes] = {}
    headers: list[tuple[str, str]] = []
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
        if name == b"te" and value.strip().lower() != b"trailers":
            raise _Malformed(400, "TE may only be 'trailers'")
        if name == b"host":
            if host is not None:
                raise _Malformed(400, "Host is repeated")
            host = value
            continue
        if name == b"content-length":
            lengths.append(value)
        text = value.decode("latin-1")
        if name == b"cookie":
            cookies.append(text)  # RFC 9113 section 8.2.3: one field again for HTTP/1.1
            continue
        headers.append((name.decode("ascii"), text))
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
    if authority is None and host is None:
        raise _Malformed(400, "the request has no :authority")
    if authority is not None and b"@" in authority:
        raise _Malformed(400, ":authority must not carry user information")
    headers.insert(0, ("host", (authority or host or b"").decode("latin-1")))
    if cookies:
        headers.append(("cookie", "; ".join(cookies)))
    # h2 has refused (GOAWAY) a content-length that is not digits only, or differs.
    length = int(lengths[0]) if lengths else None
    return method.decode("ascii"), path.decode("latin-1"), headers, length
