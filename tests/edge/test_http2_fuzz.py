"""test_fuzz's generated requests as HTTP/2 streams, and generated frames, at a running edge.

The same promises as over HTTP/1.1: nothing reaches any address but the site's upstream (the
canary never sees a connection), no traceback and no 500 in any answer, and the edge keeps
serving other clients. Bounded and derandomised, as test_fuzz is.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable

import hpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.distribution.layout import publish_site
from tests.support.h2client import RawH2, frame

from .conftest import Canary, RunningEdge, Sites
from .test_fuzz import _ANY, _HEADER_NAMES, _HOSTS, _METHODS, _targets


@st.composite
def streams(draw: st.DrawFn, canary_port: int) -> bytes:
    """One request as HTTP/2 frames: its pseudo-header fields and fields (any names, any case,
    as a raw HPACK encoder sends them), then perhaps DATA."""
    fields = [
        (":method", draw(_METHODS)),
        (":scheme", draw(st.sampled_from(["https", "https", "http", ""]))),
        (":authority", draw(_HOSTS)),
        (":path", draw(_targets(canary_port))),
    ]
    fields = draw(st.permutations(fields))[: draw(st.integers(2, 4))]
    for _ in range(draw(st.integers(0, 4))):
        fields.append((draw(_HEADER_NAMES), draw(st.text(_ANY, max_size=40))))
    body = draw(st.binary(max_size=64))
    block = hpack.Encoder().encode([(k.encode("latin-1"), v.encode("latin-1")) for k, v in fields])
    if not body:
        return frame(0x1, 0x5, 1, block)
    return frame(0x1, 0x4, 1, block) + frame(0x0, 0x1, 1, body)


_FRAMES = st.lists(
    st.builds(
        frame,
        st.integers(0, 10),  # every frame type, and one unknown
        st.integers(0, 255),
        st.sampled_from([0, 1, 3, 5, 2**31 - 1]),
        st.binary(max_size=40),
    ),
    max_size=12,
)


def _answer(edge: RunningEdge, data: bytes) -> RawH2 | None:
    try:
        raw = RawH2(edge.https_port, "shop.test", timeout=1.0)
    except (OSError, ssl.SSLError):
        return None
    with contextlib.suppress(OSError, ssl.SSLError):
        raw.send(data)
        raw.until(lambda: raw.closed or any(f[0] in (0x1, 0x3, 0x7) for f in raw.frames), 1.0)
    raw.close()
    return raw


def test_fuzzed_streams_and_frames_stay_on_the_site(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    canary: Canary,
    start_edge: Callable[..., RunningEdge],
    caplog: pytest.LogCaptureFixture,
) -> None:
    publish_site(redis_client, prefix, sites.record("shop.test", upstream=upstream))
    publish_site(redis_client, prefix, sites.record("bystander.test", upstream=upstream))
    edge = start_edge()
    edge.wait_ready()
    sent = 0

    @settings(
        max_examples=150,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.one_of(streams(canary.port), _FRAMES.map(b"".join)))
    def one(data: bytes) -> None:
        nonlocal sent
        raw = _answer(edge, data)
        sent += 1
        assert canary.hits == [], data
        status = 0
        if raw is not None:
            with contextlib.suppress(Exception):  # a generated frame may break HPACK state
                status = raw.statuses().get(1, 0)
        assert status < 500 or status in (502, 503, 504, 508), (data, status)
        if sent % 50 == 0:
            assert edge.https("bystander.test")[0] == 200

    one()
    assert sent >= 150
    assert edge.https("bystander.test")[0] == 200
    assert edge.health() == 200
    # Whatever came, no traceback was logged (a protocol callback that raised, a task that
    # failed).
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
