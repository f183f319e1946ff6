"""The edge's site index: entries parsed on first use, changes noticed either way."""

from __future__ import annotations

from datetime import UTC, datetime

from edge.state import SiteIndex, SiteMeta
from pipeline.distribution import SiteRecord, index_entry


def record(
    domain: str, *aliases: str, chain: str = "chain", upstream: str | None = None
) -> SiteRecord:
    return SiteRecord(
        domain,
        (domain, *aliases),
        upstream,
        chain,
        "envelope",
        datetime(2027, 1, 1, tzinfo=UTC),
        "1f",
    )


def snapshot(*records: SiteRecord) -> dict[bytes, bytes]:
    return {r.domain.encode(): index_entry(r).encode() for r in records}


def test_names_resolve_before_entries_are_parsed() -> None:
    index = SiteIndex()
    index.load_snapshot(snapshot(record("a.test", "www.a.test", upstream="http://10.0.0.1:80")))
    assert index.sites == {}  # nothing parsed yet
    meta = index.lookup("www.a.test")
    assert meta is not None and meta.domain == "a.test" and meta.upstream == "http://10.0.0.1:80"
    assert set(index.sites) == {"a.test"}


def test_an_event_for_an_unparsed_site_drops_the_names_it_lost() -> None:
    index = SiteIndex()
    index.load_snapshot(snapshot(record("a.test", "www.a.test", "shop.a.test")))
    index.put(SiteMeta.from_record(record("a.test", "www.a.test")))
    assert index.lookup("shop.a.test") is None
    assert index.lookup("www.a.test") is not None


def test_a_resnapshot_tells_about_changed_certificates_in_use_only() -> None:
    changed: list[str] = []
    index = SiteIndex()
    index.on_certificate_change(changed.append)
    index.load_snapshot(snapshot(record("used.test"), record("idle.test"), record("gone.test")))
    index.lookup("used.test")
    index.lookup("gone.test")
    index.load_snapshot(
        snapshot(record("used.test", chain="new"), record("idle.test", chain="new"))
    )
    assert sorted(changed) == ["gone.test", "used.test"]


def test_malformed_entries_are_skipped_and_counted() -> None:
    index = SiteIndex()
    raw = snapshot(record("good.test"))
    raw[b"json.test"] = b'{"h": "x"}'
    raw[b"short.test"] = b"onlyhash\tshort.test"
    index.load_snapshot(raw)
    assert index.malformed == 1  # no tab at all: skipped at once
    assert index.lookup("short.test") is None  # too few fields: found out on first use
    assert index.malformed == 2
    assert index.lookup("good.test") is not None
    assert index.certificates_known() == 1


def test_parsing_in_slices_reaches_every_entry() -> None:
    index = SiteIndex()
    index.load_snapshot(snapshot(*(record(f"s{i}.test") for i in range(25))))
    slices = 0
    while index.parse_some(10):
        slices += 1
    assert slices == 2 and len(index.sites) == 25
