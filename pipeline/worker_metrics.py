"""What the Celery workers did, as Prometheus metrics: one endpoint per worker host.

Celery's prefork pool runs tasks in child processes that come and go, so no one process holds
the figures. prometheus_client's multiprocess mode, its documented route for pre-forking
servers, has every process write its samples to memory-mapped files in
``PROMETHEUS_MULTIPROC_DIR``; one HTTP endpoint, in the worker's main process, sums them at
each scrape (``MultiProcessCollector``). The choice of mode is made when prometheus_client is
first imported, so the variable must be in the worker's environment from the start (the
systemd unit's ``Environment=``), not set by code: :func:`start_host_endpoint` refuses to run
otherwise rather than serve the main process's own (empty) counters.

Set-up, from ``pipeline/celery.py``'s signals:

* ``worker_init`` (main process, before the pool forks): :func:`start_host_endpoint` empties
  the directory of a previous run's files and serves ``/metrics`` on
  ``CERTMAN_WORKER_METRICS_ADDRESS:CERTMAN_WORKER_METRICS_PORT`` (127.0.0.1:9109 by default;
  port 0 turns it off);
* ``worker_process_shutdown`` (a child, as it exits): :func:`child_exited`.

Series (no label names a domain; every label value comes from a short fixed list):

* ``certman_issuance_steps_total{step, outcome, error_class}``: issuance steps run, by how
  they ended (:data:`OUTCOMES`) and why (:data:`ERROR_CLASSES`, ``none`` when they did not fail);
* ``certman_issuance_step_duration_seconds{step}``: how long a step's function took;
* ``certman_acme_request_duration_seconds{endpoint, method}``: each HTTP request to the CA,
  pacing waits excluded (``endpoint``: the limiter's pacing name: ``new-nonce``,
  ``new-account``, ``new-order`` or ``acme`` for the rest);
* ``certman_ratelimit_ca_refusals_total{kind}``, ``certman_ratelimit_blocks_total{kind}``
  (defined in :mod:`pipeline.acme.ratelimit`, summed here like the rest);
* ``certman_build_info{version, python}`` and the ``process_*`` metrics of the main process,
  plus ``certman_worker_pool_*`` for its children together.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import platform
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from pipeline.errors import AttemptFailed, NameRefused, PollAgain, RateLimited, RetryLater
from pipeline.version import certman_version

__all__ = [
    "ERROR_CLASSES",
    "OUTCOMES",
    "child_exited",
    "classify",
    "multiprocess_dir",
    "observe_acme_request",
    "observe_step",
    "register_build_and_process",
    "start_host_endpoint",
    "timed_step",
]

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_PORT = 9109  # next to the exporter's 9108
DEFAULT_ADDRESS = "127.0.0.1"

OUTCOMES = frozenset({"ok", "poll", "retry", "failed", "blocked", "gone", "error"})
# RFC 8555 section 6.7 (and RFC 9773's alreadyReplaced), plus the pipeline's own: notFound (a
# 404 with no problem document), conflict (a 409), selfCheck (DNS does not reach the edges),
# stuck (the sweeper gave up), retryable (network, 5xx), unexpected (an exception no one
# classified), none (no failure). Anything else is "other": a label value never comes from
# outside this list, so a CA sending new types cannot grow the series.
ERROR_CLASSES = frozenset(
    {
        "accountDoesNotExist", "alreadyReplaced", "alreadyRevoked", "badCSR", "badNonce",
        "badPublicKey", "badRevocationReason", "badSignatureAlgorithm", "caa", "compound",
        "connection", "dns", "externalAccountRequired", "incorrectResponse", "invalidContact",
        "malformed", "orderNotReady", "rateLimited", "rejectedIdentifier", "serverInternal",
        "tls", "unauthorized", "unsupportedContact", "unsupportedIdentifier",
        "userActionRequired",
        "notFound", "conflict", "selfCheck", "stuck", "retryable", "unexpected", "none", "other",
    }
)  # fmt: skip
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,39}")

STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ACME_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

STEPS = Counter(
    "certman_issuance_steps_total",
    "Issuance steps run, by step, how they ended and why (error_class none when they did not "
    "fail).",
    ["step", "outcome", "error_class"],
)
STEP_SECONDS = Histogram(
    "certman_issuance_step_duration_seconds",
    "How long an issuance step's work took, whatever its outcome.",
    ["step"],
    buckets=STEP_BUCKETS,
)
ACME_SECONDS = Histogram(
    "certman_acme_request_duration_seconds",
    "HTTP requests to the CA, by the limiter's pacing endpoint and HTTP method (pacing waits "
    "excluded).",
    ["endpoint", "method"],
    buckets=ACME_BUCKETS,
)

# Issuer names come from the settings (a bounded set); reasons and causes from fixed lists.
ISSUED_BY = Counter(
    "certman_issuance_issuer_total",
    "Certificates stored, by the issuer that issued them and why it was that one (preferred: "
    "the first choice; fallback: a later one after the first failed on its side).",
    ["issuer", "reason"],
)
FALLBACKS = Counter(
    "certman_issuer_fallbacks_total",
    "Orders moved from an issuer to the next one, by the issuer left and the cause "
    "(unavailable, rate-limited, account-refused, marked-down).",
    ["issuer", "cause"],
)
FALLBACK_CAUSES = frozenset({"unavailable", "rate-limited", "account-refused", "marked-down"})


def issued(issuer: str, *, fallback: bool) -> None:
    """Count a certificate stored from ``issuer``."""
    ISSUED_BY.labels(_name(issuer), "fallback" if fallback else "preferred").inc()


def fell_back(issuer: str, cause: str) -> None:
    """Count an order leaving ``issuer`` for the next one."""
    FALLBACKS.labels(_name(issuer), cause if cause in FALLBACK_CAUSES else "other").inc()


def _name(value: str) -> str:
    return value if _NAME.fullmatch(value) else "other"


def observe_step(step: str, outcome: str, error_class: str, seconds: float) -> None:
    """Count one run of an issuance step and time it.

    ``outcome`` is one of :data:`OUTCOMES` and ``error_class`` one of :data:`ERROR_CLASSES`
    (anything else is counted as ``error`` / ``other``); :func:`classify` gives both from the
    exception a step raised.
    """
    step = _name(step)
    STEPS.labels(
        step,
        outcome if outcome in OUTCOMES else "error",
        error_class if error_class in ERROR_CLASSES else "other",
    ).inc()
    STEP_SECONDS.labels(step).observe(seconds)


def observe_acme_request(endpoint: str, method: str, seconds: float) -> None:
    """Time one HTTP request to the CA."""
    ACME_SECONDS.labels(_name(endpoint), method.upper() if method.isalpha() else "OTHER").observe(
        seconds
    )


def classify(exc: BaseException | None) -> tuple[str, str]:
    """``(outcome, error_class)`` for what a step raised (None: it returned)."""
    if exc is None:
        return "ok", "none"
    if isinstance(exc, PollAgain):
        return "poll", "none"
    if isinstance(exc, RateLimited):
        return "retry", "rateLimited"
    if isinstance(exc, RetryLater):
        return "retry", "retryable"
    if isinstance(exc, AttemptFailed):
        code = exc.error_type or "other"
        return (
            "blocked" if isinstance(exc, NameRefused) else "failed",
            code if code in ERROR_CLASSES else "other",
        )
    if type(exc).__name__ == "OrderGone":  # pipeline.issuance's; not imported (the models)
        return "gone", "none"
    return "error", "unexpected"


@contextlib.contextmanager
def timed_step(step: str) -> Iterator[None]:
    """Count and time the step run inside, classifying what it raises (and re-raising it)."""
    started = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        observe_step(step, *classify(exc), time.perf_counter() - started)
        raise
    observe_step(step, "ok", "none", time.perf_counter() - started)


# ---- the host's endpoint ------------------------------------------------------------------


def multiprocess_dir() -> Path | None:
    """The directory multiprocess mode writes to, if prometheus_client runs in that mode."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory or values.ValueClass is values.MutexValue:
        return None
    return Path(directory)


class BuildInfoCollector(Collector):
    """``certman_build_info{version, python} 1``."""

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "certman_build_info",
            "The running certman's version.",
            labels=["version", "python"],
        )
        info.add_metric([certman_version(), platform.python_version()], 1)
        yield info


class PoolProcessCollector(Collector):
    """The pool's children, together: CPU time and resident memory summed, and how many.

    Read from ``/proc`` at each scrape (the children Linux lists for the main process's
    threads), so a child's figures leave with it: the CPU total is a gauge-like sum of the
    live children, not a counter.
    """

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = Path(proc)
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._page = os.sysconf("SC_PAGESIZE") if hasattr(os, "sysconf") else 4096

    def _children(self) -> set[int]:
        pids: set[int] = set()
        for path in glob.glob(str(self._proc / "self" / "task" / "*" / "children")):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in Path(path).read_text().split())
        return pids

    def collect(self) -> Iterator[Metric]:
        cpu = rss = 0.0
        children = self._children()
        for pid in children:
            try:
                stat = (self._proc / str(pid) / "stat").read_text()
            except OSError:
                continue
            fields = stat.rpartition(")")[2].split()
            cpu += (int(fields[11]) + int(fields[12])) / self._ticks  # utime, stime
            rss += int(fields[21]) * self._page
        yield GaugeMetricFamily(
            "certman_worker_pool_processes", "Live child processes of the worker.", len(children)
        )
        yield GaugeMetricFamily(
            "certman_worker_pool_cpu_seconds",
            "User and system CPU time of the live child processes, summed.",
            cpu,
        )
        yield GaugeMetricFamily(
            "certman_worker_pool_resident_memory_bytes",
            "Resident memory of the live child processes, summed.",
            rss,
        )


def register_build_and_process(registry: CollectorRegistry) -> None:
    """``certman_build_info`` and this process's ``process_*`` and ``python_info`` metrics."""
    registry.register(BuildInfoCollector())
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


def host_registry(directory: Path) -> CollectorRegistry:
    """What the host's endpoint serves: every process's samples summed, and the host's own."""
    registry = CollectorRegistry(auto_describe=False)
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    register_build_and_process(registry)
    registry.register(PoolProcessCollector())
    return registry


def clean_directory(directory: Path) -> int:
    """Remove a previous run's sample files (a counter must start again from zero when its
    worker does); returns how many. Only ``*.db`` files: the directory may be shared with
    nothing else, but nothing else is touched if it is."""
    directory.mkdir(parents=True, exist_ok=True)
    removed = 0
    for path in directory.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


def start_host_endpoint(*, address: str, port: int) -> Any:
    """Clean the multiprocess directory and serve this host's ``/metrics`` from a thread.

    Call in the worker's main process before the pool starts (Celery's ``worker_init``).
    Returns the server (``shutdown()`` stops it), or None when turned off (port 0), when
    multiprocess mode is not on (the environment lacked ``PROMETHEUS_MULTIPROC_DIR``), or when
    the port is taken (both logged; the worker runs on without an endpoint).
    """
    if port == 0:
        return None
    directory = multiprocess_dir()
    if directory is None:
        log.warning(
            "worker metrics off: %s was not in the environment when the worker started "
            "(prometheus_client chooses multiprocess mode at import)",
            MULTIPROC_ENV,
        )
        return None
    removed = clean_directory(directory)
    try:
        server, _thread = start_http_server(port, addr=address, registry=host_registry(directory))
    except OSError as exc:
        # Metrics must not stop issuance: CertmanWorkerMetricsDown says the endpoint is missing.
        log.error("worker metrics off: cannot listen on %s:%d: %s", address, port, exc)
        return None
    log.info(
        "worker metrics on http://%s:%d/metrics (from %s, %d old files removed)",
        address,
        port,
        directory,
        removed,
    )
    return server


def child_exited(pid: int | None = None) -> None:
    """A pool child is leaving: drop its live-gauge files (prometheus_client's bookkeeping;
    its counters and histograms stay, as totals must)."""
    directory = multiprocess_dir()
    if directory is not None:
        mark_process_dead(os.getpid() if pid is None else pid, str(directory))  # type: ignore[no-untyped-call]
