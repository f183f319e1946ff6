"""Finishing orders ask for a dispatch: at most one request per debounce window."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from pipeline import runtime
from pipeline.celery import app
from pipeline.tasks import issuance as issuance_tasks
from tests.support.ports import wait_until


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    # The Celery app's broker was fixed when it was imported; record the requests instead of
    # sending them somewhere other than this test's Redis database.
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(app, "send_task", lambda name, **options: calls.append((name, options)))
    return calls


def test_orders_ending_together_ask_for_one_dispatch(
    certman_env: dict[str, str],
    redis_client: redis.Redis,
    sent: list[tuple[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A window far longer than the loop can take, however slow the machine (the real one, 0.5 s,
    # flags for 0.4 s): all 50 fall in it.
    monkeypatch.setattr(issuance_tasks, "DISPATCH_DEBOUNCE", 30)
    for _ in range(50):
        issuance_tasks._order_slot_freed(runtime.current())
    assert len(sent) == 1
    name, options = sent[0]
    assert name == "certman.maintenance.dispatch"
    # It runs after the window closes, so it sees every slot freed within the window.
    assert options["countdown"] == issuance_tasks.DISPATCH_DEBOUNCE


def test_an_order_ending_after_the_window_asks_again(
    certman_env: dict[str, str], redis_client: redis.Redis, sent: list[tuple[str, Any]]
) -> None:
    issuance_tasks._order_slot_freed(runtime.current())

    def asked_again() -> bool:
        issuance_tasks._order_slot_freed(runtime.current())
        return len(sent) == 2

    wait_until(asked_again, timeout=5, what="a second dispatch request")


def test_redis_down_leaves_the_dispatch_to_beat(
    certman_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    sent: list[tuple[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("CERTMAN_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    runtime.reset(close=True, settings=True)
    # The order is stored already: this must not raise.
    issuance_tasks._order_slot_freed(runtime.current())
    assert sent == []
    assert "beat will dispatch" in caplog.text
