"""``scripts/bulk_onboard.py`` as operators run it: a subprocess, real store, real Redis."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import redis
from sqlalchemy import func, select

from pipeline.models import Site, SiteChange, SiteName
from tests.support.from_settings import session_scope

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bulk_onboard.py"


def run(
    *args: str, cwd: Path, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env=env or dict(os.environ),
        timeout=120,
    )


def count(url: str, model: type) -> int:
    with session_scope(url) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def dealers(n: int) -> str:
    return "domain,upstream,aliases\n" + "".join(
        f"dealer{i}.example.com,http://10.0.0.{i % 250}:8080,www.dealer{i}.example.com\n"
        for i in range(n)
    )


def test_file_run_summary_rejected_file_and_queue(
    certman_env: dict[str, str], database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    source = tmp_path / "dealers.csv"
    source.write_text(dealers(5) + "not a domain\ndealer1.example.com,,www.dealer1.example.com\n")
    result = run(str(source), "--batch-size", "2", cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "read 7 lines" in out and "5 added" in out and "1 duplicates" in out
    assert "1 rejected" in out and f"{source}.rejected.csv" in out
    # Production limits by default (the settings say so): 5 sites fit the burst.
    assert "5 certificates to issue: within the current limits' burst" in out
    assert "last one expected around" in out
    with (tmp_path / "dealers.csv.rejected.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[1][:2] == ["7", "not a domain"]
    assert count(database_url, Site) == 5 and count(database_url, SiteName) == 10
    # The dispatcher was kicked once per committed batch: its messages wait in the broker.
    assert redis_client.llen("issuance") == 3
    # Each added site's history says who added it, and with what.
    with session_scope(database_url) as session:
        history = session.execute(select(SiteChange.domain, SiteChange.action, SiteChange.actor,
                                         SiteChange.detail)).all()  # fmt: skip
    assert len(history) == 5
    assert {(action, actor.partition(":")[0]) for _, action, actor, _ in history} == {
        ("add", "onboard")
    }
    assert ("dealer1.example.com", "names dealer1.example.com www.dealer1.example.com") in {
        (domain, detail) for domain, _, _, detail in history
    }


def test_stdin_and_default_rejected_file_in_cwd(
    certman_env: dict[str, str], database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    result = run("-", "--no-queue", cwd=tmp_path, stdin="a.example.com\nbad..example.com\n")
    assert result.returncode == 0, result.stderr
    assert "1 added" in result.stdout and "--no-queue" in result.stdout
    assert "bad..example.com" in (tmp_path / "stdin.rejected.csv").read_text()
    assert redis_client.llen("issuance") == 0
    other = tmp_path / "elsewhere.csv"
    result = run("-", "--no-queue", "--rejected", str(other), cwd=tmp_path, stdin="x y\n")
    assert result.returncode == 0 and "x y" in other.read_text()


def test_non_tty_progress_lines_and_second_run(
    certman_env: dict[str, str], database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    source = tmp_path / "dealers.csv"
    source.write_text(dealers(6))
    result = run(
        str(source), "--no-queue", "--batch-size", "2", "--progress-interval", "0", cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("bulk_onboard:")]
    assert len(progress) == 3
    assert progress[-1].startswith("bulk_onboard: 6 lines read: 6 added, 0 already there")
    assert "\r" not in result.stderr  # no bar when not on a terminal
    again = run(str(source), "--no-queue", cwd=REPO)
    assert "0 added, 6 already there" in again.stdout and "nothing new to issue" in again.stdout
    assert count(database_url, Site) == 6


def test_dry_run_writes_nothing(
    certman_env: dict[str, str], database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    source = tmp_path / "dealers.csv"
    source.write_text(dealers(3) + "bad name\n")
    result = run(str(source), "--dry-run", cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "3 would be added" in result.stdout and "dry run: nothing was written" in result.stdout
    assert count(database_url, Site) == 0
    assert redis_client.dbsize() == 0
    assert not (tmp_path / "dealers.csv.rejected.csv").exists()


def test_killed_mid_run_then_resumed(
    certman_env: dict[str, str], database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """SIGKILL after the third batch's commit, before its snapshot publish; then run again."""
    source = tmp_path / "dealers.csv"
    source.write_text(dealers(50))
    wrapper = textwrap.dedent(
        f"""
        import os, runpy, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        from pipeline.distribution import publishing as snapshot
        real, calls = snapshot.publish_records, []
        def publish(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            real(*args, **kwargs)
        snapshot.publish_records = publish
        sys.argv = ["bulk_onboard.py", {str(source)!r}, "--no-queue", "--batch-size", "10"]
        runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
        """
    )
    killed = subprocess.run(
        [sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == -9, killed.stderr
    assert count(database_url, Site) == 30
    assert redis_client.hlen("certman:sites") == 20

    resumed = run(str(source), "--no-queue", "--batch-size", "10", cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr
    assert "20 added, 30 already there, 0 duplicates, 0 rejected" in resumed.stdout
    assert count(database_url, Site) == 50 and count(database_url, SiteName) == 100
    assert redis_client.hlen("certman:sites") == 50


def test_failures_are_one_line_with_non_zero_status(
    certman_env: dict[str, str], redis_client: redis.Redis, tmp_path: Path
) -> None:
    missing = run(str(tmp_path / "nope.csv"), cwd=REPO)
    assert missing.returncode == 1
    assert missing.stderr.strip().count("\n") == 0
    assert "cannot read" in missing.stderr and "No such file" in missing.stderr

    usage = run(str(tmp_path / "x.csv"), "--batch-size", "0", cwd=REPO)
    assert usage.returncode == 2 and "--batch-size" in usage.stderr

    source = tmp_path / "dealers.csv"
    source.write_text(dealers(1))
    env = dict(os.environ)
    env["CERTMAN_DATABASE_URL"] = "postgresql+psycopg://postgres@127.0.0.1:1/none"
    down = run(str(source), cwd=REPO, env=env)
    assert down.returncode == 1
    assert down.stderr.startswith("bulk_onboard: database unavailable:")
    assert down.stderr.strip().count("\n") == 0

    env = dict(os.environ)
    env["CERTMAN_REDIS_URL"] = "redis://127.0.0.1:1/0"
    down = run(str(source), cwd=REPO, env=env)
    assert down.returncode == 1 and down.stderr.startswith("bulk_onboard: Redis unavailable:")


def _json_lines(stderr: str) -> list[dict[str, object]]:
    """Every stderr line, each of which must be one JSON object."""
    records = [json.loads(line) for line in stderr.splitlines()]
    assert all(isinstance(record, dict) for record in records)
    return records


def test_json_logs_progress_and_errors_one_object_per_line(
    certman_env: dict[str, str], database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    source = tmp_path / "dealers.csv"
    source.write_text(dealers(4))
    result = run(
        str(source), "--no-queue", "--batch-size", "2", "--progress-interval", "0",
        "--log-format", "json", cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    records = _json_lines(result.stderr)
    progress = [r for r in records if r["logger"] == "certman.onboard"]
    assert [r["level"] for r in progress] == ["INFO", "INFO"]
    assert str(progress[-1]["message"]).startswith("4 lines read: 4 added, 0 already there")
    assert "4 added" in result.stdout  # the summary is the command's output, as in text

    # CERTMAN_LOG_FORMAT does the same for a run given no option (the units' env file).
    env = dict(os.environ) | {
        "CERTMAN_LOG_FORMAT": "json",
        "CERTMAN_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    down = run(str(source), cwd=REPO, env=env)
    assert down.returncode == 1
    (record,) = _json_lines(down.stderr)
    assert record["level"] == "ERROR" and str(record["message"]).startswith("Redis unavailable:")

    env["CERTMAN_LOG_FORMAT"] = "xml"
    bad = run(str(source), cwd=REPO, env=env)
    assert (
        bad.returncode == 2
        and "CERTMAN_LOG_FORMAT: must be one of text, json, not 'xml'" in bad.stderr
    )
