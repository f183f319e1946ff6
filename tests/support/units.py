"""The pipeline's roles started as deploy/systemd's units start them: the unit's exact
``ExecStart`` (this virtualenv for /opt/certman, the host's name for systemd's %H), under the
system's supervisor, which restarts an exited role as ``Restart=always`` does and says so."""

from __future__ import annotations

import shlex
import socket
import subprocess
from pathlib import Path

from tests.support.system import BIN, System

UNITS = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
# What System's supervisor prints each time the role exits.
SUPERVISOR_LINE = "test supervisor: exited"


def unit_command(role: str, workdir: Path) -> list[str]:
    """The unit's ExecStart; beat's schedule file (/var/lib/certman) goes to ``workdir``."""
    (line,) = [
        line.removeprefix("ExecStart=")
        for line in (UNITS / f"certman-{role}.service").read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    line = line.replace("/opt/certman/bin/", f"{BIN}/").replace("%H", socket.gethostname())
    line = line.replace("/var/lib/certman/", f"{workdir}/")
    return shlex.split(line)


def start_role(system: System, role: str) -> subprocess.Popen[bytes]:
    """Start ``role`` (worker, beat) as its unit does, logging to ``<role>.log``."""
    process = system._spawn(
        f"{role}.log", unit_command(role, system.workdir), env=system.env, supervised=True
    )
    system.workers.append(process)
    return process


def role_log(system: System, role: str) -> str:
    return (system.workdir / f"{role}.log").read_text(errors="replace")
