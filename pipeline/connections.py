"""The process's Redis connection and rate limiter, made on first use and dropped after a fork."""

from __future__ import annotations

import logging
from typing import Any

import redis
from redis.exceptions import LockError
from redis.lock import Lock

from pipeline.ratelimit import Limits, RateLimiter
from pipeline.redis_connect import RedisTarget, sync_client
from pipeline.settings import get_settings

log = logging.getLogger(__name__)

_redis: redis.Redis[Any] | None = None
_limiter: RateLimiter | None = None


def get_redis() -> redis.Redis[Any]:
    global _redis
    if _redis is None:
        # One server, or the master the Sentinels name (asked again on every reconnection, so
        # that after a failover the next call reaches the new master).
        _redis = sync_client(
            RedisTarget.from_settings(get_settings()), socket_timeout=10, health_check_interval=30
        )
    return _redis


def get_limiter() -> RateLimiter:
    global _limiter
    if _limiter is None:
        settings = get_settings()
        _limiter = RateLimiter(
            get_redis(), Limits.from_settings(settings), prefix=settings.redis_prefix
        )
    return _limiter


def reset(*, close: bool = False) -> None:
    """Forget the connection. After a fork it must only be dropped: closing it would shut the
    socket the parent still uses."""
    global _redis, _limiter
    if close and _redis is not None:
        _redis.close()
    _redis = None
    _limiter = None


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
