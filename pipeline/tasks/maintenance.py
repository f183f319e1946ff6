"""Beat's tasks: start due work, and keep the fleet alive unattended."""

from __future__ import annotations

import logging

from celery import Task

from pipeline import dispatch
from pipeline.celery import app
from pipeline.connections import get_redis
from pipeline.db import session_scope
from pipeline.settings import get_settings
from pipeline.tasks.issuance import enqueue_chain

log = logging.getLogger(__name__)


@app.task(name="certman.maintenance.dispatch", bind=True, acks_late=True)
def dispatch_due(self: Task) -> int:
    """Start orders for due sites and renewals, as many as the in-flight bound allows."""
    settings = get_settings()
    lock = get_redis().lock(f"{settings.redis_prefix}:lock:dispatch", timeout=120, blocking=False)
    if not lock.acquire():
        return 0  # another dispatcher is at it; beat will call again
    try:
        with session_scope() as session:
            started = dispatch.start_due(session, limit=settings.max_orders_in_flight)
        for item in started:
            enqueue_chain(item.order_id, item.domain, item.step, item.queue)
        if started:
            log.info("started %d orders", len(started))
        return len(started)
    finally:
        lock.release()


def kick_dispatch() -> None:
    """Ask for a dispatch now instead of at beat's next tick (after adding sites)."""
    dispatch_due.apply_async(queue="issuance")
