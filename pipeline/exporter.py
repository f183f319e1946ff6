"""``certman exporter``: the fleet's inventory as Prometheus metrics, computed from the store.

Workers come and go and hold nothing worth scraping; the store and Redis hold the truth. Each
scrape runs a handful of aggregate queries on indexed columns (sites by state, certificates
by expiry and renewal time, orders by step and age, recent failed attempts), whatever the size
of the fleet, and reads the rate limiter's buckets and the alert counts from Redis.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from pipeline.acme.ratelimit import RateLimiter
from pipeline.db import session_scope
from pipeline.fleet import renewal, upkeep
from pipeline.fleet.dispatch import UNFINISHED
from pipeline.models import Attempt, Certificate, Order, Site, SiteState
from pipeline.models.base import utcnow
from pipeline.settings import Settings

log = logging.getLogger(__name__)

EXPIRY_HORIZONS = (7, 14)  # days


class InventoryCollector(Collector):
    """Gauges over the store, recomputed at every scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("certman_store_up", "1 if the last scrape could read the store.")
        try:
            metrics = list(self._inventory())
        except SQLAlchemyError as exc:
            log.warning("exporter: store unavailable: %s", str(exc).splitlines()[0])
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from metrics

    def _inventory(self) -> Iterator[Metric]:
        now = utcnow()
        with session_scope(self.settings.effective_database_url) as session:
            by_state = {
                str(state): n
                for state, n in session.execute(
                    select(Site.state, func.count()).group_by(Site.state)
                ).tuples()
            }
            sites = GaugeMetricFamily("certman_sites", "Sites by state.", labels=["state"])
            for state in SiteState:
                sites.add_metric([state.value], float(by_state.get(state.value, 0)))
            yield sites

            current = renewal.count_current(session)
            yield GaugeMetricFamily(
                "certman_certificates", "Current (served) certificates.", value=current
            )

            expiring = GaugeMetricFamily(
                "certman_certificates_expiring",
                "Current certificates expiring within the horizon (expired ones included).",
                labels=["within"],
            )
            for days in EXPIRY_HORIZONS:
                n = session.scalar(
                    select(func.count())
                    .select_from(Certificate)
                    .where(Certificate.current, Certificate.not_after <= now + timedelta(days=days))
                )
                expiring.add_metric([f"{days}d"], float(n or 0))
            yield expiring

            soonest = session.scalar(
                select(func.min(Certificate.not_after)).where(Certificate.current)
            )
            if soonest is not None:
                yield GaugeMetricFamily(
                    "certman_certificate_soonest_expiry_timestamp_seconds",
                    "When the first current certificate expires (Unix time).",
                    value=soonest.timestamp(),
                )

            due = session.scalar(
                select(func.count())
                .select_from(Certificate)
                .where(Certificate.current, Certificate.renew_at <= now)
            )
            yield GaugeMetricFamily(
                "certman_certificates_renewal_due",
                "Current certificates past their renewal time (the renewal backlog).",
                value=float(due or 0),
            )

            alerting = upkeep.count_expiring(
                session, now=now, fraction=self.settings.alert_fraction
            )
            yield GaugeMetricFamily(
                "certman_certificates_alerting",
                "Current certificates with less than CERTMAN_ALERT_FRACTION of their life left.",
                value=float(alerting),
            )

            in_flight = GaugeMetricFamily(
                "certman_orders_in_flight", "Unfinished orders by step.", labels=["step"]
            )
            by_step = {
                str(step): n
                for step, n in session.execute(
                    select(Order.step, func.count())
                    .where(Order.step.in_(UNFINISHED))
                    .group_by(Order.step)
                ).tuples()
            }
            for step in UNFINISHED:
                in_flight.add_metric([step.value], float(by_step.get(step.value, 0)))
            yield in_flight

            stuck = upkeep.count_stuck(session, now=now, stuck_after=self.settings.stuck_after)
            yield GaugeMetricFamily(
                "certman_orders_stuck",
                "Unfinished orders untouched for longer than CERTMAN_STUCK_AFTER.",
                value=float(stuck),
            )

            failed = session.scalar(
                select(func.count())
                .select_from(Attempt)
                .where(
                    Attempt.created_at >= now - timedelta(hours=1),
                    Attempt.outcome.in_(["failed", "blocked"]),
                )
            )
            yield GaugeMetricFamily(
                "certman_attempts_failed_last_hour",
                "Issuance attempts that ended in failure in the last hour.",
                value=float(failed or 0),
            )


def build_registry(
    settings: Settings, client: redis.Redis[Any], limiter: RateLimiter
) -> CollectorRegistry:
    """``client`` and ``limiter``: the process's (its runtime's), for the alert counts and
    the first issuer's buckets."""
    from pipeline.acme.ratelimit import RateLimitCollector
    from pipeline.fleet.alerts import AlertCountCollector
    from pipeline.worker_metrics import register_build_and_process

    registry = CollectorRegistry(auto_describe=False)
    register_build_and_process(registry)
    registry.register(InventoryCollector(settings))
    registry.register(RateLimitCollector(limiter))
    registry.register(AlertCountCollector(client, settings.redis_prefix))
    return registry


def serve(
    settings: Settings,
    client: redis.Redis[Any],
    limiter: RateLimiter,
    *,
    port: int,
    address: str = "127.0.0.1",
) -> Any:
    """Start the HTTP server in a thread; returns the server (``shutdown()`` stops it)."""
    registry = build_registry(settings, client, limiter)
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server


def run_forever(
    settings: Settings, client: redis.Redis[Any], limiter: RateLimiter, *, port: int, address: str
) -> None:
    # A service: its own lines at INFO, whatever level the certman command logs the rest at.
    log.setLevel(logging.INFO)
    server = serve(settings, client, limiter, port=port, address=address)
    log.info("exporter serving http://%s:%d/metrics", address, port)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
