"""Free loopback ports, so that tests on one machine never collide."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

# Every port handed out in this process: the OS may offer a port again as soon as the socket
# that found it is closed, before whatever the port was meant for has bound it.
_handed_out: set[int] = set()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free now and not handed out before in this process."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port that was not handed out already")


def free_port_block(count: int) -> int:
    """A port P with P .. P+count-1 all free now and none handed out before in this process
    (a pre-forked edge's worker i serves metrics on P+i)."""
    for _ in range(100):
        base = free_port()
        rest = range(base + 1, base + count)
        if base + count - 1 > 65535 or any(port in _handed_out for port in rest):
            continue
        try:
            for port in rest:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
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
