"""deploy/systemd/: every unit passes ``systemd-analyze verify`` and is hardened.

The units name ``/opt/certman/bin`` (where docs/production.md installs the wheel); ``verify``
checks that ExecStart's binary exists, so each is rendered with this test's virtualenv (which
has the same console scripts) in its place. ``verify`` only warns about an unknown or invalid
directive (exit status 0), so any line it prints about a unit fails the test.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))
ROLES = {"worker", "beat", "edge", "flower", "exporter", "api"}
HARDENING = (
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "PrivateTmp=yes",
    "LimitCORE=0",
    "Restart=always",
)


def test_a_unit_for_every_role() -> None:
    assert {unit.stem.removeprefix("certman-") for unit in UNITS} == ROLES


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_units_verify(tmp_path: Path) -> None:
    venv_bin = Path(sys.executable).parent
    for unit in UNITS:
        text = unit.read_text()
        assert "/opt/certman/bin/" in text
        (tmp_path / unit.name).write_text(text.replace("/opt/certman/bin/", f"{venv_bin}/"))
    result = subprocess.run(
        ["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.glob("*.service"))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = result.stdout + result.stderr
    complaints = [line for line in output.splitlines() if "certman-" in line]
    assert result.returncode == 0 and not complaints, output


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    broken = tmp_path / "certman-broken.service"
    broken.write_text("[Service]\nExecStart=/bin/true\nProtectSystem=sometimes\n")
    result = subprocess.run(
        ["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60
    )
    assert "certman-broken.service" in result.stdout + result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.stem)
def test_units_are_hardened(unit: Path) -> None:
    lines = set(unit.read_text().splitlines())
    for directive in HARDENING:
        assert directive in lines, f"{unit.name} lacks {directive}"
    assert not any(line.startswith("User=root") for line in lines)
    assert any(line.startswith("User=certman") for line in lines)
    # The edge reads a file of its own, without the database URL the pipeline's holds.
    env_file = "edge.env" if unit.stem == "certman-edge" else "certman.env"
    assert f"EnvironmentFile=/etc/certman/{env_file}" in lines
    if unit.stem == "certman-edge":
        # Binds 80 and 443 as its own user: that capability and no other.
        assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in lines
        assert "CapabilityBoundingSet=CAP_NET_BIND_SERVICE" in lines
    else:
        assert "CapabilityBoundingSet=" in lines
