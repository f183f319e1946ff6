"""Locks whose work outlives them: released quietly, and never someone else's."""

from __future__ import annotations

import logging

import pytest
import redis

from pipeline.locks import release
from tests.support.ports import wait_until


def test_a_lock_that_expired_under_its_work_is_released_quietly(
    redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    mine = redis_client.lock("test:lock:order:1", timeout=0.1)
    assert mine.acquire(blocking=False)
    wait_until(
        lambda: not redis_client.exists("test:lock:order:1"), timeout=5, what="the lock to lapse"
    )
    theirs = redis_client.lock("test:lock:order:1", timeout=30)
    assert theirs.acquire(blocking=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.locks"):
        release(mine)  # the work is done: no LockNotOwnedError to fail its task
    assert theirs.owned()  # and the lock another run holds now is left alone
    assert "expired before its work ended" in caplog.text
