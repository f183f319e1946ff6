"""A Redis master, a replica and three Sentinels of a test's own, on free loopback ports.

The Sentinels are real (``redis-server --sentinel`` with a generated configuration) with short
timings, so that a killed master is noticed in a second and a replica promoted a moment later.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

import redis

from tests.support.ports import free_port, wait_until
from tests.support.redis_tls_server import issue, make_ca

MASTER_NAME = "certman"
# A master that does not answer for this long is subjectively down; two Sentinels agreeing
# (the quorum) make it objectively down and start the failover.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class SentinelCluster:
    """With ``tls``: every server and Sentinel listens with TLS only (a certificate of a test
    CA, ``self.ca``), replicates and monitors over TLS, and asks no client certificate."""

    def __init__(self, *, sentinels: int = 3, tls: bool = False) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="certman-sentinel-"))
        self.master_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.tls = tls
        if tls:
            self.ca = make_ca(self.directory / "pki", "sentinel test CA")
            self.server_pair = issue(self.ca, self.directory / "pki", "redis", server=True)

    def _tls_options(self) -> list[str]:
        """redis-server's options (also Sentinel's, as configuration lines) for TLS only."""
        if not self.tls:
            return []
        return [
            "tls-cert-file", str(self.server_pair.cert_file),
            "tls-key-file", str(self.server_pair.key_file),
            "tls-ca-cert-file", str(self.ca.file),
            "tls-auth-clients", "no",
            "tls-replication", "yes",
        ]  # fmt: skip

    # --- addresses -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """CERTMAN_REDIS_URL in kombu's form: every Sentinel, the database on the first."""
        first, *rest = self.sentinel_ports
        return ";".join(
            [f"sentinel://127.0.0.1:{first}/0", *(f"sentinel://127.0.0.1:{p}" for p in rest)]
        )

    @property
    def env(self) -> dict[str, str]:
        env = {"CERTMAN_REDIS_URL": self.url, "CERTMAN_REDIS_SENTINEL_MASTER": MASTER_NAME}
        if self.tls:
            env["CERTMAN_REDIS_SENTINEL_TLS"] = "true"
            env["CERTMAN_REDIS_CA_FILE"] = str(self.ca.file)
        return env

    def client(self, port: int) -> redis.Redis:
        tls: dict[str, object] = {}
        if self.tls:
            tls = {"ssl": True, "ssl_ca_certs": str(self.ca.file), "ssl_cert_reqs": "required"}
        return redis.Redis(
            host="127.0.0.1", port=port, socket_timeout=2, socket_connect_timeout=1, **tls
        )

    # --- lifecycle -------------------------------------------------------------------------
    def _redis(self, port: int, *extra: str) -> None:
        work = self.directory / str(port)
        work.mkdir()
        ports = ["--port", "0", "--tls-port", str(port)] if self.tls else ["--port", str(port)]
        tls = [f"--{option}" if i % 2 == 0 else option
               for i, option in enumerate(self._tls_options())]  # fmt: skip
        with (work / "redis.log").open("ab") as log:
            self.procs[port] = subprocess.Popen(
                ["redis-server", *ports, "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(work), *tls, *extra],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def _sentinel(self, port: int) -> None:
        work = self.directory / str(port)
        work.mkdir()
        config = work / "sentinel.conf"
        # Sentinel rewrites its configuration file as it learns the others: one each, writable.
        options = self._tls_options()
        pairs = zip(options[::2], options[1::2], strict=True)
        tls = "".join(f"{key} {value}\n" for key, value in pairs)
        listen = f"port 0\ntls-port {port}\n{tls}" if self.tls else f"port {port}\n"
        config.write_text(
            f"{listen}"
            "bind 127.0.0.1\n"
            f"dir {work}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        with (work / "sentinel.log").open("ab") as log:
            self.procs[port] = subprocess.Popen(
                ["redis-server", str(config), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
            )

    def start(self) -> SentinelCluster:
        self._redis(self.master_port)
        self._redis(self.replica_port, "--replicaof", "127.0.0.1", str(self.master_port))
        for port in self.sentinel_ports:
            self._sentinel(port)
        replica = self.client(self.replica_port)
        wait_until(
            lambda: replica.info("replication")["master_link_status"] == "up",
            timeout=20,
            what="the replica to sync with the master",
        )
        others = len(self.sentinel_ports) - 1

        def sentinels_ready() -> bool:
            # Each Sentinel must know the replica (to promote it) and the other Sentinels (to
            # reach a majority): both are learnt from the master, within a few seconds.
            for port in self.sentinel_ports:
                state = self.client(port).execute_command("SENTINEL", "MASTER", MASTER_NAME)
                fields = dict(zip(state[::2], state[1::2], strict=True))
                if int(fields[b"num-slaves"]) < 1 or int(fields[b"num-other-sentinels"]) < others:
                    return False
            return True

        wait_until(sentinels_ready, timeout=30, what="the Sentinels to know each other", every=0.2)
        return self

    def master_port_now(self) -> int:
        """The master's port as the Sentinels see it now (the first that answers)."""
        for port in self.sentinel_ports:
            try:
                _, found = self.client(port).sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(found)
            except redis.RedisError:
                continue
        raise RuntimeError("no Sentinel answered")

    def kill_master(self) -> None:
        proc = self.procs[self.master_port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(
            f"== {path.parent.name}/{path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.directory.glob("*/*.log"))
        )

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SentinelCluster:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
