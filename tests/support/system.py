"""The whole system on loopback: Pebble, an edge, Celery workers, sharing one environment.

Used by the integration tests, the demo and the benchmarks, so that all three run the real
commands (``celery -A pipeline worker``, ``certman-edge``, ``certman``) the way an operator does.

As in production (docs/production.md): the pipeline signs with a signing key of its own
(``CERTMAN_SIGNING_KEY``), the edge trusts only its public half
(``CERTMAN_EDGE_TRUSTED_SIGNERS``), and, with ``acl`` (the default), the edge talks to Redis as
a read-only ACL user and everything else as the pipeline's user (:mod:`pipeline.distribution.acl`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from pipeline.crypto.keys import generate_keypair
from pipeline.crypto.signing import SigningKey
from pipeline.distribution.acl import edge_rules, pipeline_rules
from tests.support.pebble import Pebble
from tests.support.ports import free_port, wait_listening, wait_until

BIN = Path(sys.executable).parent
# The work directories systems made for themselves, removed by close() (one a caller gave, such
# as the demo's, is the caller's to keep).
_MADE: set[Path] = set()


def _new_workdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="certman-"))
    _MADE.add(path)
    return path


@dataclass
class System:
    redis_url: str
    database_url: str | None = None
    workdir: Path = field(default_factory=_new_workdir)
    pebble_options: dict[str, Any] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    redis_prefix: str = "certman"
    # Restart a worker or beat that exits, as systemd's Restart=always does in production (they
    # ride out a broker restart now; the tests of that assert the supervisor restarted nothing).
    supervise: bool = False
    # Seconds the supervisor waits before starting an exited process again. Longer than the
    # broker's visibility timeout, a restarted worker takes back at once every task the dead
    # one held; shorter, a younger task waits for kombu's periodic pass (about 100 s).
    restart_delay: float = 1.0
    # Redis ACL users of this system's own on ``redis_url``'s server (removed at stop): the
    # edge read-only, the rest as the pipeline. Off for a Redis the caller may not administer.
    acl: bool = True
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
        self.other_edges: list[subprocess.Popen[bytes]] = []  # spawn_edge's, stopped with it
        self.key_dir = self.workdir / "edge-keys"
        self.database_url = self.database_url or f"sqlite:///{self.workdir / 'certman.db'}"
        self.signing_dir = self.workdir / "signing-keys"
        # What the edge is given: public halves only, never the directory with the private key.
        self.trusted_signers = self.workdir / "edge-trusted-signers"
        self.signing_key_path: Path | None = None
        token = secrets.token_hex(4)
        self.edge_user = (f"certman-edge-{token}", secrets.token_urlsafe(18))
        self.pipeline_user = (f"certman-pipeline-{token}", secrets.token_urlsafe(18))
        self._acl_applied = False

    # --- lifecycle -------------------------------------------------------------------------
    def start(self, *, workers: int = 1, edge: bool = True) -> System:
        self.pebble.start()
        key_id = generate_keypair(self.key_dir)
        self.edge_public_key = self.key_dir / f"{key_id}.pub"
        self.signing_key_path = self.new_signing_key()
        self.trust(self.signing_key_path)
        if self.acl:
            self.apply_acl()
        self.certman("db", "upgrade")
        if edge:
            self.start_edge()
        for _ in range(workers):
            self.start_worker()
        return self

    # --- signing keys and Redis users ------------------------------------------------------
    def new_signing_key(self) -> Path:
        """A new signing key pair in the system's signing directory; the private key's path."""
        key_id = SigningKey.generate().write(self.signing_dir)
        return self.signing_dir / f"{key_id}.key"

    def trust(self, key: Path, directory: Path | None = None) -> Path:
        """Copy ``key``'s public half into an edge's trusted-signers directory."""
        directory = directory or self.trusted_signers
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(key.with_suffix(".pub"), directory / key.with_suffix(".pub").name)
        return directory

    def apply_acl(self) -> None:
        """Create (or, after a Redis restart, create again) this system's two ACL users."""
        admin = redis.Redis.from_url(self.redis_url)
        try:
            for (user, password), rules in (
                (self.edge_user, edge_rules(self.redis_prefix)),
                (self.pipeline_user, pipeline_rules(self.redis_prefix, self._redis_db())),
            ):
                admin.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}",
                                      *rules)  # fmt: skip
        finally:
            admin.close()
        self._acl_applied = True

    def _redis_db(self) -> int:
        path = urlsplit(self.redis_url).path.strip("/")
        return int(path) if path.isdigit() else 0

    def _drop_acl(self) -> None:
        if not self._acl_applied:
            return
        admin = redis.Redis.from_url(self.redis_url)
        try:
            admin.execute_command("ACL", "DELUSER", self.edge_user[0], self.pipeline_user[0])
        except redis.RedisError:
            pass  # the server is gone already (a test stopped it): nothing to remove
        finally:
            admin.close()

    def redis_url_as(self, user: tuple[str, str] | None) -> str:
        """``redis_url`` with ``user``'s credentials (None, or ACL off: as given)."""
        if user is None or not self.acl:
            return self.redis_url
        parts = urlsplit(self.redis_url)
        host = parts.netloc.rsplit("@", 1)[-1]
        netloc = f"{quote(user[0], safe='')}:{quote(user[1], safe='')}@{host}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def edge_env(self) -> dict[str, str]:
        """The edge's environment: the read-only Redis user, public signing keys only."""
        return self.env | {
            "CERTMAN_REDIS_URL": self.redis_url_as(self.edge_user),
            "CERTMAN_EDGE_TRUSTED_SIGNERS": str(self.trusted_signers),
        }

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CERTMAN_DATA_DIR": str(self.workdir),
                "CERTMAN_DATABASE_URL": str(self.database_url),
                "CERTMAN_REDIS_URL": self.redis_url_as(self.pipeline_user),
                "CERTMAN_SIGNING_KEY": str(self.signing_key_path or self.workdir / "signing.key"),
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
            loop = (
                'while :; do "$@"; echo "test supervisor: exited $?, restarting"; '
                f"sleep {self.restart_delay}; done"
            )
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
        self, *, concurrency: int = 4, name: str | None = None, metrics_port: int = 0
    ) -> subprocess.Popen[bytes]:
        """A worker; with ``metrics_port``, serving its host's /metrics there as the systemd
        unit sets it up (a multiprocess directory in the worker's environment only)."""
        index = len(self.workers)
        env = None
        if metrics_port:
            metrics_dir = self.workdir / f"worker{index}-metrics"
            metrics_dir.mkdir(exist_ok=True)
            env = {**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
                   "CERTMAN_WORKER_METRICS_PORT": str(metrics_port)}  # fmt: skip
        worker = self._spawn(
            f"worker{index}.log",
            [
                str(BIN / "celery"), "-A", "pipeline", "worker", "-l", "info",
                "-c", str(concurrency), "-n", name or f"w{index}-{os.getpid()}@%h",
                # As the unit starts it: gossip and mingle on (the ACL must allow them).
                "-E",
            ],
            env=env,
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
        self.edge = self._edge(self.http_port, self.https_port, self.metrics_port, self.edge_env)
        return self.edge

    def spawn_edge(
        self, *, trusted_signers: Path, data_dir: Path, log_name: str
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Another edge of the fleet, on ports of its own, trusting ``trusted_signers``, with
        ``data_dir`` for what it keeps on disk; returns it (stopped with the system) and its
        HTTPS port."""
        env = self.edge_env | {
            "CERTMAN_EDGE_TRUSTED_SIGNERS": str(trusted_signers),
            "CERTMAN_DATA_DIR": str(data_dir),
        }
        https_port = free_port()
        edge = self._edge(free_port(), https_port, free_port(), env, log_name=log_name)
        self.other_edges.append(edge)
        return edge, https_port

    def _edge(
        self,
        http_port: int,
        https_port: int,
        metrics_port: int,
        env: dict[str, str],
        *,
        log_name: str = "edge.log",
    ) -> subprocess.Popen[bytes]:
        edge = self._spawn(
            log_name,
            [
                str(BIN / "certman-edge"),
                "--http-port", str(http_port),
                "--https-port", str(https_port),
                "--metrics-port", str(metrics_port),
                "--address", "127.0.0.1", "--allow-loopback-upstream",
                *(["--redis-url", self.edge_redis_url] if self.edge_redis_url else []),
            ],
            env=env,
        )  # fmt: skip
        wait_listening(edge, https_port, timeout=20, what="the edge", log=self.workdir / log_name)
        return edge

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
        for edge in (self.edge, *self.other_edges):
            if edge and edge.poll() is None:
                edge.terminate()
                try:
                    edge.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    edge.kill()
        self.pebble.stop()
        self._drop_acl()

    def close(self) -> None:
        """Stop everything, then remove the files the system made for itself (its work
        directory and Pebble's): the logs go with them, so a test prints them first."""
        try:
            self.stop()
        finally:
            self.pebble.remove_files()
            if self.workdir in _MADE:
                shutil.rmtree(self.workdir, ignore_errors=True)
                _MADE.discard(self.workdir)

    def __enter__(self) -> System:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
