"""``GET /v1/sites`` walked page by page over a whole fleet: time and the server's peak memory.

Fills two stores (``benchmarks/reconcile.py``'s fill: one name or two and a current certificate
a site), a baseline of --baseline sites (10,000) and the fleet of --sites (100,000), then for
each, interleaved and --rounds times: starts ``certman api serve`` (one process, its own) on the
store, walks every page of ``/v1/sites?limit=1000`` with a token, and stops it; prints the walk's
seconds and the server process's peak RSS (its ``ru_maxrss``, read when it exits), with the
ratios of the fleet to the baseline. Keyset pagination holds one page at a time, so the peak
stays where the baseline's is while the time grows with the fleet.

    .venv/bin/python benchmarks/api_list.py [--sites 100000] [--baseline 10000] [--rounds 2]
        [--only sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.onboard import postgres_database
from benchmarks.reconcile import fill
from pipeline import db
from tests.support.ports import free_port, wait_until

BIN = Path(sys.executable).parent


def env_for(url: str, data_dir: str) -> dict[str, str]:
    # No Redis is asked for: the rate limit is off, and a listing publishes nothing.
    return {**os.environ, "CERTMAN_DATABASE_URL": url, "CERTMAN_DATA_DIR": data_dir}


def make_token(env: dict[str, str]) -> str:
    made = subprocess.run(
        [str(BIN / "certman"), "api", "tokens", "create", "--name", f"bench{time.time_ns()}",
         "--scope", "sites:read", "--json"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return str(json.loads(made.stdout)["token"])


@contextmanager
def serving(env: dict[str, str]) -> Iterator[tuple[str, dict[str, float]]]:
    """An API process on the store; yields its URL and, after it exits, its peak RSS (MiB)."""
    port = free_port()
    peak: dict[str, float] = {}
    proc = subprocess.Popen(
        [str(BIN / "certman"), "api", "serve", "--port", str(port), "--rate", "off"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(url + "/v1/openapi.json", timeout=2).ok, timeout=30,
                   what="the API to start")  # fmt: skip
        yield url, peak
    finally:
        proc.terminate()
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0
        peak["rss"] = usage.ru_maxrss / 1024


def walk(url: str, token: str) -> tuple[float, int, int]:
    """(seconds, sites, pages) of a walk through every page."""
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {token}"
    started = time.perf_counter()
    sites = pages = 0
    params: dict[str, str | int] = {"limit": 1000}
    while True:
        response = http.get(url + "/v1/sites", params=params, timeout=60)
        response.raise_for_status()
        page = response.json()
        sites += len(page["sites"])
        pages += 1
        if page["next_cursor"] is None:
            break
        params["cursor"] = page["next_cursor"]
    http.close()
    return time.perf_counter() - started, sites, pages


def bench(kind: str, urls: dict[int, str], rounds: int, data_dir: str) -> None:
    results: dict[int, list[tuple[float, float]]] = {n: [] for n in urls}
    tokens = {n: make_token(env_for(url, data_dir)) for n, url in urls.items()}
    for _ in range(rounds):
        for n, url in urls.items():  # interleaved: baseline, fleet, baseline, fleet
            with serving(env_for(url, data_dir)) as (address, peak):
                seconds, sites, pages = walk(address, tokens[n])
                assert sites == n, (sites, n)
            results[n].append((seconds, peak["rss"]))
    base_n, fleet_n = sorted(urls)
    print(f"\n{kind}: a full walk of GET /v1/sites?limit=1000 (load {os.getloadavg()[0]:.1f})")
    for n in (base_n, fleet_n):
        for seconds, rss in results[n]:
            print(f"  {n:7,} sites  {seconds:6.2f} s  {n / seconds:8,.0f} sites/s  "
                  f"server peak RSS {rss:6.1f} MiB")  # fmt: skip
    base_rss = min(r for _, r in results[base_n])
    fleet_rss = min(r for _, r in results[fleet_n])
    base_s = min(s for s, _ in results[base_n])
    fleet_s = min(s for s, _ in results[fleet_n])
    print(
        f"  {fleet_n // base_n}x the sites: {fleet_s / base_s:.1f}x the time, "
        f"{fleet_rss / base_rss:.2f}x the server's peak memory (best of {rounds})"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="certman-bench-api-") as directory:
        urls: dict[int, str] = {}
        if args.only == "sqlite":
            for n in (args.baseline, args.sites):
                urls[n] = f"sqlite:///{directory}/certman-{n}.db"
                db.upgrade(urls[n])
                fill(urls[n], n)
            db.dispose_engines()
            bench("SQLite", urls, args.rounds, directory)
            return
        with (
            postgres_database(args.pg_admin_url) as base,
            postgres_database(args.pg_admin_url) as fleet,
        ):
            for n, url in ((args.baseline, base), (args.sites, fleet)):
                db.upgrade(url)
                fill(url, n)
                urls[n] = url
            db.dispose_engines()
            bench("PostgreSQL", urls, args.rounds, directory)


if __name__ == "__main__":
    main()
