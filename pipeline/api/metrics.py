"""The API's Prometheus metrics, in a registry of its own (served at ``/metrics``).

Labels are the route's name, the method and the status: never a path (it holds customers'
domains, unbounded), a token or a token's name.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "certman_api_requests",
            "API requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "certman_api_request_seconds",
            "Time to answer an API request, by route.",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.refused = Counter(
            "certman_api_refused",
            "Requests refused before any work: unauthorised, forbidden, rate limited, too large.",
            ["why"],
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.seconds.labels(route).observe(seconds)
