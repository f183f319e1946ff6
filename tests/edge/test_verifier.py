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
from pipeline.distribution import SiteRecord
from pipeline.signing import SignedSite, SigningKey, TrustedSigners

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


def test_a_change_is_served_before_its_write_is_committed(tmp_path: Path) -> None:
    async def scenario() -> None:
        mirror = Mirror(tmp_path / "mirror.sqlite3")
        try:
            mirror.put_site("a.test", b"entry", b"signed", b"blob-1", "h1")
            assert mirror.blob("a.test") == b"blob-1"  # at once, written or not
            mirror.remove_site("a.test", None)
            assert mirror.blob("a.test") is None
            mirror.put_site("a.test", b"entry", b"signed", b"blob-2", "h2")
            mirror.trust([("a.test", b"d" * 16, SIGNER.key_id)])
            await mirror.flush()
            assert mirror._pending == {}  # every write committed: read from the file
            assert mirror.blob("a.test") == b"blob-2"
            # Only blobs whose content hash the mirror lacks are fetched.
            asked: list[list[str]] = []

            def fetch(domains: list[str]) -> list[bytes | None]:
                asked.append(domains)
                return [b"blob-" + d.encode() if d != "gone.test" else None for d in domains]

            index = {
                b"a.test": b"h2\t1\t\t\ta.test",
                b"c.test": b"hc\t1\t\t\tc.test",
                b"gone.test": b"hg\t1\t\t\tgone.test",
                b"nocert.test": b"hn\t0\t\t\t",
            }
            counts: list[int] = []
            assert await mirror.fetch_missing(index, fetch, counts.append) == 1
            assert asked == [["c.test", "gone.test"]] and counts == [1]
            assert mirror.blob("c.test") == b"blob-c.test"
            # A snapshot without the site drops it, its blob and what was trusted of it.
            await mirror.replace_index({b"b.test": b"entry-b"}, {b"b.test": b"signed-b"})
            mirror.synced(7)
            await mirror.flush()
            contents = mirror.load()
            assert (contents.index, contents.trusted) == ({b"b.test": b"entry-b"}, {})
            assert mirror.statement("b.test") == b"signed-b"
            assert contents.version == 7 and mirror.blob("a.test") is None
        finally:
            mirror.close()

    asyncio.run(scenario())


def test_a_mirror_without_a_path_lives_in_a_private_directory_removed_at_close() -> None:
    mirror = Mirror(None)
    directory = mirror.path.parent
    assert not mirror.persistent and directory.stat().st_mode & 0o077 == 0
    mirror.close()
    assert not directory.exists()
