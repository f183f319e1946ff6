"""The backstop for lost publishes: the edges' snapshot brought back in line with the store."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import delete, select

from pipeline import runtime
from pipeline.cli.commands import main
from pipeline.crypto.signing import SignedChallenge, SignedSite, SigningKey, TrustedSigners
from pipeline.distribution import publishing as snapshot
from pipeline.distribution.layout import SiteRecord, parse_index_entry, replace_all
from pipeline.models import Certificate, Site
from tests.support.factories import NOW, make_cert, make_site
from tests.support.from_settings import session_scope


def _stored(*domains: str, certified: bool = True) -> None:
    with session_scope() as session:
        for domain in domains:
            site = make_site(session, domain)
            if certified:
                make_cert(session, site)


def _publish_all() -> None:
    with session_scope() as session:
        runtime.current().publisher.resync(session)


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
    drift = runtime.current().publisher.reconcile(session_scope, limit=100)
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
        dry = runtime.current().publisher.find_drift(session)
    assert dry.stale == ["never-published.example", "renewed.example"]
    assert dry.extra == ["removed.example"]

    runtime.current().publisher.reconcile(session_scope, limit=100)
    renewed = _entry(redis_client, "renewed.example")
    assert renewed is not None and renewed[2] == (NOW + timedelta(days=90)).timestamp()
    assert _entry(redis_client, "never-published.example") is not None
    assert _entry(redis_client, "removed.example") is None
    assert redis_client.hget("certman:names", "removed.example") is None
    assert redis_client.hget("certman:sites", "kept.example") == kept  # untouched
    again = runtime.current().publisher.reconcile(session_scope, limit=100)
    assert (again.stale, again.extra) == ([], [])


def test_fixes_per_run_are_bounded(certman_env: dict[str, str], redis_client: redis.Redis) -> None:
    _stored(*(f"s{i}.example" for i in range(5)))
    first = runtime.current().publisher.reconcile(session_scope, limit=2)
    assert len(first.stale) == 5
    assert redis_client.hlen("certman:index") == 2
    second = runtime.current().publisher.reconcile(session_scope, limit=2)
    assert len(second.stale) == 3


def test_cli_dry_run_reports_without_fixing(
    certman_env: dict[str, str], redis_client: redis.Redis
) -> None:
    _stored("a.example")
    result = CliRunner().invoke(main, ["snapshot", "reconcile", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "stale": ["a.example"],
        "extra": [],
        "fixed": False,
        "unsigned": ["a.example"],
    }
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
    from pipeline.fleet import sites

    monkeypatch.setattr(snapshot, "RESYNC_BATCH", 2)
    monkeypatch.setattr(snapshot, "IN_BATCH", 2)
    _stored(*(f"s{i}.example" for i in range(5)))
    _stored("bare.example", certified=False)
    with session_scope() as session:
        assert runtime.current().publisher.resync(session) == 6
        listed = sites.list_sites(session)
        assert len(snapshot.current_certificates(session, list(range(1, 7)))) == 5
    assert all(_entry(redis_client, f"s{i}.example")[1] for i in range(5))  # type: ignore[index]
    assert _entry(redis_client, "bare.example")[1] is False  # type: ignore[index]
    assert sum(row["serial"] is not None for row in listed) == 5
    with session_scope() as session:
        drift = runtime.current().publisher.find_drift(session)
    assert (drift.stale, drift.extra) == ([], [])


# --- signed statements ---------------------------------------------------------------------------
def _statement(client: redis.Redis, domain: str) -> SignedSite:
    raw = client.hget("certman:signed", domain)
    assert raw is not None
    return SignedSite.from_json(raw)


def _ours() -> TrustedSigners:
    key = runtime.current().signing_key
    return TrustedSigners.of([ed25519.Ed25519PublicKey.from_public_bytes(key.public_bytes)])


def test_every_publication_is_signed_by_the_pipelines_key(
    certman_env: dict[str, str], redis_client: redis.Redis
) -> None:
    _stored("a.example")
    _stored("bare.example", certified=False)
    _publish_all()
    for domain in ("a.example", "bare.example"):
        statement = _statement(redis_client, domain)
        _ours().verify_site(statement)
        blob = redis_client.hget("certman:sites", domain)
        assert blob is not None and SiteRecord.from_json(blob).matches(statement)
    before = _statement(redis_client, "a.example").version
    runtime.current().publisher.unpublish("a.example")
    tombstone = _statement(redis_client, "a.example")
    _ours().verify_site(tombstone)
    assert tombstone.removed and tombstone.version > before
    runtime.current().publisher.set_challenge("tok-en_1", "tok-en_1.thumb", 60)
    raw = redis_client.get("certman:challenge-signed:tok-en_1")
    assert raw is not None
    _ours().verify_challenge(SignedChallenge.from_json(raw), now=time.time())


def _unsigned(client: redis.Redis, domain: str) -> None:
    client.hdel("certman:signed", domain)


def _forged(client: redis.Redis, domain: str) -> None:
    # Another Redis writer's statement, with the fields the store would agree with, claiming
    # the pipeline's key id: only the signature can tell.
    statement = _statement(client, domain)
    data = statement.to_dict() | {"signature": "A" * 86}
    client.hset("certman:signed", domain, json.dumps(data))


def _steered(client: redis.Redis, domain: str) -> None:
    # Signed by a key of the writer's own, saying another upstream.
    statement = _statement(client, domain)
    other = SigningKey.generate().sign_site(
        SignedSite(**{**statement.to_dict(), "names": statement.names, "upstream": "http://evil"})
    )
    client.hset("certman:signed", domain, other.to_json())


def _garbled(client: redis.Redis, domain: str) -> None:
    client.hset("certman:signed", domain, "{not json")


def _tombstoned(client: redis.Redis, domain: str) -> None:
    statement = _statement(client, domain)
    tombstone = SignedSite(domain, statement.version + 1, removed=True)
    client.hset(
        "certman:signed", domain, runtime.current().signing_key.sign_site(tombstone).to_json()
    )


@pytest.mark.parametrize("spoil", [_unsigned, _forged, _steered, _garbled, _tombstoned])
def test_a_statement_missing_or_not_ours_is_drift_and_republished_signed(
    certman_env: dict[str, str], redis_client: redis.Redis, spoil: Any
) -> None:
    _stored("a.example", "b.example")
    _publish_all()
    spoil(redis_client, "a.example")
    with session_scope() as session:
        drift = runtime.current().publisher.find_drift(session)
    assert (drift.stale, drift.unsigned, drift.extra) == (["a.example"], ["a.example"], [])
    kept = redis_client.hget("certman:signed", "b.example")
    runtime.current().publisher.reconcile(session_scope, limit=100)
    statement = _statement(redis_client, "a.example")
    _ours().verify_site(statement)
    blob = redis_client.hget("certman:sites", "a.example")
    assert blob is not None and SiteRecord.from_json(blob).matches(statement)
    assert redis_client.hget("certman:signed", "b.example") == kept  # untouched
    with session_scope() as session:
        again = runtime.current().publisher.find_drift(session)
    assert (again.stale, again.unsigned, again.extra) == ([], [], [])


def test_an_unsigned_snapshot_after_the_upgrade_is_signed_by_the_reconcile(
    certman_env: dict[str, str], redis_client: redis.Redis
) -> None:
    # What an installation upgraded from unsigned distribution holds: records, no statements.
    _stored("a.example", "b.example")
    with session_scope() as session:
        records = [
            snapshot.site_record(session, site) for site in session.scalars(select(Site)).all()
        ]
    replace_all(redis_client, "certman", records)
    assert redis_client.hlen("certman:signed") == 0
    result = CliRunner().invoke(main, ["keys", "status", "--json"])
    assert result.exit_code == 0, result.output
    unsigned = [row for row in json.loads(result.output) if row.get("unsigned")]
    assert [row["records"] for row in unsigned] == [2]
    drift = runtime.current().publisher.reconcile(session_scope, limit=100)
    assert drift.unsigned == ["a.example", "b.example"]
    for domain in ("a.example", "b.example"):
        _ours().verify_site(_statement(redis_client, domain))


def test_an_index_entry_pointing_at_another_blob_than_the_one_signed_is_drift(
    certman_env: dict[str, str], redis_client: redis.Redis
) -> None:
    _stored("a.example")
    _publish_all()
    entry = redis_client.hget("certman:index", "a.example")
    assert entry is not None
    redis_client.hset("certman:index", "a.example", b"0" * 16 + entry[16:])
    with session_scope() as session:
        assert runtime.current().publisher.find_drift(session).unsigned == ["a.example"]


def test_a_signed_site_the_store_no_longer_has_is_removed_with_a_tombstone(
    certman_env: dict[str, str], redis_client: redis.Redis
) -> None:
    _stored("a.example", "gone.example")
    _publish_all()
    # Index and blob gone (a writer, or a half-done removal), the statement still there.
    redis_client.hdel("certman:index", "gone.example")
    redis_client.hdel("certman:sites", "gone.example")
    with session_scope() as session:
        session.execute(delete(Site).where(Site.domain == "gone.example"))
    drift = runtime.current().publisher.reconcile(session_scope, limit=100)
    assert drift.extra == ["gone.example"]
    assert _statement(redis_client, "gone.example").removed


def test_a_writers_statement_of_a_huge_version_does_not_block_a_domain(
    certman_env: dict[str, str], redis_client: redis.Redis
) -> None:
    _stored("0-stuck.example", "a.example", "b.example")
    # Unsigned junk of a version far ahead: not the pipeline's, so not one it must exceed.
    junk = {"domain": "0-stuck.example", "version": 2**62, "names": ["0-stuck.example"]}
    redis_client.hset("certman:signed", "0-stuck.example", json.dumps(junk))
    drift = runtime.current().publisher.reconcile(session_scope, limit=100)
    assert drift.stale == ["0-stuck.example", "a.example", "b.example"]
    for domain in ("0-stuck.example", "a.example", "b.example"):
        _ours().verify_site(_statement(redis_client, domain))
    assert _statement(redis_client, "0-stuck.example").version < 2**62
    # And a resync signs it from the clock too, not above the junk.
    redis_client.hset("certman:signed", "0-stuck.example", json.dumps(junk))
    with session_scope() as session:
        runtime.current().publisher.resync(session)
    assert _statement(redis_client, "0-stuck.example").version < 2**62


def test_the_task_rebuilds_a_snapshot_redis_lost(
    certman_env: dict[str, str], redis_client: redis.Redis
) -> None:
    # Beat sends it as soon as Redis is back: it must not wait for a dispatch to rebuild, which
    # a first publication after the restart would stop from rebuilding anything.
    from pipeline.tasks.maintenance import reconcile_snapshot

    _stored("a.example", "b.example")
    assert not redis_client.exists("certman:version")
    assert reconcile_snapshot() == {"stale": 2, "extra": 0}
    assert _entry(redis_client, "a.example") is not None
    assert _entry(redis_client, "b.example") is not None
    # Rebuilt: the next run finds nothing to do.
    assert reconcile_snapshot() == {"stale": 0, "extra": 0}
