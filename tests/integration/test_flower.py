"""Flower during a stuck order: the task list shows each issuance task's domain, and the
dispatcher's task (every 15 s) is not in it to bury them.

A real worker (task events on), beat's dispatch task sent as beat sends it, and a real Flower
with basic auth (as its unit demands), asked through its UI and its API.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from typing import Any

import pytest

from tests.support.ports import free_port, port_open, wait_until
from tests.support.system import BIN, System

pytestmark = pytest.mark.integration

USER = ("operator", "flower-test-password")
DOMAIN = "stuck-dealer.example.com"


def _get(port: int, path: str) -> bytes:
    token = base64.b64encode(":".join(USER).encode()).decode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body: bytes = response.read()
    return body


def flower_tasks(port: int) -> dict[str, Any]:
    tasks: dict[str, Any] = json.loads(_get(port, "/api/tasks"))
    return tasks


def test_the_task_list_shows_domains_and_not_the_dispatcher(system: System) -> None:
    system.start(workers=1)
    port = free_port()
    flower = system._spawn(
        "flower.log",
        [str(BIN / "celery"), "-A", "pipeline", "flower", f"--port={port}"],
        env=system.env | {"FLOWER_BASIC_AUTH": ":".join(USER)},
    )
    system.workers.append(flower)
    wait_until(lambda: port_open(port), timeout=30, what="Flower to listen")

    # Flower listens before its event receiver has subscribed: send a harmless task until
    # Flower shows one, so that it sees everything that follows.
    def flower_sees_events() -> bool:
        system.call_task("certman.maintenance.check_expiry")
        return any(
            task.get("name") == "certman.maintenance.check_expiry"
            for task in flower_tasks(port).values()
        )

    wait_until(flower_sees_events, timeout=60, what="Flower to receive task events", every=0.5)

    # The dispatcher runs (as beat sends it) while a site is issued.
    for _ in range(3):
        system.call_task("certman.maintenance.dispatch")
    system.certman("domains", "add", DOMAIN)
    system.wait_active([DOMAIN], timeout=120)

    def issuance_task_with_its_domain() -> bool:
        return any(
            task.get("name", "").startswith("certman.issue.") and DOMAIN in task.get("args", "")
            for task in flower_tasks(port).values()
        )

    wait_until(issuance_task_with_its_domain, timeout=30, what="Flower to show the domain")
    worker_log = (system.workdir / "worker0.log").read_text(errors="replace")
    assert "certman.maintenance.dispatch" in worker_log, "the dispatcher never ran"
    names = {task.get("name") for task in flower_tasks(port).values()}
    assert "certman.maintenance.dispatch" not in names, names

    # The UI's task list has the arguments column (Flower's default has none).
    page = _get(port, "/tasks").decode()
    assert '<th data-column="args">' in page
