"""Fixtures shared by every test: real Redis, real PostgreSQL, SQLite and Pebble.

Redis tests get a redis-server of this pytest session's own (started on first use, on a free
port, keeping nothing on disk, stopped at the end), flushed around each test: two runs on one
machine, or a run and the machine's other Redis users, never see each other's keys, key prefix
(``certman``) or Celery queues. To use an existing server instead, set CERTMAN_TEST_REDIS_URL,
or any of CERTMAN_TEST_REDIS_HOST / _PORT / _DB (defaults 127.0.0.1, 6379, 15): that database is
flushed around each test, so give each concurrent run a database of its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.redis_server import RedisServer

REDIS_HOST = os.environ.get("CERTMAN_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CERTMAN_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("CERTMAN_TEST_REDIS_DB", "15"))
# An existing server asked for explicitly, or None for a private one.
EXPLICIT_REDIS_URL: str | None = os.environ.get("CERTMAN_TEST_REDIS_URL") or (
    f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    if any(f"CERTMAN_TEST_REDIS_{var}" in os.environ for var in ("HOST", "PORT", "DB"))
    else None
)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    if EXPLICIT_REDIS_URL is not None:
        yield EXPLICIT_REDIS_URL
        return
    # A directory of its own to work in, so that nothing it might write lands in the checkout.
    directory = Path(tempfile.mkdtemp(prefix="certman-test-redis-"))
    server = RedisServer(directory, append_only=False)
    try:
        server.start().close()
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


# --- stores ------------------------------------------------------------------------------------
PG_ADMIN_URL = os.environ.get(
    "CERTMAN_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A PostgreSQL database made for this test run, migrated to head, dropped at the end."""
    import uuid

    import sqlalchemy as sa

    from pipeline.db import upgrade

    name = f"certman_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    from pipeline import db

    db.dispose_engines(close=True)
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """An empty, migrated store: a new SQLite file, or the run's PostgreSQL database emptied."""
    from pipeline.db import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'certman.db'}"
        upgrade(url)
        yield url
        return
    url = request.getfixturevalue("pg_database_url")
    import sqlalchemy as sa

    from pipeline.db import get_engine
    from pipeline.models import Base

    with get_engine(url).begin() as connection:
        tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
        connection.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    yield url


@pytest.fixture
def certman_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, redis_url: str, database_url: str
) -> Iterator[dict[str, str]]:
    """The process's settings pointed at this test's store and Redis database."""
    from pipeline import acme_client, connections, signer
    from pipeline.settings import get_settings

    env = {
        "CERTMAN_DATA_DIR": str(tmp_path),
        "CERTMAN_DATABASE_URL": database_url,
        "CERTMAN_REDIS_URL": redis_url,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    connections.reset()
    acme_client.reset()
    signer.reset()  # the signing key of this test's data directory, made on first use
    yield env
    get_settings.cache_clear()
    connections.reset(close=True)
    acme_client.reset()
    signer.reset()
