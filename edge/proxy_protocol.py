"""The PROXY protocol (versions 1 and 2, haproxy's spec): how an L4 load balancer tells the
edge who the client is, in a header sent before the first byte of HTTP or TLS.

When it is on, every connection must start with such a header (that is the protocol: a
connection without one is from somewhere other than the load balancer, and is closed). The
header is read straight from the socket, peeking first and then consuming exactly its length,
so the TLS or HTTP bytes behind it are left for the server. The connection then goes through
the same budget as any other (:mod:`edge.connections`), by the client the header names.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

from edge.connections import ConnectionBudget
from edge.shares import client_key

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
    """Reads the PROXY header of each connection edge.connections' accept loop hands to
    :meth:`accepted`, then passes the connection to ``admit`` with the client's address in
    place of the balancer's: the connection budget (edge.connections' ``admit``) counts it by
    that client, in total and per address, and times its first byte, as on a port without the
    PROXY protocol. While its header is read a connection counts against ``budget``'s total
    only (every peer is the balancer), for at most ``timeout`` seconds."""

    def __init__(
        self,
        admit: Callable[[socket.socket, Any], None],
        budget: ConnectionBudget | None = None,
        *,
        timeout: float = 5.0,
        on_refused: Callable[[str], None] = lambda reason: None,
        on_over_budget: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._admit = admit
        self._on_over_budget = on_over_budget
        self._budget = budget
        self._timeout = timeout
        self._on_refused = on_refused
        self._pending: set[asyncio.Task[None]] = set()

    def stop(self) -> None:
        for task in self._pending:
            task.cancel()

    def accepted(self, conn: socket.socket, address: Any) -> None:
        peer = client_key(address[0] if isinstance(address, tuple) else "")
        budget = self._budget
        if budget is not None:
            refusal = budget.admit(peer, per_address=False)
            if refusal is not None:
                self._on_over_budget(refusal)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
        task = asyncio.ensure_future(self._handshake(conn, address, peer))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _handshake(self, conn: socket.socket, peer: Any, counted: str) -> None:
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
        finally:
            if self._budget is not None:
                self._budget.release(counted)
        self._admit(conn, client or peer)

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
