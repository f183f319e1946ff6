"""Choosing a certificate by SNI: a bounded LRU of per-site TLS contexts, built on demand.

The first handshake for a site fetches its blob (one HGET), opens the envelope, builds the
context (~1.5 ms for P-256) and caches it; the clear key exists only inside that call. A site
whose envelope cannot be opened is logged once per certificate version and refused, without
affecting any other site.

A blob is trusted only as far as it agrees with where it was found: a record filed under
another domain than its own is refused, and a certificate is served only for the names its
leaf covers (the cached context keeps them, so the per-handshake check is a set lookup).
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from cryptography import x509

from edge.metrics import EdgeMetrics
from edge.state import SiteIndex, SiteMeta, StatementUnavailable
from edge.tls import build_context
from pipeline.crypto import envelope
from pipeline.crypto.signing import content_digest
from pipeline.distribution.layout import SiteRecord, content_hash

if TYPE_CHECKING:
    from pipeline.crypto.keys import Keyring

__all__ = [
    "CachedSite",
    "ContextCache",
    "NameNotCovered",
    "SiteContexts",
    "SiteUnavailable",
    "SniSelector",
    "sni_name",
    "sni_started",
]

log = logging.getLogger(__name__)

# Where the SNI callback leaves the name it matched, for the 421 check in the HTTP layer.
_SNI_ATTR = "certman_sni_name"
# And when it started (time.perf_counter()), for the handshake duration (edge.handshakes).
_STARTED_ATTR = "certman_sni_started"

# Fetches a site's blob from Redis; None when the site is gone, raises when Redis is unreachable.
BlobFetcher = Callable[[str], "bytes | None"]

# One DNS label as a certificate's wildcard may stand for it (letters, digits, hyphens).
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class CachedSite(NamedTuple):
    ctx: ssl.SSLContext
    # The leaf's SAN dNSNames, lower-case, wildcards kept as "*.parent".
    names: frozenset[str]
    # content_hash of the record it was built from.
    version: str

    def covers(self, name: str) -> bool:
        """Whether the certificate is valid for ``name`` (a lower-case name whose first label,
        if a wildcard is tried, the caller has checked)."""
        return name in self.names or "*." + name.partition(".")[2] in self.names


class ContextCache:
    """LRU of domain -> CachedSite; memory stays bounded by ``size`` whatever the site count."""

    def __init__(self, size: int, metrics: EdgeMetrics) -> None:
        self.size = size
        self._metrics = metrics
        self._items: OrderedDict[str, CachedSite] = OrderedDict()

    def get(self, domain: str) -> CachedSite | None:
        site = self._items.get(domain)
        if site is not None:
            self._items.move_to_end(domain)
        return site

    def put(self, domain: str, site: CachedSite) -> None:
        self._items[domain] = site
        self._items.move_to_end(domain)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
            self._metrics.cache_evictions.labels("lru").inc()

    def evict(self, domain: str, reason: str) -> None:
        if self._items.pop(domain, None) is not None:
            self._metrics.cache_evictions.labels(reason).inc()

    def __contains__(self, domain: object) -> bool:
        return domain in self._items

    def __len__(self) -> int:
        return len(self._items)


class SiteUnavailable(Exception):
    """The site's certificate cannot be served now (blob missing or Redis unreachable)."""


class NameNotCovered(Exception):
    """The site's certificate does not cover the name asked for (index and blob disagree)."""


class SiteContexts:
    """Builds and caches contexts; forgets a site's context and failure when its cert changes."""

    def __init__(
        self,
        index: SiteIndex,
        keyring: Keyring,
        fetch_blob: BlobFetcher,
        cache: ContextCache,
        metrics: EdgeMetrics,
    ) -> None:
        self._index = index
        self._keyring = keyring
        self._fetch_blob = fetch_blob
        self.cache = cache
        self._metrics = metrics
        # domain -> content hash of the certificate version that failed, so it is logged once
        # and not retried on every handshake.
        self._failed: dict[str, str] = {}
        # domain -> version whose certificate was found not to cover a name (logged once).
        self._uncovered: dict[str, str] = {}
        # domain -> version of another domain's record found filed under it (logged once).
        self._misfiled: dict[str, str] = {}
        index.on_certificate_change(self._forget)

    def _forget(self, domain: str) -> None:
        self.cache.evict(domain, "replaced")
        self._failed.pop(domain, None)
        self._uncovered.pop(domain, None)
        self._misfiled.pop(domain, None)

    def failed(self, meta: SiteMeta) -> bool:
        return self._failed.get(meta.domain) == meta.content_hash

    def context_for(self, meta: SiteMeta, name: str | None = None) -> ssl.SSLContext | None:
        """The site's context, building it on a miss; None if it cannot be served.

        With ``name`` (the SNI name being handshaken), raises NameNotCovered unless the site's
        certificate covers it.
        """
        site = self.cache.get(meta.domain)
        if site is not None:
            self._metrics.cache_hits.inc()
        else:
            if self.failed(meta):
                return None
            self._metrics.cache_misses.inc()
            raw = self._fetch_blob(meta.domain)
            if raw is None:
                raise SiteUnavailable(meta.domain)
            site = self._install(SiteRecord.from_json(raw), meta)
            if site is None:
                return None
        if name is not None and not site.covers(name):
            if self._uncovered.get(meta.domain) != site.version:
                self._uncovered[meta.domain] = site.version
                log.error(
                    "certificate of %s does not cover %s, which the index files under it; "
                    "refusing that name",
                    meta.domain,
                    name,
                    extra={"domain": meta.domain},
                )
            raise NameNotCovered(name)
        return site.ctx

    def install(self, record: SiteRecord, meta: SiteMeta) -> ssl.SSLContext | None:
        """Open ``record``'s envelope and cache its context; None (logged once) if it fails.

        ``meta`` is the verified statement of the domain the record was fetched by: a record
        for another domain, or carrying another chain or envelope than was signed, is refused
        rather than cached.
        """
        site = self._install(record, meta)
        return site.ctx if site is not None else None

    def _install(self, record: SiteRecord, meta: SiteMeta) -> CachedSite | None:
        domain = meta.domain
        if record.domain != domain:
            # A blob swapped or copied under another key: serving it would answer for one
            # domain with another's certificate (valid for it, so the client would not notice).
            # Not remembered as failed: the index's version of the site says nothing about
            # what the blob holds, and putting the right record back must work at once.
            version = content_hash(record)
            if self._misfiled.get(domain) != version:
                self._misfiled[domain] = version
                self._metrics.envelope_failures.labels("RecordMisfiled").inc()
                log.error(
                    "record filed under %s is for %s; refusing %s's handshakes",
                    domain,
                    record.domain,
                    domain,
                    extra={"domain": domain},
                )
            return None
        if content_digest(record.chain_pem, record.envelope) != meta.digest:
            # The blob is not what the pipeline signed for this version: someone else's
            # certificate, or key sealed to our public key by someone else.
            version = content_hash(record)
            if self._misfiled.get(domain) != version:
                self._misfiled[domain] = version
                self._metrics.signature_failures.labels("blob", "mismatch").inc()
                log.error(
                    "the blob of %s is not the one its signed record names; refusing it",
                    domain,
                    extra={"domain": domain},
                )
            return None
        if not (record.chain_pem and record.envelope):
            return None
        started = time.perf_counter()
        try:
            site = self._build(record)
        except (envelope.EnvelopeError, ValueError, ssl.SSLError) as exc:
            self._fail(record, exc)
            return None
        finally:
            self._metrics.context_build_seconds.inc(time.perf_counter() - started)
        self.cache.put(record.domain, site)
        return site

    def _build(self, record: SiteRecord) -> CachedSite:
        assert record.chain_pem and record.envelope
        chain = record.chain_pem.encode()
        leaf = x509.load_pem_x509_certificate(chain)
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise ValueError("the certificate has no subjectAltName") from None
        names = frozenset(n.lower() for n in san.get_values_for_type(x509.DNSName))
        sealed = envelope.from_text(record.envelope, domain=record.domain)
        key_pem = envelope.open_envelope(
            sealed,
            self._keyring,
            domain=record.domain,
            binding=envelope.spki_fingerprint(leaf.public_key()),
        )
        try:
            return CachedSite(build_context(chain, key_pem), names, content_hash(record))
        finally:
            # Drop the only reference now rather than when the frame dies.
            del key_pem

    def _fail(self, record: SiteRecord, exc: Exception) -> None:
        if isinstance(exc, envelope.EnvelopeError):
            kind, reason = type(exc).__name__, exc.reason
        elif isinstance(exc, ssl.SSLError):
            kind, reason = "CertificateKeyMismatch", f"key does not load with chain: {exc.reason}"
        else:
            kind, reason = "BadCertificate", str(exc)
        self._metrics.envelope_failures.labels(kind).inc()
        self._failed[record.domain] = content_hash(record)
        log.error("cannot serve %s: %s (%s); refusing its handshakes", record.domain, reason, kind,
                  extra={"domain": record.domain})  # fmt: skip


class SniSelector:
    """The ``sni_callback`` of the listening context."""

    def __init__(self, index: SiteIndex, contexts: SiteContexts, metrics: EdgeMetrics) -> None:
        self._index = index
        self._contexts = contexts
        self._metrics = metrics
        # The callback runs once per handshake: resolve the labelled counters once.
        self._ok = metrics.handshakes.labels("ok")

    def __call__(
        self, sslobj: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        started = time.perf_counter()
        outcome = self._metrics.handshakes.labels
        if not server_name:
            outcome("no_sni").inc()
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        # Lower-cased only: a trailing dot, a port, spaces or empty labels are not a host name
        # (RFC 6066 section 3) and must not find a site, which they would once normalised.
        name = server_name.lower()
        try:
            meta = self._lookup(name)
            if meta is None or not meta.has_cert:
                outcome("unknown_name").inc()
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            ctx = self._contexts.context_for(meta, name)
        except (SiteUnavailable, StatementUnavailable):
            outcome("unavailable").inc()
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        except NameNotCovered:
            outcome("name_not_covered").inc()
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        except Exception:
            # An exception escaping the callback would abort the handshake with a traceback on
            # stderr and no alert; keep it to this one connection.
            log.exception("SNI callback failed for %s", name)
            outcome("error").inc()
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        if ctx is None:
            outcome("envelope_failed").inc()
            return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
        sslobj.context = ctx
        setattr(sslobj, _SNI_ATTR, name)
        setattr(sslobj, _STARTED_ATTR, started)
        self._ok.inc()
        return None

    def _lookup(self, name: str) -> SiteMeta | None:
        """``SiteIndex.lookup`` for a raw SNI name: the index's names are valid by construction,
        so an exact hit needs no check; a wildcard must stand for one well-formed label."""
        names = self._index.names
        domain = names.get(name)
        if domain is None:
            label, _, parent = name.partition(".")
            if not parent or not _LABEL.fullmatch(label):
                return None
            domain = names.get("*." + parent)
            if domain is None:
                return None
        return self._index.get(domain)


def sni_name(sock: object) -> str | None:
    """The name the SNI callback matched on this connection's socket, if any."""
    value = getattr(sock, _SNI_ATTR, None)
    return value if isinstance(value, str) else None


def sni_started(sock: object) -> float | None:
    """When the SNI callback started on this connection's socket (``time.perf_counter()``),
    if it accepted the name."""
    value = getattr(sock, _STARTED_ATTR, None)
    return value if isinstance(value, float) else None
