"""The local sealed mirror: an edge rides out Redis outages and restarts, and the TLS path never
touches the network."""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from pipeline.distribution.layout import publish_site
from tests.support.redis_server import RedisServer

from .conftest import RunningEdge, Sites, serial_of, wait_for

NAMES = [f"m{i}.test" for i in range(9)]


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)  # in case a test left it frozen
    server.stop()


def _edge(start_edge: Callable[..., RunningEdge], server: RedisServer, mirror: Path) -> RunningEdge:
    return start_edge(redis_url=server.url, prefix="mir", mirror_path=mirror)


def _published(server: RedisServer, sites: Sites, upstream: str) -> dict[str, str]:
    client = redis.Redis.from_url(server.url)
    serials = {}
    for name in NAMES:
        record = sites.record(name, upstream=upstream)
        publish_site(client, "mir", record)
        serials[name] = str(record.serial)
    client.close()
    return serials


def test_an_edge_restarted_while_redis_is_down_serves_every_site(
    tmp_path: Path,
    own_redis: RedisServer,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    mirror = tmp_path / "state" / "mirror-0.sqlite3"
    serials = _published(own_redis, sites, upstream)
    first = _edge(start_edge, own_redis, mirror)
    first.wait_ready()
    wait_for(lambda: "certman_edge_mirror_blobs_fetched_total 9.0" in first.metrics())
    first.stop()
    own_redis.stop()
    # Nothing on disk that opens without the edge key: 0600, sealed envelopes only.
    assert stat.S_IMODE(mirror.stat().st_mode) == 0o600
    for path in mirror.parent.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
        assert b"PRIVATE KEY" not in path.read_bytes(), path
    again = _edge(start_edge, own_redis, mirror)
    again.wait_ready()
    for name in NAMES:
        assert serial_of(again.peer_cert(name)) == serials[name]
        assert again.https(name)[0] == 200
    status, body = _health(again)
    assert status == 200 and "serving, snapshot stale since" in body
    # Redis back: caught up without fetching what the mirror already holds.
    own_redis.start()
    wait_for(lambda: "certman_edge_sync_connected 1.0" in again.metrics(), 10, "reconnected")
    assert "certman_edge_mirror_blobs_fetched_total 0.0" in again.metrics()


def test_a_frozen_redis_does_not_touch_handshakes(
    tmp_path: Path,
    own_redis: RedisServer,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    serials = _published(own_redis, sites, upstream)
    edge = _edge(start_edge, own_redis, tmp_path / "mirror.sqlite3")
    edge.wait_ready()
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        # Not one of these names has a context yet: every handshake opens an envelope, from
        # the mirror, while Redis answers nothing.
        for name in NAMES:
            assert serial_of(edge.peer_cert(name)) == serials[name]
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)


def test_a_change_reaches_the_mirror_and_only_it_is_fetched(
    tmp_path: Path,
    own_redis: RedisServer,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    mirror = tmp_path / "mirror.sqlite3"
    _published(own_redis, sites, upstream)
    edge = _edge(start_edge, own_redis, mirror)
    edge.wait_ready()
    edge.stop()
    renewed = sites.record("m3.test", upstream=upstream)
    publish_site(redis.Redis.from_url(own_redis.url), "mir", renewed)
    again = _edge(start_edge, own_redis, mirror)
    wait_for(
        lambda: "certman_edge_mirror_blobs_fetched_total 1.0" in again.metrics(),
        what="only the changed blob fetched",
    )
    wait_for(lambda: serial_of(again.peer_cert("m3.test")) == renewed.serial, what="renewal served")


def test_signatures_are_verified_ahead_of_first_use_and_not_again_after_a_restart(
    tmp_path: Path,
    own_redis: RedisServer,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    mirror = tmp_path / "mirror.sqlite3"
    serials = _published(own_redis, sites, upstream)
    first = _edge(start_edge, own_redis, mirror)
    first.wait_ready()
    wait_for(
        lambda: "certman_edge_signatures_verified_ahead_total 9.0" in first.metrics(),
        what="every statement verified on the verifier's thread",
    )
    assert "certman_edge_signatures_pending 0.0" in first.metrics()
    for name in NAMES:
        assert serial_of(first.peer_cert(name)) == serials[name]
    assert "certman_edge_signatures_verified_on_loop_total 0.0" in first.metrics()
    first.stop()
    again = _edge(start_edge, own_redis, mirror)
    again.wait_ready()
    wait_for(lambda: "certman_edge_sync_connected 1.0" in again.metrics(), what="in sync")
    for name in NAMES:
        assert serial_of(again.peer_cert(name)) == serials[name]
    text = again.metrics()
    # Remembered in the mirror: not one signature verified again, ahead or on first use.
    assert "certman_edge_signatures_verified_ahead_total 0.0" in text
    assert "certman_edge_signatures_verified_on_loop_total 0.0" in text


def test_health_tells_not_ready_from_stale(
    tmp_path: Path, own_redis: RedisServer, start_edge: Callable[..., RunningEdge]
) -> None:
    own_redis.stop()
    edge = _edge(start_edge, own_redis, tmp_path / "never-synced.sqlite3")
    status, body = _health(edge)
    assert status == 503 and body.startswith("not ready")


def _health(edge: RunningEdge) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{edge.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
