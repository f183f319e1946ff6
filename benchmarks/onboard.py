"""Bulk onboarding: 100,000 CSV lines into the store (target: under a minute, docs/architecture.md).

For PostgreSQL (a fresh database, created and dropped here) and SQLite (a new file), the real
service (:mod:`pipeline.fleet.onboarding`, as ``scripts/bulk_onboard.py`` drives it) reads a
generated file: one site in four has a ``www.`` alias, 1 % of the lines are duplicates and
0.5 % are invalid. Every batch is published to the edges' snapshot in a Redis database of its
own (``--redis-url``, flushed first and last); the dispatcher is not kicked (``--no-queue``
semantics: nothing would consume the messages). Each run is timed twice: the first run, and a
second over the same file, which must add nothing (the idempotent re-run an operator does
after a crash).

Baseline, measured in the same run on the same store: the naive path, ``certman domains add``'s
body once per line (a transaction per site with the ORM's ``add_site``, then one snapshot
publish) over the first ``--baseline`` lines, extrapolated to the whole file.

    .venv/bin/python benchmarks/onboard.py [--lines 100000] [--baseline 2000]
        [--pg-admin-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres]
        [--redis-url redis://127.0.0.1:6379/9] [--only sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from pipeline import db
from pipeline.crypto.signing import SigningKey
from pipeline.distribution import layout as distribution
from pipeline.fleet.onboarding import (
    Onboarding,
    Options,
    RejectedWriter,
    heal_snapshot,
    open_input,
    publish_records,
    read_lines,
)
from pipeline.fleet.sites import SiteRules, add_site, parse_site
from pipeline.settings import Settings

# The installation's defaults: the benchmark's upstreams are public names.
RULES = SiteRules.from_settings(Settings())
PREFIX = "certman-bench-onboard"
# Every publication is signed, as in production: the signatures are part of the cost measured.
SIGNER = SigningKey.generate()
SUFFIXES = ("example.com", "example.net", "example.org", "example.co.uk", "example.com.au")


def generate(path: Path, lines: int, seed: int = 8) -> None:
    rng = random.Random(seed)
    written: list[str] = []
    with path.open("w") as out:
        out.write("domain,upstream,aliases\n")
        for i in range(lines):
            roll = rng.random()
            if roll < 0.005:
                line = f"bad dealer {i}.example.com"
            elif roll < 0.015 and written:
                line = rng.choice(written)
            else:
                domain = f"dealer-{i:06d}.{SUFFIXES[i % len(SUFFIXES)]}"
                upstream = f"http://10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:8080"
                alias = f"www.{domain}" if rng.random() < 0.25 else ""
                line = f"{domain},{upstream},{alias}"
                if len(written) < 10_000:
                    written.append(line)
            out.write(line + "\n")


@contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    name = f"certman_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        db.dispose_engines()
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_service(url: str, path: Path, client: redis.Redis) -> tuple[float, int, int]:
    engine = db.get_engine(url)
    onboarding = Onboarding(
        engine,
        Options(batch_size=1000, rules=RULES),
        publish_batch=lambda sites: publish_records(client, PREFIX, sites, SIGNER),
        publish_existing=lambda domains: heal_snapshot(engine, client, PREFIX, domains, SIGNER),
        rejected=RejectedWriter(path.with_suffix(".rejected.csv")),
    )
    started = time.perf_counter()
    with open_input(str(path)) as stream:
        summary = onboarding.run(read_lines(stream))
    onboarding.rejected.close()
    return time.perf_counter() - started, summary.read, summary.added


def run_baseline(url: str, path: Path, count: int, client: redis.Redis) -> float:
    """``certman domains add`` per line, in process (no interpreter start-up counted)."""
    from pipeline.distribution.publishing import site_record

    with path.open() as stream:
        rows = [line.cells for line in read_lines(stream)][:count]
    started = time.perf_counter()
    for cells in rows:
        try:
            new = parse_site(
                cells[0], cells[2].split() if len(cells) > 2 else (), cells[1], rules=RULES
            )
        except (ValueError, IndexError):
            continue
        with db.session_scope(url) as session:
            try:
                site, _ = add_site(session, new)
            except ValueError:
                continue
            record = site_record(session, site)
        distribution.publish_site(client, PREFIX + "-baseline", record, signer=SIGNER)
    return time.perf_counter() - started


def bench(kind: str, url: str, path: Path, lines: int, baseline: int, client: redis.Redis) -> None:
    db.upgrade(url)
    elapsed, read, added = run_service(url, path, client)
    again, _, added_again = run_service(url, path, client)
    assert added_again == 0, f"the second run added {added_again}"
    engine = db.get_engine(url)
    with engine.begin() as connection:
        stored = connection.execute(sa.text("SELECT count(*) FROM sites")).scalar_one()
        # Clear the store for the baseline, so both measure inserts into an empty table.
        connection.execute(sa.text("DELETE FROM site_names"))
        connection.execute(sa.text("DELETE FROM sites"))
    assert stored == added, (stored, added)
    naive = run_baseline(url, path, baseline, client) * lines / baseline
    print(
        f"{kind:10} {read:,} lines in {elapsed:5.1f} s = {read / elapsed:8,.0f} lines/s "
        f"({added:,} sites); re-run {again:4.1f} s adds 0; "
        f"baseline per-row add_site {lines / naive:6,.0f} lines/s "
        f"(≈{naive:,.0f} s for {lines:,}, from {baseline:,}): ×{naive / elapsed:,.0f}",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--baseline", type=int, default=2000)
    parser.add_argument(
        "--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    with tempfile.TemporaryDirectory(prefix="certman-bench-onboard-") as tmp:
        path = Path(tmp) / "dealers.csv"
        generate(path, args.lines)
        print(f"{args.lines:,} lines generated ({path.stat().st_size / 1e6:.1f} MB)", flush=True)
        try:
            if args.only in (None, "postgresql"):
                with postgres_database(args.pg_admin_url) as url:
                    bench("postgresql", url, path, args.lines, args.baseline, client)
            if args.only in (None, "sqlite"):
                url = f"sqlite:///{Path(tmp) / 'certman.db'}"
                bench("sqlite", url, path, args.lines, args.baseline, client)
        finally:
            client.flushdb()
    return 0


if __name__ == "__main__":
    sys.exit(main())
