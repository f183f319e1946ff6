"""Every metric name the dashboard and the alerts use is one certman really exports.

The names are collected from scrapes over HTTP of a real edge (after a proxied request and a
refused handshake), a real worker host in multiprocess mode (tests/pipeline's, with forked
children) and a real ``certman exporter`` on a SQLite store and Redis: a misspelt name in a
query is caught here, where promtool alone would accept it.
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from pipeline.distribution.layout import publish_site
from tests.edge.conftest import RunningEdge, Sites
from tests.pipeline.test_worker_metrics import run_host, stop_host
from tests.support.factories import make_cert, make_site
from tests.support.ports import free_port

from .promql import alert_queries, dashboard, dashboard_queries, metric_names

# Made by Prometheus itself for every target.
PROMETHEUS_OWN = {"up"}


def names_in(text: str) -> set[str]:
    """Every sample name the exposition has or, for a family with no sample yet (a labelled
    counter nobody incremented), could have."""
    found: set[str] = set()
    for family in text_string_to_metric_families(text):
        found.update(s.name for s in family.samples)
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_count", "_sum"),
            "summary": ("_count", "_sum"),
            "info": ("_info",),
        }.get(family.type, ("",))
        found.update(family.name + suffix for suffix in suffixes)
    return found


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


@pytest.fixture
def exporter_names(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[set[str]]:
    from pipeline import runtime
    from pipeline.db import upgrade
    from pipeline.exporter import serve
    from tests.support.from_settings import session_scope

    url = f"sqlite:///{tmp_path / 'certman.db'}"
    upgrade(url)
    for key, value in {
        "CERTMAN_DATA_DIR": str(tmp_path),
        "CERTMAN_DATABASE_URL": url,
        "CERTMAN_REDIS_URL": redis_url,
    }.items():
        monkeypatch.setenv(key, value)
    runtime.reset(settings=True)
    with session_scope() as session:  # one current certificate: its expiry is a series
        make_cert(session, make_site(session, "served.example"), lifetime=timedelta(days=90))
    port = free_port()
    process = runtime.current()
    server = serve(process.settings, process.redis, process.limiter, port=port)
    try:
        yield names_in(get(f"http://127.0.0.1:{port}/metrics"))
    finally:
        server.shutdown()
        server.server_close()
        runtime.reset(close=True, settings=True)


@pytest.fixture
def edge_names(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> set[str]:
    publish_site(redis_client, prefix, sites.record("shop.test", upstream=upstream))
    edge = start_edge()
    edge.wait_ready()
    assert edge.https("shop.test")[0] == 200
    with pytest.raises(ssl.SSLError):
        edge.tls("unknown.test")
    return names_in(edge.metrics())


@pytest.fixture
def worker_names(tmp_path: Path) -> set[str]:
    port = free_port()
    host = run_host(tmp_path / "worker-metrics", port)
    try:
        return names_in(get(f"http://127.0.0.1:{port}/metrics"))
    finally:
        stop_host(host)


def test_dashboard_and_alerts_use_only_exported_names(
    exporter_names: set[str], edge_names: set[str], worker_names: set[str]
) -> None:
    # Each role says what it is and how its process fares.
    for names in (edge_names, worker_names):
        assert {"certman_build_info", "process_cpu_seconds_total"} <= names
    exported = exporter_names | edge_names | worker_names | PROMETHEUS_OWN
    used: dict[str, set[str]] = {}
    queries = {**dashboard_queries(dashboard()), **alert_queries()}
    for key, expr in queries.items():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(key)
    unknown = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert unknown == {}, "names no role exports"
    # The check has teeth: the queries name many series, from every role.
    assert len(used) > 40
    assert {"certman_store_up", "certman_edge_requests_total"} <= set(used)
    assert "certman_issuance_steps_total" in used
