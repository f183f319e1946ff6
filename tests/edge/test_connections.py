"""Connections as a budgeted resource: caps in total and per address, a first-byte timeout,
and accept back-off at the open-file limit, on a real ``certman-edge`` process."""

from __future__ import annotations

import http.client
import os
import resource
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from edge.connections import ConnectionBudget, ConnectionLimits
from pipeline.distribution.layout import publish_site
from tests.support.ports import free_port

from .conftest import DEADLINE, Keys, Sites, edge_command, get_status, wait_for


def test_budget_counts_per_client_and_in_total() -> None:
    budget = ConnectionBudget(ConnectionLimits(total=3, per_address=2))
    assert budget.admit("a") is None and budget.admit("a") is None
    assert budget.admit("a") == "per_address"
    assert budget.admit("b") is None
    assert budget.admit("c") == "total"
    budget.release("a")
    assert budget.admit("c") is None
    assert budget.open == 3
    derived = ConnectionBudget(ConnectionLimits(total=0))
    assert derived.total == max(16, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)


@dataclass
class EdgeProcess:
    proc: subprocess.Popen[bytes]
    http_port: int
    metrics_port: int
    log: Path

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def metrics(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=DEADLINE)
        try:
            conn.request("GET", "/metrics")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


@pytest.fixture
def run_edge(
    redis_url: str, prefix: str, keys: Keys, tmp_path: Path
) -> Iterator[Callable[..., EdgeProcess]]:
    started: list[EdgeProcess] = []

    def run(nofile: int, *extra: str) -> EdgeProcess:
        http_port, https_port, metrics_port = free_port(), free_port(), free_port()
        env = {**os.environ, "CERTMAN_REDIS_PREFIX": prefix, "CERTMAN_REDIS_URL": redis_url,
               "CERTMAN_EDGE_TRUSTED_SIGNERS": str(keys.signer_dir)}  # fmt: skip
        log = tmp_path / f"edge-{len(started)}.log"

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        with log.open("wb") as sink:
            proc = subprocess.Popen(
                edge_command(
                    "--http-port", str(http_port), "--https-port", str(https_port),
                    "--metrics-port", str(metrics_port), "--key-dir", str(keys.directory),
                    "--address", "127.0.0.1", "--allow-loopback-upstream",
                    "--state-dir", tempfile.mkdtemp(prefix="certman-edge-state-"), *extra,
                ),
                env=env,
                stderr=sink,
                preexec_fn=limit,
            )  # fmt: skip
        edge = EdgeProcess(proc, http_port, metrics_port, log)
        started.append(edge)
        url = f"http://127.0.0.1:{metrics_port}/healthz"
        wait_for(lambda: get_status(url) == 200, 15, "edge healthz")
        return edge

    yield run
    for edge in started:
        edge.proc.kill()
        edge.proc.wait()


def _idle(port: int, source: str) -> socket.socket | None:
    """A connection that never sends a byte, or None when the edge's backlog is full."""
    sock = socket.socket()
    sock.settimeout(0.3)
    sock.bind((source, 0))
    try:
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def _get(port: int, host: str, timeout: float = DEADLINE) -> tuple[int, float]:
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.monotonic() - started
    finally:
        conn.close()


def test_per_address_cap_keeps_others_served(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    run_edge: Callable[..., EdgeProcess],
) -> None:
    publish_site(redis_client, prefix, sites.record("plain.test", upstream=upstream, cert=False))
    edge = run_edge(1024, "--max-connections-per-address", "20", "--first-byte-timeout", "30")
    wait_for(lambda: _get(edge.http_port, "plain.test")[0] == 200, what="the site served")
    held = [s for s in (_idle(edge.http_port, "127.0.0.2") for _ in range(100)) if s]
    try:
        status, took = _get(edge.http_port, "plain.test")
        assert status == 200 and took < 1.0, (status, took)
        text = edge.metrics()
        refused = [
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith('certman_edge_connections_refused_total{reason="per_address"}')
        ]
        assert refused and refused[0] >= 80, refused
        # The refused ones were reset, not left open: 20 of the 100 stay.
        alive = 0
        for sock in held:
            sock.setblocking(False)
            try:
                sock.recv(1)  # b"" (closed) or a reset: refused
            except BlockingIOError:
                alive += 1  # open, and nothing to read
            except OSError:
                pass
        assert alive == 20, alive
    finally:
        for sock in held:
            sock.close()


def test_open_file_limit_backs_off_quietly_and_recovers(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    run_edge: Callable[..., EdgeProcess],
) -> None:
    """No caps to save it: the edge runs into EMFILE, pauses accepting instead of spinning,
    logs one line, and serves the next client once the silent connections time out."""
    publish_site(redis_client, prefix, sites.record("plain.test", upstream=upstream, cert=False))
    nofile = 128
    edge = run_edge(
        nofile,
        "--max-connections", "100000",
        "--max-connections-per-address", "100000",
        "--first-byte-timeout", "3",
    )  # fmt: skip
    wait_for(lambda: _get(edge.http_port, "plain.test")[0] == 200, what="the site served")
    before = len(edge.log_lines())
    held: list[socket.socket] = []
    try:
        # Silent connections until the process has no file descriptor left, then a few more
        # that wait in the listen backlog.
        while edge.open_files() < nofile and len(held) < 2 * nofile:
            sock = _idle(edge.http_port, "127.0.0.2")
            if sock is not None:
                held.append(sock)
        wait_for(lambda: edge.open_files() >= nofile, what="the open-file limit reached")
        held += [s for s in (_idle(edge.http_port, "127.0.0.2") for _ in range(10)) if s]
        cpu = edge.cpu_seconds()
        time.sleep(1.0)
        spent = edge.cpu_seconds() - cpu
        assert spent < 0.2, f"{spent:.2f} s of CPU in 1 s at the open-file limit"
        # Another client: in the backlog until the silent ones are closed, then served.
        status, took = _get(edge.http_port, "plain.test", timeout=15)
        assert status == 200, status
        assert took < 8, took
    finally:
        for sock in held:
            sock.close()
    lines = edge.log_lines()[before:]
    assert not any("Traceback" in line for line in lines), lines[:20]
    paused = [line for line in lines if "pausing accepts" in line]
    assert len(paused) == 1, lines[:20]
    assert len(lines) <= 5, lines[:20]
    text = edge.metrics()
    assert 'certman_edge_accept_errors_total{reason="EMFILE"}' in text
    assert 'certman_edge_connections_refused_total{reason="first_byte_timeout"}' in text


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--upstream-per-site", "0"], {}, "--upstream-per-site must be at least 1"),
        (["--first-byte-timeout", "-1"], {}, "--first-byte-timeout must be at least 0"),
        (["--via-pseudonym", "a,b"], {}, "--via-pseudonym must be a token"),
        ([], {"CERTMAN_EDGE_UPSTREAM_PER_CLIENT": "many"}, "--upstream-per-client: invalid int"),
        ([], {"CERTMAN_EDGE_ALLOW_LOOPBACK_UPSTREAM": "maybe"}, "'maybe' is not on or off"),
    ],
)
def test_bad_budget_settings_get_one_line(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = subprocess.run(
        edge_command(*args),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("certman-edge: ")
