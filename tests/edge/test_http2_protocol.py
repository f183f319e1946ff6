"""edge.http2 on its own: a real TLS listener with ALPN h2 on loopback, a handler of the test's,
and clients that behave and misbehave (the h2 library over ssl sockets, raw frames)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, cast

import h2.connection
import h2.errors
import hpack
import pytest
from hpack.hpack import encode_integer

from edge import http2
from edge.exchange import Exchange, Proxy
from edge.h2encoder import RepeatDecoder
from edge.h2limits import H2Limits
from edge.http2 import H2Protocol, H2Stream
from edge.metrics import EdgeMetrics
from edge.tls import build_context
from tests.edge.conftest import wait_for
from tests.support.h2client import H2Client, H2Response, RawH2, frame
from tests.support.pki import Pki

NAME = "h2.test"


@dataclass
class Seen:
    """What the handler saw, for the test thread to read."""

    written: dict[int, int] = field(default_factory=dict)
    outcome: dict[int, str] = field(default_factory=dict)
    started: int = 0


def _mark_sni(obj: Any, name: str | None, ctx: ssl.SSLContext) -> None:
    setattr(obj, "certman_sni_name", name)  # noqa: B010 - the attribute edge.sni sets


class StubServer:
    def __init__(self, pki: Pki, limits: H2Limits) -> None:
        chain, key, _ = pki.leaf([NAME])
        self.ctx = build_context(chain.encode(), key)
        # The SNI callback's mark, as edge.sni leaves it for the protocols.
        self.ctx.sni_callback = _mark_sni
        self.limits = limits
        self.seen = Seen()
        self.protocols: list[H2Protocol] = []
        self.metrics = EdgeMetrics()
        self.connections: set[Any] = set()
        self.refusals: list[str] = []
        self.h2_limits = limits
        self.idle_timeout = limits.idle_timeout
        self.max_header_size = limits.max_header_list_size
        self.scheme = "https"
        self.loop = asyncio.new_event_loop()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self.server = await self.loop.create_server(
                self._protocol, sock=self.sock, ssl=self.ctx
            )

        self.loop.run_until_complete(main())
        self.loop.run_forever()

    # What H2Protocol asks of edge.https.SiteServer (H2Server).
    @property
    def proxy(self) -> Proxy:
        return cast(Proxy, self)  # only its handle() is called

    def refused(self, reason: str) -> None:
        self.refusals.append(reason)

    def _protocol(self) -> H2Protocol:
        protocol = H2Protocol(self, "127.0.0.1")
        self.protocols.append(protocol)
        return protocol

    async def handle(self, ex: Exchange) -> None:
        req, sink = ex.request, ex.sink
        sid = cast(H2Stream, sink).stream_id
        self.seen.started += 1
        path = req.target.split("?")[0]
        try:
            if path == "/echo":
                size = 0
                while chunk := await ex.body.read():
                    size += len(chunk)
                reply = {
                    "method": req.method,
                    "target": req.target,
                    "authority": req.authority,
                    "headers": req.headers,
                    "body": size,
                    "body_length": req.body_length,
                    "has_body": req.has_body,
                    "client": req.client,
                    "sni": req.sni,
                    "version": req.version,
                }
                data = json.dumps(reply).encode()
                fields = [
                    ("Content-Type", "application/json"),
                    ("Connection", "close, x-gone"),
                    ("X-Gone", "1"),
                    ("Transfer-Encoding", "chunked"),
                ]
                sink.start(200, "OK", fields, body=True, close=False)
                sink.write(data)
                sink.end()
            elif path == "/big":
                total = int(req.target.split("=")[1])
                sink.start(200, "OK", [("content-length", str(total))], body=True, close=False)
                written = 0
                while written < total:
                    n = min(16384, total - written)
                    waiting = sink.write(b"x" * n)
                    written += n
                    self.seen.written[sid] = written
                    if waiting is not None:
                        try:
                            await asyncio.wait_for(waiting, 1.0)
                        except TimeoutError:
                            sink.abort()
                            self.seen.outcome[sid] = "stalled"
                            return
                sink.end()
            elif path == "/hang":
                await asyncio.Event().wait()
            else:
                sink.start(404, "Not Found", [("content-length", "0")], body=False, close=False)
            self.seen.outcome[sid] = "done"
        except asyncio.CancelledError:
            self.seen.outcome[sid] = "cancelled"
            raise

    def start(self) -> StubServer:
        self.thread.start()
        wait_for(lambda: hasattr(self, "server"), what="the stub listener")
        return self

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            for protocol in self.protocols:
                if protocol.transport is not None:
                    protocol.transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.server.wait_closed()
            # Until every transport has finished closing (connection_lost has run).
            deadline = self.loop.time() + 5
            while any(p.transport is not None for p in self.protocols):
                assert self.loop.time() < deadline, "a connection did not close"
                await asyncio.sleep(0.01)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(close(), self.loop)
        self.thread.join(5)
        self.loop.close()

    def client(self, **kwargs: Any) -> H2Client:
        return H2Client(self.port, NAME, **kwargs)


@pytest.fixture
def serve(pki: Pki) -> Iterator[Any]:
    servers: list[StubServer] = []

    def start(**overrides: Any) -> StubServer:
        limits = replace(H2Limits(), **overrides)
        server = StubServer(pki, limits).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


BASIC = [(":method", "GET"), (":scheme", "https"), (":authority", NAME), (":path", "/echo")]


# ---- requests as the core receives them ---------------------------------------------------------


def test_alpn_selects_h2_and_a_request_reaches_the_handler_as_http1_style_fields(
    serve: Any,
) -> None:
    server = serve()
    with server.client() as client:
        assert client.alpn == "h2"
        sid = client.request(
            "POST",
            "/echo?q=1",
            NAME,
            [("content-length", "5"), ("cookie", "a=1"), ("cookie", "b=2"), ("x-test", "yes")],
            b"hello",
        )
        response = client.wait(sid)
    assert response.status == 200, response
    seen = json.loads(response.body)
    assert seen["method"] == "POST"
    assert seen["target"] == "/echo?q=1"
    assert seen["body"] == 5
    assert seen["sni"] == NAME
    assert seen["client"] == "127.0.0.1"
    assert seen["authority"] == NAME
    assert seen["version"] == "2"
    assert (seen["body_length"], seen["has_body"]) == (5, True)
    headers = [tuple(h) for h in seen["headers"]]
    assert [n for n, _ in headers if n.startswith(":")] == []
    assert ("cookie", "a=1; b=2") in headers  # crumbs joined again (RFC 9113 8.2.3)
    # Hop-by-hop fields are never sent (the core removes those Connection names).
    names = [name for name, _ in response.headers]
    assert "content-type" in names
    assert not {"connection", "transfer-encoding"} & set(names)


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        (
            [
                (":method", "GET"),
                (":scheme", "https"),
                (":authority", NAME),
                (":path", "/echo"),
                ("X-Upper", "1"),
            ],
            400,
        ),
        ([*BASIC, ("connection", "keep-alive")], 400),
        ([*BASIC, ("transfer-encoding", "chunked")], 400),
        ([*BASIC, ("upgrade", "websocket")], 400),
        ([*BASIC, ("keep-alive", "5")], 400),
        ([*BASIC, ("proxy-connection", "x")], 400),
        ([*BASIC, ("te", "gzip")], 400),
        ([*BASIC, ("x-bad", "a\r\nx-injected: 1")], 400),
        ([*BASIC, ("x-bad", "a\nb")], 400),
        ([*BASIC, ("x-bad", "a\x00b")], 400),
        ([*BASIC, ("x-bad", " leading")], 400),
        ([*BASIC, ("bad name", "1")], 400),
        ([*BASIC, (":extra", "1")], 400),
        ([*BASIC, (":path", "/again")], 400),
        ([("x-first", "1"), *BASIC], 400),
        ([(":method", "GET"), (":scheme", "http"), (":authority", NAME), (":path", "/echo")], 400),
        ([(":method", "GET"), (":scheme", "https"), (":authority", NAME)], 400),
        ([(":method", "GET"), (":scheme", "https"), (":authority", NAME), (":path", "")], 400),
        ([(":scheme", "https"), (":authority", NAME), (":path", "/echo")], 400),
        ([(":method", "GET"), (":scheme", "https"), (":path", "/echo")], 400),
        ([*BASIC, ("host", "other.test")], 400),
        (
            [(":method", "GET"), (":scheme", "https"), (":authority", f"u@{NAME}"), (":path", "/")],
            400,
        ),
        ([(":method", "CONNECT"), (":authority", "10.0.0.1:22")], 405),
        ([*BASIC, ("x-big", "v" * 40000)], 431),
    ],
)
def test_a_malformed_request_gets_a_one_line_error_on_its_stream(
    serve: Any, fields: list[tuple[str, str]], status: int
) -> None:
    server = serve()
    with server.client() as client:
        # Three times: then the client's encoder sends indexes (decoded from what the
        # edge kept of the second) and a good request's checks are the ones kept.
        for _ in range(3):
            sid = client.conn.get_next_available_stream_id()
            client.responses[sid] = H2Response()
            client.conn.send_headers(sid, fields, end_stream=True)
            client.flush()
            response = client.wait(sid)
            assert response.status == status, response
            assert response.body.count(b"\n") == 1
            # The connection stays usable for the next request.
            again = client.get("/echo", NAME)
            assert again.status == 200
    assert server.seen.started == 3


@pytest.mark.parametrize(
    ("length", "body"),
    [("3", b"12345"), ("10", b"12345"), ("1, 2", b"1"), ("-1", b""), ("\u00b2", b"1")],
)
def test_a_content_length_the_data_disagree_with_ends_the_connection(
    serve: Any, length: str, body: bytes
) -> None:
    server = serve()
    with RawH2(server.port, NAME) as raw:
        fields = [*BASIC[:3], (":path", "/echo"), ("content-length", length)]
        raw.send(frame(0x1, 0x4, 1, hpack.Encoder().encode(fields)) + frame(0x0, 0x1, 1, body))
        raw.until(lambda: raw.goaway() is not None)
        assert raw.goaway() == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert server.seen.outcome.get(1) != "done"


def test_a_content_length_with_no_data_resets_the_stream(serve: Any) -> None:
    server = serve()
    with server.client() as client:
        none = client.request("POST", "/echo", NAME, [("content-length", "7")])
        assert client.wait(none).reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
        right = client.request("POST", "/echo", NAME, [("content-length", "5")], b"12345")
        assert json.loads(client.wait(right).body)["body"] == 5
    assert server.seen.started == 1


# ---- flow control -------------------------------------------------------------------------------


def test_a_response_is_written_only_as_far_as_the_window_allows(serve: Any) -> None:
    server = serve()
    with server.client(auto_window=False) as client:
        sid = client.request("GET", "/big?n=10000000", NAME)
        client.wait_for(lambda: client.responses[sid].reset is not None, timeout=5)
        # The default windows are 65,535 bytes: no more was sent, and the handler's write
        # waited (the core times that wait out and aborts the stream, as the stub does here).
        assert len(client.responses[sid].body) == 65535
        assert client.responses[sid].reset == h2.errors.ErrorCodes.INTERNAL_ERROR
    assert server.seen.outcome.get(sid) == "stalled"
    assert server.seen.written[sid] <= 65535 + 16384


def test_a_reading_client_gets_the_whole_response(serve: Any) -> None:
    server = serve()
    with server.client() as client:
        sid = client.request("GET", "/big?n=3000000", NAME)
        response = client.wait(sid, timeout=10)
    assert response.ended and len(response.body) == 3_000_000


def test_a_request_body_is_acknowledged_only_as_the_handler_takes_it(serve: Any) -> None:
    server = serve()
    with server.client() as client:
        # /hang never reads: the client's window for the stream closes at 65,535 bytes.
        sid = client.request("POST", "/hang", NAME, end=False)
        for at in range(0, 65535, 16384):
            client.conn.send_data(sid, b"x" * min(16384, 65535 - at))
        client.flush()
        for _ in range(5):
            client.pump(0.1)
        wait_for(lambda: server.seen.started == 1, what="the handler started")
        assert client.conn.local_flow_control_window(sid) == 0


def test_an_abandoned_stream_cancels_its_handler(serve: Any) -> None:
    server = serve()
    with server.client() as client:
        sid = client.request("GET", "/hang", NAME)
        wait_for(lambda: server.seen.started == 1, what="the handler started")
        client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        client.flush()
        wait_for(lambda: server.seen.outcome.get(sid) == "cancelled", what="the handler cancelled")
        assert client.get("/echo", NAME).status == 200


def test_a_closed_connection_cancels_every_stream(serve: Any) -> None:
    server = serve()
    client = server.client()
    sids = [client.request("GET", "/hang", NAME) for _ in range(3)]
    wait_for(lambda: server.seen.started == 3, what="the handlers started")
    client.close()
    wait_for(
        lambda: all(server.seen.outcome.get(s) == "cancelled" for s in sids),
        what="every handler cancelled",
    )


# ---- HTTP/2's own attacks -----------------------------------------------------------------------


def headers_frame(sid: int, encoder: hpack.Encoder, path: str = "/hang", end: bool = True) -> bytes:
    fields = [*BASIC[:3], (":path", path)]
    return frame(0x1, 0x4 | (0x1 if end else 0), sid, encoder.encode(fields))


def test_more_streams_than_advertised_are_refused(serve: Any) -> None:
    server = serve(max_concurrent_streams=4)
    with RawH2(server.port, NAME) as raw:
        encoder = hpack.Encoder()
        raw.send(b"".join(headers_frame(sid, encoder) for sid in range(1, 13, 2)))
        assert raw.until(lambda: len(raw.resets()) >= 2)
        assert raw.resets() == {
            9: h2.errors.ErrorCodes.REFUSED_STREAM,
            11: h2.errors.ErrorCodes.REFUSED_STREAM,
        }
        # The streams it refused never reached the handler; the connection goes on.
        wait_for(lambda: server.seen.started == 4, what="four handlers")
        raw.send(frame(0x3, 0, 1, struct.pack(">I", 8)) + headers_frame(13, encoder, "/echo"))
        assert raw.until(lambda: 13 in raw.statuses())
        assert raw.statuses()[13] == 200
    # SETTINGS_MAX_CONCURRENT_STREAMS is what the client is told.
    with server.client() as client:
        client.wait_for(lambda: client.remote_settings.get(3) == 4)


def test_the_streams_h2_holds_stay_bounded_without_a_walk_per_stream(serve: Any) -> None:
    """h2 counts open streams for its limit by walking every stream it holds (and prunes the
    closed ones as it goes); the edge's connection answers that count without the walk while it
    can, yet what h2 holds stays within twice the streams in flight plus a slack."""
    server = serve()
    in_flight, rounds = 8, 40
    with server.client() as client:
        for _ in range(rounds):
            sids = [client.request("GET", "/", NAME) for _ in range(in_flight)]
            for sid in sids:
                assert client.wait(sid).status == 404
        conn = server.protocols[-1].conn
        assert isinstance(conn, http2._Connection)
        walk = h2.connection.H2Connection.open_inbound_streams.fget
        assert walk is not None

        async def held_and_open() -> tuple[int, int]:
            # On the server's loop: h2's own walk prunes what it counts.
            return len(conn.streams), walk(conn)

        held, open_now = asyncio.run_coroutine_threadsafe(held_and_open(), server.loop).result(5)
    assert held <= 2 * in_flight + http2._PRUNE_SLACK, held
    assert open_now == 0  # every stream answered: the exact count agrees
    assert server.seen.started == in_flight * rounds


def test_rapid_reset_ends_the_connection_with_enhance_your_calm(serve: Any) -> None:
    server = serve(max_resets=50)
    with RawH2(server.port, NAME) as raw:
        encoder = hpack.Encoder()
        burst = b"".join(
            headers_frame(sid, encoder) + frame(0x3, 0, sid, struct.pack(">I", 8))
            for sid in range(1, 400, 2)
        )
        raw.send(burst)
        raw.until(lambda: raw.goaway() is not None)
        assert raw.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert server.refusals == ["h2_resets"]
    # The frames after the bound were never parsed: no more than the budget reached a handler.
    assert server.seen.started <= 51


def test_streams_the_edge_must_reset_count_as_resets_too(serve: Any) -> None:
    """The "made you reset" form: malformed requests, each answered and reset by the edge."""
    server = serve(max_resets=20)
    with RawH2(server.port, NAME) as raw:
        encoder = hpack.Encoder()
        bad = [*BASIC, ("transfer-encoding", "chunked")]
        raw.send(b"".join(frame(0x1, 0x5, sid, encoder.encode(bad)) for sid in range(1, 100, 2)))
        raw.until(lambda: raw.goaway() is not None)
        assert raw.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_a_continuation_flood_ends_the_connection(serve: Any) -> None:
    server = serve(max_header_block=16384)
    with RawH2(server.port, NAME) as raw:
        start = frame(0x1, 0x1, 1, hpack.Encoder().encode(BASIC))  # no END_HEADERS
        # Never-ending CONTINUATION frames, each small, none ending the block.
        raw.send(start)
        for _ in range(40):
            if not raw.send(frame(0x9, 0, 1, b"\x40\x01a\x01b" * 100)):
                break
        raw.until(lambda: raw.goaway() is not None)
        assert raw.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert server.seen.started == 0


def test_an_hpack_bomb_ends_the_connection(serve: Any) -> None:
    server = serve()
    with RawH2(server.port, NAME) as raw:
        # One field of 4,000 bytes, literal with incremental indexing (it enters the dynamic
        # table as index 62), then 1,000 one-byte references to it: 4 MB decoded.
        entry = b"\x40" + encode_integer(6, 7) + b"x-bomb" + encode_integer(4000, 7) + b"b" * 4000
        bomb = hpack.Encoder().encode(BASIC) + entry + b"\xbe" * 1000
        raw.send(frame(0x1, 0x5, 1, bomb))
        raw.until(lambda: raw.goaway() is not None)
        assert raw.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    assert server.seen.started == 0


def test_a_header_list_over_the_advertised_size_gets_431(serve: Any) -> None:
    server = serve(max_header_list_size=8192)
    with server.client() as client:
        client.wait_for(lambda: client.remote_settings.get(6) == 8192)
        sid = client.request("GET", "/echo", NAME, [("x-big", "v" * 9000)])
        assert client.wait(sid).status == 431
        assert client.get("/echo", NAME).status == 200


@pytest.mark.parametrize(
    "flood",
    [
        frame(0x4, 0, 0),  # SETTINGS, each needing an ACK
        frame(0x6, 0, 0, b"12345678"),  # PING, each needing an answer
        frame(0x0, 0, 1),  # empty DATA, each costing work for nothing
    ],
    ids=["settings", "ping", "empty-data"],
)
def test_a_flood_of_frames_that_need_work_ends_the_connection(serve: Any, flood: bytes) -> None:
    server = serve(max_control_frames=100)
    with RawH2(server.port, NAME) as raw:
        encoder = hpack.Encoder()
        raw.send(headers_frame(1, encoder, "/hang", end=False))
        raw.send(flood * 500)
        raw.until(lambda: raw.goaway() is not None)
        assert raw.goaway() == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    del server


def test_a_few_pings_are_answered(serve: Any) -> None:
    server = serve(max_control_frames=100)
    with RawH2(server.port, NAME) as raw:
        raw.send(frame(0x6, 0, 0, b"12345678") * 10)
        assert raw.until(lambda: sum(1 for f in raw.frames if f[0] == 0x6) == 10)
        assert raw.goaway() is None


# ---- the connection's life ----------------------------------------------------------------------


def test_an_idle_connection_gets_goaway_and_is_closed(serve: Any) -> None:
    server = serve(idle_timeout=0.5)
    with server.client() as client:
        assert client.get("/echo", NAME).status == 200
        client.wait_for(lambda: client.goaway is not None or client.closed, timeout=5)
        assert client.goaway is not None
        assert client.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
    wait_for(lambda: not server.connections, what="the connection gone from the server's set")


def test_shutdown_lets_the_streams_in_flight_finish(serve: Any) -> None:
    server = serve()
    with RawH2(server.port, NAME) as raw:
        fields = [*BASIC[:3], (":path", "/big?n=100000")]
        raw.send(frame(0x1, 0x5, 1, hpack.Encoder().encode(fields)))

        def data() -> int:
            return sum(len(f[3]) for f in raw.frames if f[0] == 0x0 and f[2] == 1)

        # The response stops at the default window, 65,535 bytes.
        assert raw.until(lambda: data() == 65535)
        # SiteServer.stop() asks every connection to close when idle: GOAWAY NO_ERROR now,
        # the stream in flight still finishes, then the connection closes.
        (protocol,) = server.protocols
        server.loop.call_soon_threadsafe(protocol.close_when_idle)
        assert raw.until(lambda: raw.goaway() is not None)
        assert raw.goaway() == h2.errors.ErrorCodes.NO_ERROR
        # A stream opened after the GOAWAY is refused, not processed.
        raw.send(frame(0x1, 0x5, 3, hpack.Encoder().encode(BASIC)))
        assert raw.until(lambda: 3 in raw.resets())
        assert raw.resets()[3] == h2.errors.ErrorCodes.REFUSED_STREAM
        more = struct.pack(">I", 100000)
        raw.send(frame(0x8, 0, 0, more) + frame(0x8, 0, 1, more))  # WINDOW_UPDATEs
        assert raw.until(lambda: raw.closed)
        assert data() == 100000
        ends = [f for f in raw.frames if f[0] == 0x0 and f[2] == 1 and f[1] & 0x1]
        assert len(ends) == 1
    wait_for(lambda: not server.connections, what="the connection closed")


def test_a_repeated_block_decodes_as_hpack_decodes_it_even_as_the_table_changes() -> None:
    """RepeatDecoder keeps what a block of indexed fields decoded to; a later block that adds
    to the dynamic table moves the indexes, and the same bytes must then mean the new fields,
    as for hpack's own decoder. A kept list is held to the size limit as hpack holds it."""
    encoder = hpack.Encoder()
    blocks = [
        encoder.encode([(b":method", b"GET"), (b"x-a", b"1")]),
        encoder.encode([(b":method", b"GET"), (b"x-a", b"1")]),  # all indexed now
        encoder.encode([(b"x-b", b"2")]),  # a new entry: index 62 is x-b now
        b"\x82\xbe",  # the second block's bytes again (":method: GET", index 62)
        b"\x82\xbe",
        b"\x82\xbf",  # x-a, one further down the table
    ]
    assert blocks[1] == b"\x82\xbe"
    mine, reference = RepeatDecoder(), hpack.Decoder()
    decoded = [list(mine.decode(b, raw=True)) for b in blocks]
    assert decoded == [list(reference.decode(b, raw=True)) for b in blocks]
    assert decoded[3] == [(b":method", b"GET"), (b"x-b", b"2")]
    assert decoded[5] == [(b":method", b"GET"), (b"x-a", b"1")]
    mine.max_header_list_size = 40  # under the kept list's 32 + 10 + 32 + 4
    with pytest.raises(hpack.OversizedHeaderListError):
        mine.decode(b"\x82\xbe", raw=True)
