"""Fixtures shared by every test: real Redis, real PostgreSQL, SQLite and Pebble.

Redis tests get a redis-server of this pytest session's own (started on first use, on a free
port, keeping nothing on disk, stopped at the end), flushed around each test: two runs on one
machine, or a run and the machine's other Redis users, never see each other's keys, key prefix
(``certman``) or Celery queues. To use an existing server instead, set CERTMAN_TEST_REDIS_URL,
or any of CERTMAN_TEST_REDIS_HOST / _PORT / _DB (defaults 127.0.0.1, 6379, 15): that database is
flushed around each test, so give each concurrent run a database of its own (under
pytest-xdist, worker N of a run uses that database number minus N: 15, 14, ...).

The whole suite runs in parallel (scripts/test passes pytest-xdist's ``-n``): each xdist worker
is a pytest session of its own, so it gets its own redis-server and PostgreSQL database, and
every port comes from :func:`tests.support.ports.free_port`. See :func:`_parallel_order`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from tests.support import tiers
from tests.support.redis_server import RedisServer

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

REDIS_HOST = os.environ.get("CERTMAN_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CERTMAN_TEST_REDIS_PORT", "6379"))
REDIS_DB = int(os.environ.get("CERTMAN_TEST_REDIS_DB", "15"))
# The pytest-xdist worker this process is ("gw0", "gw1", ...), or "" in a run without -n.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")


def _worker_database(url: str) -> str:
    """``url`` with its database number moved on by this xdist worker's number: each worker
    flushes its database around every test, so two must never share one."""
    if not XDIST_WORKER:
        return url
    parts = urlsplit(url)
    path = parts.path.strip("/")
    # Downwards (15, 14, ...), away from database 0, which other users of a server take.
    database = ((int(path) if path.isdigit() else 0) - int(XDIST_WORKER.removeprefix("gw"))) % 16
    return urlunsplit(parts._replace(path=f"/{database}"))


# An existing server asked for explicitly, or None for a private one.
_EXPLICIT: str | None = os.environ.get("CERTMAN_TEST_REDIS_URL") or (
    f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    if any(f"CERTMAN_TEST_REDIS_{var}" in os.environ for var in ("HOST", "PORT", "DB"))
    else None
)
EXPLICIT_REDIS_URL: str | None = _worker_database(_EXPLICIT) if _EXPLICIT else None


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


# --- tiers ------------------------------------------------------------------------------------
# Items not in exactly one tier, found while marking them (tests/test_tiers.py asserts none).
TIER_PROBLEMS = pytest.StashKey[list[str]]()
# Set when every selected test is a unit test: then each runs under tiers.unit_guard.
UNIT_ONLY = pytest.StashKey[bool]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{tiers.UNIT}: {tiers.UNIT_MEANS}")
    for name, meaning in tiers.RESOURCES.items():
        config.addinivalue_line("markers", f"{name}: {meaning}")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # First, so that -m selects by the marks given here.
    config.stash[TIER_PROBLEMS] = tiers.mark_items(items)
    if XDIST_WORKER:
        _parallel_order(items)


def _parallel_order(items: list[pytest.Item]) -> None:
    """In a parallel run, the longest tests first, so that none starts last and leaves the
    other workers idle while it runs (scripts/test uses ``--dist loadgroup``, which hands out
    one test at a time, in this order, to whichever worker is free). Each xdist worker collects
    and orders alike (the order depends on nothing but the items), as xdist requires.

    Tests that use the session's built wheel (``installed``) go to one worker as a group, or
    each worker that got one would build and install the wheel again (minutes each).
    """
    for item in items:
        if "installed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("wheel"))
    items.sort(key=tiers.parallel_rank)


def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[UNIT_ONLY] = bool(session.items) and all(
        item.get_closest_marker(tiers.UNIT) is not None for item in session.items
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    # Only in a run of unit tests alone: in a mixed run, services started by other tests'
    # module-scoped fixtures keep working in their threads while a unit test runs.
    if not item.config.stash.get(UNIT_ONLY, False):
        return (yield)
    with tiers.unit_guard():
        return (yield)


# --- temporary files ---------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _run_temporary_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Everything made with :mod:`tempfile` in this session (Pebble's and the system's work
    directories, edge state directories...) goes into one directory of the session's own,
    removed at the end, so that no run leaves ``pebble-*`` or ``certman-*`` behind in /tmp even
    when a test fails or forgets to clean up. The harnesses remove what they make as well; this
    is the net under them.

    Opened to every user (0755), as /tmp is traversable: some tests make a directory outside
    pytest's (closed) base directory on purpose, for a process run as another user to read.
    pytest's own base directory (``tmp_path``) is decided first and stays where pytest keeps it.
    """
    tmp_path_factory.getbasetemp()
    run = Path(tempfile.mkdtemp(prefix="certman-tests-"))
    run.chmod(0o755)
    saved = tempfile.tempdir
    tempfile.tempdir = str(run)
    try:
        yield
    finally:
        tempfile.tempdir = saved
        shutil.rmtree(run, ignore_errors=True)


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


@pytest.fixture(scope="session")
def sqlite_store_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A SQLite store migrated once for the run, whose transactions can hold savepoints.

    pysqlite begins transactions itself and does not let SAVEPOINT nest inside them: the
    driver's own handling is turned off and SQLAlchemy emits BEGIN (SQLAlchemy's documented
    recipe for SAVEPOINT with pysqlite).
    """
    from sqlalchemy import event

    from pipeline.db import make_engine, upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('store') / 'certman.db'}"
    upgrade(url)
    engine = make_engine(url)

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN")

    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[[], AbstractContextManager[Session]]]:
    """A migrated store (SQLite, or the run's PostgreSQL database) in a transaction rolled
    back at the end of the test.

    ``with store() as session:`` is a session scope like the pipeline's: committed on success
    (to a savepoint of the test's transaction), rolled back on any error. Nothing is truncated
    and nothing outlives the test. For tests that run in this process only (a subprocess or a
    worker cannot see the test's transaction: those use ``database_url``).
    """
    from sqlalchemy.orm import Session

    from pipeline.db import get_engine
    from pipeline.models import Base

    if request.param == "sqlite":
        engine = request.getfixturevalue("sqlite_store_engine")
    else:
        engine = get_engine(request.getfixturevalue("pg_database_url"))
    with engine.connect() as connection:
        outer = connection.begin()
        # Empty for this test, whatever other tests left in the run's database: undone too.
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())

        @contextmanager
        def scope() -> Iterator[Session]:
            session = Session(
                bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
            )
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise
            finally:
                session.close()

        try:
            yield scope
        finally:
            outer.rollback()


@pytest.fixture
def certman_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, redis_url: str, database_url: str
) -> Iterator[dict[str, str]]:
    """The process's settings pointed at this test's store and Redis database."""
    from pipeline import runtime

    env = {
        "CERTMAN_DATA_DIR": str(tmp_path),
        "CERTMAN_DATABASE_URL": database_url,
        "CERTMAN_REDIS_URL": redis_url,
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # The process's runtime made afresh from these settings (the signing key of this test's
    # data directory made on first use), and closed after the test.
    runtime.reset(close=True, settings=True)
    yield env
    runtime.reset(close=True, settings=True)
