"""What the edges see: the pipeline's side of the Redis snapshot (pipeline.distribution.layout).

The one home for publishing to the edges: every site record, removal, resync, reconcile,
challenge answer and bulk onboarding batch goes through here (:class:`Publisher`, or the batch
functions onboarding calls), signed with the pipeline's signing key, because an edge serves
only what verifies.
"""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from cryptography.hazmat.primitives.asymmetric import ed25519
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, selectinload

from pipeline.crypto.signing import BadSignature, SignedSite, SigningKey, TrustedSigners
from pipeline.distribution import layout as distribution
from pipeline.models import Certificate, Site, SiteName

log = logging.getLogger(__name__)


def site_record(
    session: Session, site: Site, *, current: Certificate | None = None
) -> distribution.SiteRecord:
    """What the edges are told of ``site``; ``current``: its current certificate, where the
    caller has it in hand (one query fewer), else read from the store."""
    cert = current
    if cert is None:
        cert = session.scalar(
            select(Certificate).where(Certificate.site_id == site.id, Certificate.current)
        )
    return _record(site, cert)


def _record(site: Site, cert: Certificate | None) -> distribution.SiteRecord:
    return distribution.SiteRecord(
        domain=site.domain,
        names=tuple(site.all_names),
        upstream=site.upstream,
        chain_pem=cert.chain_pem if cert else None,
        envelope=cert.key_envelope if cert else None,
        not_after=cert.not_after if cert else None,
        serial=cert.serial if cert else None,
    )


class UnissuedSite(Protocol):
    """A site about to be onboarded (:class:`pipeline.fleet.sites.NewSite`): what its first
    record, with no certificate yet, says."""

    @property
    def domain(self) -> str: ...
    @property
    def names(self) -> tuple[str, ...]: ...
    @property
    def upstream(self) -> str | None: ...


class Publisher:
    """The pipeline's side of the edges' snapshot: every write to it goes through here, signed.

    Made by the process's runtime (:class:`pipeline.runtime.Runtime`) over its Redis client
    and signing key; the key is asked for only when something is signed.
    """

    def __init__(
        self,
        client: redis.Redis[Any],
        prefix: str,
        signing_key: Callable[[], SigningKey],
    ) -> None:
        self.redis = client
        self.prefix = prefix
        self._signing_key = signing_key

    @property
    def signing_key(self) -> SigningKey:
        return self._signing_key()

    def publish(self, record: distribution.SiteRecord) -> None:
        distribution.publish_site(self.redis, self.prefix, record, signer=self.signing_key)

    def unpublish(self, domain: str) -> None:
        """Take a site off the edges: a signed tombstone, the only removal an edge believes."""
        distribution.remove_site(self.redis, self.prefix, domain, signer=self.signing_key)

    def publish_batch(self, records: Iterable[distribution.SiteRecord]) -> None:
        publish_batch(self.redis, self.prefix, records, self.signing_key)

    def set_challenge(self, token: str, key_authorization: str, ttl: int) -> None:
        distribution.set_challenge(
            self.redis, self.prefix, token, key_authorization, ttl, signer=self.signing_key
        )

    def remove_challenge(self, token: str) -> None:
        distribution.remove_challenge(self.redis, self.prefix, token)

    def exists(self) -> bool:
        """Whether Redis holds a snapshot at all (its version counter is set by every write)."""
        return bool(self.redis.exists(f"{self.prefix}:version"))

    def is_published(self, record: distribution.SiteRecord) -> bool:
        """Whether the edges already have exactly ``record``: its index entry, and a statement
        saying the same, signed by the pipeline's current key (what an edge would serve)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(f"{self.prefix}:index", record.domain)
        pipe.hget(f"{self.prefix}:signed", record.domain)
        entry, raw = pipe.execute()
        if entry is None or raw is None or entry.decode() != distribution.index_entry(record):
            return False
        try:
            statement = SignedSite.from_json(raw)
        except BadSignature:
            return False
        if not record.matches(statement):
            return False
        key = self.signing_key
        return _verified.check(key, _signed_by_us(key), raw, statement)

    def resync(self, session: Session) -> int:
        """Rebuild the whole snapshot from the store (after a Redis loss); returns the count."""
        return _resync(self, session)

    def find_drift(self, session: Session) -> Drift:
        """Compare the store with the snapshot's index and signed statements."""
        return _find_drift(self, session)

    def reconcile(
        self, session_scope: Callable[[], AbstractContextManager[Session]], *, limit: int | None
    ) -> Drift:
        """Publish what the snapshot lacks and remove what the store no longer has."""
        return _reconcile(self, session_scope, limit=limit)


def publish_batch(
    client: redis.Redis[Any],
    prefix: str,
    records: Iterable[distribution.SiteRecord],
    signer: SigningKey,
) -> None:
    """Publish several records, signed, in two round trips (bulk onboarding's batches)."""
    distribution.publish_sites(client, prefix, records, signer)


def publish_records(
    redis_client: redis.Redis[Any], prefix: str, sites: Sequence[UnissuedSite], signer: SigningKey
) -> None:
    """Bulk onboarding's new sites into the edges' snapshot, signed: two Redis round trips a
    batch. Each site still goes through the atomic publishing script and its event; the batch
    only saves the round trips."""
    records = [
        distribution.SiteRecord(
            domain=site.domain,
            names=site.names,
            upstream=site.upstream,
            chain_pem=None,
            envelope=None,
            not_after=None,
            serial=None,
        )
        for site in sites
    ]
    publish_batch(redis_client, prefix, records, signer)


def heal_snapshot(
    engine: Engine,
    redis_client: redis.Redis[Any],
    prefix: str,
    domains: Sequence[str],
    signer: SigningKey,
) -> None:
    """Publish the sites among ``domains`` that the snapshot lacks.

    A bulk onboarding killed between a batch's commit and its publication leaves committed
    sites the edges do not know; the re-run finds them "already there" and this puts them
    back. One HMGET per batch: the common case (all present) costs one round trip.
    """
    present = redis_client.hmget(f"{prefix}:index", list(domains))
    missing = [domain for domain, entry in zip(domains, present, strict=True) if entry is None]
    if not missing:
        return
    with Session(engine) as session:
        sites = session.scalars(
            select(Site).where(Site.domain.in_(missing)).options(selectinload(Site.names))
        ).all()
        records = [site_record(session, site) for site in sites]
    publish_batch(redis_client, prefix, records, signer)


# Ids per IN (...) list: one bound parameter each, and PostgreSQL refuses a statement with more
# than 65,535 (SQLite, 32,766), which a fleet of 100,000 sites passes.
IN_BATCH = 10_000


def current_certificates(session: Session, site_ids: Sequence[int]) -> dict[int, Certificate]:
    certs: dict[int, Certificate] = {}
    for start in range(0, len(site_ids), IN_BATCH):
        batch = site_ids[start : start + IN_BATCH]
        rows = session.scalars(
            select(Certificate).where(Certificate.site_id.in_(batch), Certificate.current)
        )
        certs.update((cert.site_id, cert) for cert in rows)
    return certs


RESYNC_BATCH = 1000


def _resync(publisher: Publisher, session: Session) -> int:
    count = 0
    if session.get_bind().dialect.name == "postgresql":
        # The batches are read one after another: one snapshot of the store for all of them,
        # or a name moving between two sites meanwhile could be staged for neither.
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})

    def records() -> Iterator[distribution.SiteRecord]:
        # A batch of sites at a time, each let go once staged: 100,000 chains and envelopes
        # never sit in memory together.
        nonlocal count
        after = 0
        while sites := session.scalars(
            select(Site)
            .where(Site.id > after)
            .order_by(Site.id)
            .limit(RESYNC_BATCH)
            .options(selectinload(Site.names))
        ).all():
            certs = current_certificates(session, [site.id for site in sites])
            for site in sites:
                yield _record(site, certs.get(site.id))
            count += len(sites)
            after = sites[-1].id
            session.expunge_all()

    distribution.replace_all(
        publisher.redis, publisher.prefix, records(), signer=publisher.signing_key
    )
    return count


@dataclass(frozen=True)
class Drift:
    """Where the edges' snapshot and the store disagree."""

    stale: list[str]  # in the store, but missing from Redis or different there
    extra: list[str]  # in Redis, but no longer in the store
    # Among ``stale``: the sites whose signed statement is missing, unreadable, not signed by
    # the pipeline's current key, or saying something other than the store (an unsigned
    # snapshot after the upgrade, a statement replaced by another Redis writer, a key rotation
    # not yet followed by a resync). An edge keeps serving the last good record it holds for
    # such a site, and one that holds none serves nothing, until it is published again.
    unsigned: list[str] = field(default_factory=list)


def _summary(record: distribution.SiteRecord) -> tuple[object, ...]:
    # The index entry without its content hash: what can be compared without reading every
    # certificate's chain and envelope out of the store. A new certificate changes not_after.
    return distribution.parse_index_entry(distribution.index_entry(record))[1:]


def _claims(statement: SignedSite) -> tuple[object, ...]:
    # What a statement says that the store's small columns can confirm: the digest only as
    # "there is a certificate" (the chain and envelope are not read), the serial in full.
    return (statement.names, statement.upstream, statement.digest is not None,
            statement.not_after, statement.serial)  # fmt: skip


class _Verified:
    """Statements this process already verified, by a 16-byte hash of their raw JSON.

    Every reconcile reads every statement, and re-verifying those that did not change would
    cost a large fleet minutes of CPU an hour (docs/architecture.md, section 5). A statement
    that changes in any byte hashes differently and is verified again; the set is emptied when
    the signing key changes.
    """

    def __init__(self) -> None:
        self.key_id = ""
        self.digests: set[bytes] = set()

    def check(self, key: SigningKey, trusted: TrustedSigners, raw: bytes, st: SignedSite) -> bool:
        if key.key_id != self.key_id:
            self.key_id, self.digests = key.key_id, set()
        if st.signer != key.key_id:
            return False
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if digest in self.digests:
            return True
        try:
            trusted.verify_site(st)
        except BadSignature:
            return False
        self.digests.add(digest)
        return True


_verified = _Verified()


def _signed_by_us(key: SigningKey) -> TrustedSigners:
    return TrustedSigners.of([ed25519.Ed25519PublicKey.from_public_bytes(key.public_bytes)])


def _find_drift(publisher: Publisher, session: Session) -> Drift:
    """Compare the store with the snapshot's index and signed statements, reading only the
    small columns of the store."""
    certs = {
        site_id: (not_after, serial)
        for site_id, not_after, serial in session.execute(
            select(Certificate.site_id, Certificate.not_after, Certificate.serial).where(
                Certificate.current
            )
        ).tuples()
    }
    # Plain rows, not ORM objects: at 100,000 sites building the objects is most of the cost.
    names: dict[int, list[str]] = defaultdict(list)
    for site_id, name in session.execute(
        select(SiteName.site_id, SiteName.name).order_by(SiteName.id)
    ).tuples():
        names[site_id].append(name)
    expected: dict[str, tuple[object, ...]] = {}
    claims: dict[str, tuple[object, ...]] = {}
    for site_id, domain, upstream in session.execute(
        select(Site.id, Site.domain, Site.upstream)
    ).tuples():
        cert = certs.get(site_id)
        record = distribution.SiteRecord(
            domain=domain,
            names=tuple(names[site_id]),
            upstream=upstream,
            chain_pem="-" if cert else None,
            envelope="-" if cert else None,
            not_after=cert[0] if cert else None,
            serial=cert[1] if cert else None,
        )
        expected[domain] = _summary(record)
        claims[domain] = _claims(record.statement(0))
    prefix = publisher.prefix
    client = publisher.redis
    found: dict[str, tuple[object, ...] | None] = {}
    hashes: dict[str, str] = {}
    for raw_domain, raw_entry in client.hscan_iter(f"{prefix}:index", count=1000):
        domain = raw_domain.decode()
        try:
            parsed = distribution.parse_index_entry(raw_entry)
        except ValueError:
            found[domain] = None  # unreadable: published again if the store has it
            continue
        found[domain], hashes[domain] = parsed[1:], parsed[0]
    key = publisher.signing_key
    trusted = _signed_by_us(key)
    good: set[str] = set()
    live: set[str] = set()  # statements of a site (not a tombstone), whatever their signature
    for raw_domain, raw in client.hscan_iter(f"{prefix}:signed", count=1000):
        domain = raw_domain.decode()
        try:
            statement = SignedSite.from_json(raw)
        except BadSignature:
            continue
        if statement.removed:
            continue
        live.add(domain)
        digest = statement.digest
        if (
            statement.domain == domain
            and claims.get(domain) == _claims(statement)
            # The index entry's content hash is the start of the signed digest: an index
            # pointing at another blob than the one signed would be refused by the edges.
            and (digest is None or hashes.get(domain) == digest[:16])
            and _verified.check(key, trusted, raw, statement)
        ):
            good.add(domain)
    unsigned = sorted(domain for domain in expected if domain not in good)
    stale = sorted(
        domain
        for domain, want in expected.items()
        if found.get(domain) != want or domain not in good
    )
    extra = sorted(domain for domain in found.keys() | live if domain not in expected)
    return Drift(stale=stale, extra=extra, unsigned=unsigned)


def _reconcile(
    publisher: Publisher,
    session_scope: Callable[[], AbstractContextManager[Session]],
    *,
    limit: int | None,
) -> Drift:
    """Publish what the snapshot lacks and remove what the store no longer has.

    The backstop for a publish that never happened (Redis failed after the store's commit and
    the retry could not be sent) and for one that raced a removal. Each fix re-reads the site
    in a transaction of its own and publishes what the store says then, not what the comparison
    saw. (A change committed and published in the instant between that read and the fix can
    still be overtaken by it; the next run puts that right.) At most ``limit`` fixes a run
    (None: all), removals first, as they are few and a removed site must stop being served;
    a snapshot that is wholly wrong is for ``resync``.
    """
    with session_scope() as session:
        drift = _find_drift(publisher, session)
    fixes = [*drift.extra, *drift.stale][:limit]
    failed = 0
    for domain in fixes:
        with session_scope() as session:
            site = session.scalar(
                select(Site).where(Site.domain == domain).options(selectinload(Site.names))
            )
            record = site_record(session, site) if site is not None else None
        try:
            if record is not None:
                publisher.publish(record)
            else:
                publisher.unpublish(domain)
        except RuntimeError as exc:
            # The publishing script refused every version we signed (a signed version in Redis
            # that stays above ours): one site, not a reason to leave the others unfixed.
            failed += 1
            log.error("edge snapshot: %s", exc)
    if drift.stale or drift.extra:
        log.warning(
            "edge snapshot differed from the store: %d sites missing or different (%d of them "
            "not signed as the store says), %d no longer stored; fixed %d, %d failed",
            len(drift.stale), len(drift.unsigned), len(drift.extra), len(fixes) - failed, failed,
        )  # fmt: skip
    return drift
