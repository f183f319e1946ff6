"""Prometheus metrics of one edge process, on a registry of its own.

A registry per edge (not the global one) keeps several edges in one test process apart.

What every request updates (``certman_edge_requests_total``, and
``certman_edge_upstream_response_seconds`` for a proxied one) is kept as plain numbers, a list
item added to, and turned into Prometheus samples only when ``/metrics`` is read
(:class:`RequestMetrics`, a custom collector on the same registry): a ``prometheus_client``
counter's ``inc`` and a histogram's ``observe`` take a lock and check the metric each time
(docs/architecture.md section 6 has what that cost). An edge process updates and scrapes them
on its one event loop thread, so nothing is lost between the two. The other metrics are updated
on rare events (a refusal, a handshake, a sync) and stay ``prometheus_client``'s own. Nothing
is labelled by domain.
"""

from __future__ import annotations

import os
import platform
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from pipeline.version import certman_version

__all__ = [
    "HANDSHAKE_BUCKETS",
    "STATUS_CLASSES",
    "UPSTREAM_BUCKETS",
    "EdgeMetrics",
    "PlainHistogram",
    "RequestMetrics",
]

# Index i is the class of statuses i*100 .. i*100+99 (0 for anything outside 100-599).
STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
# From the SNI callback to the handshake's end: a context built on a miss (~1.5 ms), the
# server's signature, and one round trip to the client.
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# From sending the request upstream to its response's header block.
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EdgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.handshakes = Counter(
            "certman_edge_sni_total",
            "TLS handshakes by the SNI callback's outcome.",
            ["outcome"],
            registry=r,
        )
        self.cache_hits = Counter(
            "certman_edge_context_cache_hits_total",
            "SNI lookups served from cache.",
            registry=r,
        )
        self.cache_misses = Counter(
            "certman_edge_context_cache_misses_total",
            "SNI lookups that had to open an envelope and build a context.",
            registry=r,
        )
        self.cache_evictions = Counter(
            "certman_edge_context_cache_evictions_total",
            "Contexts dropped by the LRU bound or because their certificate changed.",
            ["reason"],
            registry=r,
        )
        self.envelope_failures = Counter(
            "certman_edge_envelope_open_failures_total",
            "Envelopes that could not be opened, by reason.",
            ["reason"],
            registry=r,
        )
        self.context_build_seconds = Counter(
            "certman_edge_context_build_seconds_total",
            "Time spent opening envelopes and building contexts.",
            registry=r,
        )
        self.sync_events = Counter(
            "certman_edge_sync_events_total",
            "Events applied, by type.",
            ["type"],
            registry=r,
        )
        self.sync_resnapshots = Counter(
            "certman_edge_sync_snapshots_total", "Snapshots read, by cause.", ["cause"], registry=r
        )
        self.sync_connection_errors = Counter(
            "certman_edge_sync_connection_errors_total",
            "Lost Redis connections.",
            registry=r,
        )
        self.upstream_errors = Counter(
            "certman_edge_upstream_errors_total",
            "Failed proxied requests.",
            ["kind"],
            registry=r,
        )
        self.tls_failures = Counter(
            "certman_edge_tls_failures_total",
            "TLS handshakes that failed after the ClientHello, by OpenSSL's reason.",
            ["reason"],
            registry=r,
        )
        self.sync_malformed_events = Counter(
            "certman_edge_sync_malformed_events_total",
            "Change events that could not be applied (each answered by a snapshot re-read).",
            registry=r,
        )
        self.sync_failures = Counter(
            "certman_edge_sync_failures_total",
            "Failed attempts of the sync loop (Redis unreachable or lost, or an unexpected "
            "error), each retried with backoff.",
            registry=r,
        )
        self.requests_rejected = Counter(
            "certman_edge_requests_rejected_total",
            "Requests answered by the edge itself (4xx, or 503/508) before reaching an upstream.",
            ["reason"],
            registry=r,
        )
        self.upstream_cancelled = Counter(
            "certman_edge_upstream_cancelled_total",
            "Upstream requests cancelled because the client left or its body was malformed.",
            ["reason"],
            registry=r,
        )
        self.signature_failures = Counter(
            "certman_edge_signature_failures_total",
            "Signed statements refused (sites, removals, challenges), by reason: unsigned, "
            "untrusted_signer, bad_signature, malformed, misfiled, mismatch, rollback, expired.",
            ["what", "reason"],
            registry=r,
        )
        self.mirror_synced = Gauge(
            "certman_edge_mirror_synced_timestamp_seconds",
            "When the edge (and its local mirror) last matched Redis; 0 if never.",
            registry=r,
        )
        self.mirror_fetched = Counter(
            "certman_edge_mirror_blobs_fetched_total",
            "Blobs fetched from Redis into the local mirror (only those whose content changed).",
            registry=r,
        )
        self.mirror_sites = Gauge(
            "certman_edge_mirror_sites", "Sites held in the local mirror.", registry=r
        )
        self.mirror_bytes = Gauge(
            "certman_edge_mirror_bytes", "Size of the local mirror on disk.", registry=r
        )
        self.certificates_known = Gauge(
            "certman_edge_certificates_known", "Sites with a certificate in the index.", registry=r
        )
        self.soonest_expiry = Gauge(
            "certman_edge_certificate_soonest_expiry_timestamp_seconds",
            "not_after of the certificate that expires first (0 if none).",
            registry=r,
        )
        self.cached_contexts = Gauge(
            "certman_edge_context_cache_size", "TLS contexts in the cache.", registry=r
        )
        self.sync_connected = Gauge(
            "certman_edge_sync_connected", "1 while subscribed to the change channel.", registry=r
        )
        self.sync_lag = Gauge(
            "certman_edge_sync_lag_seconds",
            "Seconds since the edge last confirmed it holds the current version.",
            registry=r,
        )
        self.sync_version = Gauge(
            "certman_edge_sync_version", "Distribution version the edge has applied.", registry=r
        )

        # Per request: plain numbers, exported at scrape time (see the module docstring).
        self.request_metrics = RequestMetrics(("https", "http"))
        self.upstream_seconds = self.request_metrics.upstream_seconds
        r.register(self.request_metrics)
        self.handshake_seconds = Histogram(
            "certman_edge_tls_handshake_seconds",
            "Completed TLS handshakes: from the SNI callback (the ClientHello read) to the "
            "handshake's end as the event loop sees it; a context built on a cache miss and "
            "one round trip to the client included.",
            buckets=HANDSHAKE_BUCKETS,
            registry=r,
        )
        # ---- budgets (edge.connections, edge.shares) ----
        self.connections_refused = Counter(
            "certman_edge_connections_refused_total",
            "Client connections closed by the connection budget: total or per_address cap at "
            "accept, or first_byte_timeout (no request byte in time), or an HTTP/2 connection "
            "ended with ENHANCE_YOUR_CALM (h2_resets, h2_control_frames, h2_header_block).",
            ["reason"],
            registry=r,
        )
        self.accept_errors = Counter(
            "certman_edge_accept_errors_total",
            "accept() failures that paused accepting (EMFILE, ENFILE, ENOBUFS, ENOMEM, other).",
            ["reason"],
            registry=r,
        )
        self.connections_open = Gauge(
            "certman_edge_connections_open",
            "Client connections open on the site ports.",
            registry=r,
        )
        self.upstream_slots_in_use = Gauge(
            "certman_edge_upstream_slots_in_use",
            "Upstream request slots held (the total share; per site and client shares are "
            'refusals in certman_edge_requests_rejected_total{reason=~"share_.*"}).',
            registry=r,
        )
        self.upstream_slots_waiting = Gauge(
            "certman_edge_upstream_slots_waiting",
            "Requests waiting in the bounded queue for an upstream slot.",
            registry=r,
        )
        Info("certman_build", "The running certman's version.", registry=r).info(
            {"version": certman_version(), "python": platform.python_version()}
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def request_counts(self, scheme: str) -> list[int]:
        """``certman_edge_requests_total``'s counts for ``scheme``, indexed by ``status // 100``
        (see STATUS_CLASSES): the proxy core and Tornado's log function on the site ports
        (:mod:`edge.app`) each add 1 to an item per request they answered."""
        return self.request_metrics.requests[scheme]

    @staticmethod
    def bind(gauge: Gauge, fn: Callable[[], float]) -> None:
        gauge.set_function(fn)


# prometheus_client's own switch for the ``_created`` samples (its counters and histograms
# read the same variable when imported).
_CREATED = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true",
    "1",
    "t",
)


class PlainHistogram:
    """A histogram of plain numbers: :meth:`observe` adds 1 to one bucket's count (found by
    bisection) and the value to the sum; the cumulative buckets are made at scrape time."""

    __slots__ = ("bounds", "counts", "created", "labels", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # The "le" values as prometheus_client writes them (Go's float format: 0.005, 1.0).
        self.labels = (*(repr(float(b)) for b in bounds), "+Inf")
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, as Prometheus's "le" (less or equal) means.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self, name: str, documentation: str) -> Metric:
        buckets: list[tuple[str, float]] = []
        total = 0
        for label, count in zip(self.labels, self.counts, strict=True):
            total += count
            buckets.append((label, float(total)))
        family = HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)
        if _CREATED:
            family.samples.append(Sample(f"{name}_created", {}, self.created, None))
        return family


class RequestMetrics(Collector):
    """The per-request metrics, ``certman_edge_requests_total{scheme,status_class}`` and
    ``certman_edge_upstream_response_seconds``: plain numbers the data path updates, the same
    names, labels, buckets and documentation as when they were ``prometheus_client``'s own."""

    REQUESTS = "certman_edge_requests"
    REQUESTS_DOC = (
        "Requests answered on the site ports (HTTP and HTTPS), by scheme and status class "
        "(the upstream's status when proxied, else the edge's own answer)."
    )
    UPSTREAM = "certman_edge_upstream_response_seconds"
    UPSTREAM_DOC = (
        "Proxied requests: from sending the request upstream to its response's headers "
        "(connection included; failures are in certman_edge_upstream_errors_total)."
    )

    def __init__(self, schemes: tuple[str, ...]) -> None:
        # Every scheme and class from the start, so that rate() has a series before the first.
        self.requests = {scheme: [0] * len(STATUS_CLASSES) for scheme in schemes}
        self.created = time.time()
        self.upstream_seconds = PlainHistogram(UPSTREAM_BUCKETS)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            self.REQUESTS, self.REQUESTS_DOC, labels=("scheme", "status_class")
        )
        created = self.created if _CREATED else None
        for scheme, row in self.requests.items():
            for klass, count in zip(STATUS_CLASSES, row, strict=True):
                requests.add_metric((scheme, klass), float(count), created=created)
        yield requests
        yield self.upstream_seconds.family(self.UPSTREAM, self.UPSTREAM_DOC)
