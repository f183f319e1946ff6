"""The PROXY protocol (versions 1 and 2, haproxy's spec): how an L4 load balancer tells the
edge who the client is, in a header sent before the first byte of HTTP or TLS.

When it is on, every connection must start with such a header (that is the protocol: a
connection without one is from somewhere other than the load balancer, and is closed). The
header is read straight from the socket, peeking first and then consuming exactly its length,
so the TLS or HTTP bytes behind it are left for the server: the HTTPS port's
(:class:`edge.https.SiteServer`, given the socket) or the plain port's Tornado server (given a
stream).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, SSLIOStream
from tornado.netutil import add_accept_handler, ssl_wrap_socket

from edge.connections import SocketServer

__all__ = ["ProxyHeaderError", "ProxyProtocolAcceptor", "parse_proxy_header"]

log = logging.getLogger(__name__)

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_MAX = 107  # the spec's longest v1 line, CRLF included
_V2_MAX = 16 + 216 + 4096  # addresses (216 for UNIX) plus room for TLVs we skip
_PEEK = _V2_MAX

Address = tuple[str, int]


class ProxyHeaderError(ValueError):
    """Not a PROXY protocol header the edge accepts."""


def parse_proxy_header(data: bytes) -> tuple[int, Address | None] | None:
    """``(length of the header, client address or None for LOCAL/UNKNOWN)``, or None when
    ``data`` is a valid beginning that needs more bytes."""
    if data.startswith(V2_SIGNATURE[: len(data)]) and len(data) < 16:
        return None
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    if b"PROXY "[: len(data)] == data[:6]:
        return _parse_v1(data)
    raise ProxyHeaderError("the connection does not start with a PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[int, Address | None] | None:
    end = data.find(b"\r\n", 0, _V1_MAX)
    if end < 0:
        if len(data) >= _V1_MAX:
            raise ProxyHeaderError("PROXY v1 line longer than 107 bytes")
        return None
    try:
        fields = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    if fields[:2] == ["PROXY", "UNKNOWN"]:
        return end + 2, None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 line is malformed")
    _, family, source, _destination, source_port, _destination_port = fields
    try:
        ip = ipaddress.ip_address(source)
        port = int(source_port)
    except ValueError:
        raise ProxyHeaderError("PROXY v1 address is malformed") from None
    if (ip.version == 4) != (family == "TCP4") or not 0 <= port <= 65535:
        raise ProxyHeaderError("PROXY v1 address does not match its family")
    return end + 2, (str(ip), port)


def _parse_v2(data: bytes) -> tuple[int, Address | None] | None:
    version_command, family, length = struct.unpack("!BBH", data[12:16])
    if version_command >> 4 != 2:
        raise ProxyHeaderError("PROXY v2 header with another version")
    command = version_command & 0x0F
    total = 16 + length
    if total > _V2_MAX:
        raise ProxyHeaderError("PROXY v2 header too long")
    if len(data) < total:
        return None
    if command == 0x0:  # LOCAL: the balancer's own health check; the peer is the peer
        return total, None
    if command != 0x1:
        raise ProxyHeaderError("PROXY v2 header with an unknown command")
    body = data[16:total]
    if family == 0x11 and length >= 12:  # TCP over IPv4
        source = str(ipaddress.IPv4Address(body[0:4]))
        (port,) = struct.unpack("!H", body[8:10])
    elif family == 0x21 and length >= 36:  # TCP over IPv6
        source = str(ipaddress.IPv6Address(body[0:16]))
        (port,) = struct.unpack("!H", body[32:34])
    elif family == 0x00:  # UNSPEC: the balancer has no client address to give
        return total, None
    else:
        raise ProxyHeaderError("PROXY v2 header for a transport the edge does not serve")
    return total, (source, port)


class ProxyProtocolAcceptor:
    """Accepts on ``sockets``, reads each connection's PROXY header, and hands the connection
    to ``server`` (whose ``handle_stream`` is Tornado's documented entry point for a stream)
    with the client's address in place of the balancer's."""

    def __init__(
        self,
        server: HTTPServer | SocketServer,
        sockets: list[socket.socket],
        tls: ssl.SSLContext | None,
        *,
        timeout: float = 5.0,
        on_refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._server = server
        self._sockets = sockets
        self._tls = tls
        self._timeout = timeout
        self._on_refused = on_refused
        self._removers: list[Callable[[], None]] = []
        self._pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        for sock in self._sockets:
            self._removers.append(add_accept_handler(sock, self._accepted))

    def stop(self) -> None:
        for remove in self._removers:
            remove()
        self._removers.clear()
        for sock in self._sockets:
            sock.close()
        for task in self._pending:
            task.cancel()

    def _accepted(self, conn: socket.socket, address: Any) -> None:
        task = asyncio.ensure_future(self._handshake(conn, address))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _handshake(self, conn: socket.socket, peer: Any) -> None:
        conn.setblocking(False)
        try:
            client = await asyncio.wait_for(self._read_header(conn), self._timeout)
        except (ProxyHeaderError, TimeoutError, OSError) as exc:
            reason = "timeout" if isinstance(exc, TimeoutError) else "malformed"
            log.debug("PROXY protocol: closing a connection from %s: %s", peer, exc)
            self._on_refused(reason)
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        self._hand_over(conn, client or peer)

    async def _read_header(self, conn: socket.socket) -> Address | None:
        loop = asyncio.get_running_loop()
        while True:
            await _readable(loop, conn)
            data = conn.recv(_PEEK, socket.MSG_PEEK)
            if not data:
                raise ProxyHeaderError("closed before the PROXY header")
            parsed = parse_proxy_header(data)
            if parsed is not None:
                length, client = parsed
                consumed = 0
                while consumed < length:  # the bytes were peeked: they are there to take
                    consumed += len(conn.recv(length - consumed))
                return client
            # A header split across segments: the socket stays readable with the same bytes,
            # so wait a little instead of spinning on it.
            await asyncio.sleep(0.005)

    def _hand_over(self, conn: socket.socket, address: Any) -> None:
        server = self._server
        if not isinstance(server, HTTPServer):
            server.handle_socket(conn, address, None)
            return
        try:
            if self._tls is not None:
                conn = ssl_wrap_socket(
                    conn, self._tls, server_side=True, do_handshake_on_connect=False
                )
                stream: IOStream = SSLIOStream(
                    conn,
                    max_buffer_size=server.max_buffer_size,
                    read_chunk_size=server.read_chunk_size,
                )
            else:
                stream = IOStream(
                    conn,
                    max_buffer_size=server.max_buffer_size,
                    read_chunk_size=server.read_chunk_size,
                )
        except OSError:
            conn.close()
            return
        server.handle_stream(stream, address)


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()
    fd = conn.fileno()

    def on_readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, on_readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
