"""Onboard dealer sites in bulk from a CSV: ``certman-onboard FILE.csv``.

Installed with the package as ``certman-onboard``; ``python scripts/bulk_onboard.py FILE.csv``
in a checkout runs the same code (that script is a thin wrapper around :func:`main`).

Columns ``domain[,upstream[,aliases]]`` (aliases separated by spaces); a header row whose first
cell is ``domain`` is optional; ``-`` reads stdin. Every line is validated like
``certman domains add``; rejected lines go to ``<input>.rejected.csv`` with their line number
and reason (spreadsheet-safe: a cell that would be read as a formula starts with ``'``, as
OWASP advises; a line with a cell over 32 KiB is one rejected line, not the end of the run).
Idempotent and resumable: run it again after a crash and it finishes the job. The service
itself is :mod:`pipeline.fleet.onboarding`.

The progress bar is tqdm's: a small, well-kept library that already handles what a bar needs
(rates, ETA from the bytes read, terminal width, and staying quiet when told), and it is a
dependency of the package already. It is used only on a terminal: when stderr is not a TTY
(CI, cron, a pipe) the script prints a plain progress line every few seconds instead, which
logs keep readable where a bar's carriage returns would not.

Exit status: 0 when the run finished (rejected lines included, see the summary); 1 with a
one-line reason when the input cannot be read or the store or Redis is unavailable; 2 for bad
usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from pipeline.crypto.keys import KeyFileError
from pipeline.distribution import publishing as snapshot
from pipeline.fleet.onboarding import (
    Onboarding,
    Options,
    RejectedWriter,
    Summary,
    estimate,
    open_input,
    read_lines,
)
from pipeline.logformat import LOG_FORMATS, configure, env_format
from pipeline.version import certman_version

PROG = "certman-onboard"

log = logging.getLogger("certman.onboard")


def parse_args(argv: list[str] | None, prog: str = PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Onboard dealer sites from a CSV (domain[,upstream[,aliases]]); '-' is stdin.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {certman_version()}")
    parser.add_argument("input", help="the CSV file, or - for stdin")
    parser.add_argument("--batch-size", type=int, default=1000, help="rows per transaction")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and count against the store, write nothing "
        "(the rejected file only if --rejected is given)",
    )
    parser.add_argument("--upstream-default", metavar="URL", help="upstream for rows without one")
    parser.add_argument(
        "--priority", action="store_true", help="issue these before every site already waiting"
    )
    parser.add_argument(
        "--rejected",
        metavar="FILE",
        type=Path,
        help="where to write rejected lines (default: <input>.rejected.csv, ./stdin.rejected.csv)",
    )
    parser.add_argument(
        "--no-queue", action="store_true", help="do not kick the dispatcher after each batch"
    )
    parser.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        help="progress and errors on stderr as text, or as one JSON object per line "
        "(default: CERTMAN_LOG_FORMAT, else text)",
    )
    parser.add_argument(
        "--progress-interval",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between plain progress lines when stderr is not a terminal (0: each batch)",
    )
    args = parser.parse_args(argv)
    if args.log_format is None:
        try:
            args.log_format = env_format()
        except ValueError as exc:
            parser.error(str(exc))
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.upstream_default is not None:
        from pipeline.fleet.sites import SiteError, SiteRules, validate_upstream
        from pipeline.settings import get_settings

        try:
            policy = SiteRules.from_settings(get_settings()).policy
            args.upstream_default = validate_upstream(args.upstream_default, policy)
        except SiteError as exc:
            parser.error(f"--upstream-default: {exc}")
    return args


def rejected_path(args: argparse.Namespace) -> Path | None:
    if args.rejected is not None:
        return Path(args.rejected)
    if args.dry_run:
        return None  # a dry run writes nothing unless asked to
    if args.input == "-":
        return Path("stdin.rejected.csv")
    return Path(f"{args.input}.rejected.csv")


class Progress:
    """A tqdm bar over the input's bytes on a terminal; plain periodic lines otherwise (log
    records with ``--log-format json``)."""

    def __init__(
        self, stream: IO[str], path: str, interval: float, prog: str = PROG, *, json: bool = False
    ) -> None:
        self.stream = stream
        self.prog = prog
        self.interval = interval
        self.last = time.monotonic()
        self.bar: Any = None
        self.json = json
        self.tty = sys.stderr.isatty() and not json
        if self.tty:
            from tqdm import tqdm

            size = os.path.getsize(path) if path != "-" and os.path.isfile(path) else None
            self.bar = tqdm(total=size, unit="B", unit_scale=True, desc=prog, file=sys.stderr)
        self.position = 0

    def update(self, summary: Summary) -> None:
        if self.bar is not None:
            position = self._tell()
            if position is not None:
                self.bar.update(position - self.position)
                self.position = position
            self.bar.set_postfix(
                added=summary.added,
                there=summary.already,
                dup=summary.duplicates,
                rej=summary.rejected,
                refresh=False,
            )
            return
        now = time.monotonic()
        if summary.batches == 1 or now - self.last >= self.interval:
            self.last = now
            if self.json:
                log.info("%s", summary.progress_line())
            else:
                print(f"{self.prog}: {summary.progress_line()}", file=sys.stderr, flush=True)

    def _tell(self) -> int | None:
        try:
            return int(self.stream.buffer.tell())  # type: ignore[attr-defined]
        except (AttributeError, OSError, ValueError):
            return None

    def close(self) -> None:
        if self.bar is not None:
            if self.bar.total is not None:
                self.bar.update(self.bar.total - self.position)
            self.bar.close()


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Run an onboarding; returns the exit status. ``prog`` prefixes every message."""
    args = parse_args(argv, prog)
    json_logs = args.log_format == "json"
    if json_logs:
        # Libraries at WARNING (alembic says a lot at INFO while loading); our progress at INFO.
        configure(logging.WARNING, "json")
        log.setLevel(logging.INFO)

    def fail(message: str) -> int:
        if json_logs:
            log.error("%s", message)
        else:
            print(f"{prog}: {message}", file=sys.stderr)
        return 1

    import redis
    import sqlalchemy.exc

    from pipeline.acme.ratelimit import Limits
    from pipeline.cli.common import cli_actor
    from pipeline.db import get_engine
    from pipeline.fleet.sites import SiteRules
    from pipeline.runtime import Runtime
    from pipeline.settings import SettingsError, get_settings

    try:
        settings = get_settings()
        limits = Limits.from_settings(settings)
        # The script's runtime: its Redis client (verified TLS like every other) and signing key.
        process = Runtime(settings)
    except (SettingsError, ValueError) as exc:
        return fail(str(exc))
    try:
        stream = open_input(args.input)
    except OSError as exc:
        return fail(f"cannot read {args.input}: {exc.strerror or exc}")
    client: Any = None
    writes = not args.dry_run
    try:
        engine = get_engine(settings.effective_database_url)
    except ValueError as exc:  # a URL whose driver is missing: one line naming the setting
        stream.close()
        return fail(str(exc))
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("SELECT 1")
        if writes:
            client = process.redis
            client.ping()
            # Before the first batch: a key that cannot be read must stop the run before it
            # stores sites it cannot publish.
            signing_key = process.signing_key
    except KeyFileError as exc:
        return fail(str(exc))
    except sqlalchemy.exc.OperationalError as exc:
        return fail(f"database unavailable: {str(exc.orig).strip().splitlines()[0]}")
    except redis.exceptions.RedisError as exc:
        return fail(f"Redis unavailable: {exc}")

    prefix = settings.redis_prefix
    kick = None
    if writes and not args.no_queue:
        from pipeline.tasks.maintenance import kick_dispatch

        kick = kick_dispatch
    rejected = RejectedWriter(rejected_path(args))
    progress = Progress(stream, args.input, args.progress_interval, prog, json=json_logs)
    job = Onboarding(
        engine,
        Options(
            batch_size=args.batch_size,
            dry_run=args.dry_run,
            upstream_default=args.upstream_default,
            priority=args.priority,
            rules=SiteRules.from_settings(settings),
            actor=None if args.dry_run else cli_actor("onboard"),
        ),
        # Looked up at each call, not bound at import: a test swaps it to crash mid-run.
        publish_batch=(lambda sites: snapshot.publish_records(client, prefix, sites, signing_key))
        if writes
        else None,
        publish_existing=(
            lambda domains: snapshot.heal_snapshot(engine, client, prefix, domains, signing_key)
        )
        if writes
        else None,
        kick=kick,
        rejected=rejected,
        on_batch=progress.update,
    )
    try:
        summary = job.run(read_lines(stream))
    except sqlalchemy.exc.OperationalError as exc:
        return fail(f"database unavailable: {str(exc.orig).strip().splitlines()[0]}")
    except redis.exceptions.RedisError as exc:
        return fail(f"Redis unavailable: {exc}")
    except OSError as exc:
        return fail(f"cannot read {args.input}: {exc}")
    finally:
        progress.close()
        rejected.close()
        stream.close()

    verb = "would be added" if args.dry_run else "added"
    print(
        f"read {summary.read} lines in {summary.elapsed:.1f} s: {summary.added} {verb}, "
        f"{summary.already} already there, {summary.duplicates} duplicates, "
        f"{summary.rejected} rejected"
    )
    if summary.rejected and rejected.path is not None:
        print(f"rejected lines with reasons: {rejected.path}")
    print(estimate(summary.added, summary.per_domain, limits).describe())
    if args.dry_run:
        print("dry run: nothing was written")
    elif kick is None and summary.added:
        print("not queued (--no-queue): beat's dispatcher starts them within its next tick")
    return 0


def console() -> None:
    """The ``certman-onboard`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    console()
