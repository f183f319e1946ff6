"""What an edge process knows about sites: a small in-memory index, no certificates or keys.

Filled from ``P:index`` and ``P:signed`` (see :mod:`pipeline.distribution.layout`), or from the
local mirror (:mod:`edge.mirror`); the blobs with chains and envelopes stay in the mirror until
a handshake needs one.

Only what the pipeline signed is believed (:mod:`pipeline.crypto.signing`). The index's name map
is a routing hint read at start, before anything is verified: a name leads to a domain, whose signed
statement is checked when the site is first used, and the name must be one the statement lists.
Signatures are verified ahead of that first use on a thread of their own (:mod:`edge.verifier`),
and remembered by the digest of the raw statement (here and in the local mirror), so the first
handshake of a name usually only parses its statement; one that comes before the verifier got
there verifies it itself. A statement byte-for-byte the same as the one in use is not even
parsed again, so a re-read snapshot costs only what changed.

A statement that does not verify, is unsigned, or is older than one this edge already accepted
for the domain is refused for that domain alone, and the last good one stays in use. A domain
that disappears from a snapshot goes only with a signed tombstone newer than what the edge
holds; without one it stays, since deleting is all a Redis writer could have done.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from edge.verifier import raw_digest
from pipeline.crypto.signing import BadSignature, SignedSite, TrustedSigners
from pipeline.distribution.layout import SiteRecord, parse_index_entry

__all__ = [
    "RefusalListener",
    "SiteIndex",
    "SiteMeta",
    "Snapshot",
    "StatementUnavailable",
    "normalize_host",
]

log = logging.getLogger(__name__)

# distribution.content_hash of a record without a certificate.
_NO_CERTIFICATE = hashlib.sha256(b"\x00").hexdigest()[:16]


class StatementUnavailable(Exception):
    """A site's statement could not be read just now (its lookup failed); nothing changed, the
    next use tries again."""


class Snapshot(NamedTuple):
    """A snapshot read and prepared for :meth:`SiteIndex.install` (see there)."""

    names: dict[str, str]  # name -> domain, unverified
    unparsed: dict[str, bytes]  # domain -> index entry
    signed: dict[str, bytes]  # domain -> raw signed statement
    malformed: int
    # Where statements not in ``signed`` are looked up on first use, raising
    # StatementUnavailable if it cannot answer now: the local mirror's, for a start from it, or
    # Redis's, during an edge's first fill (50 MB at 100,000 sites that a start need not read).
    lookup: Callable[[str], bytes | None] | None = None

    def pending(self) -> list[tuple[str, bytes]]:
        """(domain, raw statement) of every entry: what the verifier may check ahead."""
        return [(d, raw) for d, raw in self.signed.items() if d in self.unparsed]


class SiteMeta(NamedTuple):
    # A NamedTuple, not a dataclass: 100,000 of these are built at start, and a tuple is the
    # cheapest immutable record Python makes.
    domain: str
    names: tuple[str, ...]
    upstream: str | None
    has_cert: bool
    not_after: float | None
    content_hash: str
    version: int = 0
    digest: str | None = None  # SHA-256 of chain and envelope, as signed

    @classmethod
    def from_signed(cls, signed: SignedSite) -> SiteMeta:
        """From a verified statement: everything the edge acts on comes from here."""
        return cls(
            domain=signed.domain,
            names=tuple(dict.fromkeys((signed.domain, *signed.names))),
            upstream=signed.upstream,
            has_cert=signed.digest is not None,
            not_after=float(signed.not_after) if signed.not_after is not None else None,
            content_hash=signed.digest[:16] if signed.digest else _NO_CERTIFICATE,
            version=signed.version,
            digest=signed.digest,
        )

    def covers(self, name: str) -> bool:
        if name in self.names:
            return True
        head, dot, rest = name.partition(".")
        return bool(head and dot and f"*.{rest}" in self.names)


def normalize_host(host: str) -> str:
    """Host header or SNI value -> the lower-case name without port or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):  # IPv6 literal: never one of our names, keep it whole
        return host.partition("]")[0] + "]"
    return host.rsplit(":", 1)[0].rstrip(".") if ":" in host else host.rstrip(".")


# Called with the domain whose certificate changed or disappeared.
ChangeListener = Callable[[str], None]
# Called with (domain, kind, detail, version) when a statement is refused; kind is a short
# word for metrics (BadSignature's kinds, or "misfiled", "rollback", "mismatch").
RefusalListener = Callable[[str, str, str, int], None]


def _log_refusal(domain: str, kind: str, detail: str, version: int) -> None:
    log.error("refusing the record of %s (version %d): %s", domain, version, detail,
              extra={"domain": domain})  # fmt: skip


class SiteIndex:
    """domain -> SiteMeta and name -> domain; mutated only on the event loop's thread.

    A snapshot's entries are parsed when first needed (a lookup, an event): at start only each
    entry's names are read, which is what keeps an edge with 100,000 sites ready in under a
    second.
    """

    def __init__(
        self,
        signers: TrustedSigners,
        on_refused: RefusalListener = _log_refusal,
        on_verified: Callable[[], None] = lambda: None,
    ) -> None:
        self._signers = signers
        self._on_refused = on_refused
        # Called for every signature verified here, on the event loop (what the verifier's
        # thread did not get to first).
        self._on_verified = on_verified
        self.sites: dict[str, SiteMeta] = {}
        self.names: dict[str, str] = {}
        self._unparsed: dict[str, bytes] = {}
        self._signed: dict[str, bytes] = {}
        self._lookup: Callable[[str], bytes | None] | None = None
        # The newest statement accepted per domain, kept across snapshots: what "last good"
        # and "no roll-back" are measured against; and a digest of its raw bytes, so that the
        # same statement met again (a re-read snapshot) is not verified again.
        self._accepted: dict[str, SiteMeta] = {}
        self._accepted_raw: dict[str, bytes] = {}
        # domain -> digest of a raw statement whose signature is known good (verified ahead
        # by edge.verifier, or by this edge before a restart), not yet necessarily accepted.
        self._trusted: dict[str, bytes] = {}
        # domain -> version of the signed tombstone that removed it: nothing at or below it is
        # accepted again (a replay of the last genuine record must not bring the site back).
        self._removed: dict[str, int] = {}
        # What this edge accepted before it restarted (see remember): the domains whose
        # statement has not been read back yet, where it is read, and the version of those
        # read back whose signer is no longer trusted (nothing older is accepted either).
        self._unread: set[str] = set()
        self._remembered: Callable[[str], bytes | None] | None = None
        self._floors: dict[str, int] = {}
        self._remembered_names: dict[str, str] = {}
        self._listeners: list[ChangeListener] = []
        self.malformed = 0

    def on_certificate_change(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    # ---- reading ---------------------------------------------------------------------------

    def lookup(self, name: str) -> SiteMeta | None:
        domain = self.names.get(name)
        if domain is None and "." in name:
            # A certificate for *.example.com covers exactly one more label.
            domain = self.names.get("*." + name.split(".", 1)[1])
        if domain is None:
            return None
        meta = self.get(domain)
        # The name map is unsigned: a name leads only to a site whose signed names list it.
        return meta if meta is not None and meta.covers(name) else None

    def get(self, domain: str) -> SiteMeta | None:
        meta = self.sites.get(domain)
        if meta is None and domain in self._unparsed:
            meta = self._parse(domain)
        return meta

    def domains(self) -> list[str]:
        """Every domain known, parsed or not (nothing is parsed or verified for this)."""
        return [*self.sites, *(d for d in self._unparsed if d not in self.sites)]

    def known_digest(self, domain: str) -> bytes | None:
        """The digest of a raw statement of ``domain`` whose signature is known good, if any.
        Called from the verifier's thread too: two dict lookups, atomic under the GIL."""
        return self._trusted.get(domain) or self._accepted_raw.get(domain)

    def add_statements(self, signed: Mapping[str, bytes]) -> None:
        """The statements of a snapshot whose index was installed without them (an edge's
        first fill: ready on the index alone), for the sites not used meanwhile; lookups stop."""
        self._signed = {d: raw for d, raw in signed.items() if d in self._unparsed}
        self._lookup = None

    def trust(self, verified: Iterable[tuple[str, bytes]]) -> None:
        """Statements (domain, raw digest) whose signatures are known good."""
        self._trusted.update(verified)

    def trust_remembered(self, remembered: Mapping[str, tuple[bytes, str]]) -> None:
        """Statements this edge verified before (domain -> (raw digest, signer)), of signers
        it still trusts: a key retired since is not believed for having been once."""
        current = self._signers.key_ids
        self._trusted.update(
            (domain, digest) for domain, (digest, signer) in remembered.items() if signer in current
        )

    def remember(
        self,
        held: Iterable[str],
        tombstones: Mapping[str, int],
        statement: Callable[[str], bytes | None],
        names: Mapping[str, str],
    ) -> None:
        """What this edge accepted before a restart, from its local mirror: the domains it
        holds a statement of, the versions of the signed tombstones of removed ones, where a
        statement is read (on the event loop, when first needed), and the names its entries
        route. Nothing older is accepted again, and a site whose snapshot entry is missing,
        replayed or misfiled is served from what was accepted, as before the restart."""
        for domain, version in tombstones.items():
            self._removed[domain] = max(version, self._removed.get(domain, 0))
        self._unread = {domain for domain in held if domain not in self._accepted}
        self._remembered = statement
        self._remembered_names = dict(names)

    def removed_version(self, domain: str) -> int | None:
        """The version of the signed tombstone ``domain`` was removed by, if it is removed."""
        return self._removed.get(domain)

    def certificates_known(self) -> int:
        """Sites with a certificate, parsed ones by their statement, the rest by the index's
        word: a metric must not force 100,000 verifications."""
        parsed = sum(1 for meta in self.sites.values() if meta.has_cert)
        return parsed + sum(1 for e in self._unparsed.values() if _index_has_cert(e))

    def soonest_expiry(self) -> float:
        dates = [m.not_after for m in self.sites.values() if m.has_cert and m.not_after]
        for entry in self._unparsed.values():
            not_after = _index_not_after(entry)
            if not_after:
                dates.append(not_after)
        return min(dates, default=0.0)

    # ---- changes -----------------------------------------------------------------------------

    def accept(
        self, signed: SignedSite, record: SiteRecord | None = None, *, verified: bool = False
    ) -> SiteMeta | None:
        """Verify ``signed`` (from an event, with the record it came with; ``verified``: its
        signature is known good already) and apply it; None (refused, reported) if it does
        not verify, is not newer, or ``record`` carries something else than it says."""
        if not verified:
            self._on_verified()
            try:
                self._signers.verify_site(signed)
            except BadSignature as exc:
                self._refuse(signed.domain, exc.kind, str(exc), signed.version)
                return None
        if record is not None and (record.domain != signed.domain or not record.matches(signed)):
            detail = "the record differs from what was signed"
            self._refuse(signed.domain, "mismatch", detail, signed.version)
            return None
        if not self._newer(signed):
            return None
        if signed.removed:
            self._accepted.pop(signed.domain, None)
            self._accepted_raw.pop(signed.domain, None)
            self._unread.discard(signed.domain)
            self._floors.pop(signed.domain, None)
            self._removed[signed.domain] = signed.version
            self._drop(signed.domain)
            return None
        meta = SiteMeta.from_signed(signed)
        self._put(meta)
        return meta

    def refuse_unsigned(self, domain: str, detail: str = "unsigned") -> None:
        """Report an unsigned change of ``domain`` (which changes nothing)."""
        self._refuse(domain, "unsigned", detail, 0)

    def load_snapshot(
        self, raw_index: Mapping[bytes, bytes], raw_signed: Mapping[bytes, bytes]
    ) -> None:
        """Swap in a whole snapshot (``P:index`` and ``P:signed``): :meth:`prepare` then
        :meth:`install`."""
        self.install(self.prepare(raw_index, raw_signed))

    @staticmethod
    def prepare(raw_index: Mapping[bytes, bytes], raw_signed: Mapping[bytes, bytes]) -> Snapshot:
        """The name map and entries of a snapshot, touching nothing of the index: a tenth of a
        second at 100,000 sites, which the sync does on a thread rather than the event loop.
        Entries without a tab are malformed: skipped and counted."""
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
        signed = {k.decode("utf-8", "replace"): v for k, v in raw_signed.items()}
        return Snapshot(names, unparsed, signed, malformed)

    def install(self, snapshot: Snapshot) -> None:
        """Swap in a prepared snapshot, telling listeners about every certificate that differs
        from one already in use. Sites missing without a signed tombstone are kept."""
        unparsed = snapshot.unparsed
        old = self.sites
        self.sites, self.names = {}, snapshot.names
        self._unparsed, self._signed = unparsed, snapshot.signed
        self._lookup = snapshot.lookup
        self.malformed = snapshot.malformed
        for name, domain in self._remembered_names.items():
            # A name the snapshot's (unsigned) map lost still leads where it led before.
            self.names.setdefault(name, domain)
        for domain in [*self._accepted, *self._unread]:
            if domain not in unparsed and not self._removed_by_tombstone(domain):
                # Gone from Redis with no signed removal: only a writer without our key does
                # that. Keep serving what we had, from the mirror, which kept it too.
                last = self._last(domain)
                if last is not None:
                    self._restore(last)
        # Only parsed sites can have a TLS context in use: an entry never looked up has none.
        # One whose index entry names other content is verified now, not evicted on the
        # index's unsigned word: a replayed or forged entry must not cost it its context.
        for domain, before in old.items():
            after = unparsed.get(domain)
            if after is not None and after[: after.find(b"\t")].decode() == before.content_hash:
                continue
            if self.get(domain) is None:  # gone (accepting a new statement tells by itself)
                self._changed(domain)

    def _removed_by_tombstone(self, domain: str) -> bool:
        try:
            raw = self._statement(domain)
        except StatementUnavailable:
            return False  # not known to be removed: kept
        if raw is None:
            return False
        try:
            statement = SignedSite.from_json(raw)
        except BadSignature:
            return False
        if not statement.removed or statement.domain != domain:
            return False
        verified = self._trusted.get(domain) == raw_digest(raw)
        return self.accept(statement, verified=verified) is None and domain not in self._accepted

    # ---- internals ---------------------------------------------------------------------------

    def _parse(self, domain: str) -> SiteMeta | None:
        raw_signed = self._statement(domain)  # first: it may raise, changing nothing
        entry = self._unparsed.pop(domain)
        try:
            parse_index_entry(entry)
        except (ValueError, UnicodeDecodeError):
            self.malformed += 1
            log.error("index entry for %s is malformed; its names are refused", domain,
                      extra={"domain": domain})  # fmt: skip
            return self._fall_back(domain)
        if raw_signed is None:
            detail = "unsigned (run `certman snapshot resync` on the pipeline)"
            self._refuse(domain, "unsigned", detail, 0)
            return self._fall_back(domain)
        seen = raw_digest(raw_signed)
        if self._accepted_raw.get(domain) == seen:
            return self._fall_back(domain)  # the very statement in use: nothing to check again
        try:
            statement = SignedSite.from_json(raw_signed)
        except BadSignature as exc:
            self._refuse(domain, exc.kind, str(exc), 0)
            return self._fall_back(domain)
        if statement.domain != domain:
            detail = f"the statement filed under it is for {statement.domain}"
            self._refuse(domain, "misfiled", detail, statement.version)
            return self._fall_back(domain)
        verified = self._trusted.get(domain) == seen
        if statement.removed:
            self.accept(statement, verified=verified)
            return self._fall_back(domain)
        meta = self.accept(statement, verified=verified)
        if meta is None:
            return self._fall_back(domain)
        self._accepted_raw[domain] = seen
        return meta

    def _statement(self, domain: str) -> bytes | None:
        raw = self._signed.get(domain)
        if raw is None and self._lookup is not None:
            return self._lookup(domain)
        self._signed.pop(domain, None)
        return raw

    def _last(self, domain: str) -> SiteMeta | None:
        """The newest statement accepted for ``domain``: in memory, or read back from the
        mirror when it was accepted before a restart (and still verifies)."""
        meta = self._accepted.get(domain)
        if meta is not None or domain not in self._unread or self._remembered is None:
            return meta
        raw = self._remembered(domain)
        self._unread.discard(domain)
        if raw is None:
            return None
        try:
            statement = SignedSite.from_json(raw)
        except BadSignature:
            return None
        if statement.domain != domain:
            return None
        if statement.removed:
            # Removed since the restart (the mirror written after it was loaded).
            self._removed[domain] = max(statement.version, self._removed.get(domain, 0))
            return None
        digest = raw_digest(raw)
        if self._trusted.get(domain) != digest:
            self._on_verified()
            try:
                self._signers.verify_site(statement)
            except BadSignature:
                # Its signer retired since: not served, but it was accepted, so nothing
                # older is either.
                self._floors[domain] = statement.version
                return None
        meta = SiteMeta.from_signed(statement)
        self._accepted[domain] = meta
        self._accepted_raw[domain] = digest
        return meta

    def _newer(self, signed: SignedSite) -> bool:
        last = self._last(signed.domain)
        removed_at = self._removed.get(signed.domain)
        if removed_at is not None and (last is None or removed_at > last.version):
            if signed.version > removed_at or (signed.version == removed_at and signed.removed):
                return True
            detail = f"not newer than its removal at version {removed_at}"
            self._refuse(signed.domain, "rollback", detail, signed.version)
            return False
        if last is None:
            floor = self._floors.get(signed.domain)
            if floor is None or signed.version > floor:
                return True
            detail = f"not newer than version {floor}, accepted before a restart"
            self._refuse(signed.domain, "rollback", detail, signed.version)
            return False
        if signed.version > last.version:
            return True
        if signed.version == last.version and not signed.removed:
            same = SiteMeta.from_signed(signed) == last
            if not same:
                detail = "a second, different statement of the same version"
                self._refuse(signed.domain, "rollback", detail, signed.version)
            return same
        detail = f"older than version {last.version}, already accepted"
        self._refuse(signed.domain, "rollback", detail, signed.version)
        return False

    def _fall_back(self, domain: str) -> SiteMeta | None:
        """The last good statement of ``domain``, if any, back in use; else its names go."""
        last = self._last(domain)
        if last is not None:
            self._restore(last)
            return last
        for name, owner in list(self.names.items()):
            if owner == domain:
                del self.names[name]
        return None

    def _restore(self, meta: SiteMeta) -> None:
        self.sites[meta.domain] = meta
        self._unparsed.pop(meta.domain, None)
        for name in meta.names:
            self.names[name] = meta.domain

    def _put(self, meta: SiteMeta) -> None:
        old = self.sites.get(meta.domain) or self._accepted.get(meta.domain)
        self._unparsed.pop(meta.domain, None)
        if old is not None:
            for name in set(old.names) - set(meta.names):
                if self.names.get(name) == meta.domain:
                    del self.names[name]
        self.sites[meta.domain] = meta
        self._accepted[meta.domain] = meta
        self._unread.discard(meta.domain)
        self._floors.pop(meta.domain, None)
        self._removed.pop(meta.domain, None)
        self._accepted_raw.pop(meta.domain, None)  # set again by _parse when it read the raw
        for name in meta.names:
            self.names[name] = meta.domain
        if old is not None and old.content_hash != meta.content_hash:
            self._changed(meta.domain)

    def _drop(self, domain: str) -> None:
        old = self.sites.pop(domain, None)
        self._unparsed.pop(domain, None)
        if old is None:
            self._fall_back(domain)  # never parsed: clears its names
            return
        for name in old.names:
            if self.names.get(name) == domain:
                del self.names[name]
        self._changed(domain)

    def _refuse(self, domain: str, kind: str, detail: str, version: int) -> None:
        self._on_refused(domain, kind, detail, version)

    def _changed(self, domain: str) -> None:
        for listener in self._listeners:
            listener(domain)


def _index_has_cert(entry: bytes) -> bool:
    first = entry.find(b"\t")
    return entry[first + 1 : first + 2] == b"1"


def _index_not_after(entry: bytes) -> float | None:
    fields = entry.split(b"\t", 3)
    try:
        return float(fields[2]) if len(fields) > 3 and fields[1] == b"1" and fields[2] else None
    except ValueError:
        return None
