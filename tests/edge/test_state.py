"""The edge's site index: entries parsed and verified on first use, changes noticed either way,
and nothing believed that the pipeline did not sign."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from edge.state import SiteIndex, StatementUnavailable
from edge.verifier import raw_digest
from pipeline.crypto.signing import SignedSite, SigningKey, TrustedSigners
from pipeline.distribution.layout import SiteRecord, index_entry

SIGNER = SigningKey.generate()


@pytest.fixture
def refusals() -> list[tuple[str, str]]:
    return []


@pytest.fixture
def index(refusals: list[tuple[str, str]]) -> SiteIndex:
    signers = TrustedSigners.of([SIGNER.public_key()])
    return SiteIndex(signers, on_refused=lambda d, kind, detail, v: refusals.append((d, kind)))


def record(
    domain: str,
    *aliases: str,
    chain: str = "chain",
    upstream: str | None = None,
    version: int = 1,
    signer: SigningKey = SIGNER,
) -> SiteRecord:
    bare = SiteRecord(
        domain,
        (domain, *aliases),
        upstream,
        chain,
        "envelope",
        datetime(2027, 1, 1, tzinfo=UTC),
        "1f",
    )
    return replace(bare, signed=signer.sign_site(bare.statement(version)))


def snapshot(*records: SiteRecord) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    index = {r.domain.encode(): index_entry(r).encode() for r in records}
    signed = {r.domain.encode(): r.signed.to_json().encode() for r in records if r.signed}
    return index, signed


def test_names_resolve_before_entries_are_parsed(index: SiteIndex) -> None:
    index.load_snapshot(*snapshot(record("a.test", "www.a.test", upstream="http://10.0.0.1:80")))
    assert index.sites == {}  # nothing parsed yet
    meta = index.lookup("www.a.test")
    assert meta is not None and meta.domain == "a.test" and meta.upstream == "http://10.0.0.1:80"
    assert set(index.sites) == {"a.test"}


def test_an_event_for_an_unparsed_site_drops_the_names_it_lost(index: SiteIndex) -> None:
    index.load_snapshot(*snapshot(record("a.test", "www.a.test", "shop.a.test")))
    newer = record("a.test", "www.a.test", version=2)
    assert newer.signed is not None and index.accept(newer.signed, newer) is not None
    assert index.lookup("shop.a.test") is None
    assert index.lookup("www.a.test") is not None


def test_a_resnapshot_tells_about_changed_certificates_in_use_only(index: SiteIndex) -> None:
    changed: list[str] = []
    index.on_certificate_change(changed.append)
    removed = SIGNER.sign_site(SignedSite("gone.test", 2, removed=True))
    index.load_snapshot(*snapshot(record("used.test"), record("idle.test"), record("gone.test")))
    index.lookup("used.test")
    index.lookup("gone.test")
    raw_index, raw_signed = snapshot(
        record("used.test", chain="new", version=2), record("idle.test", chain="new", version=2)
    )
    raw_signed[b"gone.test"] = removed.to_json().encode()
    index.load_snapshot(raw_index, raw_signed)
    assert sorted(changed) == ["gone.test", "used.test"]
    assert index.lookup("gone.test") is None


def test_malformed_entries_are_skipped_and_counted(index: SiteIndex) -> None:
    raw_index, raw_signed = snapshot(record("good.test"))
    raw_index[b"json.test"] = b'{"h": "x"}'
    raw_index[b"short.test"] = b"onlyhash\tshort.test"
    index.load_snapshot(raw_index, raw_signed)
    assert index.malformed == 1  # no tab at all: skipped at once
    assert index.lookup("short.test") is None  # too few fields: found out on first use
    assert index.malformed == 2
    assert index.lookup("good.test") is not None
    assert index.certificates_known() == 1


# ---- what a Redis writer cannot do -------------------------------------------------------------


def test_unsigned_forged_and_untrusted_entries_are_refused(
    index: SiteIndex, refusals: list[tuple[str, str]]
) -> None:
    raw_index, raw_signed = snapshot(
        record("ok.test"), record("untrusted.test", signer=SigningKey.generate())
    )
    unsigned = replace(record("unsigned.test"), signed=None)
    raw_index[b"unsigned.test"] = index_entry(unsigned).encode()
    forged = record("forged.test", upstream="http://10.0.0.1")
    assert forged.signed is not None
    steered = replace(forged.signed, upstream="http://10.6.6.6")  # signature now wrong
    raw_index[b"forged.test"] = index_entry(forged).encode()
    raw_signed[b"forged.test"] = steered.to_json().encode()
    index.load_snapshot(raw_index, raw_signed)
    assert index.lookup("ok.test") is not None
    for name in ("untrusted.test", "unsigned.test", "forged.test"):
        assert index.lookup(name) is None, name
    assert sorted(refusals) == [
        ("forged.test", "bad_signature"),
        ("unsigned.test", "unsigned"),
        ("untrusted.test", "untrusted_signer"),
    ]


def test_an_index_entry_cannot_point_a_name_elsewhere(index: SiteIndex) -> None:
    victim, attacker = record("victim.test"), record("attacker.test")
    raw_index, raw_signed = snapshot(victim, attacker)
    # The name map is unsigned: file victim's name under the attacker's (genuine) record.
    entry = index_entry(attacker).rsplit("\t", 1)[0] + "\tattacker.test victim.test"
    raw_index[b"attacker.test"] = entry.encode()
    del raw_index[b"victim.test"]
    index.load_snapshot(raw_index, raw_signed)
    assert index.lookup("victim.test") is None  # the attacker's signed names do not list it
    assert index.lookup("attacker.test") is not None


def test_no_rollback_and_the_last_good_record_stays(
    index: SiteIndex, refusals: list[tuple[str, str]]
) -> None:
    old, new = (
        record("a.test", upstream="http://10.0.0.1", version=5),
        record("a.test", upstream="http://10.0.0.2", version=6),
    )
    index.load_snapshot(*snapshot(new))
    assert index.lookup("a.test").upstream == "http://10.0.0.2"  # type: ignore[union-attr]
    # A genuine older record replayed, by event and by snapshot: ignored, the newer one stays.
    assert old.signed is not None and index.accept(old.signed, old) is None
    index.load_snapshot(*snapshot(old))
    assert index.lookup("a.test").upstream == "http://10.0.0.2"  # type: ignore[union-attr]
    # A forged one: refused, the last good one stays.
    raw_index, raw_signed = snapshot(new)
    raw_signed[b"a.test"] = raw_signed[b"a.test"].replace(b"10.0.0.2", b"10.6.6.6")
    index.load_snapshot(raw_index, raw_signed)
    assert index.lookup("a.test").upstream == "http://10.0.0.2"  # type: ignore[union-attr]
    assert [kind for _, kind in refusals] == ["rollback", "rollback", "bad_signature"]


def test_a_site_leaves_only_with_a_signed_tombstone(index: SiteIndex) -> None:
    site = record("a.test", version=3)
    index.load_snapshot(*snapshot(site))
    assert index.lookup("a.test") is not None
    index.load_snapshot({}, {})  # deleted from Redis, no tombstone: kept
    assert index.lookup("a.test") is not None
    forged = SigningKey.generate().sign_site(SignedSite("a.test", 9, removed=True))
    index.load_snapshot({}, {b"a.test": forged.to_json().encode()})
    assert index.lookup("a.test") is not None
    stale = SIGNER.sign_site(SignedSite("a.test", 2, removed=True))  # older than the site
    assert index.accept(stale) is None and index.lookup("a.test") is not None
    tombstone = SIGNER.sign_site(SignedSite("a.test", 4, removed=True))
    index.load_snapshot({}, {b"a.test": tombstone.to_json().encode()})
    assert index.lookup("a.test") is None


# ---- signatures verified ahead of use ------------------------------------------------------------


def _raw(rec: SiteRecord) -> bytes:
    assert rec.signed is not None
    return rec.signed.to_json().encode()


def test_a_statement_verified_ahead_is_accepted_without_a_second_verification(
    refusals: list[tuple[str, str]],
) -> None:
    on_loop: list[None] = []
    index = SiteIndex(
        TrustedSigners.of([SIGNER.public_key()]), on_verified=lambda: on_loop.append(None)
    )
    ahead, later = record("ahead.test"), record("later.test")
    prepared = SiteIndex.prepare(*snapshot(ahead, later))
    assert prepared.pending() == [("ahead.test", _raw(ahead)), ("later.test", _raw(later))]
    index.install(prepared)
    index.trust([("ahead.test", raw_digest(_raw(ahead)))])
    assert index.known_digest("ahead.test") == raw_digest(_raw(ahead))
    assert index.known_digest("later.test") is None
    assert index.lookup("ahead.test") is not None
    assert on_loop == []  # parsed only
    assert index.lookup("later.test") is not None
    assert len(on_loop) == 1  # the verifier had not got there: verified on first use


def test_trust_is_bound_to_the_exact_bytes_verified(
    index: SiteIndex, refusals: list[tuple[str, str]]
) -> None:
    genuine = record("a.test", upstream="http://10.0.0.1")
    assert genuine.signed is not None
    steered = replace(genuine.signed, upstream="http://10.6.6.6")
    index.trust([("a.test", raw_digest(_raw(genuine)))])
    raw_index, raw_signed = snapshot(genuine)
    raw_signed[b"a.test"] = steered.to_json().encode()
    index.load_snapshot(raw_index, raw_signed)
    assert index.lookup("a.test") is None
    assert refusals == [("a.test", "bad_signature")]


def test_a_statement_remembered_as_verified_is_not_believed_once_its_signer_is_retired(
    index: SiteIndex, refusals: list[tuple[str, str]]
) -> None:
    retired = SigningKey.generate()
    old = record("a.test", signer=retired)
    remembered = {"a.test": (raw_digest(_raw(old)), retired.key_id)}
    index.trust_remembered(remembered)
    index.load_snapshot(*snapshot(old))
    assert index.lookup("a.test") is None
    assert refusals == [("a.test", "untrusted_signer")]
    # The same memory with a signer still trusted is believed without verifying again.
    current = record("b.test")
    on_loop: list[None] = []
    fresh = SiteIndex(
        TrustedSigners.of([SIGNER.public_key()]), on_verified=lambda: on_loop.append(None)
    )
    fresh.trust_remembered({"b.test": (raw_digest(_raw(current)), SIGNER.key_id)})
    fresh.load_snapshot(*snapshot(current))
    assert fresh.lookup("b.test") is not None and on_loop == []


def test_an_index_installed_before_its_statements_serves_through_the_lookup(
    index: SiteIndex,
) -> None:
    """An edge's first fill: ready on the index alone, each statement looked up on first use
    until all of them are read; a lookup that cannot answer changes nothing."""
    first, second = record("first.test"), record("second.test")
    answering = {"first.test": _raw(first)}

    def lookup(domain: str) -> bytes | None:
        if domain not in answering:
            raise StatementUnavailable(domain)
        return answering[domain]

    prepared = SiteIndex.prepare(*snapshot(first, second))
    index.install(prepared._replace(signed={}, lookup=lookup))
    assert index.lookup("first.test") is not None
    with pytest.raises(StatementUnavailable):
        index.lookup("second.test")
    assert "second.test" in index.domains()  # still waiting, not refused
    index.add_statements({"first.test": _raw(first), "second.test": _raw(second)})
    assert index.lookup("second.test") is not None


def test_a_tombstone_keeps_its_version(index: SiteIndex, refusals: list[tuple[str, str]]) -> None:
    site = record("a.test", version=1)
    assert site.signed is not None
    assert index.accept(site.signed, site) is not None
    tombstone = SIGNER.sign_site(SignedSite("a.test", 2, removed=True))
    assert index.accept(tombstone) is None and index.removed_version("a.test") == 2
    # The last genuine record replayed, as an event and in a snapshot: refused both ways.
    assert index.accept(site.signed, site) is None
    raw_index, raw_signed = snapshot(site)
    index.load_snapshot(raw_index, raw_signed)
    assert index.lookup("a.test") is None
    assert refusals == [("a.test", "rollback"), ("a.test", "rollback")]
    # The same tombstone met again (a re-read snapshot) is no refusal; a newer site is taken.
    assert index.accept(tombstone) is None and len(refusals) == 2
    newer = record("a.test", version=3)
    assert newer.signed is not None and index.accept(newer.signed, newer) is not None
    assert index.removed_version("a.test") is None


def test_what_was_accepted_before_a_restart_holds_against_the_snapshot(
    refusals: list[tuple[str, str]],
) -> None:
    """A restarted edge's index, told what its mirror holds: an older statement, another
    site's statement filed under the domain and a snapshot without it all leave the site as
    it was accepted; a removed site's older records stay refused."""
    signers = TrustedSigners.of([SIGNER.public_key()])
    index = SiteIndex(signers, on_refused=lambda d, kind, detail, v: refusals.append((d, kind)))
    old, held, other = record("a.test", version=1), record("a.test", version=5), record("b.test")
    gone = record("gone.test", version=1)
    mirror = {"a.test": _raw(held)}
    index.remember(["a.test"], {"gone.test": 7}, mirror.get, {"a.test": "a.test"})
    index.load_snapshot(*snapshot(old, gone))
    meta = index.lookup("a.test")
    assert meta is not None and meta.version == 5
    assert index.lookup("gone.test") is None
    assert sorted(refusals) == [("a.test", "rollback"), ("gone.test", "rollback")]
    raw_index, raw_signed = snapshot(other)
    raw_index[b"a.test"], raw_signed[b"a.test"] = raw_index[b"b.test"], raw_signed[b"b.test"]
    index.load_snapshot(raw_index, raw_signed)
    meta = index.lookup("a.test")
    assert meta is not None and meta.version == 5
    index.load_snapshot({}, {})
    meta = index.lookup("a.test")
    assert meta is not None and meta.version == 5
