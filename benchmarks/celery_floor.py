"""Celery's own CPU per task under certman's configuration: the floor under the issuance figure.

    .venv/bin/python -m benchmarks.celery_floor [--chains 1000] [--workers 2] [--concurrency 2]

Every certificate costs the workers six tasks: the five steps, and ``finalise`` once more while
the CA processes the order (Let's Encrypt answers the finalisation "processing" and asks for a
poll 3 s later). This runs chains of six tasks that do nothing, through workers started as the
systemd unit starts them (``celery -A ... worker -E``, certman's Celery app and configuration:
JSON, acknowledged late, prefetch 1, three queues, certman's consumer and Redis transport), and
prints the workers' CPU per task and per chain of six. Two variants run in the same run, one
after the other, for the ratios: task events off (what Flower's view costs) and Celery's solo
pool (what prefork's process pool costs). Nothing certman does in a step is here, so the
issuance benchmark's workers' CPU per certificate minus this chain's is what certman's own code
costs in the workers.

The no-op task is registered on certman's Celery app in this module only, so the workers run
certman's real app with one task added; they use the machine's Redis on database 7 (flushed),
as the issuance benchmark does.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
from celery import chain

REDIS_URL = "redis://127.0.0.1:6379/7"
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHAIN_LENGTH = 6

# The workers and this process read the same settings: certman's broker is built from them. Set,
# not defaulted: the database this benchmark flushes and watches must be the one they use.
os.environ["CERTMAN_REDIS_URL"] = REDIS_URL

from pipeline.celery import app  # noqa: E402  (after the settings it reads)

if os.environ.get("CERTMAN_BENCH_NO_EVENTS"):
    # In the workers of the "events off" variant: the package's configuration turns them on.
    app.conf.worker_send_task_events = False

from benchmarks.issuance import process_cpu  # noqa: E402
from tests.support.ports import wait_until  # noqa: E402


@app.task(name="benchmarks.celery_floor.noop", acks_late=True)
def noop(order_id: int, domain: str) -> None:
    """Takes what a step takes (an order id and a domain) and does nothing with it."""


@dataclass(frozen=True)
class Variant:
    label: str
    events: bool
    pool: str


VARIANTS = (
    Variant("certman's (prefork, task events on, as the unit runs it)", True, "prefork"),
    Variant("task events off", False, "prefork"),
    Variant("solo pool, task events on", True, "solo"),
)


def start_workers(
    variant: Variant, workers: int, concurrency: int
) -> list[subprocess.Popen[bytes]]:
    env = dict(os.environ)
    if not variant.events:
        env["CERTMAN_BENCH_NO_EVENTS"] = "1"  # and no -E
    procs = []
    for index in range(workers):
        command = [str(BIN / "celery"), "-A", "benchmarks.celery_floor", "worker", "-l", "info",
                   "-n", f"floor{index}-{os.getpid()}@%h", "-P", variant.pool]  # fmt: skip
        if variant.pool != "solo":
            command += ["-c", str(concurrency)]
        if variant.events:
            command.append("-E")
        procs.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: its pool children counted
            )
        )
    return procs


def workers_cpu(procs: list[subprocess.Popen[bytes]]) -> float:
    leaders = {proc.pid for proc in procs}
    return sum(cpu for pgrp, cpu in process_cpu().values() if pgrp in leaders)


def ready(workers: int) -> bool:
    return len(app.control.ping(timeout=0.5)) >= workers


def idle(client: redis.Redis[bytes]) -> bool:
    queued = sum(int(client.llen(queue)) for queue in ("issuance", "renewals", "maintenance"))
    return queued == 0 and int(client.zcard("unacked_index")) == 0


def drained(client: redis.Redis[bytes]) -> Callable[[], bool]:
    """A check that every chain is done: nothing queued and nothing held, twice running. Once is
    not enough: a message a worker has just popped is in neither until kombu records it as
    unacknowledged, a moment later."""
    was_idle = False

    def check() -> bool:
        nonlocal was_idle
        now, before = idle(client), was_idle
        was_idle = now
        return now and before

    return check


def run(variant: Variant, chains: int, workers: int, concurrency: int) -> float:
    """The workers' CPU seconds per chain of six no-op tasks."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    procs = start_workers(variant, workers, concurrency)
    try:
        wait_until(lambda: ready(workers), timeout=60, what="the workers to answer")
        before = workers_cpu(procs)
        for order_id in range(chains):
            chain(*[noop.si(order_id, "floor.example.com") for _ in range(CHAIN_LENGTH)]).delay()
        # A task leaves the queue when a worker takes it and the unacked set when it is done.
        wait_until(drained(client), timeout=60 + chains, what="the chains", every=0.1)
        return (workers_cpu(procs) - before) / chains
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument("--concurrency", type=int, default=2, help="pool size of each worker")
    args = parser.parse_args()
    print(f"{args.chains} chains of {CHAIN_LENGTH} no-op tasks; {args.workers} workers "
          f"x concurrency {args.concurrency} (solo: 1); Redis {REDIS_URL}")  # fmt: skip
    results: list[tuple[Variant, float]] = []
    for variant in VARIANTS:
        per_chain = run(variant, args.chains, args.workers, args.concurrency)
        results.append((variant, per_chain))
    base = results[0][1]
    for variant, per_chain in results:
        print(f"  {variant.label:58s} {per_chain * 1000:6.1f} ms per chain, "
              f"{per_chain * 1000 / CHAIN_LENGTH:5.2f} ms per task, "
              f"{per_chain / base:4.2f}x certman's")  # fmt: skip
    one, five, _ = os.getloadavg()
    print(f"  load average {one:.2f} (1 min), {five:.2f} (5 min) at the end, this run included")


if __name__ == "__main__":
    main()
