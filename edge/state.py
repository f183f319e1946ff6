"""What an edge process knows about sites: a small in-memory index, no certificates or keys.

Filled from ``P:index`` (see :mod:`pipeline.distribution`); the blobs with chains and envelopes
stay in Redis until a handshake needs one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

from pipeline.distribution import SiteRecord, content_hash, parse_index_entry

__all__ = ["SiteIndex", "SiteMeta", "normalize_host"]


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
    """domain -> SiteMeta and name -> domain; mutated only on the event loop's thread."""

    def __init__(self) -> None:
        self.sites: dict[str, SiteMeta] = {}
        self.names: dict[str, str] = {}
        self._listeners: list[ChangeListener] = []

    def on_certificate_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def lookup(self, name: str) -> SiteMeta | None:
        domain = self.names.get(name)
        if domain is None and "." in name:
            # A certificate for *.example.com covers exactly one more label.
            domain = self.names.get("*." + name.split(".", 1)[1])
        return self.sites.get(domain) if domain is not None else None

    def put(self, meta: SiteMeta) -> None:
        old = self.sites.get(meta.domain)
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
        old = self.sites.pop(domain, None)
        if old is None:
            return
        for name in old.names:
            if self.names.get(name) == domain:
                del self.names[name]
        self._changed(domain)

    def replace(self, metas: Mapping[str, SiteMeta]) -> None:
        """Swap in a whole snapshot, telling listeners about every certificate that differs."""
        old = self.sites
        names: dict[str, str] = {}
        for meta in metas.values():
            for name in meta.names:
                names[name] = meta.domain
        self.sites = dict(metas)
        self.names = names
        for domain, before in old.items():
            after = metas.get(domain)
            if after is None or after.content_hash != before.content_hash:
                self._changed(domain)

    def certificates_known(self) -> int:
        return sum(1 for meta in self.sites.values() if meta.has_cert)

    def soonest_expiry(self) -> float:
        return min(
            (m.not_after for m in self.sites.values() if m.has_cert and m.not_after), default=0.0
        )

    def _changed(self, domain: str) -> None:
        for listener in self._listeners:
            listener(domain)
