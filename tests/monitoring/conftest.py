"""promtool and the files of deploy/prometheus/ for the monitoring tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# The edge tests' fixtures (keys, a PKI, an edge on loopback ports), for the name cross-check.
from tests.edge.conftest import keys, pki, prefix, sites, start_edge, upstream  # noqa: F401

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
INSTALLED = Path("/usr/local/bin/promtool")  # where scripts/install-promtool puts it


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool's path. Missing is a failure, not a skip: scripts/install provides it."""
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if found is None and INSTALLED.is_file():
        found = str(INSTALLED)
    if found is None:
        pytest.fail("promtool not found: run scripts/install (scripts/install-promtool)")
    return found


def run_promtool(promtool: str, *args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def alert_exprs(text: str) -> dict[str, str]:
    """alert name -> expr, from a rules file as written in deploy/prometheus/alerts.yml (an
    ``expr:`` on one line, or a ``|`` block); no YAML library needed."""
    found: dict[str, str] = {}
    lines = text.splitlines()
    name = None
    for i, line in enumerate(lines):
        if m := re.match(r"\s*- alert: (\w+)\s*$", line):
            name = m.group(1)
        elif (m := re.match(r"(\s*)expr: (.*)$", line)) and name is not None:
            indent, rest = len(m.group(1)), m.group(2).strip()
            if rest != "|":
                found[name] = rest
                continue
            block = []
            for following in lines[i + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            found[name] = " ".join(b for b in block if b and not b.startswith("#"))
    return found
