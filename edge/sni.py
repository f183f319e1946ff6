"""Choosing a certificate by SNI: a bounded LRU of per-site TLS contexts, built on demand.

The first handshake for a site fetches its blob (one HGET), opens the envelope, builds the
context (~1.5 ms for P-256) and caches it; the clear key exists only inside that call. A site
whose envelope cannot be opened is logged once per certificate version and refused, without
affecting any other site.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from cryptography import x509

from edge.metrics import EdgeMetrics
from edge.state import SiteIndex, SiteMeta, normalize_host
from edge.tls import build_context
from pipeline import envelope
from pipeline.distribution import SiteRecord, content_hash

if TYPE_CHECKING:
    from pipeline.keys import Keyring

__all__ = ["ContextCache", "SiteContexts", "SniSelector", "sni_name"]

log = logging.getLogger(__name__)

# Where the SNI callback leaves the name it matched, for the 421 check in the HTTP layer.
_SNI_ATTR = "certman_sni_name"

# Fetches a site's blob from Redis; None when the site is gone, raises when Redis is unreachable.
BlobFetcher = Callable[[str], "bytes | None"]


class ContextCache:
    """LRU of domain -> SSLContext; memory stays bounded by ``size`` whatever the site count."""

    def __init__(self, size: int, metrics: EdgeMetrics) -> None:
        self.size = size
        self._metrics = metrics
        self._items: OrderedDict[str, ssl.SSLContext] = OrderedDict()

    def get(self, domain: str) -> ssl.SSLContext | None:
        ctx = self._items.get(domain)
        if ctx is not None:
            self._items.move_to_end(domain)
        return ctx

    def put(self, domain: str, ctx: ssl.SSLContext) -> None:
        self._items[domain] = ctx
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
        index.on_certificate_change(self._forget)

    def _forget(self, domain: str) -> None:
        self.cache.evict(domain, "replaced")
        self._failed.pop(domain, None)

    def failed(self, meta: SiteMeta) -> bool:
        return self._failed.get(meta.domain) == meta.content_hash

    def context_for(self, meta: SiteMeta) -> ssl.SSLContext | None:
        """The site's context, building it on a miss; None if it cannot be served."""
        ctx = self.cache.get(meta.domain)
        if ctx is not None:
            self._metrics.cache_hits.inc()
            return ctx
        if self.failed(meta):
            return None
        self._metrics.cache_misses.inc()
        raw = self._fetch_blob(meta.domain)
        if raw is None:
            raise SiteUnavailable(meta.domain)
        return self.install(SiteRecord.from_json(raw))

    def install(self, record: SiteRecord) -> ssl.SSLContext | None:
        """Open ``record``'s envelope and cache its context; None (logged once) if it fails."""
        if not (record.chain_pem and record.envelope):
            return None
        started = time.perf_counter()
        try:
            ctx = self._build(record)
        except (envelope.EnvelopeError, ValueError, ssl.SSLError) as exc:
            self._fail(record, exc)
            return None
        finally:
            self._metrics.context_build_seconds.inc(time.perf_counter() - started)
        self.cache.put(record.domain, ctx)
        return ctx

    def _build(self, record: SiteRecord) -> ssl.SSLContext:
        assert record.chain_pem and record.envelope
        chain = record.chain_pem.encode()
        leaf = x509.load_pem_x509_certificate(chain)
        sealed = envelope.from_text(record.envelope, domain=record.domain)
        key_pem = envelope.open_envelope(
            sealed,
            self._keyring,
            domain=record.domain,
            binding=envelope.spki_fingerprint(leaf.public_key()),
        )
        try:
            return build_context(chain, key_pem)
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
        log.error("cannot serve %s: %s (%s); refusing its handshakes", record.domain, reason, kind)


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
        outcome = self._metrics.handshakes.labels
        if not server_name:
            outcome("no_sni").inc()
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        name = normalize_host(server_name)
        meta = self._index.lookup(name)
        if meta is None or not meta.has_cert:
            outcome("unknown_name").inc()
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        try:
            ctx = self._contexts.context_for(meta)
        except SiteUnavailable:
            outcome("unavailable").inc()
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
        self._ok.inc()
        return None


def sni_name(sock: object) -> str | None:
    """The name the SNI callback matched on this connection's socket, if any."""
    value = getattr(sock, _SNI_ATTR, None)
    return value if isinstance(value, str) else None
