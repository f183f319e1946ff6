"""pipeline.worker_metrics: a worker host's processes counted together, scraped over HTTP.

A real "worker host" runs as a subprocess in prometheus_client's multiprocess mode, serves its
endpoint from the main process as a Celery worker would from ``worker_init``, and forks real
children that do what the issuance tasks will (count steps, time CA requests, count a CA
refusal through pipeline.acme.ratelimit's counter) and exit. The test scrapes the endpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline import worker_metrics
from pipeline.errors import AttemptFailed, NameRefused, PollAgain, RateLimited, RetryLater
from pipeline.version import certman_version
from tests.support.ports import free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

HOST = textwrap.dedent(
    """
    import contextlib, os, sys, time
    from pipeline import worker_metrics as wm
    from pipeline.acme import ratelimit
    from pipeline.errors import NameRefused, RateLimited

    server = wm.start_host_endpoint(
        address="127.0.0.1", port=int(os.environ["CERTMAN_WORKER_METRICS_PORT"])
    )
    assert server is not None, "no endpoint"

    def work():
        wm.observe_step("place_order", "ok", "none", 0.2)
        with contextlib.suppress(RateLimited), wm.timed_step("place_order"):
            raise RateLimited("rate limited by the CA", 5)
        with contextlib.suppress(NameRefused), wm.timed_step("place_order"):
            raise NameRefused("the CA refuses", error_type="caa")
        wm.observe_acme_request("new-order", "post", 0.05)
        ratelimit.CA_REFUSALS.labels("new-orders").inc()

    children = []
    for _ in range(2):  # two pool children that work and exit, as after max-tasks-per-child
        pid = os.fork()
        if pid == 0:
            work()
            wm.child_exited()
            os._exit(0)
        children.append(pid)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    read, write = os.pipe()
    idle = os.fork()  # one child still alive while scraped
    if idle == 0:
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    print("ready", flush=True)
    sys.stdin.read()  # until the test is done
    os.close(write)
    os.waitpid(idle, 0)
    server.shutdown()
    """
)


def run_host(directory: Path, port: int) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "CERTMAN_WORKER_METRICS_PORT": str(port),
        "CERTMAN_WORKER_METRICS_ADDRESS": "127.0.0.1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", HOST],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # returns at "ready" or when the host fails
    if line.strip() != "ready":
        proc.kill()
        proc.stdout.close()
        pytest.fail(f"worker host did not start: {line!r}, exit {proc.wait()}")
    return proc


def stop_host(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    proc.stdout.close()
    assert proc.wait(10) == 0


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_host_endpoint_sums_its_children_and_starts_from_zero_after_a_restart(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "worker-metrics"
    port = free_port()
    for _run in range(2):  # the second run is the worker restarted: counts start again
        host = run_host(directory, port)
        try:
            samples = scrape(port)
        finally:
            stop_host(host)
        steps = "certman_issuance_steps_total"
        assert value(samples, steps, step="place_order", outcome="ok", error_class="none") == 2
        assert (
            value(samples, steps, step="place_order", outcome="retry", error_class="rateLimited")
            == 2
        )
        assert value(samples, steps, step="place_order", outcome="blocked", error_class="caa") == 2
        duration = "certman_issuance_step_duration_seconds"
        assert value(samples, f"{duration}_count", step="place_order") == 6
        assert value(samples, f"{duration}_sum", step="place_order") >= 0.4
        acme = "certman_acme_request_duration_seconds"
        assert value(samples, f"{acme}_count", endpoint="new-order", method="POST") == 2
        assert value(samples, f"{acme}_bucket", endpoint="new-order", method="POST", le="0.05") == 2
        assert value(samples, "certman_ratelimit_ca_refusals_total", kind="new-orders") == 2
        # The host's own: build, process, and the live child.
        build = [k for k in samples if k[0] == "certman_build_info"]
        assert len(build) == 1 and ("version", certman_version()) in build[0][1]
        assert value(samples, "process_resident_memory_bytes") > 0
        assert value(samples, "certman_worker_pool_processes") == 1
        assert value(samples, "certman_worker_pool_resident_memory_bytes") > 0
        assert list(directory.glob("*.db")), "the children wrote no sample files"


def test_no_endpoint_without_multiprocess_mode(caplog: pytest.LogCaptureFixture) -> None:
    # This test process imported prometheus_client without PROMETHEUS_MULTIPROC_DIR.
    caplog.set_level(logging.WARNING, logger="pipeline.worker_metrics")
    assert worker_metrics.start_host_endpoint(address="127.0.0.1", port=free_port()) is None
    assert "PROMETHEUS_MULTIPROC_DIR" in caplog.text
    assert worker_metrics.start_host_endpoint(address="127.0.0.1", port=0) is None  # off


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (None, ("ok", "none")),
        (PollAgain("pending", 2), ("poll", "none")),
        (RateLimited("slow down", 60), ("retry", "rateLimited")),
        (RetryLater("badNonce", 1), ("retry", "retryable")),
        (AttemptFailed("validation", error_type="unauthorized"), ("failed", "unauthorized")),
        (AttemptFailed("no DNS", error_type="selfCheck"), ("failed", "selfCheck")),
        (
            NameRefused("refused", error_type="rejectedIdentifier"),
            ("blocked", "rejectedIdentifier"),
        ),
        (AttemptFailed("odd", error_type="dealer.example.com"), ("failed", "other")),
        (ValueError("bug"), ("error", "unexpected")),
    ],
)
def test_classify_keeps_labels_to_a_fixed_list(
    exc: BaseException | None, expected: tuple[str, str]
) -> None:
    assert worker_metrics.classify(exc) == expected


def test_a_taken_port_leaves_the_worker_running_without_an_endpoint(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
        script = (
            "import logging; logging.basicConfig()\n"
            "from pipeline import worker_metrics\n"
            f"assert worker_metrics.start_host_endpoint(address='127.0.0.1', port={port}) is None"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
        )
    assert done.returncode == 0, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
