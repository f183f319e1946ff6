"""The issuance chain: one thin task per step over :class:`pipeline.issuance.OrderSteps`.

Task names say the step and arguments carry the domain, so Flower shows which site is where.
Each task hands the step the process's runtime (:mod:`pipeline.runtime`).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import redis
from celery import Task, chain
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from pipeline import issuance, runtime, worker_metrics
from pipeline.celery import app
from pipeline.errors import AttemptFailed, PollAgain, RetryLater
from pipeline.fleet import chain as steps_of_chain
from pipeline.fleet.chain import Step
from pipeline.issuance import OrderSteps
from pipeline.locks import release
from pipeline.logformat import log_context
from pipeline.models import OrderStep

log = logging.getLogger(__name__)

_TASK_OPTIONS: dict[str, Any] = {"bind": True, "acks_late": True, "max_retries": None}
_STEP = {step.name: step for step in steps_of_chain.STEPS}


def _run(task: Task, step: Step, order_id: int, domain: str) -> None:
    # Every line the step logs, certman's or a library's, says which order and step it is
    # about (the JSON log format's fields; pipeline.logformat).
    with log_context(domain=domain, order_id=order_id, step=step.name):
        _run_step(task, step, order_id, domain)


def _run_step(task: Task, step: Step, order_id: int, domain: str) -> None:
    process = runtime.current()
    steps = OrderSteps(process)
    # Two copies of a step for one order (a sweeper re-enqueue racing a slow original) must not
    # both talk to the CA: the second waits its turn, then finds the step already done.
    lock = process.redis.lock(
        # Longer than a step takes (a few requests of at most 30 s each), short enough that a
        # SIGKILLed worker's lock does not hold up the redelivered step for long.
        f"{process.settings.redis_prefix}:lock:order:{order_id}",
        timeout=90,
        blocking=False,
    )
    if not lock.acquire():
        raise _retry(task, 5 + random.random() * 5)
    try:
        with worker_metrics.timed_step(step.name):
            steps.run(step, order_id)
        if step.ends_order:
            _order_slot_freed(process)
    except issuance.OrderGone:
        log.info("order %s for %s is gone; nothing to do", order_id, domain)
    except AttemptFailed as problem:
        steps.fail_order(order_id, step.name, problem)
        _order_slot_freed(process)
    except RetryLater as problem:
        if not isinstance(problem, PollAgain):
            steps.note_retry(order_id, step.name, problem)
        countdown = min(problem.countdown, issuance.MAX_COUNTDOWN)
        # Jitter, so that workers refused together do not all come back in the same instant.
        countdown += random.uniform(0, min(1.0, countdown * 0.1))
        log.info("order %s for %s waits %.1fs at %s: %s", order_id, domain, countdown, step.name,
                 problem.reason)  # fmt: skip
        raise _retry(task, countdown) from None
    finally:
        _release(lock)


def _release(lock: Any) -> None:
    try:
        release(lock)
    except redis.RedisError as exc:
        # Redis away (a restart, a failover): the lock lapses by its timeout. Raising would put
        # a failure in place of the step's outcome (its retry, its requeue), and a failed task
        # is acknowledged and gone.
        log.warning("could not release %s (%s); it lapses by its timeout", lock.name, exc)


# What sending a message raises while the broker is away (a restart, a Sentinel failover).
BROKER_AWAY = (OperationalError, redis.ConnectionError, redis.TimeoutError, OSError)
# A step's retry, or the next step, is sent through a broker that may be away: kept trying for
# about 35 s (a Sentinel promotes a replica in a few seconds), where Celery's default policy
# gives up after about one.
RETRY_PUBLISH_POLICY: dict[str, float] = {
    "max_retries": 20,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 2,
}


def _retry(task: Task, countdown: float) -> BaseException:
    """``task.retry(countdown=...)``'s exception, for the caller to raise.

    Celery sends the retry as a new message and then acknowledges this one; when it cannot send
    (the broker away past :data:`RETRY_PUBLISH_POLICY`), it rejects this one without
    requeueing: the step would be dropped, and an order stored but not yet published would wait
    for the reconcile. The message is asked back instead: requeued, or, when the broker is still
    away, left unacknowledged for the visibility timeout to return (pipeline.consumer). The
    copy runs the step again, which is idempotent.

    ``throw=False``: the caller raises the retry outside the step's exception, ``from None``.
    Raised inside ``task.retry``, it carried the step's exception as its context, and Celery's
    retry handling formats every frame of both into a traceback nobody reads, once for every
    wait of every order (docs/architecture.md section 6 has what it cost).
    """
    try:
        retried: BaseException = task.retry(
            countdown=countdown, retry=True, retry_policy=RETRY_PUBLISH_POLICY, throw=False
        )
    except Reject as rejected:
        if rejected.requeue or not isinstance(rejected.reason, BROKER_AWAY):
            raise
        log.warning("could not send the retry (%s); the task is requeued", rejected.reason)
        requeued: BaseException = Reject(rejected.reason, requeue=True)
        return requeued
    return retried


# At most one dispatch asked for per this many seconds by finishing orders.
DISPATCH_DEBOUNCE = 0.5


def _order_slot_freed(process: runtime.Runtime) -> None:
    # An order ended, so one more may start: ask for a dispatch soon rather than at beat's next
    # tick, or a bulk onboarding would go in steps of CERTMAN_MAX_ORDERS_IN_FLIGHT per tick.
    # One request per DISPATCH_DEBOUNCE, not one per order: that dispatch fills every slot freed
    # meanwhile, where a task per order cost two queries per certificate. The flag lapses before
    # the dispatch runs, so an order that found it set ended before the dispatch looks.
    flag = f"{process.settings.redis_prefix}:dispatch-requested"
    try:
        first = process.redis.set(flag, 1, nx=True, px=int(DISPATCH_DEBOUNCE * 800))
    except redis.RedisError as exc:
        # The order is stored either way; beat's next dispatch fills the slot.
        log.warning("could not ask for a dispatch now (%s); beat will dispatch", exc)
        return
    if first:
        app.send_task("certman.maintenance.dispatch", queue="issuance", countdown=DISPATCH_DEBOUNCE)


@app.task(name="certman.issue.place_order", **_TASK_OPTIONS)
def place_order(self: Task, order_id: int, domain: str) -> None:
    _run(self, _STEP["place_order"], order_id, domain)


@app.task(name="certman.issue.publish_challenges", **_TASK_OPTIONS)
def publish_challenges(self: Task, order_id: int, domain: str) -> None:
    _run(self, _STEP["publish_challenges"], order_id, domain)


@app.task(name="certman.issue.poll_validation", **_TASK_OPTIONS)
def poll_validation(self: Task, order_id: int, domain: str) -> None:
    _run(self, _STEP["poll_validation"], order_id, domain)


@app.task(name="certman.issue.finalise", **_TASK_OPTIONS)
def finalise(self: Task, order_id: int, domain: str) -> None:
    _run(self, _STEP["finalise"], order_id, domain)


@app.task(name="certman.issue.encrypt_and_store", **_TASK_OPTIONS)
def encrypt_and_store(self: Task, order_id: int, domain: str) -> None:
    _run(self, _STEP["encrypt_and_store"], order_id, domain)


STEPS: list[tuple[OrderStep, Task]] = [
    (OrderStep.QUEUED, place_order),
    (OrderStep.PLACED, publish_challenges),
    (OrderStep.CHALLENGED, poll_validation),
    (OrderStep.READY, finalise),
    (OrderStep.ISSUED, encrypt_and_store),
]


def enqueue_chain(order_id: int, domain: str, step: OrderStep, queue: str) -> None:
    """Send the chain from ``step`` to the end; call only after the order's row is committed."""
    index = next(i for i, (s, _) in enumerate(STEPS) if s == step)
    # Each step sends the next as it ends: through a broker that may be away for a moment (a
    # failover), where Celery's default policy gives up after about a second and fails the step
    # that just succeeded, leaving the order to the stuck-order sweeper.
    signatures = [
        task.si(order_id, domain).set(queue=queue, retry_policy=RETRY_PUBLISH_POLICY)
        for _, task in STEPS[index:]
    ]
    chain(*signatures).apply_async()
