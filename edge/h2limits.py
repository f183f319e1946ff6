"""HTTP/2's own attacks, bounded before the frames reach the ``h2`` state machine.

An HTTP/2 connection multiplexes, so a client can make the edge work without ever completing a
request: open and reset streams as fast as it can write (rapid reset, CVE-2023-44487), send one
header block in endless CONTINUATION frames (the CONTINUATION flood of 2024), make the edge
answer SETTINGS and PING frames without end, or send frames that carry nothing (CVE-2019-9518).
``h2`` parses whatever it is given, so :class:`FrameGuard` reads the 9-byte frame headers of
the inbound byte stream first (no payload is copied) and keeps a budget per connection for each
kind of work; past a budget the connection ends with GOAWAY ENHANCE_YOUR_CALM.

The HPACK bomb (a small header block that decodes to a huge one) is bounded by the decoder's
``max_header_list_size`` and by the protocol's own check of the decoded size
(:mod:`edge.http2`); more streams than advertised are refused one by one (REFUSED_STREAM).

Pure bookkeeping, no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FrameGuard", "H2Limits", "TooMuch", "WindowBudget"]

_FRAME_HEADER = 9
_PREFACE = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x6, 0x9
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4


@dataclass(frozen=True)
class H2Limits:
    """What one HTTP/2 connection may ask of the edge."""

    # Advertised in SETTINGS_MAX_CONCURRENT_STREAMS; a stream past it is refused.
    max_concurrent_streams: int = 100
    # Decoded header list (RFC 9113 section 6.5.2: names + values + 32 per field), advertised
    # and enforced by the HPACK decoder and again by the protocol: 431 past it.
    max_header_list_size: int = 32 * 1024
    # Encoded bytes of one header block across HEADERS and CONTINUATION frames.
    max_header_block: int = 64 * 1024
    # Flow control: the client may send this much of a request body before the upstream has
    # taken it (per stream, per connection); the edge's memory per connection is bounded by it.
    stream_window: int = 65535
    connection_window: int = 1024 * 1024
    # Resets per connection per interval: the client's RST_STREAM, and streams the edge had to
    # refuse or reset for the client's errors (the "made you reset" form of the same attack).
    max_resets: int = 200
    # SETTINGS and PING frames that need an answer, and frames that carry nothing.
    max_control_frames: int = 100
    interval: float = 10.0
    # A connection with no stream open this long is closed with GOAWAY.
    idle_timeout: float = 60.0


class TooMuch(Exception):
    """A budget is spent; the message names which, ``reason`` (for a metric label) too."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason


class WindowBudget:
    """A count of events in a fixed window of ``interval`` seconds."""

    def __init__(
        self,
        limit: int,
        interval: float,
        reason: str,
        what: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.interval = interval
        self.reason = reason
        self.what = what
        self._clock = clock
        self._started = clock()
        self.count = 0

    def spend(self, n: int = 1) -> None:
        now = self._clock()
        if now - self._started >= self.interval:
            self._started = now
            self.count = 0
        self.count += n
        if self.count > self.limit:
            raise TooMuch(self.reason, f"more than {self.limit} {self.what} in {self.interval:g} s")


class FrameGuard:
    """Reads the frame headers of a server connection's inbound bytes and spends budgets.

    :meth:`feed` raises :class:`TooMuch` as soon as a frame breaks a bound; bytes after it are
    never handed on. Frame lengths are taken as they come: ``h2`` itself refuses a frame longer
    than the advertised maximum.
    """

    def __init__(self, limits: H2Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.resets = WindowBudget(
            limits.max_resets, limits.interval, "resets", "stream resets", clock
        )
        self.control = WindowBudget(
            limits.max_control_frames,
            limits.interval,
            "control_frames",
            "SETTINGS, PING or empty frames",
            clock,
        )
        self._preface = _PREFACE
        self._head = bytearray()
        self._skip = 0  # payload bytes of the current frame still to pass
        self._block: int | None = None  # encoded bytes of a header block not yet ended

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if self._preface:
            taken = min(self._preface, len(view))
            self._preface -= taken
            view = view[taken:]
        while view:
            if self._skip:
                taken = min(self._skip, len(view))
                self._skip -= taken
                view = view[taken:]
                continue
            need = _FRAME_HEADER - len(self._head)
            self._head += view[:need]
            view = view[need:]
            if len(self._head) < _FRAME_HEADER:
                return
            head = bytes(self._head)
            self._head.clear()
            length = int.from_bytes(head[0:3], "big")
            self._frame(head[3], head[4], length)
            self._skip = length

    def _frame(self, kind: int, flags: int, length: int) -> None:
        if kind in (_HEADERS, _CONTINUATION):
            if kind == _HEADERS:
                self._block = 0
            if self._block is not None:
                self._block += length
                if self._block > self.limits.max_header_block:
                    raise TooMuch(
                        "header_block",
                        f"a header block over {self.limits.max_header_block} bytes"
                        " (HEADERS and CONTINUATION frames)",
                    )
            if flags & _END_HEADERS:
                self._block = None
            if length == 0 and not (kind == _HEADERS and flags & _END_STREAM):
                self.control.spend()
        elif kind == _RST_STREAM:
            self.resets.spend()
        elif kind in (_SETTINGS, _PING):
            if not flags & _ACK:
                self.control.spend()
        elif kind == _DATA and length == 0 and not flags & _END_STREAM:
            self.control.spend()
