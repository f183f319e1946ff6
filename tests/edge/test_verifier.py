"""Signatures verified ahead of use on the verifier's thread, and the mirror's writes on the
writer's thread: what each hands back, and that nothing is served from a write not yet done."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry

from edge.mirror import Mirror
from edge.verifier import Verifier, raw_digest
from pipeline.crypto.signing import SignedSite, SigningKey, TrustedSigners
from pipeline.distribution.layout import SiteRecord

SIGNER = SigningKey.generate()


def _raw(domain: str, signer: SigningKey = SIGNER, upstream: str | None = None) -> bytes:
    bare = SiteRecord(domain, (domain,), upstream, "chain", "envelope",
                      datetime(2027, 1, 1, tzinfo=UTC), "1f")  # fmt: skip
    return signer.sign_site(bare.statement(1)).to_json().encode()


def test_only_good_statements_filed_under_their_own_domain_are_vouched_for() -> None:
    verifier = Verifier(TrustedSigners.of([SIGNER.public_key()]), CollectorRegistry())
    good, known = _raw("good.test"), _raw("known.test")
    forged = SignedSite.from_json(_raw("forged.test", upstream="http://10.0.0.1"))
    removal = SIGNER.sign_site(SignedSite("gone.test", 2, removed=True)).to_json().encode()
    batch = [
        ("good.test", good),
        ("known.test", known),  # verified before: skipped
        ("forged.test", replace(forged, upstream="http://10.6.6.6").to_json().encode()),
        ("other.test", _raw("good.test")),  # a genuine statement filed elsewhere
        ("stranger.test", _raw("stranger.test", signer=SigningKey.generate())),
        ("junk.test", b"\xff{not json"),
        ("gone.test", removal),
    ]
    remembered = {"known.test": raw_digest(known)}
    try:
        got = asyncio.run(verifier.verify(batch, remembered.get))
    finally:
        verifier.close()
    assert got == [
        ("good.test", raw_digest(good), SIGNER.key_id),
        ("gone.test", raw_digest(removal), SIGNER.key_id),
    ]


def _record(domain: str, version: int, chain: str = "chain") -> tuple[SignedSite, bytes, bytes]:
    """(statement, raw statement, blob) of a site as the pipeline publishes it."""
    bare = SiteRecord(domain, (domain,), None, chain, "envelope",
                      datetime(2027, 1, 1, tzinfo=UTC), "1f")  # fmt: skip
    statement = SIGNER.sign_site(bare.statement(version))
    return statement, statement.to_json().encode(), bare.to_json().encode()


def test_a_change_is_served_before_its_write_is_committed(tmp_path: Path) -> None:
    signers = TrustedSigners.of([SIGNER.public_key()])

    async def scenario() -> None:
        mirror = Mirror(tmp_path / "mirror.sqlite3", signers=signers)
        try:
            a1, a2 = _record("a.test", 1, "one"), _record("a.test", 3, "two")
            mirror.put_site(*a1)
            assert mirror.blob("a.test") == a1[2]  # at once, written or not
            tombstone = SIGNER.sign_site(SignedSite("a.test", 2, removed=True))
            mirror.remove_site(tombstone, tombstone.to_json().encode())
            assert mirror.blob("a.test") is None
            mirror.put_site(*a2)
            mirror.trust([("a.test", b"d" * 16, SIGNER.key_id)])
            await mirror.flush()
            assert mirror._pending == {}  # every write committed: read from the file
            assert mirror.blob("a.test") == a2[2]
            # An older one, from an event behind a snapshot, is not written.
            mirror.put_site(*a1)
            await mirror.flush()
            assert mirror.blob("a.test") == a2[2] and mirror.statement("a.test") == a2[1]
            # A snapshot: only statements the edge accepts, and only blobs the mirror lacks.
            c, gone = _record("c.test", 5), _record("gone.test", 5)
            stranger = SigningKey.generate().sign_site(SignedSite("x.test", 9, ("x.test",)))
            asked: list[list[str]] = []
            blobs = {"c.test": c[2], "x.test": b"{}"}

            def fetch(domains: list[str]) -> list[bytes | None]:
                asked.append(domains)
                return [blobs.get(d) for d in domains]

            signed = {
                b"a.test": a2[1],  # held: nothing to do
                b"c.test": c[1],
                b"gone.test": gone[1],  # its blob gone from Redis: not written without it
                b"x.test": stranger.to_json().encode(),  # not a trusted signer
                b"y.test": c[1],  # filed under another domain
                b"t.test": SIGNER.sign_site(SignedSite("t.test", 4, removed=True))
                .to_json()
                .encode(),
            }
            counts: list[int] = []
            assert await mirror.store_snapshot(signed, fetch, counts.append) == 1
            assert asked == [["c.test", "gone.test"]] and counts == [1]
            assert mirror.blob("c.test") == c[2] and mirror.statement("gone.test") is None
            assert mirror.statement("x.test") is None and mirror.statement("y.test") is None
            # A snapshot without the sites (an unsigned removal) drops nothing.
            await mirror.store_snapshot({}, fetch, counts.append)
            mirror.synced(7)
            await mirror.flush()
            contents = mirror.load()
            assert set(contents.index) == {b"a.test", b"c.test"}
            assert contents.tombstones == {"t.test": 4}
            assert contents.version == 7 and contents.index[b"c.test"].endswith(b"\tc.test")
        finally:
            mirror.close()

    asyncio.run(scenario())


def test_a_mirror_without_a_path_lives_in_a_private_directory_removed_at_close() -> None:
    mirror = Mirror(None)
    directory = mirror.path.parent
    assert not mirror.persistent and directory.stat().st_mode & 0o077 == 0
    mirror.close()
    assert not directory.exists()
