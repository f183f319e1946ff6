"""What an edge process knows about sites: a small in-memory index, no certificates or keys.

Filled from ``P:index`` (see :mod:`pipeline.distribution`); the blobs with chains and envelopes
stay in Redis until a handshake needs one.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping
from typing import NamedTuple

from pipeline.distribution import SiteRecord, content_hash, parse_index_entry

__all__ = ["SiteIndex", "SiteMeta", "normalize_host"]

log = logging.getLogger(__name__)


class SiteMeta(NamedTuple):
    # A NamedTuple, not a dataclass: 100,000 of these are built at start, and a tuple is the
    # cheapest immutable record Python makes.
    domain: str
    names: tuple[str, ...]
    upstream: str | None
    has_cert: bool
    not_after: float | None
    content_hash: str

    @classmethod
    def from_index(cls, domain: str, raw: str | bytes) -> SiteMeta:
        digest, has_cert, not_after, upstream, names = parse_index_entry(raw)
        return cls(domain, names or (domain,), upstream, has_cert, not_after, digest)

    @classmethod
    def from_record(cls, record: SiteRecord) -> SiteMeta:
        return cls(
            domain=record.domain,
            names=tuple(dict.fromkeys((record.domain, *record.names))),
            upstream=record.upstream,
            has_cert=bool(record.chain_pem and record.envelope),
            not_after=record.not_after.timestamp() if record.not_after else None,
            content_hash=content_hash(record),
        )


def normalize_host(host: str) -> str:
    """Host header or SNI value -> the lower-case name without port or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal: never one of our names, keep it whole
        return host.partition("]")[0] + "]"
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


# Called with the domain whose certificate changed or disappeared.
ChangeListener = Callable[[str], None]


class SiteIndex:
    """domain -> SiteMeta and name -> domain; mutated only on the event loop's thread.

    A snapshot's entries are parsed when first needed (a lookup, an event, the background
    pass started after each snapshot): at start only each entry's names are read, which is what
    keeps an edge with 100,000 sites ready in under a second.
    """

    def __init__(self) -> None:
        self.sites: dict[str, SiteMeta] = {}
        self.names: dict[str, str] = {}
        self._unparsed: dict[str, bytes] = {}
        self._listeners: list[ChangeListener] = []
        self.malformed = 0

    def on_certificate_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def lookup(self, name: str) -> SiteMeta | None:
        domain = self.names.get(name)
        if domain is None and "." in name:
            # A certificate for *.example.com covers exactly one more label.
            domain = self.names.get("*." + name.split(".", 1)[1])
        return self.get(domain) if domain is not None else None

    def get(self, domain: str) -> SiteMeta | None:
        meta = self.sites.get(domain)
        if meta is None and domain in self._unparsed:
            meta = self._parse(domain)
        return meta

    def put(self, meta: SiteMeta) -> None:
        old = self.get(meta.domain)
        if old is not None:
            for name in set(old.names) - set(meta.names):
                if self.names.get(name) == meta.domain:
                    del self.names[name]
        self.sites[meta.domain] = meta
        for name in meta.names:
            self.names[name] = meta.domain
        if old is not None and old.content_hash != meta.content_hash:
            self._changed(meta.domain)

    def remove(self, domain: str) -> None:
        old = self.get(domain)
        if old is None:
            return
        del self.sites[domain]
        for name in old.names:
            if self.names.get(name) == domain:
                del self.names[name]
        self._changed(domain)

    def load_snapshot(self, raw_index: Mapping[bytes, bytes]) -> None:
        """Swap in a whole snapshot (``P:index``), telling listeners about every certificate
        that differs from one already in use. Malformed entries are skipped and counted."""
        names: dict[str, str] = {}
        unparsed: dict[str, bytes] = {}
        malformed = 0
        for raw_domain, entry in raw_index.items():
            try:
                domain = raw_domain.decode()
                site_names = entry[entry.rindex(b"\t") + 1 :].decode().split() or [domain]
            except (ValueError, UnicodeDecodeError):
                malformed += 1  # one bad entry must not keep every other site dark
                continue
            unparsed[domain] = entry
            for name in site_names:
                names[name] = domain
        old = self.sites
        self.sites, self.names, self._unparsed = {}, names, unparsed
        self.malformed = malformed
        # Only parsed sites can have a TLS context in use: an entry never looked up has none.
        for domain, before in old.items():
            after = unparsed.get(domain)
            if after is None or after[: after.find(b"\t")].decode() != before.content_hash:
                self._changed(domain)

    def replace(self, metas: Mapping[str, SiteMeta]) -> None:
        """Swap in a whole snapshot of parsed entries (tests and tools)."""
        old = self.sites
        self.sites, self._unparsed = dict(metas), {}
        self.names = {name: meta.domain for meta in metas.values() for name in meta.names}
        for domain, before in old.items():
            after = metas.get(domain)
            if after is None or after.content_hash != before.content_hash:
                self._changed(domain)

    def parse_some(self, limit: int) -> bool:
        """Parse up to ``limit`` waiting entries; True while some are left."""
        for domain in list(itertools.islice(self._unparsed, limit)):
            self._parse(domain)
        return bool(self._unparsed)

    def all(self) -> list[SiteMeta]:
        while self.parse_some(10_000):
            pass
        return list(self.sites.values())

    def certificates_known(self) -> int:
        return sum(1 for meta in self.all() if meta.has_cert)

    def soonest_expiry(self) -> float:
        return min((m.not_after for m in self.all() if m.has_cert and m.not_after), default=0.0)

    def _parse(self, domain: str) -> SiteMeta | None:
        entry = self._unparsed.pop(domain)
        try:
            meta = SiteMeta.from_index(domain, entry)
        except (ValueError, UnicodeDecodeError):
            self.malformed += 1
            log.error("index entry for %s is malformed; its names are refused", domain)
            for name, owner in list(self.names.items()):
                if owner == domain:
                    del self.names[name]
            return None
        self.sites[domain] = meta
        return meta

    def _changed(self, domain: str) -> None:
        for listener in self._listeners:
            listener(domain)
