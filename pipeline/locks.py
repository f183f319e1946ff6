"""Locks' release: work that outlived its lock says so instead of failing as a task."""

from __future__ import annotations

import logging

from redis.exceptions import LockError
from redis.lock import Lock

log = logging.getLogger(__name__)


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
