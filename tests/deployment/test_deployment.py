"""docs/production.md, deployed as written, issues, serves, is locked down, and rides out Redis.

The test downloads the wheel's dependencies (the namespace it deploys into has no route out),
then runs :mod:`tests.deployment.scenario` inside a network namespace of its own (``ip netns``:
the units keep their fixed ports 80, 443, 9443, 9108, 9109, 5555) and a mount namespace of its
own (private /etc, /opt/certman, /var/lib, /run: the machine's are untouched). Needs root,
``ip``, ``unshare`` and ``setpriv``; a few minutes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deployment.units import GUIDE_PATH, REPO

# Building the wheel (up to 600 s), then the scenario (up to 900 s).
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]

_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "dist", "build", "*.egg-info", "__pycache__", ".mypy_cache",
    ".ruff_cache", ".pytest_cache", "build-env",
)  # fmt: skip


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (users, namespaces, setpriv)"
    for tool in ("ip", "unshare", "setpriv", "runuser", "initdb", "postgres", "redis-server"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return "cannot make network and mount namespaces here (unshare --net --mount)"
    return None


@pytest.mark.skipif(_missing() is not None, reason=_missing() or "")
def test_the_guide_deploys_issues_and_rides_out_a_redis_restart(tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    # With the python3 the guide's commands find (the machine's, not this virtualenv's): the
    # dependencies' markers depend on its version.
    python3 = shutil.which("python3", path=GUIDE_PATH)
    assert python3 is not None
    download = subprocess.run(
        [python3, "-m", "pip", "download", "--quiet", "--dest", str(wheelhouse),
         str(REPO), "build", "setuptools>=69", "wheel"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert download.returncode == 0, download.stderr
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=_IGNORE, symlinks=True)
    config = tmp_path / "config.json"
    result_path = tmp_path / "result.json"
    config.write_text(
        json.dumps(
            {
                "work": str(tmp_path / "work"),
                "checkout": str(checkout),
                "wheelhouse": str(wheelhouse),
                "result": str(result_path),
            }
        )
    )
    netns = f"certman-deploy-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", netns], check=True, timeout=30)
    try:
        subprocess.run(
            ["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True, timeout=30
        )
        scenario = subprocess.run(
            ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "private",
             sys.executable, "-m", "tests.deployment.scenario", str(config)],
            cwd=REPO,  # python -m finds tests.deployment from here
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        # Whatever the scenario left running in the namespace (it stops what it started; this
        # is for a scenario killed by the timeout).
        pids = subprocess.run(
            ["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", netns], timeout=30)
    output = scenario.stdout[-20000:] + scenario.stderr[-5000:]
    assert result_path.exists(), output
    result = json.loads(result_path.read_text())
    print(json.dumps({k: v for k, v in result.items() if k != "error"}, indent=1))
    assert scenario.returncode == 0 and result["ok"], f"{result.get('error')}\n{output}"
    assert result["issued"]["row"]["state"] == "active"
    assert result["after_restart"]["row"]["state"] == "active"
    assert set(result["endpoints"]) == {
        "edge /healthz", "edge /metrics", "worker /metrics", "exporter /metrics", "flower",
        "api /healthz", "api /metrics",
    }  # fmt: skip
    assert result["tracebacks"] == {}
    # Every line the guide does not run says why.
    assert all(reason for _, reason in result["not_run"])
