"""A redis-server of a test's (or benchmark's) own, on a free port: one it may stop, kill and
start again, which the machine's shared Redis must never be."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import redis

from tests.support.ports import free_port, wait_until


class RedisServer:
    """Keeps nothing on disk unless given ``directory``: then an append-only file there, fsynced
    on every write, so that a restart on the same port finds everything it had. With
    ``append_only=False`` the directory is only its working directory, and nothing is kept."""

    def __init__(self, directory: Path | None = None, *, append_only: bool = True) -> None:
        self.port = free_port()
        self.directory = directory
        self.append_only = append_only
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> redis.Redis:
        """Start (or start again) and return a client once it answers."""
        if self.directory is None:
            persistence = ["--appendonly", "no"]
        elif not self.append_only:
            persistence = ["--dir", str(self.directory), "--appendonly", "no"]
        else:
            persistence = ["--dir", str(self.directory), "--appendonly", "yes",
                           "--appendfsync", "always"]  # fmt: skip
        self.proc = proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        # This server, not another process that took the port between free_port() and here.
        wait_until(
            lambda: client.info("server")["process_id"] == proc.pid,
            timeout=10,
            what=f"redis-server on port {self.port}",
        )
        return client

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop it (SIGTERM: a clean shutdown; SIGKILL: a crash) and wait for it to exit."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            self.proc.wait(timeout=20)
            self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
