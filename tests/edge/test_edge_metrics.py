"""The edge's own figures on /metrics, moved by real requests and real handshakes.

A real edge (Tornado, real TLS), a real upstream answering the status each request asks for,
and a scrape of /metrics before and after, read with prometheus_client's own parser.
"""

from __future__ import annotations

import contextlib
import re
import ssl
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge.metrics import STATUS_CLASSES, UPSTREAM_BUCKETS, RequestMetrics
from pipeline.distribution.layout import publish_site
from pipeline.version import certman_version
from tests.support.ports import free_port

from .conftest import RunningEdge, Sites, serving

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(edge: RunningEdge) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(edge.metrics()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


class _Status(BaseHTTPRequestHandler):
    """Answers ``/status/N`` with status N."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        code = int(self.path.rsplit("/", 1)[1])
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def status_upstream() -> Iterator[str]:
    with serving(_Status) as url:
        yield url


def test_requests_upstream_latency_and_handshakes_are_counted(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    status_upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    publish_site(redis_client, prefix, sites.record("shop.test", upstream=status_upstream))
    # An upstream nobody listens on: the edge answers 502 itself.
    closed = f"http://127.0.0.1:{free_port()}"
    publish_site(redis_client, prefix, sites.record("down.test", upstream=closed))
    edge = start_edge()
    edge.wait_ready()
    before = scrape(edge)

    assert edge.https("shop.test", path="/status/200")[0] == 200
    assert edge.https("shop.test", path="/status/404")[0] == 404
    assert edge.https("shop.test", path="/status/503")[0] == 503
    assert edge.https("down.test")[0] == 502
    assert edge.http("nobody.test")[0] == 404  # the edge's own answer, on port 80
    with pytest.raises(ssl.SSLError):
        edge.tls("unknown.test")  # refused by the SNI callback: a failed handshake

    after = scrape(edge)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "certman_edge_requests_total"
    assert moved(requests, scheme="https", status_class="2xx") == 1
    assert moved(requests, scheme="https", status_class="4xx") == 1
    assert moved(requests, scheme="https", status_class="5xx") == 2
    assert moved(requests, scheme="http", status_class="4xx") == 1
    assert moved(requests, scheme="http", status_class="2xx") == 0
    # Every class is there from the start, so that rate() has a series before the first one.
    assert (requests, frozenset({("scheme", "http"), ("status_class", "1xx")})) in before

    # Three answers came from the upstream; the refused connection is an error, not a latency.
    assert moved("certman_edge_upstream_response_seconds_count") == 3
    assert moved("certman_edge_upstream_response_seconds_sum") > 0
    assert moved("certman_edge_upstream_errors_total", kind="connect") == 1
    upstream_le = value(after, "certman_edge_upstream_response_seconds_bucket", le="+Inf")
    assert upstream_le == value(after, "certman_edge_upstream_response_seconds_count")

    # Four completed handshakes (one per https() call), timed; the refused one is a failure.
    assert moved("certman_edge_tls_handshake_seconds_count") == 4
    assert 0 < moved("certman_edge_tls_handshake_seconds_sum") < 4 * 5.0
    failures = sum(
        v - before.get(k, 0.0)
        for k, v in after.items()
        if k[0] == "certman_edge_tls_failures_total"
    )
    assert failures == 1
    assert moved("certman_edge_sni_total", outcome="unknown_name") == 1

    # Build and process metrics.
    build = [k for k in after if k[0] == "certman_build_info"]
    assert len(build) == 1 and ("version", certman_version()) in build[0][1]
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "process_cpu_seconds_total") > 0
    assert any(k[0] == "python_info" for k in after)

    # No domain in any label.
    text = edge.metrics()
    for name in ("shop.test", "down.test", "nobody.test", "unknown.test"):
        assert name not in text


def _exposition(registry: CollectorRegistry) -> list[str]:
    """The text exposition without the ``_created`` timestamps (when each was made)."""
    lines = generate_latest(registry).decode().splitlines()
    return [re.sub(r"^(\w+_created(\{[^}]*\})?) \S+$", r"\1 T", line) for line in lines]


def test_the_plain_per_request_metrics_are_exported_as_prometheus_clients_own() -> None:
    # The core counts in plain numbers (edge.metrics.RequestMetrics); what /metrics shows must
    # be what prometheus_client's Counter and Histogram would show for the same requests, so
    # that docs/operations.md, the dashboards and the alert rules stay true.
    plain = CollectorRegistry()
    metrics = RequestMetrics(("https", "http"))
    plain.register(metrics)
    own = CollectorRegistry()
    labels = ["scheme", "status_class"]
    counter = Counter(RequestMetrics.REQUESTS, RequestMetrics.REQUESTS_DOC, labels, registry=own)
    histogram = Histogram(
        RequestMetrics.UPSTREAM, RequestMetrics.UPSTREAM_DOC, buckets=UPSTREAM_BUCKETS, registry=own
    )
    for scheme in ("https", "http"):
        for klass in STATUS_CLASSES:
            counter.labels(scheme, klass)
    counts = metrics.requests["https"]
    for status in (200, 204, 404, 502, 99, 700):
        klass = status // 100
        counts[klass if 0 < klass < 6 else 0] += 1
        counter.labels("https", STATUS_CLASSES[klass if 0 < klass < 6 else 0]).inc()
    # Port 80's requests, counted by Tornado's log function in the same plain numbers.
    metrics.requests["http"][3] += 2
    counter.labels("http", "3xx").inc(2)
    metrics.requests["https"][2] += 1
    counter.labels("https", "2xx").inc()
    # On a bound, just above and below, past the last, zero.
    for seconds in (0.005, 0.0050001, 0.0049, 0.25, 60.0, 61.0, 0.0, 1e-9, 12.5):
        metrics.upstream_seconds.observe(seconds)
        histogram.observe(seconds)
    assert _exposition(plain) == _exposition(own)
