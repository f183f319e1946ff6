"""The backstop for lost publishes: the edges' snapshot brought back in line with the store."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import redis
from click.testing import CliRunner
from sqlalchemy import delete, select

from pipeline import snapshot
from pipeline.cli import main
from pipeline.db import session_scope
from pipeline.distribution import parse_index_entry
from pipeline.models import Certificate, Site
from tests.support.factories import NOW, make_cert, make_site


def _stored(*domains: str, certified: bool = True) -> None:
    with session_scope() as session:
        for domain in domains:
            site = make_site(session, domain)
            if certified:
                make_cert(session, site)


def _publish_all() -> None:
    with session_scope() as session:
        snapshot.resync(session)


def _entry(client: redis.Redis, domain: str) -> tuple[object, ...] | None:
    raw = client.hget("certman:index", domain)
    return parse_index_entry(raw) if raw is not None else None


def test_an_agreeing_snapshot_is_left_alone(
    certman_env: dict[str, str], redis_client: redis.Redis
) -> None:
    _stored("a.example", "b.example")
    _stored("new.example", certified=False)
    _publish_all()
    version = redis_client.get("certman:version")
    drift = snapshot.reconcile(session_scope, limit=100)
    assert (drift.stale, drift.extra) == ([], [])
    assert redis_client.get("certman:version") == version  # nothing written


def test_a_lost_publish_and_a_raced_removal_are_put_right(
    certman_env: dict[str, str], redis_client: redis.Redis
) -> None:
    _stored("renewed.example", "removed.example", "kept.example")
    _publish_all()
    kept = redis_client.hget("certman:sites", "kept.example")
    with session_scope() as session:
        # A renewal stored whose publish was lost: a newer certificate, not on the edges.
        site = session.scalar(select(Site).where(Site.domain == "renewed.example"))
        assert site is not None
        session.execute(delete(Certificate).where(Certificate.site_id == site.id))
        make_cert(session, site, not_before=NOW)
        # A site removed while a publish for it was in flight: gone here, back in Redis.
        session.execute(delete(Site).where(Site.domain == "removed.example"))
    _stored("never-published.example")

    with session_scope() as session:
        dry = snapshot.find_drift(session)
    assert dry.stale == ["never-published.example", "renewed.example"]
    assert dry.extra == ["removed.example"]

    snapshot.reconcile(session_scope, limit=100)
    renewed = _entry(redis_client, "renewed.example")
    assert renewed is not None and renewed[2] == (NOW + timedelta(days=90)).timestamp()
    assert _entry(redis_client, "never-published.example") is not None
    assert _entry(redis_client, "removed.example") is None
    assert redis_client.hget("certman:names", "removed.example") is None
    assert redis_client.hget("certman:sites", "kept.example") == kept  # untouched
    again = snapshot.reconcile(session_scope, limit=100)
    assert (again.stale, again.extra) == ([], [])


def test_fixes_per_run_are_bounded(certman_env: dict[str, str], redis_client: redis.Redis) -> None:
    _stored(*(f"s{i}.example" for i in range(5)))
    first = snapshot.reconcile(session_scope, limit=2)
    assert len(first.stale) == 5
    assert redis_client.hlen("certman:index") == 2
    second = snapshot.reconcile(session_scope, limit=2)
    assert len(second.stale) == 3


def test_cli_dry_run_reports_without_fixing(
    certman_env: dict[str, str], redis_client: redis.Redis
) -> None:
    _stored("a.example")
    result = CliRunner().invoke(main, ["snapshot", "reconcile", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"stale": ["a.example"], "extra": [], "fixed": False}
    assert redis_client.hlen("certman:index") == 0
    result = CliRunner().invoke(main, ["snapshot", "reconcile"])
    assert result.exit_code == 0, result.output
    assert "1 sites published again: a.example" in result.output
    assert _entry(redis_client, "a.example") is not None


def test_resync_and_listing_in_batches_miss_no_site(
    certman_env: dict[str, str], redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At 100,000 sites both go in batches (PostgreSQL refuses an IN list of more than 65,535
    # ids); batches of two over five sites check the joins between batches.
    from pipeline import sites

    monkeypatch.setattr(snapshot, "RESYNC_BATCH", 2)
    monkeypatch.setattr(sites, "IN_BATCH", 2)
    _stored(*(f"s{i}.example" for i in range(5)))
    _stored("bare.example", certified=False)
    with session_scope() as session:
        assert snapshot.resync(session) == 6
        listed = sites.list_sites(session)
        assert len(sites.current_certificates(session, list(range(1, 7)))) == 5
    assert all(_entry(redis_client, f"s{i}.example")[1] for i in range(5))  # type: ignore[index]
    assert _entry(redis_client, "bare.example")[1] is False  # type: ignore[index]
    assert sum(row["serial"] is not None for row in listed) == 5
    with session_scope() as session:
        drift = snapshot.find_drift(session)
    assert (drift.stale, drift.extra) == ([], [])
