"""Bulk onboarding: a CSV of dealer sites into the store, in batches, safely re-runnable.

``scripts/bulk_onboard.py`` is the command; this module is the service, so that tests and the
benchmark drive the same code the operators run.

The input is ``domain[,upstream[,aliases]]`` (aliases separated by spaces), a header optional.
It is read one line at a time: only the current batch, plus the names seen so far (to tell a
duplicate in the file from a new site), is held in memory, so 100,000 lines cost ~20 MB.

Every line goes through :func:`pipeline.fleet.sites.parse_site`, the function ``certman domains
add`` uses, so the two can never disagree about what a valid site is. A batch is then checked
against the store and written with one ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` per
table, sites and their names in one transaction. That is what makes a run idempotent and
resumable: a batch is in the store entirely or not at all, and a second run over the same file
finds every committed site "already there". A site the run inserts is never half-made: if a
concurrent writer takes one of its names between our check and our insert, the insert's
RETURNING shows it and the batch is rolled back and checked again.

After each commit the batch's sites go to the edges' snapshot (one Redis pipeline per batch)
so the edge proxies plain HTTP for them before their certificates exist, and the dispatcher is
kicked. Issuance itself is not queued here: the dispatcher starts orders from
``sites.next_attempt_at`` as the in-flight bound and the global rate limiter allow.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, Literal

from sqlalchemy import Connection, Engine, func, insert, select
from sqlalchemy.dialects import postgresql, sqlite

from pipeline.acme.ratelimit import Limits

# Publishing the batches to the edges is the snapshot's (the one home for publishing); named
# here too for the callers that found them here (scripts, benchmarks/onboard.py).
from pipeline.distribution.publishing import heal_snapshot as heal_snapshot
from pipeline.distribution.publishing import publish_records as publish_records
from pipeline.fleet import site_states
from pipeline.fleet.sites import NewSite, SiteRules, parse_site
from pipeline.models import Site, SiteChange, SiteName, SiteState
from pipeline.models.base import utcnow
from pipeline.names import registered_domain
from pipeline.setting_values import Rate

SITES = Site.__table__
SITE_NAMES = SiteName.__table__
# Names per IN (...) query: far under SQLite's 32,766 bound parameters and PostgreSQL's 65,535.
_IN_CHUNK = 5000
# A batch whose insert lost a race with another writer is re-checked this many times.
_RACE_RETRIES = 3

Outcome = Literal["added", "already", "duplicate", "rejected"]


class OnboardingError(Exception):
    """The run cannot go on (the store changed under us too often); the message says why."""


# --- reading -----------------------------------------------------------------------------------
# The longest cell a line may have: 100 names of 253 characters (Let's Encrypt's most per
# certificate) fit, with room. Checked here, per line, rather than with csv.field_size_limit,
# which is the whole process's; the csv module's own limit (128 KiB) is caught per line too.
MAX_FIELD = 32 * 1024


@dataclass(frozen=True)
class Line:
    """One data line of the input: its number in the file, its text, its cells, and why it
    cannot be read (``problem``: it is rejected with that reason) or None."""

    number: int
    text: str
    cells: tuple[str, ...]
    problem: str | None = None


def read_lines(stream: Iterable[str]) -> Iterator[Line]:
    """The data lines of ``stream``: blank lines, ``#`` comments and a header are skipped.

    A header is a first row whose first cell is literally ``domain``. Each line is parsed on
    its own (a quoted cell cannot span lines), so the rejected file can quote it as it was. A
    line that is not CSV, or has a cell longer than :data:`MAX_FIELD`, comes with its
    ``problem``: one bad line is rejected, never the end of the run.
    """
    first = True
    for number, raw in enumerate(stream, start=1):
        text = raw.rstrip("\r\n")
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            cells = tuple(cell.strip() for cell in next(csv.reader([text])))
        except csv.Error as exc:
            first = False
            yield Line(number, text, (), f"not a CSV line ({exc})")
            continue
        if first:
            first = False
            if cells and cells[0].lower() == "domain":
                continue
        longest = max(cells, key=len, default="")
        if len(longest) > MAX_FIELD:
            column = cells.index(longest) + 1
            yield Line(
                number,
                text,
                (),
                f"column {column} is {len(longest):,} characters long; at most {MAX_FIELD:,}",
            )
            continue
        yield Line(number, text, cells)


@dataclass(frozen=True)
class Candidate:
    """A line that passed validation and is not a duplicate within the file."""

    line: Line
    site: NewSite


@dataclass(frozen=True)
class Rejection:
    line: Line
    reason: str


# --- results -----------------------------------------------------------------------------------
@dataclass
class Summary:
    """What a run did. ``per_domain`` counts the added sites by registered domain."""

    read: int = 0
    added: int = 0
    already: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    per_domain: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def progress_line(self) -> str:
        rate = self.read / self.elapsed if self.elapsed > 0 else 0.0
        return (
            f"{self.read} lines read: {self.added} added, {self.already} already there, "
            f"{self.duplicates} duplicates, {self.rejected} rejected ({rate:,.0f} lines/s)"
        )


@dataclass(frozen=True)
class Estimate:
    """How long the CA's limits (as configured) take to let ``sites`` certificates through."""

    sites: int
    seconds: float | None  # None: limits lifted
    account_seconds: float
    domain_seconds: float
    busiest_domain: str | None
    finish_at: datetime | None

    def describe(self) -> str:
        if self.sites == 0:
            return "nothing new to issue"
        if self.seconds is None:
            return (
                f"{self.sites} certificates to issue, limits lifted "
                "(CERTMAN_RATE_LIMITS=off): as fast as the workers and the CA go"
            )
        when = self.finish_at.astimezone().strftime("%Y-%m-%d %H:%M %Z") if self.finish_at else "?"
        if self.seconds < 60:
            return (
                f"{self.sites} certificates to issue: within the current limits' burst, no wait "
                f"on them; the last one expected around {when}"
            )
        bound = "per-account new orders"
        if self.domain_seconds > self.account_seconds:
            bound = f"per-domain certificates ({self.busiest_domain})"
        return (
            f"{self.sites} certificates to issue: about {format_duration(self.seconds)} at the "
            f"current limits (bound: {bound}); the last one expected around {when}"
        )


def _drain_seconds(n: int, rate: Rate) -> float:
    """Seconds until the ``n``-th request fits a full GCRA bucket of ``rate``.

    The bucket holds ``count`` tokens (a burst) and refills one every ``interval``: the first
    ``count`` go at once, each further one waits an interval. The bucket's current fill is not
    read: the estimate is for the configured limits, an upper bound if nothing else spends.
    """
    return max(0, n - rate.count) * rate.interval


def estimate(
    sites: int, per_domain: Counter[str], limits: Limits, *, now: datetime | None = None
) -> Estimate:
    """Time to issue ``sites`` new certificates: the max of the account and domain bounds."""
    if sites == 0 or not limits.enabled:
        return Estimate(sites, None if sites else 0.0, 0.0, 0.0, None, None)
    account = _drain_seconds(sites, limits.new_orders)
    top = per_domain.most_common(1)
    busiest, most = top[0] if top else (None, 0)
    domain = _drain_seconds(most, limits.certs_per_domain)
    seconds = max(account, domain)
    return Estimate(
        sites, seconds, account, domain, busiest, (now or utcnow()) + timedelta(seconds=seconds)
    )


def format_duration(seconds: float) -> str:
    if seconds < 60:
        return "under a minute"
    minutes = math.ceil(seconds / 60)
    days, rest = divmod(minutes, 24 * 60)
    hours, minutes = divmod(rest, 60)
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else "", f"{minutes} min"]
    if days:
        parts[2] = ""  # minutes do not matter in a multi-day estimate
    return " ".join(p for p in parts if p)


# --- the run -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    batch_size: int = 1000
    dry_run: bool = False
    upstream_default: str | None = None
    priority: bool = False
    # The installation's outbound policy and issuers: the caller's (SiteRules.from_settings).
    rules: SiteRules = field(kw_only=True)
    # Who adds the sites, recorded in each added site's history in the batch's transaction
    # (the API's token); None records nothing.
    actor: str | None = None


# A cell starting with one of these is a formula to a spreadsheet (CSV injection, OWASP):
# ``=HYPERLINK(...)`` in a dealer list must not run when someone opens the rejected file.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# What the rejected file quotes of a line: enough to find it; a spreadsheet cell holds 32,767.
_SHOWN = 1000


def spreadsheet_safe(cell: str) -> str:
    """``cell`` prefixed with ``'`` when a spreadsheet would read it as a formula, as OWASP's
    CSV injection advice says (the ``'`` shows the cell as text; the value is otherwise kept)."""
    return f"'{cell}" if cell.startswith(_FORMULA_STARTS) else cell


def _shown(text: str) -> str:
    if len(text) <= _SHOWN:
        return text
    return f"{text[:_SHOWN]}… ({len(text):,} characters in all)"


class RejectedWriter:
    """The rejected lines as CSV (``line,content,reason``), the file made on the first one.

    Made to be opened in a spreadsheet: every cell is quoted, and one a spreadsheet would take
    for a formula (it starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return) is
    prefixed with ``'`` (OWASP's advice on CSV injection); a very long line is cut to its first
    1,000 characters.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._writer: Any = None

    def write(self, rejection: Rejection) -> None:
        if self.path is None:
            return
        if self._file is None:
            self._file = self.path.open("w", newline="", encoding="utf-8")
            self._writer = csv.writer(self._file, quoting=csv.QUOTE_ALL)
            self._writer.writerow(["line", "content", "reason"])
        self._writer.writerow(
            [
                rejection.line.number,
                spreadsheet_safe(_shown(rejection.line.text)),
                spreadsheet_safe(_shown(rejection.reason)),
            ]
        )

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self.path is not None and self.path.exists():
            # A clean run must not leave the previous run's rejections looking current.
            self.path.unlink()


class Onboarding:
    """One run over one input. ``publish_batch`` and ``kick`` are called after each commit."""

    def __init__(
        self,
        engine: Engine,
        options: Options,
        *,
        publish_batch: Callable[[Sequence[NewSite]], None] | None = None,
        publish_existing: Callable[[Sequence[str]], None] | None = None,
        kick: Callable[[], None] | None = None,
        rejected: RejectedWriter | None = None,
        on_batch: Callable[[Summary], None] | None = None,
        on_result: Callable[[int, Outcome, str | None], None] | None = None,
    ) -> None:
        """``on_result(line number, outcome, reason)`` hears every line's answer (the API's
        batch answers each line); a line rejected after a lost race is heard once."""
        self.engine = engine
        self.on_result = on_result
        self.options = options
        self.publish_batch = publish_batch
        self.publish_existing = publish_existing
        self.kick = kick
        self.rejected = rejected or RejectedWriter(None)
        self.on_batch = on_batch
        self.summary = Summary()
        # Names seen in this file: name -> (primary domain, line number). The one structure
        # that grows with the input; it is what tells an in-file duplicate from a new site.
        self._seen: dict[str, tuple[str, int]] = {}
        self._aliases: dict[str, int] = {}  # alias count of the file's sites that have aliases
        # Lines rejected by a check against the store: a re-check after a lost race must not
        # count them twice.
        self._rejected_lines: set[int] = set()
        self._next_attempt_at: datetime | None = None

    # The public entry point.
    def run(self, lines: Iterable[Line]) -> Summary:
        if self.options.priority and not self.options.dry_run:
            self._next_attempt_at = self._priority_time()
        batch: list[Candidate] = []
        for line in lines:
            self.summary.read += 1
            candidate = self._validate(line)
            if candidate is None:
                continue
            batch.append(candidate)
            if len(batch) >= self.options.batch_size:
                self._flush(batch)
                batch = []
        if batch:
            self._flush(batch)
        return self.summary

    def _reject(self, line: Line, reason: str) -> None:
        self.summary.rejected += 1
        self.rejected.write(Rejection(line, reason))
        if self.on_result is not None:
            self.on_result(line.number, "rejected", reason)

    def _validate(self, line: Line) -> Candidate | None:
        if line.problem is not None:
            self._reject(line, line.problem)
            return None
        cells = line.cells
        if len(cells) > 3:
            self._reject(line, f"{len(cells)} columns; expected domain[,upstream[,aliases]]")
            return None
        domain = cells[0] if cells else ""
        upstream = (cells[1] if len(cells) > 1 else "") or self.options.upstream_default
        aliases = cells[2].split() if len(cells) > 2 else []
        try:
            site = parse_site(domain, aliases, upstream, rules=self.options.rules)
        except ValueError as exc:  # InvalidName, SiteError: the same reasons the CLI gives
            self._reject(line, str(exc))
            return None
        earlier = self._seen.get(site.domain)
        if earlier is not None:
            owner, number = earlier
            if owner != site.domain:
                self._reject(line, f"{site.domain} already belongs to site {owner} (line {number})")
            elif self._same_names(site):
                self.summary.duplicates += 1
                if self.on_result is not None:
                    self.on_result(line.number, "duplicate", f"{site.domain} is on line {number}")
            else:
                self._reject(line, f"{site.domain} is already on line {number} with other names")
            return None
        for name in site.aliases:
            earlier = self._seen.get(name)
            if earlier is not None:
                owner, number = earlier
                self._reject(line, f"{name} already belongs to site {owner} (line {number})")
                return None
        for name in site.names:
            self._seen[name] = (site.domain, line.number)
        if site.aliases:
            self._aliases[site.domain] = len(site.aliases)
        return Candidate(line, site)

    def _same_names(self, site: NewSite) -> bool:
        """Whether the file already has this site with exactly these names."""
        owned = all(self._seen.get(name, ("", 0))[0] == site.domain for name in site.names)
        return owned and self._aliases.get(site.domain, 0) == len(site.aliases)

    # --- one batch ---------------------------------------------------------------------------
    def _flush(self, batch: list[Candidate]) -> None:
        for _ in range(_RACE_RETRIES):
            outcome = self._write(batch)
            if outcome is not None:
                break
        else:
            raise OnboardingError(
                f"batch ending on line {batch[-1].line.number}: names kept being taken by "
                "another writer; run again"
            )
        added, already = outcome
        if self.on_result is not None:
            lines = {candidate.site.domain: candidate.line.number for candidate in batch}
            for site in added:
                self.on_result(lines[site.domain], "added", None)
            for site in already:
                self.on_result(lines[site.domain], "already", None)
        self.summary.batches += 1
        self.summary.added += len(added)
        self.summary.already += len(already)
        for site in added:
            # A certificate spends on every registered domain among its names, once each.
            for domain in {registered_domain(name) for name in site.names}:
                self.summary.per_domain[domain] += 1
        if not self.options.dry_run:
            # Only after the commit: an edge or a worker must find the rows it is told about.
            if self.publish_batch is not None and added:
                self.publish_batch(added)
            if self.publish_existing is not None and already:
                self.publish_existing([site.domain for site in already])
            if self.kick is not None and added:
                self.kick()
        if self.on_batch is not None:
            self.on_batch(self.summary)

    def _write(self, batch: list[Candidate]) -> tuple[list[NewSite], list[NewSite]] | None:
        """Check and insert one batch in one transaction: (added, already there), or None
        when another writer won a race for one of its names (rolled back: check again)."""
        with self.engine.connect() as connection:
            transaction = connection.begin()
            try:
                fresh, already = self._classify(connection, batch)
                if self.options.dry_run or not fresh:
                    transaction.rollback()
                    return fresh, already
                if not self._insert(connection, fresh):
                    transaction.rollback()
                    return None
                transaction.commit()
                return fresh, already
            except BaseException:
                transaction.rollback()
                raise

    def _classify(
        self, connection: Connection, batch: list[Candidate]
    ) -> tuple[list[NewSite], list[NewSite]]:
        names = [name for candidate in batch for name in candidate.site.names]
        owners: dict[str, str] = {}
        for chunk in _chunks(names, _IN_CHUNK):
            rows = connection.execute(
                select(SITE_NAMES.c.name, SITES.c.domain)
                .join(SITES, SITES.c.id == SITE_NAMES.c.site_id)
                .where(SITE_NAMES.c.name.in_(chunk))
            )
            owners.update((name, domain) for name, domain in rows)
        existing = sorted({c.site.domain for c in batch if owners.get(c.site.domain)})
        stored: dict[str, set[str]] = {}
        for chunk in _chunks(existing, _IN_CHUNK):
            rows = connection.execute(
                select(SITES.c.domain, SITE_NAMES.c.name)
                .join(SITE_NAMES, SITES.c.id == SITE_NAMES.c.site_id)
                .where(SITES.c.domain.in_(chunk))
            )
            for domain, name in rows:
                stored.setdefault(domain, set()).add(name)
        fresh: list[NewSite] = []
        already: list[NewSite] = []
        for candidate in batch:
            site = candidate.site
            taken = [
                (n, owners[n]) for n in site.names if owners.get(n, site.domain) != site.domain
            ]
            if taken:
                name, owner = taken[0]
                self._reject_stored(candidate, f"{name} already belongs to site {owner}")
            elif site.domain in stored:
                if stored[site.domain] == set(site.names):
                    already.append(site)
                else:
                    self._reject_stored(
                        candidate,
                        f"{site.domain} exists with names {', '.join(sorted(stored[site.domain]))}"
                        "; remove it first to change its names",
                    )
            else:
                fresh.append(site)
        return fresh, already

    def _reject_stored(self, candidate: Candidate, reason: str) -> None:
        """Reject a line the store conflicts with, and free its names for later lines.

        Lines of the same batch were checked against it already: one that shares a name with
        it stays rejected, and its reason names this line, which the rejected file shows too.
        """
        if candidate.line.number not in self._rejected_lines:
            self._rejected_lines.add(candidate.line.number)
            self._reject(candidate.line, reason)
        for name in candidate.site.names:
            if self._seen.get(name, ("", 0))[1] == candidate.line.number:
                del self._seen[name]
        self._aliases.pop(candidate.site.domain, None)

    def _insert(self, connection: Connection, fresh: list[NewSite]) -> bool:
        """One INSERT per table; False if any row was not inserted (someone else has it)."""
        now = utcnow()
        next_attempt_at = self._next_attempt_at or now
        dialect = connection.dialect.name
        site_rows = [
            {
                "domain": site.domain,
                "upstream": site.upstream,
                "customer_ref": site.customer_ref,
                "state": site_states.INITIAL.value,
                "consecutive_failures": 0,
                "next_attempt_at": next_attempt_at,
                "created_at": now,
                "updated_at": now,
            }
            for site in fresh
        ]
        statement = (
            _insert(dialect, SITES)
            .on_conflict_do_nothing(index_elements=["domain"])
            .returning(SITES.c.id, SITES.c.domain)
        )
        ids = dict((domain, id_) for id_, domain in connection.execute(statement, site_rows))
        if len(ids) != len(fresh):
            return False
        name_rows = [{"site_id": ids[site.domain], "name": n} for site in fresh for n in site.names]
        statement = (
            _insert(dialect, SITE_NAMES)
            .on_conflict_do_nothing(index_elements=["name"])
            .returning(SITE_NAMES.c.name)
        )
        inserted = connection.execute(statement, name_rows).all()
        if len(inserted) != len(name_rows):
            return False
        if self.options.actor is not None:
            connection.execute(
                insert(SiteChange),
                [{"domain": site.domain, "action": "add", "actor": self.options.actor,
                  "detail": "names " + " ".join(site.names), "created_at": now}
                 for site in fresh],
            )  # fmt: skip
        return True

    def _priority_time(self) -> datetime:
        """Ahead of everything waiting: a second before the earliest due site, or now."""
        now = utcnow()
        with self.engine.connect() as connection:
            earliest = connection.execute(
                select(func.min(Site.next_attempt_at)).where(
                    Site.state.in_(site_states.sources(SiteState.ISSUING))
                )
            ).scalar_one_or_none()
        return min(earliest or now, now) - timedelta(seconds=1)


def _insert(dialect: str, table: Any) -> Any:
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise OnboardingError(f"bulk onboarding supports SQLite and PostgreSQL, not {dialect}")


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def open_input(path: str) -> IO[str]:
    """The input as text: ``-`` is stdin. A UTF-8 BOM (spreadsheet exports) is dropped."""
    import sys

    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", errors="replace")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")
