"""The composition root: one runtime per process, made on first use, dropped in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import db, runtime
from pipeline.settings import Settings


@pytest.fixture
def fresh(certman_env: dict[str, str]) -> runtime.Runtime:
    return runtime.current()


def test_the_process_has_one_runtime_and_its_parts_share_one_redis(
    fresh: runtime.Runtime,
) -> None:
    assert runtime.current() is fresh
    assert fresh.publisher.redis is fresh.redis
    assert fresh.limiter.redis is fresh.redis


def test_after_a_fork_everything_is_dropped_in_one_place(
    fresh: runtime.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.celery import _after_fork

    fresh.redis.ping()
    key = fresh.signing_key
    disposed: list[bool] = []
    monkeypatch.setattr(db, "dispose_engines", lambda *, close=False: disposed.append(close))
    _after_fork()
    after = runtime.current()
    assert after is not fresh
    assert after.redis is not fresh.redis  # a connection of the child's own
    assert disposed == [False]  # the parent's pooled connections are forgotten, not closed
    assert fresh.redis.ping()  # ... and neither is the parent's Redis connection
    assert after.signing_key is not key and after.signing_key.key_id == key.key_id
    after.close()
    fresh.close()


def test_reset_is_the_one_place_the_process_forgets(fresh: runtime.Runtime) -> None:
    runtime.reset()
    assert runtime.current() is not fresh
    second = runtime.current()
    runtime.reset(close=True)
    assert runtime.current() is not second


def test_a_runtime_uses_the_parts_it_is_given(tmp_path: Path) -> None:
    given = object()
    built = runtime.Runtime(
        Settings(data_dir=tmp_path),
        limiter=given,  # type: ignore[arg-type]
        acme=given,  # type: ignore[arg-type]
        publisher=given,  # type: ignore[arg-type]
    )
    assert built.limiter is given and built.acme is given and built.publisher is given
