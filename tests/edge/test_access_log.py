"""The access log of the metrics port: a load balancer's /healthz probe answered 503 is
information for the balancer, not an error of the edge."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from tests.support.ports import free_port

from .conftest import RunningEdge, wait_for


def test_a_failing_health_probe_is_not_logged_as_an_error(
    start_edge: Callable[..., RunningEdge], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tornado.access")
    # Redis out of reach and no mirror: not ready, so /healthz answers 503.
    edge = start_edge(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    for _ in range(3):
        assert edge.health() == 503
    probes = wait_for(
        lambda: [r for r in caplog.records if "/healthz" in r.getMessage()], what="probe lines"
    )
    assert all(r.levelno <= logging.INFO for r in probes), [
        (r.levelname, r.getMessage()) for r in probes
    ]
    assert any(r.getMessage().startswith("503 GET /healthz") for r in probes)
    edge.metrics()
    scrapes = wait_for(
        lambda: [r for r in caplog.records if "/metrics" in r.getMessage()], what="scrape line"
    )
    assert all(r.levelno == logging.DEBUG for r in scrapes)
