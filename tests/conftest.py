"""Fixtures shared by every test: real Redis, real PostgreSQL, SQLite and Pebble.

Redis tests use one database number (CERTMAN_TEST_REDIS_DB, default 15), flushed around each
test, so that the machine's other Redis users are never touched.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

REDIS_HOST = os.environ.get("CERTMAN_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CERTMAN_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("CERTMAN_TEST_REDIS_DB", "15"))


@pytest.fixture
def redis_url() -> str:
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()
