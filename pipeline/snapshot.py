"""What the edges see: the pipeline's side of the Redis snapshot (pipeline.distribution)."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from pipeline import distribution
from pipeline.connections import get_redis
from pipeline.models import Certificate, Site, SiteName
from pipeline.settings import get_settings
from pipeline.sites import current_certificates

log = logging.getLogger(__name__)


def site_record(session: Session, site: Site) -> distribution.SiteRecord:
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


def publish(record: distribution.SiteRecord) -> None:
    distribution.publish_site(get_redis(), get_settings().redis_prefix, record)


def unpublish(domain: str) -> None:
    distribution.remove_site(get_redis(), get_settings().redis_prefix, domain)


def set_challenge(token: str, key_authorization: str, ttl: int) -> None:
    distribution.set_challenge(
        get_redis(), get_settings().redis_prefix, token, key_authorization, ttl
    )


def remove_challenge(token: str) -> None:
    distribution.remove_challenge(get_redis(), get_settings().redis_prefix, token)


def exists() -> bool:
    """Whether Redis holds a snapshot at all (its version counter is set by every write)."""
    return bool(get_redis().exists(f"{get_settings().redis_prefix}:version"))


RESYNC_BATCH = 1000


def resync(session: Session) -> int:
    """Rebuild the whole snapshot from the store (after a Redis loss); returns the site count."""
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

    distribution.replace_all(get_redis(), get_settings().redis_prefix, records())
    return count


@dataclass(frozen=True)
class Drift:
    """Where the edges' snapshot and the store disagree."""

    stale: list[str]  # in the store, but missing from Redis or different there
    extra: list[str]  # in Redis, but no longer in the store


def _summary(record: distribution.SiteRecord) -> tuple[object, ...]:
    # The index entry without its content hash: what can be compared without reading every
    # certificate's chain and envelope out of the store. A new certificate changes not_after.
    return distribution.parse_index_entry(distribution.index_entry(record))[1:]


def find_drift(session: Session) -> Drift:
    """Compare the store with the snapshot's index, reading only the small columns."""
    not_after = dict(
        session.execute(
            select(Certificate.site_id, Certificate.not_after).where(Certificate.current)
        )
        .tuples()
        .all()
    )
    # Plain rows, not ORM objects: at 100,000 sites building the objects is most of the cost.
    names: dict[int, list[str]] = defaultdict(list)
    for site_id, name in session.execute(
        select(SiteName.site_id, SiteName.name).order_by(SiteName.id)
    ).tuples():
        names[site_id].append(name)
    expected: dict[str, tuple[object, ...]] = {}
    for site_id, domain, upstream in session.execute(
        select(Site.id, Site.domain, Site.upstream)
    ).tuples():
        has_cert = site_id in not_after
        record = distribution.SiteRecord(
            domain=domain,
            names=tuple(names[site_id]),
            upstream=upstream,
            chain_pem="-" if has_cert else None,
            envelope="-" if has_cert else None,
            not_after=not_after.get(site_id),
            serial=None,
        )
        expected[domain] = _summary(record)
    found: dict[str, tuple[object, ...] | None] = {}
    index = f"{get_settings().redis_prefix}:index"
    for raw_domain, raw_entry in get_redis().hscan_iter(index, count=1000):
        domain = raw_domain.decode()
        try:
            found[domain] = distribution.parse_index_entry(raw_entry)[1:]
        except ValueError:
            found[domain] = None  # unreadable: published again if the store has it
    stale = sorted(domain for domain, want in expected.items() if found.get(domain) != want)
    extra = sorted(domain for domain in found if domain not in expected)
    return Drift(stale=stale, extra=extra)


def reconcile(
    session_scope: Callable[[], AbstractContextManager[Session]], *, limit: int | None
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
        drift = find_drift(session)
    fixes = [*drift.extra, *drift.stale][:limit]
    for domain in fixes:
        with session_scope() as session:
            site = session.scalar(
                select(Site).where(Site.domain == domain).options(selectinload(Site.names))
            )
            record = site_record(session, site) if site is not None else None
        if record is not None:
            publish(record)
        else:
            unpublish(domain)
    if drift.stale or drift.extra:
        log.warning(
            "edge snapshot differed from the store: %d sites missing or different, %d no "
            "longer stored; fixed %d", len(drift.stale), len(drift.extra), len(fixes),
        )  # fmt: skip
    return drift
