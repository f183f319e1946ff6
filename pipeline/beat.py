"""Beat that rides out Redis: celery-redbeat's scheduler, kept alive through a restart.

redbeat keeps beat's lock and its schedule in Redis, and leaves three things to the caller
that a Redis restart or a Sentinel failover brings about:

- its tick extends the lock with no error handling, so a ``ConnectionError`` while Redis is
  away, or a ``LockNotOwnedError`` once it is back without the lock key, ends the beat
  (CRITICAL, exit 1);
- the lock is taken once, when beat starts (``beat_init``); a failure there is swallowed and
  the next tick dies on a lock that is None;
- the schedule is written once, at start: a Redis restarted without its data comes back with
  no schedule, and a beat that stayed up would never send a task again.

:class:`Scheduler` treats each as a state to recover from: while Redis is away it logs one
line and schedules nothing; a lost lock is taken again if free (another beat may have taken
over meanwhile: this one then stands by); a lost schedule is written again, and because a
Redis that lost its schedule lost the broker's queues with it, the tasks that put the fleet
back in order are sent at once: the snapshot reconcile (the edges' snapshot is gone too) and a
sweep that sends again the chains of every order in flight (their messages are gone).
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import kombu.exceptions
import redis
from celery.signals import beat_init
from redbeat.schedulers import (
    LUA_EXTEND_TO_SCRIPT,
    RedBeatScheduler,
    acquire_distributed_beat_lock,
    get_redis,
)

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

REDIS_ERRORS: tuple[type[Exception], ...] = (
    kombu.exceptions.OperationalError,  # kombu's name for a broker it cannot reach
    redis.ConnectionError,
    redis.TimeoutError,  # (Sentinel's MasterNotFoundError is a ConnectionError)
    # A demoted master answers writes with READONLY until the client finds the new one.
    redis.ReadOnlyError,
)
# While Redis is away, one line, then one a minute at most: a long outage must not flood the
# journal, and the operator still sees it is going on.
OUTAGE_LOG_EVERY = 60.0


class Scheduler(RedBeatScheduler):  # type: ignore[misc]  # redbeat ships no type hints
    """``beat_scheduler = "pipeline.beat:Scheduler"``."""

    lock: Any = None  # redis-py's Lock while this beat holds it
    _outage_since: float | None = None
    _outage_logged_at: float = 0.0
    _standing_by: bool = False

    def tick(self, min: Any = min, **kwargs: Any) -> float:
        try:
            if self.lock_key and not self._hold_lock():
                return float(self.max_interval)
            self._restore_schedule_if_lost()
            interval = self._send_due(min)
        except REDIS_ERRORS as exc:
            self._redis_away(exc)
            return float(self.max_interval)
        if self._outage_since is not None:
            log.warning(
                "beat: Redis reachable again after %.0f s: scheduling, and reconciling the "
                "edges' snapshot",
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
            # A failover (replication is asynchronous) or a restart from an older save can lose
            # a publication the old master had acknowledged: the edges would keep the previous
            # certificate until the periodic reconcile. Now, not in ten minutes; it is
            # idempotent, and outages are rare.
            with contextlib.suppress(*REDIS_ERRORS):
                self.app.send_task("certman.maintenance.reconcile_snapshot")
        return interval

    def setup_schedule(self) -> None:
        # At start: a beat started while Redis is away waits for it (the schedule is written
        # on the first tick that finds Redis without it) instead of exiting with a traceback.
        try:
            super().setup_schedule()
        except REDIS_ERRORS as exc:
            self._redis_away(exc)

    # --- the lock ----------------------------------------------------------------------------
    def _hold_lock(self) -> bool:
        """Extend the lock, or take it if it is free; False while another beat holds it."""
        if self.lock is not None:
            try:
                self.lock.extend(int(self.lock_timeout))
                return True
            except redis.exceptions.LockNotOwnedError:
                log.warning(
                    "beat: lost the schedule lock %s (Redis restarted, or it lapsed): "
                    "taking it again if it is free",
                    self.lock_key,
                )
                self.lock = None
        client = get_redis(self.app)
        lock = client.lock(self.lock_key, timeout=self.lock_timeout, sleep=self.max_interval)
        # As redbeat's own beat_init handler does: extend *to* the timeout, not by it.
        lock.lua_extend = client.register_script(LUA_EXTEND_TO_SCRIPT)
        if not lock.acquire(blocking=False):
            if not self._standing_by:
                log.info("beat: another beat holds the schedule lock: standing by")
                self._standing_by = True
            return False
        log.info("beat: Acquired lock")
        self._standing_by = False
        self.lock = lock
        return True

    # --- the schedule ------------------------------------------------------------------------
    def _restore_schedule_if_lost(self) -> None:
        conf = self.app.redbeat_conf
        if not conf.schedule or get_redis(self.app).exists(conf.schedule_key):
            return
        log.warning(
            "beat: Redis has lost beat's schedule (restarted without its data?): writing it "
            "again, republishing the edges' snapshot and sending again the orders in flight"
        )
        # The broker's bindings (kombu's exchange -> queue table) went with the data, and a
        # message published before a worker declares its queues again would be routed nowhere:
        # declare them first (whatever kombu's per-connection cache of declarations says).
        with self.app.connection_for_write() as connection:
            channel = connection.default_channel
            for queue in self.app.amqp.queues.values():
                queue.bind(channel).declare()
        # Their messages were in the Redis that was lost: what they would have done is done
        # now. Names, not imports: beat never loads the task modules' dependencies.
        self.app.send_task("certman.maintenance.reconcile_snapshot")
        self.app.send_task("certman.maintenance.sweep_stuck_orders", kwargs={"lost": True})
        # Last: until it is written, the next tick finds it missing and does all this again.
        self.setup_schedule()

    def _send_due(self, min: Any) -> float:
        # redbeat's tick without its lock extension (done above, with errors handled).
        remaining: list[float] = []
        try:
            for entry in self.schedule.values():
                next_time_to_run = self.maybe_due(entry, **self._maybe_due_kwargs)
                if next_time_to_run:
                    remaining.append(next_time_to_run)
        except RuntimeError:
            log.debug("beat: RuntimeError", exc_info=True)
        return float(min([*remaining, self.max_interval]))

    # --- Redis away --------------------------------------------------------------------------
    def _redis_away(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        elif now - self._outage_logged_at < OUTAGE_LOG_EVERY:
            return
        self._outage_logged_at = now
        log.warning(
            "beat: Redis unreachable (%s: %s): scheduling nothing, trying again every %.0f s",
            type(exc).__name__,
            exc,
            self.max_interval,
        )

    def close(self) -> None:
        # Releasing the lock needs Redis: a beat stopped while it is away just lets it lapse.
        try:
            super().close()
        except REDIS_ERRORS + (redis.exceptions.LockError,):
            self.lock = None


# redbeat takes the lock at start in a beat_init handler, whose failure Celery logs as an ERROR
# with a traceback: with Redis away at start, this one logs one line instead, and a tick takes
# the lock once Redis answers. (Connected when the scheduler's module is loaded, which beat
# does when it prints its banner, before it sends beat_init.)
beat_init.disconnect(acquire_distributed_beat_lock)


def _take_lock_at_start(sender: Any = None, **kwargs: Any) -> None:
    try:
        acquire_distributed_beat_lock(sender=sender, **kwargs)
    except REDIS_ERRORS as exc:
        scheduler = sender.scheduler
        if isinstance(scheduler, Scheduler):
            scheduler._redis_away(exc)
        else:
            raise


beat_init.connect(_take_lock_at_start)
