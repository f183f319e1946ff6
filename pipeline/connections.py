"""The process's Redis connection and rate limiter, for commands and scripts; locks' release.

Both belong to the process's :class:`pipeline.runtime.Runtime` (made on first use, dropped after
a fork in one place); services are handed them as arguments instead of calling these.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from redis.exceptions import LockError
from redis.lock import Lock

from pipeline.acme.ratelimit import RateLimiter

log = logging.getLogger(__name__)


def get_redis() -> redis.Redis[Any]:
    """The runtime's Redis client."""
    from pipeline import runtime

    return runtime.current().redis


def get_limiter() -> RateLimiter:
    """The runtime's rate limiter."""
    from pipeline import runtime

    return runtime.current().limiter


def reset(*, close: bool = False) -> None:
    """Forget the process's runtime (:func:`pipeline.runtime.reset`). After a fork connections
    must only be dropped: closing them would shut the sockets the parent still uses."""
    from pipeline import runtime

    runtime.reset(close=close)


def release(lock: Lock) -> None:
    """Release a lock taken with a timeout.

    Work that outlived the timeout finds its lock expired, perhaps taken by someone else: say
    so rather than raise, which would turn work that is done into a failed task (and, for a
    step of the issuance chain, stop the chain until the sweeper sends it again).
    """
    try:
        lock.release()
    except LockError as exc:
        log.warning("lock %s expired before its work ended: %s", lock.name, exc)
