"""certman's Celery configuration: the defaults every worker, beat and Flower start from.

The package carries them so that an installed wheel needs no checkout. An operator reads and
overrides them in a file of their own (the checkout's ``celery.conf.py`` is the example: it
starts from these and changes what it needs), named by ``CERTMAN_CELERY_CONFIG``.
"""

from __future__ import annotations

from datetime import timedelta

from kombu.entity import Queue

from pipeline.redis_connect import RedisTarget
from pipeline.settings import get_settings

_settings = get_settings()
_redis = RedisTarget.from_settings(_settings)
_broker = _redis.celery_broker()

# One Redis (redis://, rediss://, unix://), or the Sentinels (sentinel://h1:26379;...) with the
# master's name in the transport options below.
broker_url = _broker["broker_url"]
broker_connection_retry_on_startup = True
# With rediss:// kombu would otherwise fall back to CERT_NONE: verify the server, against
# CERTMAN_REDIS_CA_FILE, and present CERTMAN_REDIS_CERT_FILE/_KEY_FILE where given (None for
# redis://, unix:// and sentinel://).
broker_use_ssl = _broker["broker_use_ssl"]
# Longer than the longest countdown any task gives itself (waits are capped at 15 minutes), so
# the Redis transport seldom redelivers a task that is merely waiting; when it does, the order
# lock and the step checks make the copy harmless. With Sentinel: master_name and the
# Sentinels' own options.
broker_transport_options = {
    "visibility_timeout": _settings.broker_visibility_timeout,
    **_broker["transport_options"],
}

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
task_routes = {
    "certman.maintenance.*": {"queue": "maintenance"},
    "certman.webhooks.*": {"queue": "maintenance"},
}

# Riding out a Redis restart or failover: the broker connection is retried for ever (the
# default, said here because the fleet depends on it), and pipeline.consumer keeps a kombu
# error on closing the lost connection from ending the worker.
broker_connection_retry = True
broker_connection_max_retries = None
worker_consumer = "pipeline.consumer:Consumer"

# Flower needs events; `celery -A pipeline worker -E` or this turns them on.
worker_send_task_events = True
# But not task-sent, which the sender of every message makes: each step sends the next one, and
# every retry is a message, so it was a quarter of the events, each a Redis round trip
# (docs/architecture.md section 6 has what it cost). Flower lists a task from its
# task-received on, which carries the same name and arguments; what it no longer shows is a
# task still waiting in Redis for a worker to take it (a backlog: `celery -A pipeline
# inspect` and the queue lengths show that).
task_send_sent_event = False

timezone = "UTC"
enable_utc = True

# Beat without a single point of failure (celery-redbeat): the schedule's state and a lock live
# in Redis, under certman's prefix. Any number of `celery -A pipeline beat` may run; the one
# holding the lock schedules and renews it on every tick, the others wait for it, and one of them
# takes over at most beat_lock_timeout (+ one loop interval) after the holder died. Each entry's
# last run is kept in Redis and recorded before its task is sent, so the beat that takes over
# carries on the same schedule: an interval may be missed when a beat dies, never doubled.
# pipeline.beat's Scheduler is redbeat's, riding out a Redis restart or failover (see there).
beat_scheduler = "pipeline.beat:Scheduler"
_redbeat = _redis.redbeat()
redbeat_redis_url = _redbeat["redbeat_redis_url"]
redbeat_redis_use_ssl = _redbeat["redbeat_redis_use_ssl"]
redbeat_redis_options = _redbeat["redbeat_redis_options"]
redbeat_key_prefix = f"{_settings.redis_prefix}:redbeat:"
redbeat_lock_key = f"{_settings.redis_prefix}:redbeat:lock"
redbeat_lock_timeout = _settings.beat_lock_timeout
# The lock is renewed once a loop, and a waiting beat tries for it once a loop: a fifth of its
# timeout (at most 5 s), so that a busy tick never lets it lapse and a takeover is prompt.
beat_max_loop_interval = min(5.0, _settings.beat_lock_timeout / 5)

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
    # Attempt rows older than CERTMAN_ATTEMPTS_RETENTION_DAYS, a bounded batch a run.
    "prune-attempts": {
        "task": "certman.maintenance.prune_attempts",
        "schedule": timedelta(hours=1),
    },
    "sweep-stuck-orders": {
        "task": "certman.maintenance.sweep_stuck_orders",
        "schedule": timedelta(minutes=2),
    },
    # Webhooks to the platform: due deliveries (and retries) sent; certificate.expiring and
    # the pruning of old deliveries.
    "webhooks-dispatch": {"task": "certman.webhooks.dispatch", "schedule": timedelta(seconds=5)},
    "webhooks-upkeep": {"task": "certman.webhooks.upkeep", "schedule": timedelta(minutes=30)},
}
