"""Free loopback ports, so that tests on one machine never collide."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

# Every port handed out in this process: the OS may offer a port again as soon as the socket
# that found it is closed, before whatever the port was meant for has bound it.
_handed_out: set[int] = set()

# Ports come from below the kernel's ephemeral range (32768-60999 by default), where the OS
# never picks a port on its own: a port found free in that range could be taken as the local
# port of any outgoing connection (the suite makes thousands) before the server meant for it
# binds it. Each pytest-xdist worker draws from its own band, so two workers never hand out the
# same port either; the draw is random so that two runs side by side rarely meet.
_LOW, _HIGH = 10_000, 32_000


def _band() -> range:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) % workers if worker.isdigit() else 0
    width = (_HIGH - _LOW) // max(workers, 1)
    return range(_LOW + index * width, _LOW + (index + 1) * width)


def _free_now(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free now (TCP and UDP both, as a DNS server binds each) and not handed out
    before in this process."""
    band = _band()
    for _ in range(1000):
        port = random.choice(band)
        if port in _handed_out:
            continue
        if _free_now(port, socket.SOCK_STREAM) and _free_now(port, socket.SOCK_DGRAM):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port left in {band}")


def free_port_block(count: int) -> int:
    """A port P with P .. P+count-1 all free now and none handed out before in this process
    (a pre-forked edge's worker i serves metrics on P+i)."""
    for _ in range(100):
        base = free_port()
        rest = range(base + 1, base + count)
        if base + count > _band().stop or any(port in _handed_out for port in rest):
            continue
        if not all(_free_now(port, socket.SOCK_STREAM) for port in rest):
            continue
        _handed_out.update(rest)
        return base
    raise RuntimeError("no block of free ports")


def wait_until(
    predicate: Callable[[], object], *, timeout: float, what: str, every: float = 0.05
) -> None:
    """Poll ``predicate`` until it is truthy, or fail after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # the thing polled may not be up yet
            last_error = exc
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_listening(
    process: subprocess.Popen[bytes], port: int, *, timeout: float, what: str, log: Path
) -> None:
    """Wait until ``port`` accepts connections while ``process`` runs. If the process exits
    first, fail at once; if the port never opens, stop the process. Either way the error
    carries the end of ``log``, the process's output, which says why."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if process.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {process.returncode} before listening on port {port}; "
                f"the end of {log.name}:\n{_tail(log)}"
            )
        time.sleep(0.05)
    _stop(process)
    raise TimeoutError(
        f"timed out after {timeout}s waiting for {what} to listen on port {port}; "
        f"the end of {log.name}:\n{_tail(log)}"
    )


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(unreadable: {exc})"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Kill ``process`` (its whole session, if it leads one) and reap it."""
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except ProcessLookupError:
        pass
    process.wait(timeout=10)
