"""Finishing orders ask for a dispatch: at most one request per debounce window."""

from __future__ import annotations

from typing import Any

import pytest
import redis

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
    certman_env: dict[str, str], redis_client: redis.Redis, sent: list[tuple[str, Any]]
) -> None:
    for _ in range(50):
        issuance_tasks._order_slot_freed()
    assert len(sent) == 1
    name, options = sent[0]
    assert name == "certman.maintenance.dispatch"
    # It runs after the window closes, so it sees every slot freed within the window.
    assert options["countdown"] == issuance_tasks.DISPATCH_DEBOUNCE


def test_an_order_ending_after_the_window_asks_again(
    certman_env: dict[str, str], redis_client: redis.Redis, sent: list[tuple[str, Any]]
) -> None:
    issuance_tasks._order_slot_freed()

    def asked_again() -> bool:
        issuance_tasks._order_slot_freed()
        return len(sent) == 2

    wait_until(asked_again, timeout=5, what="a second dispatch request")
