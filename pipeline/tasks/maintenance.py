"""Beat's tasks: start due work, and keep the fleet alive unattended.

Thin tasks: each takes the process's runtime (:mod:`pipeline.runtime`) and hands its parts to
the plain functions of dispatch, renewal, upkeep, snapshot and alerts.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import Task

from pipeline import runtime
from pipeline.celery import app
from pipeline.errors import AttemptFailed, RetryLater
from pipeline.fleet import alerts, dispatch, renewal, retention, upkeep
from pipeline.issuance import OrderSteps
from pipeline.locks import release
from pipeline.models.base import utcnow
from pipeline.tasks.issuance import enqueue_chain

log = logging.getLogger(__name__)


# No task events (pipeline.celery.QUIET_TASKS): every 15 s in Flower it buries the rest.
@app.task(name="certman.maintenance.dispatch", bind=True, acks_late=True, send_events=False)
def dispatch_due(self: Task) -> int:
    """Start orders for due sites and renewals, as many as the in-flight bound allows."""
    process = runtime.current()
    settings = process.settings
    lock = process.redis.lock(f"{settings.redis_prefix}:lock:dispatch", timeout=120, blocking=False)
    if not lock.acquire():
        # Another dispatch is at it, and may have looked before the order that asked for this
        # one ended: look again shortly rather than leave its slot empty until beat's next tick.
        if self.request.retries < 3:
            raise self.retry(countdown=1.0)
        return 0
    try:
        _rebuild_if_lost(process)
        with process.session_scope() as session:
            started = dispatch.start_due(
                session, limit=settings.max_orders_in_flight, profile=settings.acme_profile
            )
        for item in started:
            enqueue_chain(item.order_id, item.domain, item.step, item.queue)
        if started:
            log.info("started %d orders", len(started))
        return len(started)
    finally:
        release(lock)


def _rebuild_if_lost(process: runtime.Runtime) -> int | None:
    """Rebuild the edges' snapshot if Redis lost it (a restart without persistence): the
    number of sites rebuilt, or None when it was there."""
    publisher = process.publisher
    if publisher.exists():
        return None
    with process.session_scope() as session:
        count = publisher.resync(session)
    log.warning("edge snapshot was missing from Redis; rebuilt %d sites", count)
    return count


def kick_dispatch() -> None:
    """Ask for a dispatch now instead of at beat's next tick (after adding sites)."""
    dispatch_due.apply_async(queue="issuance")


# --- upkeep (issue 7): thin tasks over pipeline.fleet.upkeep and pipeline.fleet.renewal -----------
# Each is idempotent: a sweep claims orders with a conditional UPDATE, a refresh rewrites what the
# CA says, an alert is deduplicated in Redis. Overlapping runs are harmless, retries are safe.
ARI_INTERVAL_DEFAULT = 600.0


def _beat_interval(entry: str, default: float) -> float:
    # The batch is sized from beat's own schedule, so each certificate is checked about once per
    # CERTMAN_ARI_REFRESH_HOURS whatever the interval someone configures.
    schedule = (app.conf.beat_schedule or {}).get(entry, {}).get("schedule")
    if isinstance(schedule, timedelta):
        return schedule.total_seconds()
    if isinstance(schedule, (int, float)):
        return float(schedule)
    return default


@app.task(name="certman.maintenance.sweep_stuck_orders", bind=True, acks_late=True)
def sweep_stuck_orders(self: Task, lost: bool = False) -> dict[str, int]:
    """Re-send the chain of orders nothing has touched for a while; give up after N tries.

    ``lost``: Redis came back without its data (beat found its schedule gone), so every order
    in flight lost its message: each is sent again now, whatever its age, without counting a
    try (a copy of a chain still running is harmless: the order lock and the step checks)."""
    process = runtime.current()
    settings = process.settings
    with process.session_scope() as session:
        sweep = upkeep.sweep_stuck(
            session,
            now=utcnow(),
            stuck_after=0 if lost else settings.stuck_after,
            max_tries=settings.stuck_max_tries,
            count_tries=not lost,
        )
    # After the commit: a worker must find the claimed row the message talks about.
    why = "whose message Redis lost" if lost else "stuck"
    for item in sweep.requeue:
        log.warning("order %s for %s %s at %s: sent again", item.order_id, item.domain,
                    why, item.step)  # fmt: skip
        enqueue_chain(item.order_id, item.domain, item.step, item.queue)
    upkeep.fail_exhausted(
        sweep, max_tries=settings.stuck_max_tries, fail_order=OrderSteps(process).fail_order
    )
    return {"requeued": len(sweep.requeue), "failed": len(sweep.exhausted)}


@app.task(name="certman.maintenance.refresh_ari", bind=True, acks_late=True)
def refresh_ari(self: Task) -> dict[str, int]:
    """Ask each issuer for the ARI window of the stalest batch of the certificates it issued
    (a CA knows only its own)."""
    from pipeline.crypto.keys import PublicKey

    process = runtime.current()
    settings = process.settings
    totals = {"checked": 0, "moved": 0, "errors": 0}
    lock = process.redis.lock(
        f"{settings.redis_prefix}:lock:refresh-ari", timeout=600, blocking=False
    )
    if not lock.acquire():
        return totals  # a slow previous run is still at it
    try:
        period = timedelta(hours=settings.ari_refresh_hours)
        with process.session_scope() as session:
            total = renewal.count_current(session)
        limit = renewal.ari_batch_size(
            total,
            interval=_beat_interval("refresh-ari", ARI_INTERVAL_DEFAULT),
            period=period.total_seconds(),
        )
        edge_key_id = (
            PublicKey.load(settings.edge_public_key).key_id if settings.edge_public_key else None
        )
        for position, issuer in enumerate(settings.issuer_list):
            try:
                client = process.acme_for(issuer.name)
            except (RetryLater, AttemptFailed) as exc:
                # That CA is unreachable or refuses us now: the others are still asked.
                log.warning("ARI refresh skips issuer %s: %s", issuer.name, exc)
                continue
            # An issuer without ARI is asked nothing (its window is None at once): its
            # certificates are recorded as such, for certman domains show.
            result = renewal.refresh_ari(
                process.session_scope,
                client.renewal_window,
                now=utcnow(),
                period=period,
                limit=limit,
                edge_key_id=edge_key_id,
                issuer=issuer.name,
                first_issuer=position == 0,
            )
            for key in totals:
                totals[key] += getattr(result, key)
    finally:
        release(lock)
    if totals["checked"]:
        log.info("ARI: %d checked, %d renewal times moved", totals["checked"], totals["moved"])
    return totals


# Fixes per run: enough for any drift that single lost publishes make, bounded so that one run
# never republishes a whole fleet (a snapshot that is wholly wrong is resync's job).
RECONCILE_LIMIT = 1000


@app.task(name="certman.maintenance.reconcile_snapshot", bind=True, acks_late=True)
def reconcile_snapshot(self: Task) -> dict[str, int]:
    """Make the edges' snapshot match the store where a publish was lost."""
    process = runtime.current()
    # Rebuilt here, not left to the next dispatch: an order finishing across the restart
    # publishes its one site first, and dispatch, which rebuilds only a snapshot that is
    # missing, would then leave the rest unpublished (beat sends this task as soon as Redis is
    # back).
    rebuilt = _rebuild_if_lost(process)
    if rebuilt is not None:
        return {"stale": rebuilt, "extra": 0}
    drift = process.publisher.reconcile(process.session_scope, limit=RECONCILE_LIMIT)
    return {"stale": len(drift.stale), "extra": len(drift.extra)}


@app.task(name="certman.maintenance.check_expiry", bind=True, acks_late=True)
def check_expiry(self: Task) -> int:
    """Alert on certificates running out of life unrenewed, and on sites failing repeatedly."""
    process = runtime.current()
    settings = process.settings
    with process.session_scope() as session:
        found = upkeep.expiring_alerts(session, now=utcnow(), fraction=settings.alert_fraction)
        found += upkeep.failing_alerts(session, threshold=settings.alert_consecutive_failures)
    raised = alerts.raise_alerts(
        found, send=_queue_webhook, client=process.redis, settings=settings
    )
    return len(raised)


@app.task(name="certman.maintenance.prune_attempts", bind=True, acks_late=True)
def prune_attempts(self: Task) -> int:
    """Delete attempt rows older than CERTMAN_ATTEMPTS_RETENTION_DAYS, in batches."""
    process = runtime.current()
    days = process.settings.attempts_retention_days
    deleted = retention.prune_attempts(
        process.session_scope, before=utcnow() - timedelta(days=days)
    )
    if deleted:
        log.info("pruned %d attempt rows older than %g days", deleted, days)
    return deleted


def _queue_webhook(payload: dict[str, Any]) -> None:
    send_alert_webhook.apply_async((payload,), queue="maintenance")


@app.task(
    name="certman.maintenance.send_alert_webhook",
    bind=True,
    acks_late=True,
    autoretry_for=(alerts.WebhookUnavailable,),
    retry_backoff=5,
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=12,
)
def send_alert_webhook(self: Task, payload: dict[str, Any]) -> None:
    """POST one alert to CERTMAN_ALERT_WEBHOOK; retried with backoff while the receiver is down."""
    url = runtime.current().settings.alert_webhook
    if not url:
        return  # unset since the alert was queued
    try:
        alerts.post_webhook(url, payload)
    except alerts.WebhookRefused as exc:
        log.error("alert webhook refused the alert for %s: %s", payload.get("domain"), exc)
