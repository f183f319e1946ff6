"""``certman domains list --json`` at fleet size: time and peak memory.

For PostgreSQL (a fresh database, created and dropped here) and SQLite (a new file), fill the
store with N sites (one name or two, a current certificate each: ``benchmarks/reconcile.py``'s
fill), then run, each in a process of its own so that its peak resident memory is its own:

(a) the baseline, measured in the same run: the whole listing built as one list and dumped
    at once (what ``domains list --json`` did before it streamed);
(b) ``certman domains list --json`` as an operator runs it, written to /dev/null;
(c) ``certman domains list --expiring-within 1d`` (a filtered listing: nothing matches).

and print seconds and peak RSS, with ratios to the baseline.

    .venv/bin/python benchmarks/listing.py [--sites 100000] [--only sqlite|postgresql]
        [--pg-admin-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.onboard import postgres_database
from benchmarks.reconcile import fill
from pipeline import db

BIN = Path(sys.executable).parent
BASELINE = (
    "import json, os, sys\n"
    "from pipeline.db import session_scope\n"
    "from pipeline.fleet.sites import iter_sites\n"
    "with session_scope(os.environ['CERTMAN_DATABASE_URL']) as session:\n"
    "    sys.stdout.write(json.dumps(list(iter_sites(session, batch=50_000)), indent=2,"
    " default=str))\n"
)


def measured(command: list[str], url: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of ``command`` run with the store at ``url``."""
    env = {**os.environ, "CERTMAN_DATABASE_URL": url}
    started = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        proc = subprocess.Popen(command, stdout=devnull, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} exited {proc.returncode}")
    return elapsed, usage.ru_maxrss / 1024


def bench(kind: str, url: str, sites: int) -> None:
    db.upgrade(url)
    fill(url, sites)
    db.dispose_engines()
    base = measured([sys.executable, "-c", BASELINE], url)
    streamed = measured([str(BIN / "certman"), "domains", "list", "--json"], url)
    filtered = measured([str(BIN / "certman"), "domains", "list", "--expiring-within", "1d"], url)
    print(f"\n{kind}, {sites} sites")
    print(f"  baseline: one list, dumped at once   {base[0]:6.1f} s  {base[1]:7.0f} MiB")
    for label, (seconds, rss) in (
        ("domains list --json (streamed)", streamed),
        ("domains list --expiring-within 1d", filtered),
    ):
        print(f"  {label:36} {seconds:6.1f} s  {rss:7.0f} MiB   "
              f"{seconds / base[0]:.2f}x the time, {rss / base[1]:.2f}x the memory")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=100_000)
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    parser.add_argument(
        "--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()
    if args.only in (None, "postgresql"):
        with postgres_database(args.pg_admin_url) as url:
            bench("PostgreSQL", url, args.sites)
    if args.only in (None, "sqlite"):
        with tempfile.TemporaryDirectory(prefix="certman-bench-listing-") as directory:
            bench("SQLite", f"sqlite:///{directory}/certman.db", args.sites)


if __name__ == "__main__":
    main()
