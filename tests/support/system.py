"""The whole system on loopback: Pebble, an edge, Celery workers, sharing one environment.

Used by the integration tests, the demo and the benchmarks, so that all three run the real
commands (``celery -A pipeline worker``, ``certman-edge``, ``certman``) the way an operator does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from pipeline.keys import generate_keypair
from tests.support.pebble import Pebble
from tests.support.ports import free_port, port_open, wait_until

BIN = Path(sys.executable).parent


@dataclass
class System:
    redis_url: str
    database_url: str | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="certman-")))
    pebble_options: dict[str, Any] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    redis_prefix: str = "certman"
    # Restart a worker or beat that exits, as systemd's Restart=always does in production:
    # Celery 5.5/kombu 5.7 workers exit when the broker connection drops.
    supervise: bool = False
    # The edge's --redis-url, when it must differ from redis_url (None: the edge reads
    # CERTMAN_REDIS_URL like every other process).
    edge_redis_url: str | None = None

    def __post_init__(self) -> None:
        self.http_port = free_port()
        self.https_port = free_port()
        self.metrics_port = free_port()
        self.pebble = Pebble(http_port=self.http_port, **self.pebble_options)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.edge: subprocess.Popen[bytes] | None = None
        self.key_dir = self.workdir / "edge-keys"
        self.database_url = self.database_url or f"sqlite:///{self.workdir / 'certman.db'}"

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, *, workers: int = 1, edge: bool = True) -> System:
        self.pebble.start()
        key_id = generate_keypair(self.key_dir)
        self.edge_public_key = self.key_dir / f"{key_id}.pub"
        self.certman("db", "upgrade")
        if edge:
            self.start_edge()
        for _ in range(workers):
            self.start_worker()
        return self

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CERTMAN_DATA_DIR": str(self.workdir),
                "CERTMAN_DATABASE_URL": str(self.database_url),
                "CERTMAN_REDIS_URL": self.redis_url,
                "CERTMAN_REDIS_PREFIX": self.redis_prefix,
                "CERTMAN_ACME_DIRECTORY": self.pebble.directory_url,
                "CERTMAN_ACME_CA_BUNDLE": str(self.pebble.ca_bundle),
                "CERTMAN_EDGE_PUBLIC_KEY": str(self.edge_public_key),
                "CERTMAN_EDGE_KEY_DIR": str(self.key_dir),
                "CERTMAN_PIPELINE_KEY": str(self.workdir / "pipeline.key"),
                "CERTMAN_HTTP01_PORT": str(self.http_port),
                "CERTMAN_DNS_RESOLVER": self.pebble.dns_resolver,
                "CERTMAN_RATE_LIMITS": "off",
            }
        )
        env.update(self.extra_env)
        return env

    def _spawn(
        self,
        log_name: str,
        command: list[str],
        *,
        env: dict[str, str] | None = None,
        supervised: bool = False,
    ) -> subprocess.Popen[bytes]:
        if supervised and self.supervise:
            # As systemd's Restart=always does in production.
            loop = 'while :; do "$@"; echo "test supervisor: exited $?, restarting"; sleep 1; done'
            command = ["bash", "-c", loop, "supervisor", *command]
        with (self.workdir / log_name).open("ab") as log:
            # A session of its own, so that stopping kills the pool children (or the loop) too.
            return subprocess.Popen(
                command,
                env=env or self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_worker(
        self, *, concurrency: int = 4, name: str | None = None
    ) -> subprocess.Popen[bytes]:
        index = len(self.workers)
        worker = self._spawn(
            f"worker{index}.log",
            [
                str(BIN / "celery"), "-A", "pipeline", "worker", "-l", "info",
                "-c", str(concurrency), "-n", name or f"w{index}-{os.getpid()}@%h",
                "--without-gossip", "--without-mingle", "-E",
            ],
            supervised=True,
        )  # fmt: skip
        self.workers.append(worker)
        return worker

    def start_beat(self) -> subprocess.Popen[bytes]:
        beat = self._spawn(
            "beat.log",
            [
                str(BIN / "celery"), "-A", "pipeline", "beat", "-l", "info",
                "-s", str(self.workdir / "beat-schedule"),
            ],
            supervised=True,
        )  # fmt: skip
        self.workers.append(beat)
        return beat

    def start_flower(self, port: int) -> subprocess.Popen[bytes]:
        flower = self._spawn(
            "flower.log",
            [str(BIN / "celery"), "-A", "pipeline", "flower", f"--port={port}",
             "--address=127.0.0.1"],
            env=self.env | {"FLOWER_UNAUTHENTICATED_API": "true"},
        )  # fmt: skip
        self.workers.append(flower)
        return flower

    def start_edge(self) -> subprocess.Popen[bytes]:
        self.edge = self._spawn(
            "edge.log",
            [
                str(BIN / "certman-edge"),
                "--http-port", str(self.http_port),
                "--https-port", str(self.https_port),
                "--metrics-port", str(self.metrics_port),
                "--address", "127.0.0.1",
                *(["--redis-url", self.edge_redis_url] if self.edge_redis_url else []),
            ],
        )  # fmt: skip
        wait_until(lambda: port_open(self.https_port), timeout=20, what="the edge to listen")
        return self.edge

    def certman(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        # A timeout, so that a command stalled on the database or Redis fails the test instead
        # of hanging the run.
        result = subprocess.run(
            [str(BIN / "certman"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"certman {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    def call_task(self, name: str) -> None:
        """Send a beat task now, as beat would (routes apply: it goes to the maintenance
        queue)."""
        subprocess.run(
            [str(BIN / "celery"), "-A", "pipeline", "call", name],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=60,  # a broker that does not answer fails the test instead of hanging it
        )

    def domains(self) -> dict[str, dict[str, Any]]:
        rows = json.loads(self.certman("domains", "list", "--json").stdout)
        return {row["domain"]: row for row in rows}

    def wait_active(self, names: list[str], *, timeout: float = 120) -> dict[str, dict[str, Any]]:
        def all_active() -> bool:
            rows = self.domains()
            return all(rows.get(n, {}).get("state") == "active" for n in names)

        wait_until(
            all_active, timeout=timeout, what=f"{len(names)} sites to become active", every=0.5
        )
        return self.domains()

    def kill_worker(self, worker: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        # The worker's pool children share its session: kill the whole group.
        os.killpg(worker.pid, sig)
        worker.wait(timeout=30)

    def logs(self) -> str:
        """The end of each log, for printing when a test fails."""
        return "\n".join(
            f"== {path.name}\n{path.read_text(errors='replace')[-4000:]}"
            for path in sorted(self.workdir.glob("*.log"))
        )

    def log_text(self) -> str:
        """Every log whole, for asserting that a line was logged (``logs()`` keeps only the
        end of each, which later lines can push a line out of)."""
        return "\n".join(
            path.read_text(errors="replace") for path in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
        for worker in self.workers:
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
        if self.edge and self.edge.poll() is None:
            self.edge.terminate()
            try:
                self.edge.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.edge.kill()
        self.pebble.stop()

    def __enter__(self) -> System:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
