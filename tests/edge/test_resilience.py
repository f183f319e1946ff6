"""Redis lost and back, hostile clients, health, the CLI, SIGTERM with several processes."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from pipeline.distribution.layout import publish_site
from tests.support.redis_server import RedisServer

from .conftest import (
    DEADLINE,
    Keys,
    RunningEdge,
    Sites,
    edge_command,
    serial_of,
    slow_request_arrived,
    start_prefork_edge,
    wait_for,
)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may kill: never the machine's."""
    server = RedisServer()
    yield server
    server.kill()


def test_redis_lost_then_back(
    own_redis: RedisServer, prefix: str, sites: Sites, start_edge: Callable[..., RunningEdge]
) -> None:
    client = own_redis.start()
    first = sites.record("kept.test")
    publish_site(client, prefix, first)
    edge = start_edge(redis_url=own_redis.url)
    edge.wait_ready()
    assert serial_of(edge.peer_cert("kept.test")) == first.serial
    client.close()
    own_redis.kill()
    wait_for(lambda: "certman_edge_sync_connected 0.0" in edge.metrics(), what="disconnected")
    # Still serving what it had, and still healthy (it has a snapshot).
    assert serial_of(edge.peer_cert("kept.test")) == first.serial
    assert edge.health() == 200
    # Redis comes back empty (no persistence): the pipeline republishes, the edge catches up.
    client = own_redis.start()
    second = sites.record("kept.test")
    later = sites.record("new.test")
    publish_site(client, prefix, second)
    publish_site(client, prefix, later)
    # The syncer reconnects after a backoff of up to 5 s, as long as DEADLINE: allow for it.
    wait_for(
        lambda: serial_of(edge.peer_cert("new.test")) == later.serial,
        timeout=3 * DEADLINE,
        what="new site",
    )
    wait_for(
        lambda: serial_of(edge.peer_cert("kept.test")) == second.serial,
        timeout=3 * DEADLINE,
        what="replaced",
    )
    assert "certman_edge_sync_connected 1.0" in edge.metrics()
    client.close()


def test_health_is_503_until_the_first_snapshot(start_edge: Callable[..., RunningEdge]) -> None:
    edge = start_edge(redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert edge.health() == 503
    assert "certman_edge_sync_connected 0.0" in edge.metrics()
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        edge.tls("any.test").close()


def test_garbage_and_idle_clients_do_not_block_others(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("ok.test", upstream=upstream))
    edge = start_edge()
    edge.wait_ready()
    idle = [
        socket.create_connection(("127.0.0.1", port))
        for port in (edge.http_port, edge.https_port)
        for _ in range(20)
    ]
    garbage = [b"\x00\xff" * 500, b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x00\x05hello"]
    for port in (edge.http_port, edge.https_port):
        for data in garbage:
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                try:
                    while s.recv(4096):
                        pass
                except ConnectionResetError:
                    pass
    # A handshake that stops half-way.
    half = socket.create_connection(("127.0.0.1", edge.https_port))
    half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    status, _, _ = edge.https("ok.test")
    assert status == 200
    assert edge.http("ok.test")[0] == 301
    for s in [*idle, half]:
        s.close()


# ---- the command line, as a real process --------------------------------------------------


def test_cli_bad_key_dir_exits_2_with_one_line(tmp_path: Path) -> None:
    for key_dir in (tmp_path / "missing", tmp_path):
        result = subprocess.run(
            edge_command("--key-dir", str(key_dir), "--http-port", "0", "--https-port", "0"),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "0000000000000000.key").write_text("not a key")
    result = subprocess.run(
        edge_command("--key-dir", str(bad)), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_sigterm_drains_in_flight_requests_across_processes(
    redis_url: str,
    redis_client: redis.Redis,
    prefix: str,
    keys: Keys,
    sites: Sites,
    upstream: str,
) -> None:
    publish_site(redis_client, prefix, sites.record("multi.test", upstream=upstream))
    prefork = start_prefork_edge(redis_url, prefix, keys.directory, keys.signer_dir)
    proc = prefork.proc
    try:
        edge = RunningEdge.__new__(RunningEdge)
        edge.pki, edge.https_port = sites.pki, prefork.https_port
        results: list[int] = []
        slow = threading.Thread(
            target=lambda: results.append(edge.https("multi.test", path="/slow")[0])
        )
        slow_request_arrived.clear()
        slow.start()
        # SIGTERM only once the request is in flight at the upstream (which takes 1 s there).
        assert slow_request_arrived.wait(DEADLINE), "the slow request reached the upstream"
        proc.send_signal(signal.SIGTERM)
        slow.join(DEADLINE)
        assert results == [200], "the in-flight request finished"
        assert proc.wait(DEADLINE) == 0
    finally:
        stderr = prefork.reap()
    assert "Traceback" not in stderr, stderr
