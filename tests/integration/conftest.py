from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.support.system import System


@pytest.fixture
def system(redis_url: str, redis_client: redis.Redis) -> Iterator[System]:
    """Pebble + edge + (started by the test) Celery workers, on this test's Redis database."""
    with System(redis_url=redis_url) as system:
        yield system
