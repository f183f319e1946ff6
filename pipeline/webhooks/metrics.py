"""Webhook deliveries as Prometheus series, summed over the worker's pool like the issuance
steps' (:mod:`pipeline.worker_metrics`: prometheus_client's multiprocess mode).

* ``certman_webhook_deliveries_total{outcome}``: attempts by how they ended (:data:`OUTCOMES`);
* ``certman_webhook_delivery_failures_total{reason}``: failed attempts by why
  (:data:`REASONS`). No label names a receiver or a domain.
"""

from __future__ import annotations

from prometheus_client import Counter

# delivered: a 2xx; retry: failed, tried again later; gave_up: failed past the bound.
OUTCOMES = ("delivered", "retry", "gave_up")
REASONS = (
    "http_4xx", "http_5xx", "redirect", "http_other", "connection", "timeout", "tls", "dns",
    "refused_address", "unreadable_secret",
)  # fmt: skip

DELIVERIES = Counter(
    "certman_webhook_deliveries_total",
    "Webhook delivery attempts, by how they ended (delivered, retry, gave_up).",
    ["outcome"],
)
FAILURES = Counter(
    "certman_webhook_delivery_failures_total",
    "Failed webhook delivery attempts, by why.",
    ["reason"],
)


def observe(outcome: str, reason: str | None) -> None:
    DELIVERIES.labels(outcome if outcome in OUTCOMES else "retry").inc()
    if reason is not None:
        FAILURES.labels(reason if reason in REASONS else "http_other").inc()
