"""Trust survives a restart: what a Redis writer without the signing key does to a site is
refused by the running edge, never reaches its mirror, and is refused again after a restart,
whether the restarted edge reads the forged Redis or starts from its mirror alone."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from pipeline.distribution.layout import SiteRecord, channel, index_entry, publish_site, remove_site
from tests.support.ports import free_port

from .conftest import Keys, RunningEdge, Sites, serial_of, wait_for

Start = Callable[..., RunningEdge]


def _refusals(edge: RunningEdge) -> float:
    total = 0.0
    for line in edge.metrics().splitlines():
        if line.startswith("certman_edge_signature_failures_total{") and 'what="site"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _file(r: redis.Redis, prefix: str, domain: str, record: SiteRecord) -> None:
    """``record`` filed under ``domain`` in every hash, as a writer of Redis would."""
    assert record.signed is not None
    entry = index_entry(record).rsplit("\t", 1)[0] + f"\t{domain}"
    r.hset(f"{prefix}:sites", domain, record.to_json())
    r.hset(f"{prefix}:index", domain, entry)
    r.hset(f"{prefix}:signed", domain, record.signed.to_json())


def _resync(r: redis.Redis, prefix: str) -> None:
    version = int(r.incr(f"{prefix}:version"))
    r.publish(channel(prefix), json.dumps({"type": "resync", "version": version}))


def _after_restarts(
    start_edge: Start, mirror: Path, first: RunningEdge, check: Callable[[RunningEdge], object]
) -> RunningEdge:
    """``first`` stopped, then started again from its mirror twice, ``check`` run on each:
    reading the (forged) Redis, and with Redis unreachable (the mirror alone). The last one
    is returned, still running."""
    first.stop()
    again = start_edge(mirror_path=mirror)
    again.wait_ready()
    wait_for(lambda: "certman_edge_sync_connected 1.0" in again.metrics(), what="read Redis")
    check(again)
    again.stop()
    alone = start_edge(mirror_path=mirror, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    alone.wait_ready()
    assert "certman_edge_sync_connected 0.0" in alone.metrics()
    check(alone)
    return alone


def _serves(edge: RunningEdge, record: SiteRecord) -> None:
    assert serial_of(edge.peer_cert(record.domain)) == record.serial
    assert edge.https(record.domain)[0] == 200


def _fail() -> None:
    raise AssertionError("served again")


def _removed(edge: RunningEdge, domain: str) -> bool:
    try:
        edge.peer_cert(domain)
    except ssl.SSLError as exc:
        return "UNRECOGNIZED_NAME" in str(exc) and edge.http(domain)[0] == 404
    return False


def test_an_older_genuine_statement_put_back_is_refused_and_not_mirrored(
    tmp_path: Path,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Start,
) -> None:
    mirror = tmp_path / "mirror.sqlite3"
    old = sites.record("shop.test", upstream="http://127.0.0.1:9")
    new = sites.record("shop.test", upstream=upstream)
    publish_site(redis_client, prefix, old)
    publish_site(redis_client, prefix, new)
    edge = start_edge(mirror_path=mirror)
    edge.wait_ready()
    _serves(edge, new)
    _file(redis_client, prefix, "shop.test", old)
    _resync(redis_client, prefix)
    wait_for(lambda: _refusals(edge) >= 1, what="the replay refused")
    wait_for(lambda: 'cause="gap"' in edge.metrics(), what="the forged snapshot read")
    _serves(edge, new)
    assert edge.edge is not None and new.signed is not None
    assert edge.edge.mirror.statement("shop.test") == new.signed.to_json().encode()
    _after_restarts(start_edge, mirror, edge, lambda e: _serves(e, new)).stop()
    # The pipeline's next statement is still taken.
    newer = sites.record("shop.test", upstream=upstream)
    publish_site(redis_client, prefix, newer)
    last = start_edge(mirror_path=mirror)
    wait_for(lambda: serial_of(last.peer_cert("shop.test")) == newer.serial, what="newer served")


def test_another_sites_statement_filed_under_a_victims_domain_is_refused_after_a_restart(
    tmp_path: Path,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Start,
) -> None:
    mirror = tmp_path / "mirror.sqlite3"
    victim = sites.record("victim.test", upstream=upstream)
    attacker = sites.record("attacker.test", upstream="http://127.0.0.1:9")
    publish_site(redis_client, prefix, victim)
    publish_site(redis_client, prefix, attacker)
    edge = start_edge(mirror_path=mirror)
    edge.wait_ready()
    _serves(edge, victim)
    _file(redis_client, prefix, "victim.test", attacker)
    _resync(redis_client, prefix)
    wait_for(lambda: 'cause="gap"' in edge.metrics(), what="the forged snapshot read")
    # Looked up again: the misfiled statement is met, refused, and the last good one kept.
    wait_for(lambda: _refusals(edge) >= 1 or edge.https("victim.test")[0] != 200, what="met")
    _serves(edge, victim)
    alone = _after_restarts(start_edge, mirror, edge, lambda e: _serves(e, victim))
    assert _refusals(alone) == 0  # from the mirror alone: nothing forged even read


def test_a_removal_without_a_signed_tombstone_survives_a_restart(
    tmp_path: Path,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Start,
) -> None:
    mirror = tmp_path / "mirror.sqlite3"
    site = sites.record("shop.test", upstream=upstream)
    publish_site(redis_client, prefix, site)
    edge = start_edge(mirror_path=mirror)
    edge.wait_ready()
    _serves(edge, site)
    for part in ("sites", "index", "signed", "names"):
        redis_client.hdel(f"{prefix}:{part}", "shop.test")
    _resync(redis_client, prefix)
    wait_for(lambda: 'cause="gap"' in edge.metrics(), what="the emptied snapshot read")
    _serves(edge, site)
    _after_restarts(start_edge, mirror, edge, lambda e: _serves(e, site))


def test_a_replay_after_a_signed_tombstone_does_not_resurrect_the_site(
    tmp_path: Path,
    keys: Keys,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Start,
) -> None:
    mirror = tmp_path / "mirror.sqlite3"
    site = sites.record("gone.test", upstream=upstream)
    publish_site(redis_client, prefix, site)
    edge = start_edge(mirror_path=mirror)
    edge.wait_ready()
    _serves(edge, site)
    remove_site(redis_client, prefix, "gone.test", signer=keys.signer)
    wait_for(lambda: _removed(edge, "gone.test"), what="the signed removal applied")
    # The last genuine record replayed: as an event, and in the snapshot.
    _file(redis_client, prefix, "gone.test", site)
    version = int(redis_client.incr(f"{prefix}:version"))
    event = {"type": "site", "version": version, "record": json.loads(site.to_json())}
    redis_client.publish(channel(prefix), json.dumps(event))
    wait_for(lambda: _refusals(edge) >= 1, what="the replayed event refused")
    _resync(redis_client, prefix)
    wait_for(lambda: 'cause="gap"' in edge.metrics(), what="the replayed snapshot read")
    assert _removed(edge, "gone.test")
    _after_restarts(start_edge, mirror, edge, lambda e: _removed(e, "gone.test") or _fail())


@pytest.mark.parametrize("removed", [False, True])
def test_a_mirror_written_before_versions_were_kept_keeps_only_what_verifies(
    tmp_path: Path, keys: Keys, sites: Sites, removed: bool
) -> None:
    """An older mirror (schema 0) held whatever Redis held: on opening, a row whose statement
    does not verify, or whose blob is not the one signed, is dropped; the rest get their
    version."""
    import sqlite3

    from edge.mirror import Mirror

    path = tmp_path / "old.sqlite3"
    good, other = sites.record("good.test"), sites.record("other.test")
    assert good.signed is not None and other.signed is not None
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE sites (domain TEXT PRIMARY KEY, entry BLOB, signed BLOB) WITHOUT ROWID;"
            "CREATE TABLE blobs (domain TEXT PRIMARY KEY, blob BLOB NOT NULL, hash TEXT NOT NULL);"
            "CREATE TABLE trusted (domain TEXT PRIMARY KEY, digest BLOB NOT NULL, "
            "signer TEXT NOT NULL) WITHOUT ROWID;"
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
        )
        rows = [
            ("good.test", good, good.signed.to_json()),
            ("victim.test", other, other.signed.to_json()),  # misfiled
            ("other.test", other if not removed else good, other.signed.to_json()),
        ]
        for domain, record, signed in rows:
            db.execute(
                "INSERT INTO sites VALUES (?, ?, ?)",
                (domain, b"forged\t1\t\t\tvictim.test", signed.encode()),
            )
            db.execute(
                "INSERT INTO blobs VALUES (?, ?, ?)", (domain, record.to_json().encode(), "x")
            )
    mirror = Mirror(path, signers=keys.signers)
    try:
        contents = mirror.load()
        kept = {"good.test"} | ({"other.test"} if not removed else set())
        assert {d.decode() for d in contents.index} == kept
        assert contents.index[b"good.test"] == index_entry(good).encode()
        assert mirror.statement("good.test") == good.signed.to_json().encode()
        assert contents.tombstones == {}
    finally:
        mirror.close()
    # Opened again: already migrated, nothing changes.
    again = Mirror(path, signers=keys.signers)
    try:
        assert {d.decode() for d in again.load().index} == kept
    finally:
        again.close()
