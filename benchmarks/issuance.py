"""Issuance throughput: N sites from queued to sealed in the store, against a real Pebble.

    .venv/bin/python benchmarks/issuance.py [--sites 100 1000] [--workers 2] [--concurrency N]

The whole system runs as in production, on loopback: Pebble with its validation delay off
(``PEBBLE_VA_NOSLEEP=1``) and the rate limits lifted, the edge answering HTTP-01 challenges,
and ``--workers`` Celery worker processes on one ACME account. Sites go in with the real
``scripts/bulk_onboard.py --no-queue``; the clock starts when the dispatcher is kicked and stops
when the last certificate is stored. Where the time goes: the CPU each part of the system
(workers, Pebble, the edge, Redis, PostgreSQL) spent per certificate, read from /proc, with the
throughput that implies if the machine is CPU-bound; time inside each step's task and how often
each step waited (from the workers' logs); and, first, the CPU of each step's own code run in
this process with no Celery around it (``--steps-alone``), so that the difference from the
workers' figure is what the task queue, its locks and concurrency cost.

The baseline, measured in the same run, is one site issued alone: the latency of the chain
with nothing else in flight, so the ratio says how much concurrency the pipeline gets.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import redis
from sqlalchemy import create_engine, func, select

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.models import Certificate  # noqa: E402
from tests.support.ports import wait_until  # noqa: E402
from tests.support.system import System  # noqa: E402

REDIS_URL = "redis://127.0.0.1:6379/7"
TASK_DONE = re.compile(r"Task (certman\.issue\.\w+)\[[^\]]+\] (succeeded|retry)[^\d]*([\d.]+)s")


# Pebble validates from one address, many challenges at once (3 requests each): the edge's
# per-address connection budget, made for the internet, would reset some of them.
EDGE_ENV = {"CERTMAN_EDGE_MAX_CONNECTIONS_PER_ADDRESS": "1000000"}

# The machine's own servers, which this benchmark has to itself while it runs.
SHARED = {"redis-server": -1, "postgres": -2}


def process_cpu() -> dict[int, tuple[int, float]]:
    """pid -> (process group, CPU seconds: user + system, reaped children included)."""
    tick = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue  # exited meanwhile
        # After the command: state ppid pgrp ...; utime stime cutime cstime are 12th-15th.
        pgrp = SHARED.get(comm, int(fields[2]))
        table[int(entry.name)] = (pgrp, sum(int(f) for f in fields[11:15]) / tick)
    return table


def cpu_by_part(system: System, postgresql: bool) -> dict[str, float]:
    """CPU seconds so far of each part of the system. Workers and the edge run in process groups
    of their own (their pool children included); Redis and PostgreSQL are the machine's, used by
    nothing else meanwhile."""
    table = process_cpu()

    def groups(leaders: list[int]) -> float:
        return sum(cpu for pgrp, cpu in table.values() if pgrp in leaders)

    return {
        "workers": groups([w.pid for w in system.workers]),
        "Pebble": sum(table.get(pid, (0, 0.0))[1] for pid in system.pebble.pids),
        "edge": groups([system.edge.pid] if system.edge else []),
        "Redis": groups([SHARED["redis-server"]]),
        **({"PostgreSQL": groups([SHARED["postgres"]])} if postgresql else {}),
    }


def stored(database_url: str) -> int:
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            return int(connection.scalar(select(func.count()).select_from(Certificate)) or 0)
    finally:
        engine.dispose()


def onboard(system: System, names: list[str]) -> None:
    csv = Path(tempfile.mkstemp(suffix=".csv")[1])
    csv.write_text("".join(f"{name}\n" for name in names))
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bulk_onboard.py"), "--no-queue", str(csv)],
        env=system.env,
        check=True,
        capture_output=True,
    )


def kick(system: System) -> None:
    subprocess.run(
        [str(Path(sys.executable).parent / "celery"), "-A", "pipeline", "call",
         "certman.maintenance.dispatch", "--queue", "issuance"],
        env=system.env, check=True, capture_output=True,
    )  # fmt: skip


def fresh_database(admin_url: str | None) -> str | None:
    """A new PostgreSQL database for one run (None: the embedded SQLite default)."""
    if admin_url is None:
        return None
    import uuid

    import sqlalchemy as sa

    name = f"certman_bench_{uuid.uuid4().hex[:8]}"
    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(admin_url: str, database_url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        name = database_url.rsplit("/", 1)[1]
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def profile(system: System, prefix: str | None) -> list[subprocess.Popen[bytes]]:
    """py-spy sampling every worker process (pool children included) into ``prefix-wN.txt``
    (collapsed stacks: one line a stack, its sample count last), until stopped."""
    if prefix is None:
        return []
    return [
        subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(worker.pid),
                "--subprocesses",
                "--format",
                "raw",
                "--rate",
                "200",
                "--nonblocking",
                "--output",
                f"{prefix}-w{index}.txt",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for index, worker in enumerate(system.workers)
    ]


def run(
    count: int,
    workers: int,
    concurrency: int,
    tag: str,
    admin_url: str | None,
    profile_prefix: str | None = None,
) -> tuple[float, dict[str, str]]:
    redis.Redis.from_url(REDIS_URL).flushdb()
    env = {"CERTMAN_MAX_ORDERS_IN_FLIGHT": "200", **EDGE_ENV}
    database_url = fresh_database(admin_url)
    # acl=False: the machine's shared Redis is not the benchmark's to add users to.
    with System(redis_url=REDIS_URL, extra_env=env, database_url=database_url, acl=False) as system:
        system.start(workers=0)
        for _ in range(workers):
            system.start_worker(concurrency=concurrency)
        names = [f"{tag}-{i}.bench-dealer.com" for i in range(count)]
        onboard(system, names)
        samplers = profile(system, profile_prefix)
        cpu_before = cpu_by_part(system, admin_url is not None)
        start = time.monotonic()
        kick(system)
        wait_until(
            lambda: stored(str(system.database_url)) >= count,
            timeout=60 + count,
            what=f"{count} certificates",
            every=0.2,
        )
        elapsed = time.monotonic() - start
        cpu_after = cpu_by_part(system, admin_url is not None)
        for sampler in samplers:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its file as it stops
        for sampler in samplers:
            sampler.wait(timeout=60)
        logs = "\n".join(p.read_text() for p in system.workdir.glob("worker*.log"))
    if admin_url and database_url:
        drop_database(admin_url, database_url)
    busy: dict[str, float] = defaultdict(float)
    waits: Counter[str] = Counter()
    for task, outcome, seconds in TASK_DONE.findall(logs):
        step = task.rsplit(".", 1)[1]
        if outcome == "succeeded":
            busy[step] += float(seconds)
        else:
            waits[step] += 1
    where = {
        step: f"{busy[step] / count * 1000:.1f} ms in task per site, "
        f"{waits[step] / count:.2f} waits per site"
        for step in STEPS
    }
    used = {part: (cpu_after[part] - cpu_before[part]) / count * 1000 for part in cpu_after}
    where["CPU per certificate"] = ", ".join(f"{part} {ms:.1f} ms" for part, ms in used.items())
    cores = os.cpu_count() or 1
    where["CPU-bound ceiling"] = (
        f"{cores} cores / {sum(used.values()):.1f} ms = {cores * 1000 / sum(used.values()):.0f} "
        f"certificates/s; {sum(used.values()) * count / 1000 / (cores * elapsed):.0%} of the "
        "machine busy with these parts during the run"
    )
    # The machine may be shared: CPU per certificate grows with what else runs on it.
    one, five, _ = os.getloadavg()
    where["load average"] = f"{one:.2f} (1 min), {five:.2f} (5 min) at the end, this run included"
    return elapsed, where


STEPS = ("place_order", "publish_challenges", "poll_validation", "finalise", "encrypt_and_store")


def steps_alone(count: int, admin_url: str | None) -> dict[str, float]:
    """CPU per certificate of each step's own code, called in this process one at a time with no
    Celery around it: what the workers would spend if the task queue and its concurrency cost
    nothing. Waiting for the CA happens between calls, outside what is measured."""
    redis.Redis.from_url(REDIS_URL).flushdb()
    database_url = fresh_database(admin_url)
    saved = dict(os.environ)
    with System(
        redis_url=REDIS_URL, extra_env=EDGE_ENV, database_url=database_url, acl=False
    ) as system:
        system.start(workers=0)
        onboard(system, [f"alone-{i}.bench-dealer.com" for i in range(count)])
        os.environ.update(system.env)
        try:
            cpu = _steps_inline(count)
        finally:
            os.environ.clear()
            os.environ.update(saved)
            _forget_settings()
    if admin_url and database_url:
        drop_database(admin_url, database_url)
    return cpu


def _forget_settings() -> None:
    from pipeline import runtime

    runtime.reset(close=True, settings=True)


def _steps_inline(count: int) -> dict[str, float]:
    import heapq

    from pipeline import runtime
    from pipeline.errors import RetryLater
    from pipeline.fleet.dispatch import start_due
    from pipeline.issuance import OrderSteps

    _forget_settings()
    steps = OrderSteps(runtime.current())
    _ = steps.acme  # the account's registration is not a step's cost
    with steps.sessions() as session:
        orders = [started.order_id for started in start_due(session, limit=count)]
    cpu: dict[str, float] = defaultdict(float)
    due = [(0.0, order_id, 0) for order_id in orders]  # (not before, order, step index)
    while due:
        not_before, order_id, index = heapq.heappop(due)
        time.sleep(max(0.0, not_before - time.monotonic()))
        step = STEPS[index]
        started = time.process_time()
        try:
            getattr(steps, step)(order_id)
        except RetryLater as problem:
            cpu[step] += time.process_time() - started
            heapq.heappush(due, (time.monotonic() + min(problem.countdown, 2.0), order_id, index))
            continue
        cpu[step] += time.process_time() - started
        if index + 1 < len(STEPS):
            heapq.heappush(due, (time.monotonic(), order_id, index + 1))
    return {step: cpu[step] / count * 1000 for step in STEPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--workers", type=int, default=2, help="Celery worker processes")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=os.cpu_count() or 2,
        help="pool size of each worker (default: Celery's own, one per core)",
    )
    parser.add_argument(
        "--steps-alone", type=int, default=100, help="sites for the no-Celery step timing"
    )
    parser.add_argument(
        "--postgresql",
        metavar="ADMIN_URL",
        nargs="?",
        const="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="store in a new PostgreSQL database (default: the embedded SQLite)",
    )
    parser.add_argument(
        "--profile",
        metavar="PREFIX",
        help="sample the workers with py-spy during each run (not the baseline) into "
        "PREFIX-<sites>-w<N>.txt, collapsed stacks (py-spy's CPU cost lands on the workers' "
        "figures: compare CPU only between runs without it)",
    )
    args = parser.parse_args()

    print(f"store: {'PostgreSQL' if args.postgresql else 'SQLite'}")
    alone = steps_alone(args.steps_alone, args.postgresql)
    print(f"steps alone ({args.steps_alone} sites, in one process, no Celery): "
          f"{sum(alone.values()):.1f} ms CPU per certificate")  # fmt: skip
    print("  " + ", ".join(f"{step} {ms:.1f}" for step, ms in alone.items()))
    one, five, _ = os.getloadavg()
    print(f"  load average {one:.2f} (1 min), {five:.2f} (5 min) at the end")
    single, _ = run(1, args.workers, args.concurrency, "baseline", args.postgresql)
    print(f"baseline: one site alone, queued to stored: {single:.2f} s")
    print(f"workers: {args.workers} x concurrency {args.concurrency}; one ACME account; "
          "limits lifted; Pebble validation delay off")  # fmt: skip
    for count in args.sites:
        elapsed, where = run(
            count,
            args.workers,
            args.concurrency,
            f"n{count}",
            args.postgresql,
            f"{args.profile}-{count}" if args.profile else None,
        )
        rate = count / elapsed
        print(f"\n{count} sites: {elapsed:.1f} s, {rate:.1f} certificates/s "
              f"({rate * single:.1f}x the single-site rate)")  # fmt: skip
        for step, text in where.items():
            print(f"  {step:19} {text}")


if __name__ == "__main__":
    main()
