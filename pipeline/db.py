"""Engines and sessions. The schema is only ever changed by Alembic (``certman db upgrade``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker

import migrations

# The migrations package, wherever it is installed (a checkout, or site-packages from the wheel).
MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent

# What to install for a dialect+driver whose DBAPI module is missing (the name on PyPI is not
# the module's name). Only psycopg 3 (PostgreSQL) and sqlite3 come with certman.
_DRIVER_PACKAGES = {
    "postgresql+psycopg2": "psycopg2-binary",
    "postgresql+pg8000": "pg8000",
    "postgresql+asyncpg": "asyncpg",
    "mysql+mysqldb": "mysqlclient",
    "mysql+pymysql": "pymysql",
    "mariadb+mariadbconnector": "mariadb",
    "mssql+pyodbc": "pyodbc",
    "oracle+oracledb": "oracledb",
}


# What services are handed to open a transaction: ``with sessions() as session: ...``.
SessionScope = Callable[[], AbstractContextManager[Session]]


class DatabaseURLError(ValueError):
    """CERTMAN_DATABASE_URL names a database certman cannot reach with what is installed."""


def normalise_url(url: str) -> str:
    """``postgresql://`` and ``postgres://`` (what PostgreSQL's own tools print) mean psycopg 3,
    the driver certman installs; SQLAlchemy alone would pick psycopg2."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme) :]
    return url


def make_engine(url: str) -> Engine:
    """An engine with the per-dialect settings that matter for many concurrent workers.

    A URL whose driver is not installed raises :class:`DatabaseURLError` with one line naming
    the setting and the package to install, instead of SQLAlchemy's import traceback.
    """
    url = normalise_url(url)
    try:
        return _make_engine(url)
    except NoSuchModuleError as exc:
        raise DatabaseURLError(
            f"CERTMAN_DATABASE_URL: unknown database {_scheme(url)}:// "
            "(use sqlite:///PATH or postgresql://USER@HOST/DB)"
        ) from exc
    except ArgumentError as exc:
        raise DatabaseURLError(f"CERTMAN_DATABASE_URL: not a database URL ({exc})") from exc
    except ImportError as exc:
        raise DatabaseURLError(
            f"CERTMAN_DATABASE_URL: the driver for {_scheme(url)}:// is not installed "
            f"(pip install {_driver_package(url, exc)})"
        ) from exc


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]


def _driver_package(url: str, exc: ImportError) -> str:
    try:
        parsed = make_url(url)
        name = f"{parsed.get_backend_name()}+{parsed.get_dialect().driver}"
    except Exception:  # only for the message: fall back to the module that failed to import
        name = ""
    return _DRIVER_PACKAGES.get(name) or exc.name or "the database driver"


def _make_engine(url: str) -> Engine:
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


def get_engine(url: str) -> Engine:
    engine = _sessionmaker(url).kw["bind"]
    assert isinstance(engine, Engine)
    return engine


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session committed on success and rolled back on any error (the URL is the caller's:
    a process's :class:`~pipeline.runtime.Runtime` hands its own)."""
    session = _sessionmaker(url)()
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
