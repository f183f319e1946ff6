"""A request body must average --min-body-rate once its first --body-idle-timeout seconds are
over: a body dripping a byte just inside the idle timeout is given up (408) and its slot freed,
on both ports; a body at a sane pace passes."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from .conftest import RunningEdge, Sites, wait_for
from .test_slot_release import SCHEMES, _connect, _publish, _read_response, _slots


@pytest.mark.parametrize("scheme", SCHEMES)
def test_slow_drip_body_is_given_up(
    scheme: str,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    _publish(redis_client, prefix, sites, scheme, "drip.test", upstream)
    edge = start_edge(body_idle_timeout=1.0, min_body_rate=100)
    edge.wait_ready()
    with _connect(edge, scheme, "drip.test") as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: drip.test\r\nContent-Length: 1000\r\n\r\n")
        wait_for(lambda: _slots(edge) == 1, what="the slot taken")
        started = time.monotonic()
        sock.settimeout(0.4)
        reply = b""
        # One byte every 0.4 s: never silent for the idle timeout (1 s), 2.5 B/s on average.
        while time.monotonic() - started < 6.0:
            try:
                sock.sendall(b"x")
                reply = sock.recv(65536)
                break
            except TimeoutError:
                continue
            except OSError:
                break
        took = time.monotonic() - started
        sock.settimeout(5.0)
        if reply and b"\r\n\r\n" not in reply:
            reply += _read_response(sock)[0]
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"too slowly" in reply
    # Due at 1 s + 1 s per 100 bytes received (a few): well before the 6 s the drip would go on.
    assert took < 2.5, took
    wait_for(lambda: _slots(edge) == 0, what="the slot freed")
    assert 'certman_edge_upstream_cancelled_total{reason="body_timeout"} 1.0' in edge.metrics()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_body_at_a_steady_pace_passes(
    scheme: str,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    _publish(redis_client, prefix, sites, scheme, "pace.test", upstream)
    edge = start_edge(body_idle_timeout=1.0, min_body_rate=1000)
    edge.wait_ready()
    with _connect(edge, scheme, "pace.test") as sock:
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: pace.test\r\nContent-Length: 4000\r\n\r\n")
        # 4000 bytes over 2.4 s: 1,667 B/s, past the first second and above the 1,000 B/s floor.
        for _ in range(8):
            sock.sendall(b"y" * 500)
            time.sleep(0.3)  # the client's pace being simulated
        reply, _ = _read_response(sock)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert b'"body_len": 4000' in reply
