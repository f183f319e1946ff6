"""Engines and sessions. The schema is only ever changed by Alembic (``certman db upgrade``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def make_engine(url: str) -> Engine:
    """An engine with the per-dialect settings that matter for many concurrent workers."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the edge-less demo run a worker, beat and the CLI on one file at once;
    # foreign keys are off by default in SQLite and the cascades depend on them.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # In WAL mode NORMAL still survives a crash of any process; it skips an fsync per commit.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


_makers: dict[str, sessionmaker[Session]] = {}


def _sessionmaker(url: str) -> sessionmaker[Session]:
    maker = _makers.get(url)
    if maker is None:
        maker = _makers[url] = sessionmaker(make_engine(url), expire_on_commit=False)
    return maker


def get_engine(url: str | None = None) -> Engine:
    engine = _sessionmaker(url or _default_url()).kw["bind"]
    assert isinstance(engine, Engine)
    return engine


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session committed on success and rolled back on any error."""
    session = _sessionmaker(url or _default_url())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines(*, close: bool = False) -> None:
    """Drop pooled connections. In a child after fork they are only forgotten (``close=False``):
    closing them would end the parent's sessions."""
    for maker in _makers.values():
        maker.kw["bind"].dispose(close=close)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def _default_url() -> str:
    from pipeline.settings import get_settings

    return get_settings().effective_database_url
