"""A small blocking HTTP/2 client for tests: the ``h2`` library over an ``ssl`` socket.

It speaks the protocol correctly by default and lets a test misbehave on purpose: send raw
frames, never open its receive window, reset streams, or send a header block of its own.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack

__all__ = ["PREFACE", "H2Client", "H2Response", "RawH2", "frame"]


@dataclass
class H2Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, if the stream was reset

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class H2Client:
    def __init__(
        self,
        port: int,
        server_name: str | None,
        *,
        ctx: ssl.SSLContext | None = None,
        validate: bool = False,
        auto_window: bool = True,
        initial_window: int | None = None,
        timeout: float = 5.0,
    ) -> None:
        if ctx is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname=server_name)
        self.alpn = self.sock.selected_alpn_protocol()
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.auto_window = auto_window
        self.conn.initiate_connection()
        if initial_window is not None:
            self.conn.update_settings(
                {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: initial_window}
            )
        self.flush()
        self.responses: dict[int, H2Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.settings_acked = False
        self.remote_settings: dict[int, int] = {}

    # ---- sending ---------------------------------------------------------------------------------

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str = "GET",
        path: str = "/",
        authority: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        *,
        end: bool = True,
        scheme: str = "https",
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields: list[tuple[str, str]] = [(":method", method), (":scheme", scheme)]
        if authority is not None:
            fields.append((":authority", authority))
        fields.append((":path", path))
        fields += headers or []
        self.responses[sid] = H2Response()
        self.conn.send_headers(sid, fields, end_stream=end and not body)
        if body:
            self.conn.send_data(sid, body, end_stream=end)
        self.flush()
        return sid

    def send_body(self, sid: int, chunks: Any, *, end: bool = True, timeout: float = 5.0) -> None:
        """Send ``chunks`` (bytes or an iterable of bytes) as DATA as the windows allow."""
        deadline = time.monotonic() + timeout
        for chunk in [chunks] if isinstance(chunks, bytes | bytearray) else chunks:
            view = memoryview(bytes(chunk))
            while view:
                room = min(
                    self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
                )
                if room <= 0:
                    if self.responses[sid].reset is not None or self.goaway is not None:
                        return
                    assert time.monotonic() < deadline, "the server's window stayed closed"
                    if not self.pump(0.1):
                        return
                    continue
                self.conn.send_data(sid, view[:room].tobytes())
                self.flush()
                view = view[room:]
        if end:
            self.conn.end_stream(sid)
            self.flush()

    def get(self, path: str, authority: str, **kwargs: Any) -> H2Response:
        sid = self.request("GET", path, authority, **kwargs)
        return self.wait(sid)

    # ---- receiving -------------------------------------------------------------------------------

    def pump(self, timeout: float = 0.2) -> bool:
        """Read once (up to ``timeout``); False when the connection is closed."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return True
        except (ConnectionError, ssl.SSLError, OSError):
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self._event(event)
        self.flush()
        return True

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived):
            response = self.responses.setdefault(event.stream_id, H2Response())
            headers = [(str(k), str(v)) for k, v in event.headers or []]
            status = int(dict(headers)[":status"])
            if isinstance(event, h2.events.ResponseReceived):
                response.status = status
                response.headers = [(k, v) for k, v in headers if not k.startswith(":")]
        elif isinstance(event, h2.events.DataReceived):
            response = self.responses.setdefault(event.stream_id, H2Response())
            response.body += event.data or b""
            if self.auto_window and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.responses.setdefault(event.stream_id, H2Response()).ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.responses.setdefault(event.stream_id, H2Response()).reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
        elif isinstance(event, h2.events.SettingsAcknowledged):
            self.settings_acked = True
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            for code, change in event.changed_settings.items():
                self.remote_settings[int(code)] = change.new_value

    def wait(self, sid: int, timeout: float = 5.0) -> H2Response:
        """Until stream ``sid`` ends or is reset, or the connection ends."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            response = self.responses[sid]
            if response.ended or response.reset is not None or self.goaway is not None:
                return response
            if not self.pump():
                return response
        raise AssertionError(f"stream {sid}: no end in {timeout} s: {self.responses[sid]}")

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            if not self.pump():
                if predicate():
                    return
                break
        assert predicate(), "the condition did not come true"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame, as bytes: length, type, flags, stream id, payload."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + sid.to_bytes(4, "big") + payload


class RawH2:
    """An HTTP/2 connection driven frame by frame, for the attacks a well-behaved client
    library will not send. It sends the preface and an empty SETTINGS, then what it is told."""

    def __init__(self, port: int, server_name: str | None, *, timeout: float = 5.0) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname=server_name)
        self.buffer = b""
        self.frames: list[tuple[int, int, int, bytes]] = []
        self.closed = False
        self.send(PREFACE + frame(0x4, 0, 0))

    def send(self, data: bytes) -> bool:
        """False when the server has already closed the connection."""
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError):
            return False
        return True

    def read(self, timeout: float = 0.2) -> bool:
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return True
        except (OSError, ssl.SSLError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.buffer += data
        while len(self.buffer) >= 9:
            length = int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < 9 + length:
                break
            kind, flags = self.buffer[3], self.buffer[4]
            sid = int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
            self.frames.append((kind, flags, sid, self.buffer[9 : 9 + length]))
            self.buffer = self.buffer[9 + length :]
        return True

    def until(self, predicate: Any, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            if not self.read():
                break
        return bool(predicate())

    def goaway(self) -> int | None:
        """The error code of the server's GOAWAY, if one came."""
        for kind, _, _, payload in self.frames:
            if kind == 0x7:
                return int.from_bytes(payload[4:8], "big")
        return None

    def resets(self) -> dict[int, int]:
        return {
            sid: int.from_bytes(payload[:4], "big")
            for kind, _, sid, payload in self.frames
            if kind == 0x3
        }

    def statuses(self) -> dict[int, int]:
        """Stream id to :status, decoding the server's header blocks in order."""
        decoder = hpack.Decoder()
        found: dict[int, int] = {}
        for kind, _flags, sid, payload in self.frames:
            if kind == 0x1:
                fields = {str(k): str(v) for k, v in decoder.decode(payload)}
                found[sid] = int(fields[":status"])
        return found

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
