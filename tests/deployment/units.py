"""The systemd units and the guide, read the way systemd and an operator read them.

systemd is not PID 1 where the tests run, so :func:`command` turns a unit into the command that
does what systemd would: its ``ExecStart`` as written (``%H`` expanded), as its ``User=`` and
``Group=`` (``setpriv``), with its ``EnvironmentFile=`` and ``Environment=`` and nothing else,
the ``AmbientCapabilities=`` it grants and no privilege gain (``NoNewPrivileges=``), its
``UMask=``, ``LimitCORE=`` and ``LimitNOFILE=``. Not emulated: the file-system and kernel
sandboxing (``ProtectSystem=``, ``PrivateTmp=``...), which ``systemd-analyze verify`` and
tests/packaging/test_systemd.py check instead.
"""

from __future__ import annotations

import re
import resource
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "deploy" / "systemd"
GUIDE = REPO / "docs" / "production.md"
NOT_RUN = "# not run:"
# PATH in the root shell that runs the guide's commands.
GUIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class Unit:
    name: str
    service: dict[str, list[str]] = field(default_factory=dict)

    def one(self, key: str, default: str = "") -> str:
        values = self.service.get(key, [])
        return values[-1] if values else default

    @property
    def exec_start(self) -> list[str]:
        return shlex.split(self.one("ExecStart").replace("%H", socket.gethostname()))

    @property
    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for line in self.service.get("Environment", []):
            for item in shlex.split(line):
                key, _, value = item.partition("=")
                env[key] = value
        return env


def read_unit(path: Path) -> Unit:
    unit = Unit(path.stem)
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            unit.service.setdefault(key.strip(), []).append(value.strip())
    return unit


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd's EnvironmentFile= reads them (no shell expansion)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def command(unit: Unit, *, root: Path = Path("/")) -> list[str]:
    """The setpriv command line that starts ``unit`` as systemd would (files under ``root``)."""
    env: dict[str, str] = {}
    for env_file in unit.service.get("EnvironmentFile", []):
        env.update(read_env_file(root / env_file.lstrip("-/")))
    env.update(unit.environment)
    user = unit.one("User", "root")
    group = unit.one("Group", user)
    caps = [
        cap.lower().removeprefix("cap_") for cap in unit.one("AmbientCapabilities").split() if cap
    ]
    limits = []
    for key, flag, resource_id in (
        ("LimitCORE", "core", resource.RLIMIT_CORE),
        ("LimitNOFILE", "nofile", resource.RLIMIT_NOFILE),
    ):
        if unit.one(key):
            # At most the hard limit this machine grants (systemd, as PID 1, could raise it).
            hard = resource.getrlimit(resource_id)[1]
            value = int(unit.one(key))
            limits.append(
                f"--{flag}={value if hard == resource.RLIM_INFINITY else min(value, hard)}"
            )
    prefix = ["prlimit", *limits, "--"] if limits else []
    prefix += ["setpriv", f"--reuid={user}", f"--regid={group}", "--init-groups", "--reset-env"]
    if caps:
        granted = ",".join(f"+{cap}" for cap in caps)
        prefix += [f"--inh-caps={granted}", f"--ambient-caps={granted}"]
    prefix += [f"--bounding-set=-all{''.join(f',+{cap}' for cap in caps)}"]
    if unit.one("NoNewPrivileges") == "yes":
        prefix.append("--no-new-privs")
    umask = unit.one("UMask")
    start = ["sh", "-c", f'umask {umask} && exec "$@"', "sh"] if umask else []
    return [*prefix, "env", *(f"{k}={v}" for k, v in env.items()), *start, *unit.exec_start]


def units() -> dict[str, Unit]:
    return {path.stem: read_unit(path) for path in sorted(UNITS.glob("*.service"))}


@dataclass(frozen=True)
class Block:
    language: str
    lines: list[str]  # the block's lines, dedented
    start: int  # line number of the opening fence in the guide


def blocks(text: str) -> list[Block]:
    """The guide's fenced blocks (also those indented inside a list item)."""
    found: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not match:
            i += 1
            continue
        indent, language = match.groups()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        found.append(Block(language, body, i + 1))
        i = j + 1
    return found


def commands(block: Block) -> list[tuple[str, str | None]]:
    """A shell block's commands, each with the reason it is not run (None: run)."""
    result: list[tuple[str, str | None]] = []
    for line in block.lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if NOT_RUN in line:
            text, _, reason = line.partition(NOT_RUN)
            result.append((text.strip(), reason.strip()))
        else:
            result.append((line.strip(), None))
    return result
