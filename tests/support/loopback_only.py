"""Proof that code under test sends nothing beyond this machine's loopback.

An audit hook (PEP 578) sees every ``socket.connect`` and ``socket.sendto`` this process makes,
in any thread, before the kernel does. Inside :func:`loopback_only` one aimed anywhere but
127.0.0.0/8 or ::1 is recorded and stopped there with :class:`OutsideTraffic`, so a test that
shows an address is refused also shows nothing was sent to it, without stubbing any socket.
"""

from __future__ import annotations

import ipaddress
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class OutsideTraffic(RuntimeError):
    """Something tried to reach an address beyond loopback."""


_lock = threading.Lock()
_active = 0
_attempts: list[str] = []
_installed = False


def _loopback(address: Any) -> bool:
    if not isinstance(address, tuple) or not address:
        return True  # a Unix socket path, or an abstract one: never leaves the machine
    host = str(address[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name at this level would be resolved by the kernel: not allowed
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if not _active or event not in ("socket.connect", "socket.sendto"):
        return
    address = args[1] if len(args) > 1 else None
    if not _loopback(address):
        _attempts.append(f"{event} {address!r}")
        raise OutsideTraffic(f"{event} to {address!r} outside loopback")


@contextmanager
def loopback_only() -> Iterator[list[str]]:
    """Inside: any connect or sendto beyond loopback fails; the list gets each attempt."""
    global _active, _installed
    with _lock:
        if not _installed:
            # Audit hooks cannot be removed: one, switched on and off by the counter.
            sys.addaudithook(_hook)
            _installed = True
        _active += 1
        start = len(_attempts)
    seen: list[str] = []
    try:
        yield seen
    finally:
        with _lock:
            _active -= 1
            seen.extend(_attempts[start:])
