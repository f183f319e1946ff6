"""The harness's ports and start-up waits: a server that cannot start fails its test at once,
saying why, and leaves no process behind."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.ports import free_port, free_port_block, wait_listening


def _ephemeral_range() -> range:
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return range(int(low), int(high) + 1)


def test_ports_come_from_outside_the_ephemeral_range_and_are_never_repeated() -> None:
    ports = [free_port() for _ in range(200)] + [free_port(socket.SOCK_DGRAM) for _ in range(20)]
    base = free_port_block(4)
    ports += range(base, base + 4)
    assert len(set(ports)) == len(ports)
    assert not set(ports) & set(_ephemeral_range())


def _server(log: Path, code: str) -> subprocess.Popen[bytes]:
    """A "server" running ``code`` that never listens, in a session of its own, as the
    harness starts the edge."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def test_a_server_that_exits_before_listening_fails_at_once_with_its_output(
    tmp_path: Path,
) -> None:
    log = tmp_path / "server.log"
    process = _server(log, "import sys; print('address already in use'); sys.exit(3)")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 3.*address already in use"):
        wait_listening(process, free_port(), timeout=60, what="the server", log=log)
    assert time.monotonic() - started < 30


def test_a_server_that_never_listens_is_stopped_when_the_wait_gives_up(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    process = _server(log, "import time; print('starting', flush=True); time.sleep(600)")
    try:
        with pytest.raises(TimeoutError, match=r"(?s)to listen on port.*starting"):
            wait_listening(process, free_port(), timeout=1.5, what="the server", log=log)
        assert process.returncode is not None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
