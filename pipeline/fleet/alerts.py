"""Alerts: Let's Encrypt sends no expiry emails any more, so certman must say it itself.

An alert is an ERROR log line (domain, expiry, last error), a count in Redis that the exporter
publishes as ``certman_alerts_total``, and, when ``CERTMAN_ALERT_WEBHOOK`` is set, a JSON POST
sent by a Celery task with retries, so that a slow or dead receiver never holds up the
pipeline. Each alert is raised at most once per subject and condition a day (a Redis SET NX
with a TTL), however often beat runs the check and however many workers run it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
import requests
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from pipeline.models.base import utcnow
from pipeline.outbound import redact_url, scrub_url
from pipeline.settings import Settings

log = logging.getLogger(__name__)

DEDUP_SECONDS = 24 * 3600
WEBHOOK_TIMEOUT = 10.0


@dataclass(frozen=True)
class Alert:
    condition: str  # "expiring" (little life left, not renewed) or "failing" (attempts failing)
    subject: str  # what deduplication is keyed on: "certificate:<id>" or "site:<id>"
    domain: str
    not_after: datetime | None
    last_error: str | None
    detail: str

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON body."""
        return {
            "source": "certman",
            "condition": self.condition,
            "domain": self.domain,
            "not_after": self.not_after.isoformat() if self.not_after else None,
            "last_error": self.last_error,
            "detail": self.detail,
            "subject": self.subject,
            "raised_at": utcnow().isoformat(),
        }


def _key(prefix: str, alert: Alert) -> str:
    return f"{prefix}:alert:{alert.condition}:{alert.subject}"


def _counts_key(prefix: str) -> str:
    return f"{prefix}:alerts:raised"


def raise_alerts(
    alerts: Iterable[Alert],
    *,
    client: redis.Redis[Any],
    settings: Settings,
    send: Callable[[dict[str, Any]], object] | None = None,
) -> list[Alert]:
    """Raise each alert not raised in the last day; returns those raised now.

    ``send`` hands the payload to the webhook task (``send_alert_webhook.delay``); it is called
    only when a webhook is configured.
    """
    r = client
    raised = []
    for alert in alerts:
        key = _key(settings.redis_prefix, alert)
        if not r.set(key, utcnow().isoformat(), nx=True, ex=DEDUP_SECONDS):
            continue
        log.error(
            "ALERT %s: %s: %s; expires %s; last error: %s",
            alert.condition,
            alert.domain,
            alert.detail,
            alert.not_after.isoformat() if alert.not_after else "-",
            alert.last_error or "-",
        )
        r.hincrby(_counts_key(settings.redis_prefix), alert.condition, 1)
        if settings.alert_webhook and send is not None:
            try:
                send(alert.payload())
            except Exception:
                # Not sent: forget the deduplication so that the next check raises it again.
                r.delete(key)
                log.exception("could not queue the webhook for %s", alert.domain)
                continue
        raised.append(alert)
    return raised


class WebhookUnavailable(Exception):
    """The receiver could not take the alert now (network, 5xx, 429): worth retrying."""


class WebhookRefused(Exception):
    """The receiver refused the alert (4xx): retrying will not help."""


_URLLIB3_LOG = logging.getLogger("urllib3.connectionpool")


class _Scrub(logging.Filter):
    """Rewrites a record that quotes ``url`` (or its path) into one that does not."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = scrub_url(message, self.url)
        if scrubbed != message:
            record.msg, record.args = scrubbed, ()
        return True


def post_webhook(url: str, payload: dict[str, Any], *, timeout: float = WEBHOOK_TIMEOUT) -> None:
    """POST one alert to ``url``.

    Redirects are not followed: requests would follow a 301, 302 or 303 as a GET (and a 307 or
    308 with the body) to wherever the receiver points, an address nobody configured. A 3xx is
    a refusal that names where it points, so the operator can look for the final address.

    The URL is a secret (receivers put their token in its path or query): log lines and errors
    show it, and a redirect's Location, as ``scheme://host[:port]/…`` only
    (:func:`pipeline.outbound.redact_url`), and requests' own messages are scrubbed of it.
    """
    shown = redact_url(url)
    # urllib3 logs each request's path and query at DEBUG: scrubbed while this one is made.
    scrub = _Scrub(url)
    _URLLIB3_LOG.addFilter(scrub)
    try:
        response = requests.post(url, json=payload, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        # Not chained: a traceback of requests' exception would print the URL after all.
        raise WebhookUnavailable(f"{shown}: {scrub_url(str(exc), url)}") from None
    finally:
        _URLLIB3_LOG.removeFilter(scrub)
    if 300 <= response.status_code < 400:
        location = response.headers.get("Location")
        target = redact_url(location) if location else "(no Location)"
        log.warning(
            "alert webhook %s answered HTTP %d, redirecting to %s: not followed",
            shown,
            response.status_code,
            target,
        )
        raise WebhookRefused(
            f"{shown}: HTTP {response.status_code} redirect to {target} not followed; "
            "set CERTMAN_ALERT_WEBHOOK to the final address"
        )
    if response.status_code >= 500 or response.status_code == 429:
        raise WebhookUnavailable(f"{shown}: HTTP {response.status_code}")
    if response.status_code >= 400:
        body = scrub_url(response.text[:200], url)
        raise WebhookRefused(f"{shown}: HTTP {response.status_code}: {body}")


class AlertCountCollector(Collector):
    """``certman_alerts_total{condition}``: alerts raised by any worker, counted in Redis."""

    def __init__(self, client: redis.Redis[Any], prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def collect(self) -> Iterator[CounterMetricFamily]:
        counter = CounterMetricFamily(
            "certman_alerts", "Alerts raised (deduplicated: once a day each).", labels=["condition"]
        )
        raw: dict[bytes, bytes] = self.client.hgetall(_counts_key(self.prefix))
        # Both known conditions always appear, so that rate() works from the first alert on.
        counts = {"expiring": 0.0, "failing": 0.0}
        counts.update({k.decode(): float(v) for k, v in raw.items()})
        for condition, n in sorted(counts.items()):
            counter.add_metric([condition], n)
        yield counter
