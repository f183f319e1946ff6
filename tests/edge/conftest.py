"""Real certificates, real envelopes, real Redis, an edge on loopback ports in a thread."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from tornado.netutil import bind_sockets

from edge.app import Edge, EdgeConfig
from edge.tls import listening_context
from pipeline.crypto import envelope
from pipeline.crypto.keys import Keyring, PublicKey, generate_keypair
from pipeline.crypto.signing import SigningKey, TrustedSigners, next_version
from pipeline.distribution.layout import SiteRecord
from tests.support.h2client import H2Client
from tests.support.http_servers import running
from tests.support.pki import Pki
from tests.support.ports import free_port, free_port_block

DEADLINE = 5.0


def wait_for(predicate: Callable[[], Any], timeout: float = DEADLINE, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail at the deadline."""
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            last = predicate()
        except Exception as exc:  # the thing polled for may fail until it is ready
            last = exc
        else:
            if last:
                return last
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}: last {last!r}")


@dataclass
class Keys:
    directory: Path
    public: PublicKey
    keyring: Keyring
    # The pipeline's signing key, and what the edges trust (its public half).
    signer: SigningKey
    signers: TrustedSigners
    signer_dir: Path


@pytest.fixture(scope="session")
def pki() -> Pki:
    return Pki()


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("edge-keys")
    key_id = generate_keypair(directory)
    signer = SigningKey.generate()
    signer_dir = tmp_path_factory.mktemp("signing-keys")
    signer.write(signer_dir)
    return Keys(
        directory,
        PublicKey.load(directory / f"{key_id}.pub"),
        Keyring.load_dir(directory),
        signer,
        TrustedSigners.load(signer_dir),
        signer_dir,
    )


@dataclass
class Sites:
    """Makes sealed SiteRecords the way the pipeline does."""

    pki: Pki
    keys: Keys
    upstream: str | None = None

    def record(
        self, domain: str, *aliases: str, upstream: str | None = None, cert: bool = True
    ) -> SiteRecord:
        names = (domain, *aliases)
        if not cert:
            bare = SiteRecord(domain, names, upstream or self.upstream, None, None, None, None)
            return self.signed(bare)
        chain, key_pem, leaf = self.pki.leaf(list(names))
        sealed = envelope.seal(
            key_pem,
            self.keys.public,
            domain=domain,
            binding=envelope.spki_fingerprint(leaf.public_key()),
        )
        return self.signed(
            SiteRecord(
                domain=domain,
                names=names,
                upstream=upstream or self.upstream,
                chain_pem=chain,
                envelope=envelope.to_text(sealed),
                not_after=leaf.not_valid_after_utc,
                serial=format(leaf.serial_number, "x"),
            )
        )

    def signed(self, record: SiteRecord) -> SiteRecord:
        """``record`` as the pipeline publishes it: signed, at a version above any before."""
        statement = record.statement(next_version(None))
        return replace(record, signed=self.keys.signer.sign_site(statement))

    def tampered(self, record: SiteRecord) -> SiteRecord:
        """``record`` with a corrupted envelope, signed as it is: an envelope the pipeline
        itself got wrong, which must fail to open rather than fail its signature."""
        assert record.envelope
        text = record.envelope
        middle = len(text) // 2
        flipped = "A" if text[middle] != "A" else "B"
        return self.signed(replace(record, envelope=text[:middle] + flipped + text[middle + 1 :]))


@pytest.fixture
def sites(pki: Pki, keys: Keys) -> Sites:
    return Sites(pki, keys)


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def _listen() -> tuple[list[socket.socket], int]:
    socks = bind_sockets(0, "127.0.0.1")
    return socks, socks[0].getsockname()[1]


@dataclass
class RunningEdge:
    config: EdgeConfig
    keyring: Keyring
    pki: Pki
    http_port: int = 0
    https_port: int = 0
    metrics_port: int = 0
    edge: Edge | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _started: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None
    # What https() speaks: "http/1.1", or "h2" (tests parametrised by client_protocol).
    protocol: str = "http/1.1"

    def start(self) -> RunningEdge:
        http, self.http_port = _listen()
        https, self.https_port = _listen()
        metrics, self.metrics_port = _listen()
        self.config = replace(self.config, https_public_port=self.https_port)

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self.edge = Edge(self.config, self.keyring, listening_context(self.config.tls_profile))
            self.edge.start(http, https, metrics)
            self._started.set()
            await self.edge.run_until_stopped()

        def run() -> None:
            try:
                # CERTMAN_TEST_EDGE_LOOP=uvloop: the loop the CLI runs on (--loop auto), for a
                # run of these tests on uvloop's transports; asyncio's by default.
                factory = None
                if os.environ.get("CERTMAN_TEST_EDGE_LOOP") == "uvloop":
                    import uvloop

                    factory = uvloop.new_event_loop
                with asyncio.Runner(loop_factory=factory) as runner:
                    runner.run(main())
            except BaseException as exc:  # surfaced by stop()
                self._error = exc
                self._started.set()

        self._thread = threading.Thread(target=run, name="edge", daemon=True)
        self._thread.start()
        assert self._started.wait(DEADLINE)
        return self

    def stop(self) -> None:
        """Stop the edge; a second call (the fixture's, after a test's own) does nothing."""
        if self._thread is not None and not self._thread.is_alive():
            return
        if self._loop is not None and self.edge is not None:
            self._loop.call_soon_threadsafe(self.edge.request_stop)
        if self._thread is not None:
            self._thread.join(DEADLINE * 2)
            assert not self._thread.is_alive(), "edge did not stop"
        if self._error is not None:
            raise self._error

    # ---- clients --------------------------------------------------------------------------

    def health(self) -> int:
        return get_status(f"http://127.0.0.1:{self.metrics_port}/healthz")

    def wait_ready(self) -> None:
        """Healthy, and its mirror filled (so no snapshot log line comes later)."""
        wait_for(lambda: self.health() == 200, what="healthz 200")
        assert self.edge is not None
        filled = self.edge.syncer.mirror_filled
        wait_for(filled.is_set, what="mirror filled")

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=DEADLINE) as resp:
            return str(resp.read().decode())

    def tls(self, name: str | None, *, ctx: ssl.SSLContext | None = None) -> ssl.SSLSocket:
        ctx = ctx or self.pki.client_context()
        if name is None:
            ctx.check_hostname = False
        raw = socket.create_connection(("127.0.0.1", self.https_port), timeout=DEADLINE)
        try:
            return ctx.wrap_socket(raw, server_hostname=name)
        except BaseException:
            raw.close()
            raise

    def peer_cert(self, name: str) -> x509.Certificate:
        with self.tls(name) as sock:
            der = sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der)

    def https(
        self,
        name: str,
        method: str = "GET",
        path: str = "/",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        if self.protocol == "h2":
            return self.https_h2(name, method, path, body, headers)
        conn = http.client.HTTPConnection(name, self.https_port, timeout=DEADLINE)
        conn.sock = self.tls(name)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()

    def https_h2(
        self,
        name: str,
        method: str = "GET",
        path: str = "/",
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """:meth:`https` over HTTP/2, as a browser would send it: ``Host`` becomes
        ``:authority`` (with the port, as http.client's Host has it), names in lower case, a
        bytes body with its content-length. Raises ConnectionResetError when the stream or the
        connection ends without a response."""
        fields = {k.lower(): v for k, v in (headers or {}).items()}
        authority = fields.pop("host", f"{name}:{self.https_port}")
        if isinstance(body, bytes):
            fields.setdefault("content-length", str(len(body)))
        with H2Client(self.https_port, name, ctx=self.pki.client_context()) as client:
            assert client.alpn == "h2", client.alpn
            sid = client.request(method, path, authority, list(fields.items()), end=body is None)
            if body is not None:
                client.send_body(sid, body)
            response = client.wait(sid)
        if not response.status:
            raise ConnectionResetError(f"stream reset ({response.reset}), GOAWAY {client.goaway}")
        message = http.client.HTTPMessage()
        for key, value in response.headers:
            message[key] = value
        return response.status, message, bytes(response.body)

    def http(
        self, host: str, path: str = "/", method: str = "GET"
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=DEADLINE)
        try:
            conn.request(method, path, headers={"Host": host})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=DEADLINE) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def serial_of(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


@pytest.fixture(params=["http/1.1", "h2"])
def client_protocol(request: pytest.FixtureRequest) -> str:
    """A test that uses this runs twice: its edges' https() speaks HTTP/1.1, then HTTP/2."""
    return str(request.param)


@pytest.fixture
def start_edge(
    redis_url: str, prefix: str, keys: Keys, pki: Pki, request: pytest.FixtureRequest
) -> Iterator[Callable[..., RunningEdge]]:
    running: list[RunningEdge] = []
    protocol = (
        str(request.getfixturevalue("client_protocol"))
        if "client_protocol" in request.fixturenames
        else "http/1.1"
    )

    def start(**overrides: Any) -> RunningEdge:
        # Every upstream of these tests listens on loopback, as a demo on one machine's does.
        config = EdgeConfig(
            redis_url=redis_url,
            prefix=prefix,
            reconcile_interval=0.5,
            signers=keys.signers,
            allow_loopback_upstream=True,
        )
        edge = RunningEdge(replace(config, **overrides), keys.keyring, pki, protocol=protocol)
        edge.start()
        running.append(edge)
        return edge

    yield start
    for edge in running:
        edge.stop()


# ---- an upstream that reports what it received --------------------------------------------


# Set when the upstream starts on a /slow request, so a test knows it is in flight.
slow_request_arrived = threading.Event()


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(length)
        if self.path.startswith("/slow"):
            slow_request_arrived.set()
            time.sleep(1.0)  # the slow upstream being simulated
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body_len": len(body),
            "body_head": body[:16].decode("latin-1"),
        }
        reply = json.dumps(seen).encode()
        if self.path.startswith("/big"):
            reply += b"x" * (2 * 1024 * 1024)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.send_header("Connection", "close, X-Upstream-Hop")
        self.send_header("X-Upstream-Hop", "secret")
        self.send_header("X-Upstream", "yes")
        self.end_headers()
        if self.command != "HEAD":
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(reply)

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server of ``handler`` on a free loopback port: its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    with running(server):
        yield f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def upstream() -> Iterator[str]:
    with serving(_Echo) as url:
        yield url


def edge_command(*args: str) -> list[str]:
    """``certman-edge`` with these arguments, run by this test's interpreter."""
    return [sys.executable, "-c", "from edge.cli import main; main()", *args]


@dataclass
class PreforkEdge:
    proc: subprocess.Popen[bytes]
    http_port: int
    https_port: int
    metrics_port: int

    @property
    def worker_metrics_ports(self) -> tuple[int, int]:
        """Worker i serves metrics on ``metrics_port`` + i (both reserved when started)."""
        return self.metrics_port, self.metrics_port + 1

    def reap(self) -> str:
        """Kill it if it is still running, wait for it, and return what it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        assert self.proc.stderr is not None
        with self.proc.stderr:
            return self.proc.stderr.read().decode()


def start_prefork_edge(
    redis_url: str, prefix: str, key_dir: Path, signers: Path, *extra: str
) -> PreforkEdge:
    """A two-process edge as a real subprocess, returned once both workers are healthy."""
    # Worker i serves metrics on metrics_port + i: reserve both, not just the first.
    http_port, https_port, metrics_port = free_port(), free_port(), free_port_block(2)
    env = {**os.environ, "CERTMAN_REDIS_PREFIX": prefix, "CERTMAN_REDIS_URL": redis_url,
           "CERTMAN_EDGE_TRUSTED_SIGNERS": str(signers)}  # fmt: skip
    proc = subprocess.Popen(
        edge_command(
            "--http-port", str(http_port), "--https-port", str(https_port),
            "--metrics-port", str(metrics_port), "--processes", "2",
            "--key-dir", str(key_dir), "--address", "127.0.0.1",
            "--state-dir", tempfile.mkdtemp(prefix="certman-edge-state-"),
            "--allow-loopback-upstream", *extra,
        ),
        env=env,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    prefork = PreforkEdge(proc, http_port, https_port, metrics_port)
    try:
        for port in prefork.worker_metrics_ports:
            url = f"http://127.0.0.1:{port}/healthz"
            wait_for(lambda url=url: get_status(url) == 200, 10, "worker healthz")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return prefork


# ---- raw exchanges, and a server that must never be reached ------------------------------


def raw_exchange(
    port: int, data: bytes, *, tls_name: str | None = None, pki: object = None
) -> bytes:
    """Send ``data`` on a fresh connection and return everything until the server closes or
    has answered one response with Connection: close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    try:
        if tls_name is not None:
            ctx = pki.client_context()  # type: ignore[attr-defined]
            sock = ctx.wrap_socket(sock, server_hostname=tls_name)
        sock.sendall(data)
        reply = b""
        # A reset after the answer (the edge closed with our bytes unread) ends it like EOF.
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                reply += chunk
                head, sep, _ = reply.partition(b"\r\n\r\n")
                if sep and b"content-length: " in head.lower():
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    if len(reply) >= len(head) + 4 + length:
                        break
        return reply
    finally:
        sock.close()


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.") else 0


def h2_exchange(
    edge: RunningEdge,
    name: str,
    target: str,
    lines: tuple[str, ...] | list[str] = (),
    *,
    authority: str | None = None,
    method: str = "GET",
) -> bytes:
    """One HTTP/2 request over TLS with SNI ``name``: the field ``lines`` ("Name: value",
    names sent in lower case as HTTP/2 has them), ``authority`` (default ``name``). The answer
    in HTTP/1.1 form, so raw_exchange's tests read it as they are; or ``RESET <code>`` /
    ``GOAWAY <code>`` when the edge refused the stream or the connection instead."""
    fields = []
    for line in lines:
        key, _, value = line.partition(":")
        fields.append((key.strip().lower(), value.strip()))
    with H2Client(edge.https_port, name, ctx=edge.pki.client_context()) as client:
        response = client.wait(client.request(method, target, authority or name, fields))
    if not response.status:
        if response.reset is not None:
            return f"RESET {response.reset}".encode()
        code = client.goaway.error_code if client.goaway is not None else None
        return f"GOAWAY {code}".encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in response.headers)
    return f"HTTP/1.1 {response.status} -\r\n{head}\r\n".encode("latin-1") + bytes(response.body)


def refused_as_malformed(reply: bytes) -> bool:
    """400, or (HTTP/2) the stream or connection ended with PROTOCOL_ERROR (1)."""
    return status_of(reply) == 400 or reply in (b"RESET 1", b"GOAWAY 1")


@dataclass
class Canary:
    """A server that must never be reached: the address an attacker tries to steer to."""

    port: int
    hits: list[bytes] = field(default_factory=list)


@pytest.fixture
def canary() -> Iterator[Canary]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    found = Canary(listener.getsockname()[1])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.5)
                try:
                    found.hits.append(conn.recv(4096) or b"(connected)")
                except OSError:
                    found.hits.append(b"(connected)")
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSECRET")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield found
    stop.set()
    listener.close()
    thread.join(DEADLINE)
