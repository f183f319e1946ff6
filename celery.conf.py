"""Celery configuration for certman, loaded by path from pipeline/celery.py.

(It cannot be imported as ``celery.conf``: that name is inside the celery package.)
"""

from __future__ import annotations

from datetime import timedelta

from kombu import Queue

from pipeline.settings import get_settings

_settings = get_settings()

broker_url = _settings.redis_url
broker_connection_retry_on_startup = True
# Longer than the longest countdown any task gives itself (waits are capped at 15 minutes), so
# the Redis transport seldom redelivers a task that is merely waiting; when it does, the order
# lock and the step checks make the copy harmless.
broker_transport_options = {"visibility_timeout": _settings.broker_visibility_timeout}

# JSON only: a pickle payload from the broker would be code execution in every worker.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

# Progress lives in the database; nothing reads task results.
task_ignore_result = True
# A task is acknowledged after it ran, and requeued if its worker dies mid-way: every task is
# idempotent, so running twice is safe and losing one is not.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

# Three queues, so that a renewal wave cannot starve a new customer's first certificate: a worker
# consuming several queues takes from each in turn.
task_queues = (Queue("issuance"), Queue("renewals"), Queue("maintenance"))
task_default_queue = "issuance"
task_routes = {"certman.maintenance.*": {"queue": "maintenance"}}

# Flower needs events; `celery -A pipeline worker -E` or this turns them on.
worker_send_task_events = True
task_send_sent_event = True

timezone = "UTC"
enable_utc = True

beat_schedule = {
    # Starts due first issues, retries and renewals (renewal times are fixed in the store).
    "dispatch": {"task": "certman.maintenance.dispatch", "schedule": timedelta(seconds=15)},
    "refresh-ari": {"task": "certman.maintenance.refresh_ari", "schedule": timedelta(minutes=10)},
    "check-expiry": {"task": "certman.maintenance.check_expiry", "schedule": timedelta(minutes=30)},
    # The backstop for a publish to the edges that was lost after the store's commit.
    "reconcile-snapshot": {
        "task": "certman.maintenance.reconcile_snapshot",
        "schedule": timedelta(minutes=10),
    },
    "sweep-stuck-orders": {
        "task": "certman.maintenance.sweep_stuck_orders",
        "schedule": timedelta(minutes=2),
    },
}
