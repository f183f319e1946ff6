"""Every way a request can stall or be abandoned gives its fair-share slot back, on both ports:
an upstream that stops mid-body, one that never reads a complete body, a client that leaves
mid-body or while queued for a slot; and only the final response is timed as the upstream's."""

from __future__ import annotations

import gc
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from edge.exchange import Body, Exchange
from pipeline.distribution.layout import publish_site

from .conftest import DEADLINE, RunningEdge, Sites, wait_for

Script = Callable[[socket.socket, bytes], None]


class _Scripted:
    """A loopback upstream that reads each request's header block and then runs ``script``
    on the connection (in a thread per connection); it keeps what it read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.heads: list[bytes] = []
        self.conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.conns.append(conn)
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            head = data.partition(b"\r\n\r\n")[0]
            with self._lock:
                self.heads.append(head)
            self.script(conn, head)
        except OSError:
            pass

    def paths(self) -> list[str]:
        with self._lock:
            return [h.split(b" ", 2)[1].decode() for h in self.heads]

    def open_connections(self) -> int:
        """Connections the edge still holds open to this upstream (EOF or reset: closed)."""
        with self._lock:
            conns = list(self.conns)
        poller = select.poll()
        for conn in conns:
            poller.register(conn, select.POLLRDHUP)
        gone = {fd for fd, _ in poller.poll(0)}
        return sum(1 for conn in conns if conn.fileno() not in gone)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for conn in self.conns:
                conn.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], _Scripted]]:
    made: list[_Scripted] = []

    def make(script: Script) -> _Scripted:
        server = _Scripted(script)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def _hold(conn: socket.socket, head: bytes) -> None:
    """Never answer, never read the body: the connection stays open until the test ends."""


def _stop_mid_body(conn: socket.socket, head: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nfirst chunk")
    while conn.recv(4096):
        pass


def _answer(conn: socket.socket, head: bytes) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    conn.close()


def _hints_then_late(conn: socket.socket, head: bytes) -> None:
    conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
    time.sleep(1.0)  # the slow final response being simulated
    _answer(conn, head)


SCHEMES = ["http", "https"]


def _publish(
    redis_client: redis.Redis, prefix: str, sites: Sites, scheme: str, name: str, upstream: str
) -> None:
    # Port 80 redirects a site with a certificate: there the site has none yet.
    record = sites.record(name, upstream=upstream, cert=scheme == "https")
    publish_site(redis_client, prefix, record)


def _connect(edge: RunningEdge, scheme: str, name: str) -> socket.socket:
    if scheme == "https":
        sock: socket.socket = edge.tls(name)
    else:
        sock = socket.create_connection(("127.0.0.1", edge.http_port), timeout=DEADLINE)
    sock.settimeout(DEADLINE)
    return sock


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the edge sends until it closes; how long that took."""
    started = time.monotonic()
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return data, time.monotonic() - started


def _read_response(sock: socket.socket) -> tuple[bytes, float]:
    """One response with a Content-Length (the edge's own answers have one); how long it took."""
    started = time.monotonic()
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length, head
    while len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    return head + b"\r\n\r\n" + body, time.monotonic() - started


def _gauge(edge: RunningEdge, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", edge.metrics(), re.MULTILINE)
    assert match, name
    return float(match.group(1))


def _slots(edge: RunningEdge) -> float:
    return _gauge(edge, "certman_edge_upstream_slots_in_use")


# ---- 1: an upstream that stops in the middle of its body --------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_upstream_stalling_mid_body_frees_its_slot(
    scheme: str,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    scripted: Callable[[Script], _Scripted],
    start_edge: Callable[..., RunningEdge],
) -> None:
    upstream = scripted(_stop_mid_body)
    _publish(redis_client, prefix, sites, scheme, "stall.test", upstream.url)
    edge = start_edge(upstream_response_timeout=1.0, request_timeout=300.0)
    edge.wait_ready()
    with _connect(edge, scheme, "stall.test") as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: stall.test\r\n\r\n")
        data, took = _read_until_closed(sock, DEADLINE)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"first chunk"), data[:200]
    # Cut after the upstream's silence (1 s), not the request timeout (300 s).
    assert took < 3.0, took
    wait_for(lambda: _slots(edge) == 0, what="the slot freed")
    wait_for(lambda: upstream.open_connections() == 0, what="the upstream connection closed")
    assert 'certman_edge_upstream_cancelled_total{reason="upstream_timeout"} 1.0' in edge.metrics()


# ---- 2: a complete request body the upstream never reads ----------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_complete_body_never_read_by_the_upstream_frees_its_slot(
    scheme: str,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    scripted: Callable[[Script], _Scripted],
    start_edge: Callable[..., RunningEdge],
) -> None:
    upstream = scripted(_hold)
    _publish(redis_client, prefix, sites, scheme, "deaf.test", upstream.url)
    edge = start_edge(upstream_response_timeout=1.0, body_idle_timeout=1.0, request_timeout=300.0)
    edge.wait_ready()
    body = b"b" * 20_000
    with _connect(edge, scheme, "deaf.test") as sock:
        sock.sendall(
            b"POST /up HTTP/1.1\r\nHost: deaf.test\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        data, took = _read_response(sock)
    assert data.startswith(b"HTTP/1.1 504"), data[:200]
    assert took < 3.0, took
    wait_for(lambda: _slots(edge) == 0, what="the slot freed")
    wait_for(lambda: upstream.open_connections() == 0, what="the upstream connection closed")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_large_body_the_upstream_stops_taking_is_its_timeout_not_the_clients(
    scheme: str,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    scripted: Callable[[Script], _Scripted],
    start_edge: Callable[..., RunningEdge],
) -> None:
    upstream = scripted(_hold)
    # A small receive window: the edge's writes block long before the body is through.
    upstream.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    _publish(redis_client, prefix, sites, scheme, "deaf.test", upstream.url)
    edge = start_edge(upstream_response_timeout=1.0, body_idle_timeout=3.0)
    edge.wait_ready()
    size = 64 * 1024 * 1024  # more than every buffer on the way can hold
    with _connect(edge, scheme, "deaf.test") as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: deaf.test\r\nContent-Length: %d\r\n\r\n" % size)
        # One thread (an SSL socket is not for two at once): send until the edge holds the
        # client back, then wait for the answer.
        started = time.monotonic()
        sock.settimeout(0.5)
        piece = b"b" * 65536
        sent = 0
        while sent < size:
            try:
                sent += sock.send(piece[: size - sent])
            except OSError:  # TimeoutError: held back
                break
        assert sent < size  # the edge did stop taking the body
        sock.settimeout(DEADLINE)
        try:
            data, _ = _read_response(sock)
        except (AssertionError, OSError):
            # The edge closes with the client's body unread: the reset (or, on TLS, a bare EOF)
            # may overtake its answer; what the edge did is in its metrics below.
            data = b""
        took = time.monotonic() - started
    # The upstream's silence (1 s), a 504; not the client's idle timeout (3 s), a 408.
    assert not data or data.startswith(b"HTTP/1.1 504"), data[:200]
    assert took < 2.9, took
    metrics = edge.metrics()
    assert 'certman_edge_upstream_cancelled_total{reason="upstream_timeout"} 1.0' in metrics
    assert 'certman_edge_upstream_cancelled_total{reason="body_timeout"}' not in metrics
    wait_for(lambda: _slots(edge) == 0, what="the slot freed")
    wait_for(lambda: upstream.open_connections() == 0, what="the upstream connection closed")


# ---- 3: clients leaving mid-body leave nothing behind --------------------------------------


class _Unequal:
    """A falsy value that shows both sides in wait_for's message."""

    def __init__(self, now: object, before: object) -> None:
        self.text = f"{now!r} now, {before!r} before"

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return self.text


def _live(kind: type) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, kind))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_abandoned_bodies_leave_no_exchange_behind(
    scheme: str,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    scripted: Callable[[Script], _Scripted],
    start_edge: Callable[..., RunningEdge],
) -> None:
    upstream = scripted(_hold)
    _publish(redis_client, prefix, sites, scheme, "leave.test", upstream.url)
    edge = start_edge(body_idle_timeout=1.0, upstream_per_client=100)
    edge.wait_ready()
    before = _live(Exchange), _live(Body)
    post = b"POST /up HTTP/1.1\r\nHost: leave.test\r\nContent-Length: 100000\r\n\r\npartial"
    socks = []
    for i in range(50):
        sock = _connect(edge, scheme, "leave.test")
        sock.sendall(post)
        if i % 2:
            sock.close()  # half leave at once; the others are cut by the body timer
        else:
            socks.append(sock)
    for sock in socks:
        data, _ = _read_response(sock)
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        sock.close()
    wait_for(lambda: _slots(edge) == 0, what="every slot freed")
    wait_for(
        lambda: (now := (_live(Exchange), _live(Body))) == before or _Unequal(now, before),
        what="every exchange freed",
    )
    wait_for(lambda: upstream.open_connections() == 0, what="every upstream connection closed")


# ---- 6: a client that leaves while queued for a slot ----------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_client_leaving_while_queued_takes_no_slot(
    scheme: str,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    scripted: Callable[[Script], _Scripted],
    start_edge: Callable[..., RunningEdge],
) -> None:
    holder = scripted(_hold)
    answering = scripted(_answer)
    _publish(redis_client, prefix, sites, scheme, "held.test", holder.url)
    _publish(redis_client, prefix, sites, scheme, "next.test", answering.url)
    edge = start_edge(max_upstream_connections=1, upstream_queue=4, upstream_queue_timeout=4.0)
    edge.wait_ready()
    holding = _connect(edge, scheme, "held.test")
    holding.sendall(b"GET /hold HTTP/1.1\r\nHost: held.test\r\n\r\n")
    wait_for(lambda: holder.paths() == ["/hold"], what="the only slot taken")
    gone = _connect(edge, scheme, "next.test")
    gone.sendall(b"GET /gone HTTP/1.1\r\nHost: next.test\r\n\r\n")
    wait_for(lambda: _gauge(edge, "certman_edge_upstream_slots_waiting") == 1, what="queued")
    gone.close()
    # The queue forgets the request that went away as soon as its client does.
    wait_for(lambda: _gauge(edge, "certman_edge_upstream_slots_waiting") == 0, what="dequeued")
    holding.close()
    wait_for(lambda: _slots(edge) == 0, what="the slot freed")
    with _connect(edge, scheme, "next.test") as sock:
        sock.sendall(b"GET /after HTTP/1.1\r\nHost: next.test\r\nConnection: close\r\n\r\n")
        data, _ = _read_until_closed(sock, DEADLINE)
    assert data.startswith(b"HTTP/1.1 200"), data[:200]
    # No upstream request was made for the client that had gone.
    assert answering.paths() == ["/after"]


# ---- 14: an interim response is not the upstream's response time ---------------------------


def test_interim_response_is_not_timed_as_the_response(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    scripted: Callable[[Script], _Scripted],
    start_edge: Callable[..., RunningEdge],
) -> None:
    upstream = scripted(_hints_then_late)
    _publish(redis_client, prefix, sites, "https", "hints.test", upstream.url)
    edge = start_edge()
    edge.wait_ready()
    status, _, body = edge.https("hints.test", path="/")
    assert (status, body) == (200, b"ok")
    text = edge.metrics()
    count = re.search(r"^certman_edge_upstream_response_seconds_count (\S+)$", text, re.M)
    total = re.search(r"^certman_edge_upstream_response_seconds_sum (\S+)$", text, re.M)
    assert count and total
    assert float(count.group(1)) == 1.0
    # Observed at the final response (a second after the 103), not at the 103.
    assert float(total.group(1)) >= 1.0, total.group(1)
