"""Beat's snapshot reconcile at fleet size: cheap enough to run every 10 minutes?

For SQLite (a new file) and PostgreSQL (a fresh database, created and dropped here), fill the
store with N sites, each with one name or two and a current certificate (a 2.6 KB chain and a
0.5 KB envelope, the sizes of a real ECDSA chain and HPKE envelope), and a redis-server of the
benchmark's own. Then time

(a) the baseline, measured in the same run: ``Publisher.resync``, the full rebuild that reads
    every chain and envelope and rewrites the whole snapshot;
(b) ``Publisher.find_drift`` on a snapshot that agrees with the store (every 10 minutes, the
    common case: it reads only the small columns and the index);
(c) ``Publisher.reconcile`` after ``--drift`` renewals were stored without being published.

and print milliseconds with the ratio to the baseline.

    .venv/bin/python benchmarks/reconcile.py [--sites 100000] [--drift 100]
        [--only sqlite|postgresql] [--pg-admin-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.onboard import postgres_database
from pipeline import db, runtime
from pipeline.distribution import publishing as snapshot
from pipeline.models import Certificate, Site, SiteName
from tests.support.redis_server import RedisServer

CHAIN = "-----BEGIN CERTIFICATE-----\n" + "A" * 2600 + "\n-----END CERTIFICATE-----\n"
ENVELOPE = "certman-envelope-v1." + "B" * 500
NOT_BEFORE = datetime(2026, 11, 1, tzinfo=UTC)
BATCH = 5000


def fill(url: str, sites: int) -> None:
    engine = db.get_engine(url)
    for start in range(0, sites, BATCH):
        ids = range(start + 1, min(start + BATCH, sites) + 1)
        with engine.begin() as connection:
            connection.execute(
                sa.insert(Site),
                [{"id": i, "domain": f"dealer-{i:06d}.example.com", "state": "active",
                  "upstream": f"http://10.0.{i // 256 % 256}.{i % 256}:8080"} for i in ids],
            )  # fmt: skip
            names = [{"site_id": i, "name": f"dealer-{i:06d}.example.com"} for i in ids]
            names += [{"site_id": i, "name": f"www.dealer-{i:06d}.example.com"}
                      for i in ids if i % 4 == 0]  # fmt: skip
            connection.execute(sa.insert(SiteName), names)
            connection.execute(
                sa.insert(Certificate),
                [{"site_id": i, "chain_pem": CHAIN, "key_envelope": ENVELOPE,
                  "scheme": "hpke-x25519", "key_id": "edge-1", "serial": f"{i:x}",
                  "ari_id": f"aki.{i:x}", "not_before": NOT_BEFORE,
                  "not_after": NOT_BEFORE + timedelta(days=90),
                  "renew_at": NOT_BEFORE + timedelta(days=60), "current": True} for i in ids],
            )  # fmt: skip


def lose_publishes(url: str, drift: int, sites: int) -> None:
    """``drift`` renewals stored (a later not_after) whose publish never reached Redis."""
    step = max(1, sites // drift)
    chosen = list(range(1, sites + 1, step))[:drift]
    with db.get_engine(url).begin() as connection:
        connection.execute(
            sa.update(Certificate)
            .where(Certificate.site_id.in_(chosen))
            .values(not_after=NOT_BEFORE + timedelta(days=120))
        )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return (time.perf_counter() - started) * 1000, result


@contextmanager
def configured(url: str, redis_url: str) -> Iterator[None]:
    keys = tempfile.mkdtemp(prefix="certman-bench-reconcile-keys-")
    # Every publication is signed, as in production: a signing key of the run's own.
    os.environ.update({"CERTMAN_DATABASE_URL": url, "CERTMAN_REDIS_URL": redis_url,
                       "CERTMAN_REDIS_PREFIX": "certman-bench-reconcile",
                       "CERTMAN_SIGNING_KEY": f"{keys}/signing.key"})  # fmt: skip
    runtime.reset(settings=True)
    try:
        yield
    finally:
        runtime.reset(close=True, settings=True)
        shutil.rmtree(keys, ignore_errors=True)


def bench(kind: str, url: str, redis_url: str, sites: int, drift: int) -> None:
    db.upgrade(url)
    filled, _ = timed(lambda: fill(url, sites))
    with configured(url, redis_url):

        def resync() -> int:
            with runtime.current().session_scope() as session:
                return runtime.current().publisher.resync(session)

        def find() -> snapshot.Drift:
            with runtime.current().session_scope() as session:
                return runtime.current().publisher.find_drift(session)

        baseline, count = timed(resync)
        assert count == sites, count
        agreeing, found = timed(find)
        assert (found.stale, found.extra) == ([], []), "a fresh snapshot should agree"
        # Beat's later runs: statements verified once are not verified again.
        cached, found = timed(find)
        assert (found.stale, found.extra) == ([], []), "a fresh snapshot should agree"
        lose_publishes(url, drift, sites)
        fixing, fixed = timed(
            lambda: runtime.current().publisher.reconcile(db.session_scope, limit=1000)
        )
        assert len(fixed.stale) == drift and not fixed.extra, (len(fixed.stale), fixed.extra)
        _, after = timed(find)
        assert (after.stale, after.extra) == ([], []), "reconcile should leave no drift"
    print(f"\n{kind}: {sites:,} sites (filled in {filled / 1000:.1f} s)")
    print(f"  {'resync (baseline: full rebuild)':44} {baseline:9.0f} ms   1.00x")
    print(f"  {'find_drift, snapshot agrees (verifies all)':44} {agreeing:9.0f} ms   "
          f"{agreeing / baseline:.2f}x")  # fmt: skip
    print(f"  {'find_drift again (verified ones cached)':44} {cached:9.0f} ms   "
          f"{cached / baseline:.2f}x")  # fmt: skip
    label = f"reconcile, {drift} lost publishes"
    print(f"  {label:44} {fixing:9.0f} ms   {fixing / baseline:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=100_000)
    parser.add_argument("--drift", type=int, default=100)
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    parser.add_argument(
        "--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()
    server = RedisServer()
    server.start().close()
    try:
        if args.only in (None, "sqlite"):
            with tempfile.TemporaryDirectory() as directory:
                url = f"sqlite:///{directory}/certman.db"
                bench("SQLite", url, server.url, args.sites, args.drift)
        if args.only in (None, "postgresql"):
            with postgres_database(args.pg_admin_url) as url:
                bench("PostgreSQL", url, server.url, args.sites, args.drift)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
