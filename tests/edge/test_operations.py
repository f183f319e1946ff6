"""``certman-edge`` as an operator runs it: loud at once when Redis is out of reach (and not
again every retry), counting it, serving from its mirror meanwhile; and ``--log-format json``
(or CERTMAN_LOG_FORMAT) giving one JSON object per line, with the domain where a line is about
a site."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import redis

from pipeline.crypto.signing import SigningKey
from pipeline.distribution.layout import publish_site
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer

from .conftest import Keys, RunningEdge, Sites, edge_command, get_status, serial_of, wait_for


@dataclass
class EdgeProcess:
    proc: subprocess.Popen[str]
    https_port: int
    metrics_port: int
    started: float
    lines: list[tuple[float, str]] = field(default_factory=list)  # (seconds after start, line)
    reader: threading.Thread | None = None

    def collect(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.monotonic() - self.started, line.rstrip("\n")))

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        import urllib.request

        with urllib.request.urlopen(url, timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError(f"{name} not on /metrics")

    def serial(self, pki: Pki, name: str) -> str:
        raw = socket.create_connection(("127.0.0.1", self.https_port), timeout=5)
        with pki.client_context().wrap_socket(raw, server_hostname=name) as sock:
            der = sock.getpeercert(binary_form=True)
        from cryptography import x509

        assert der is not None
        return format(x509.load_der_x509_certificate(der).serial_number, "x")


@pytest.fixture
def run_edge(keys: Keys, prefix: str) -> Iterator[Callable[..., EdgeProcess]]:
    running: list[EdgeProcess] = []

    def run(
        state: Path, redis_url: str, *args: str, env: dict[str, str] | None = None
    ) -> EdgeProcess:
        https_port, metrics_port = free_port(), free_port()
        command = edge_command(
            "--http-port", str(free_port()), "--https-port", str(https_port),
            "--metrics-port", str(metrics_port), "--address", "127.0.0.1",
            "--key-dir", str(keys.directory), "--trusted-signers", str(keys.signer_dir),
            "--state-dir", str(state), "--redis-url", redis_url, *args,
        )  # fmt: skip
        inherited = {k: v for k, v in os.environ.items() if k != "CERTMAN_LOG_FORMAT"}
        full_env = {**inherited, "CERTMAN_REDIS_PREFIX": prefix, **(env or {})}
        proc = subprocess.Popen(command, env=full_env, stderr=subprocess.PIPE, text=True)
        edge = EdgeProcess(proc, https_port, metrics_port, time.monotonic())
        edge.reader = threading.Thread(target=edge.collect, daemon=True)
        edge.reader.start()
        running.append(edge)
        return edge

    yield run
    for edge in running:
        if edge.proc.poll() is None:
            edge.proc.kill()
        edge.proc.wait()
        if edge.reader is not None:
            edge.reader.join(5)
        if edge.proc.stderr is not None:
            edge.proc.stderr.close()


def _fill_mirror(
    start_edge: Callable[..., RunningEdge], state: Path, sites: Sites, r: redis.Redis, prefix: str
) -> str:
    """A mirror (worker 0's) holding one published site; its serial."""
    record = sites.record("mirrored.test")
    publish_site(r, prefix, record)
    edge = start_edge(mirror_path=state / "mirror-0.sqlite3")
    edge.wait_ready()
    edge.stop()
    os.chmod(state, 0o700)
    return str(record.serial)


def test_an_edge_that_cannot_reach_redis_says_so_within_5_s_and_counts_it(
    tmp_path: Path,
    pki: Pki,
    sites: Sites,
    redis_client: redis.Redis,
    prefix: str,
    start_edge: Callable[..., RunningEdge],
    run_edge: Callable[..., EdgeProcess],
) -> None:
    state = tmp_path / "state"
    serial = _fill_mirror(start_edge, state, sites, redis_client, prefix)
    closed = free_port()
    edge = run_edge(state, f"redis://certman-edge:s3cretPassw0rd@127.0.0.1:{closed}/0")

    def warned() -> list[tuple[float, str]]:
        return [(t, line) for t, line in edge.lines if "cannot reach Redis" in line]

    (at, line), *_ = wait_for(warned, timeout=10, what="the warning")
    assert at < 5.0, f"warned {at:.1f} s after start"
    assert " WARNING " in line and f"redis://127.0.0.1:{closed}/0" in line
    assert "Connection refused" in line or "Error 111" in line, line
    # Counted, and growing while it lasts; served from the mirror meanwhile.
    first = wait_for(lambda: edge.metric("certman_edge_sync_failures_total"), what="counted")
    assert edge.serial(pki, "mirrored.test") == serial
    assert get_status(f"http://127.0.0.1:{edge.metrics_port}/healthz") == 200
    wait_for(lambda: edge.metric("certman_edge_sync_failures_total") >= first + 3, what="grows")
    # Said once, not at every retry; and never the password.
    assert len(warned()) == 1, warned()
    assert all("s3cretPassw0rd" not in text for _, text in edge.lines)
    assert all("Traceback" not in text for _, text in edge.lines)


def test_json_logs_are_one_object_per_line_with_the_domain(
    tmp_path: Path,
    pki: Pki,
    keys: Keys,
    sites: Sites,
    redis_client: redis.Redis,
    redis_url: str,
    prefix: str,
    run_edge: Callable[..., EdgeProcess],
) -> None:
    genuine = sites.record("good.test")
    forged = sites.record("forged.test")
    assert forged.signed is not None
    forged = replace(forged, signed=SigningKey.generate().sign_site(forged.signed))
    publish_site(redis_client, prefix, genuine)
    publish_site(redis_client, prefix, forged)
    state = tmp_path / "state"
    # The format from the environment, as every role reads it.
    edge = run_edge(state, redis_url, env={"CERTMAN_LOG_FORMAT": "json"})
    url = f"http://127.0.0.1:{edge.metrics_port}/healthz"
    wait_for(lambda: get_status(url) == 200, timeout=10, what="healthz 200")
    assert edge.serial(pki, "good.test") == genuine.serial
    with pytest.raises(OSError):  # ssl.SSLError: the forged statement is refused
        edge.serial(pki, "forged.test")
    wait_for(lambda: any("forged.test" in text for _, text in edge.lines), what="refusal logged")
    # A first start serves from the index at once and logs its snapshot line only once the
    # mirror is filled, which on a slow machine comes after the refusal.
    wait_for(lambda: any('"snapshot: ' in text for _, text in edge.lines), what="snapshot logged")
    edge.proc.send_signal(signal.SIGTERM)
    assert edge.proc.wait(10) == 0
    assert edge.reader is not None
    edge.reader.join(5)  # every line read, to EOF
    records = [json.loads(text) for _, text in edge.lines]  # every line, or this fails
    assert len(records) >= 3
    for record in records:
        assert {"time", "level", "logger", "process", "message"} <= record.keys(), record
    refusal = next(r for r in records if "refusing the record of forged.test" in r["message"])
    assert refusal["domain"] == "forged.test" and refusal["level"] == "ERROR"
    assert any(r["message"].startswith("snapshot: ") for r in records)


def test_an_unknown_log_format_is_one_line(
    tmp_path: Path, redis_url: str, run_edge: Callable[..., EdgeProcess]
) -> None:
    edge = run_edge(tmp_path / "state", redis_url, "--log-format", "xml")
    assert edge.proc.wait(30) != 0
    assert edge.reader is not None
    edge.reader.join(5)
    assert len(edge.lines) == 1 and "log format must be one of text, json" in edge.lines[0][1]


def test_an_edge_that_loses_redis_says_so_at_once_naming_it(
    tmp_path: Path,
    pki: Pki,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = RedisServer()
    client = server.start()
    try:
        record = sites.record("kept.test")
        publish_site(client, "ops", record)
        client.close()
        edge = start_edge(redis_url=server.url, prefix="ops", mirror_path=tmp_path / "m.sqlite3")
        edge.wait_ready()
        caplog.set_level(logging.WARNING, logger="edge.sync")
        server.stop()
        lost = time.monotonic()

        def said() -> list[str]:
            return [r.getMessage() for r in caplog.records if "Redis at" in r.getMessage()]

        wait_for(said, what="a warning")
        assert time.monotonic() - lost < 5.0
        assert said()[0].startswith(f"lost Redis at redis://127.0.0.1:{server.port}")
        before = float(
            next(
                line.split()[1]
                for line in edge.metrics().splitlines()
                if line.startswith("certman_edge_sync_failures_total ")
            )
        )
        assert before >= 1
        assert serial_of(edge.peer_cert("kept.test")) == record.serial
    finally:
        server.stop()


def test_a_refusal_to_start_is_a_json_line_too(
    tmp_path: Path, redis_url: str, run_edge: Callable[..., EdgeProcess]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    edge = run_edge(state, redis_url, "--log-format", "json")
    assert edge.proc.wait(30) == 2
    assert edge.reader is not None
    edge.reader.join(5)
    assert len(edge.lines) == 1, edge.lines
    record = json.loads(edge.lines[0][1])
    assert record["level"] == "CRITICAL" and str(state) in record["message"]
    assert "group- or world-writable" in record["message"]
