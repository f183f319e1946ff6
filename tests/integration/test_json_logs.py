"""A certificate issued against Pebble with every pipeline role logging JSON: each of the five
steps' lines on the worker says which domain and order it is about."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from tests.support.system import System


@pytest.fixture
def json_system(redis_url: str, redis_client: redis.Redis) -> Iterator[System]:
    # As the units' environment file would turn it on for every role.
    with System(redis_url=redis_url, extra_env={"CERTMAN_LOG_FORMAT": "json"}) as system:
        yield system


def test_every_step_of_an_issuance_logs_its_order_as_json(json_system: System) -> None:
    system = json_system.start(workers=1)
    system.certman("domains", "add", "json-dealer.example.com")
    try:
        rows = system.wait_active(["json-dealer.example.com"], timeout=120)
    except TimeoutError:
        print(system.logs())
        raise
    order_lines: list[dict[str, Any]] = []
    for line in (system.workdir / "worker0.log").read_text().splitlines():
        record = json.loads(line)  # every line: the worker's stdout and stderr together
        assert {"time", "level", "logger", "process", "message"} <= set(record), line
        if record.get("task", "").startswith("certman.issue."):
            order_lines.append(record)
    done = {r["task"]: r for r in order_lines if "succeeded in" in r["message"]}
    assert set(done) >= {
        "certman.issue.place_order",
        "certman.issue.publish_challenges",
        "certman.issue.poll_validation",
        "certman.issue.finalise",
        "certman.issue.encrypt_and_store",
    }
    order_ids = {r["order_id"] for r in order_lines}
    assert len(order_ids) == 1 and isinstance(order_ids.pop(), int)
    assert {r["domain"] for r in order_lines} == {"json-dealer.example.com"}
    # A line logged by a step itself also names the step (the task's own lines name the task).
    assert all(r["task"] == f"certman.issue.{r['step']}" for r in order_lines if "step" in r)
    assert rows["json-dealer.example.com"]["state"] == "active"
