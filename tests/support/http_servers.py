"""Test HTTP servers on a thread of their own: started, and stopped at once when done."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from socketserver import BaseServer
from typing import TypeVar

S = TypeVar("S", bound=BaseServer)

# How often serve_forever looks for shutdown(): the standard library's 0.5 s made every server a
# test stopped cost it up to half a second.
POLL_INTERVAL = 0.02


@contextmanager
def running(server: S) -> Iterator[S]:
    """``server`` serving on a daemon thread until the block ends; then shut down and closed."""
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": POLL_INTERVAL}, daemon=True
    )
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
