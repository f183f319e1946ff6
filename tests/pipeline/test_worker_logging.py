"""``--log-format json`` on every pipeline role, run as the units run them: a real worker, beat,
``certman`` and ``certman exporter`` as subprocesses on a private Redis, every stderr line read
back as JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support.ports import free_port, wait_until

BIN = Path(sys.executable).parent


@pytest.fixture
def env(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """A store of this test's own (SQLite) and the run's Redis, flushed around the test."""
    from pipeline.db import upgrade

    database_url = f"sqlite:///{tmp_path / 'certman.db'}"
    upgrade(database_url)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CERTMAN_")}
    return environ | {
        "CERTMAN_DATA_DIR": str(tmp_path),
        "CERTMAN_DATABASE_URL": database_url,
        "CERTMAN_REDIS_URL": redis_url,
    }


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Start a command with its stdout and stderr in files; stopped (SIGTERM) at the end."""
    started: list[tuple[subprocess.Popen[bytes], Path, Path]] = []

    def start(name: str, command: list[str], env: dict[str, str]) -> tuple[Path, Path]:
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            process = subprocess.Popen(
                command, env=env, stdout=stdout, stderr=stderr, start_new_session=True
            )
        started.append((process, out, err))
        return out, err

    yield start
    for process, _, _ in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process, _, _ in started:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def records(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` as a JSON object; fails on the first line that is not one."""
    parsed = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "process", "message"} <= set(record), line
        parsed.append(record)
    return parsed


def logged(path: Path, message: str) -> bool:
    return message in path.read_text(errors="replace")


def test_a_worker_logs_json_with_the_tasks_order_on_its_lines(
    env: dict[str, str], spawn: Any
) -> None:
    # As the unit starts it (deploy/systemd/certman-worker.service), plus --log-format json.
    out, err = spawn(
        "worker",
        [str(BIN / "celery"), "-A", "pipeline", "worker", "-E", "--loglevel=INFO",
         "--hostname=w-json@%h", "--log-format", "json"],
        env,
    )  # fmt: skip
    wait_until(lambda: logged(err, "ready."), timeout=60, what="the worker to be ready")
    # An issuance step for an order the store does not have: the step runs and finds it gone.
    subprocess.run(
        [str(BIN / "celery"), "-A", "pipeline", "call", "certman.issue.place_order",
         "--args", '[4242, "gone.example.com"]', "--queue", "issuance"],
        env=env, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    wait_until(lambda: logged(err, "succeeded in"), timeout=60, what="the task to finish")

    lines = records(err.read_text())
    step = [r for r in lines if r["logger"] == "pipeline.tasks.issuance"]
    assert len(step) == 1 and "is gone" in step[0]["message"]
    assert (step[0]["domain"], step[0]["order_id"], step[0]["step"]) == (
        "gone.example.com",
        4242,
        "place_order",
    )
    assert step[0]["task"] == "certman.issue.place_order" and step[0]["task_id"]
    # Celery's own line about the task carries the order too (bound from prerun to postrun).
    (done,) = [r for r in lines if "succeeded in" in r["message"]]
    assert (done["domain"], done["order_id"], done["task_id"]) == (
        "gone.example.com",
        4242,
        step[0]["task_id"],
    )
    # A line outside any task carries no task's fields.
    (ready,) = [r for r in lines if r["message"].endswith("ready.")]
    assert not {"domain", "order_id", "task", "task_id"} & set(ready)
    # No banner: its drawing would be a dozen lines a log pipeline cannot read.
    assert "[config]" not in out.read_text()


def test_beat_takes_the_format_from_the_environment_file(env: dict[str, str], spawn: Any) -> None:
    out, err = spawn(
        "beat",
        [str(BIN / "celery"), "-A", "pipeline", "beat", "--loglevel=INFO",
         f"--schedule={Path(env['CERTMAN_DATA_DIR']) / 'celerybeat-schedule'}"],
        env | {"CERTMAN_LOG_FORMAT": "json"},
    )  # fmt: skip
    wait_until(lambda: logged(err, "Starting"), timeout=60, what="beat to start")
    lines = records(err.read_text())
    assert any(r["logger"] == "celery.beat" and "Starting" in r["message"] for r in lines)
    assert "celery beat v" not in out.read_text()  # the banner


def test_a_bad_log_format_names_the_variable(env: dict[str, str]) -> None:
    for command in (
        [str(BIN / "celery"), "-A", "pipeline", "beat"],
        [str(BIN / "certman"), "domains", "list"],
    ):
        result = subprocess.run(
            command, env=env | {"CERTMAN_LOG_FORMAT": "xml"}, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert result.returncode == 2
        assert "CERTMAN_LOG_FORMAT" in result.stderr and "'xml'" in result.stderr
        assert "Traceback" not in result.stderr


def test_certman_commands_log_json_errors_included(env: dict[str, str]) -> None:
    def certman(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "certman"), "--log-format", "json", *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    listed = certman("domains", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    assert records(listed.stderr) == []
    missing = certman("domains", "show", "nobody.example.com")
    assert missing.returncode == 1
    (error,) = records(missing.stderr)
    assert error["level"] == "ERROR" and "nobody.example.com" in error["message"]


def test_the_exporter_logs_json(env: dict[str, str], spawn: Any, tmp_path: Path) -> None:
    port = free_port()
    # A store that cannot be opened: every scrape logs a warning (and serves certman_store_up 0).
    unreadable = f"sqlite:///{tmp_path / 'missing' / 'certman.db'}"
    out, err = spawn(
        "exporter",
        [str(BIN / "certman"), "exporter", "--port", str(port)],
        env | {"CERTMAN_LOG_FORMAT": "json", "CERTMAN_DATABASE_URL": unreadable},
    )
    wait_until(lambda: logged(err, "exporter serving"), timeout=60, what="the exporter")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert "certman_store_up 0.0" in response.read().decode()
    wait_until(lambda: logged(err, "store unavailable"), timeout=10, what="the warning")
    lines = records(err.read_text())
    assert [r["level"] for r in lines if "store unavailable" in r["message"]] == ["WARNING"]
    (serving,) = [r for r in lines if r["message"].startswith("exporter serving")]
    assert serving["message"] == f"exporter serving http://127.0.0.1:{port}/metrics"


def test_flower_logs_json_from_the_environment_file(env: dict[str, str], spawn: Any) -> None:
    port = free_port()
    # As the unit starts it (deploy/systemd/certman-flower.service), credentials from the
    # environment file as the guide has them.
    out, err = spawn(
        "flower",
        [str(BIN / "celery"), "-A", "pipeline", "flower", "--address=127.0.0.1", f"--port={port}"],
        env | {"CERTMAN_LOG_FORMAT": "json", "FLOWER_BASIC_AUTH": "ops:test-only"},
    )
    wait_until(lambda: logged(err, "Visit me at"), timeout=60, what="Flower to listen")
    lines = records(err.read_text())
    assert any(r["logger"] == "flower.command" for r in lines)
    assert out.read_text() == ""
