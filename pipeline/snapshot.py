"""What the edges see: the pipeline's side of the Redis snapshot (pipeline.distribution)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from pipeline import distribution
from pipeline.connections import get_redis
from pipeline.models import Certificate, Site
from pipeline.settings import get_settings
from pipeline.sites import current_certificates


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


def resync(session: Session) -> int:
    """Rebuild the whole snapshot from the store (after a Redis loss); returns the site count."""
    sites = session.scalars(select(Site).options(selectinload(Site.names))).all()
    certs = current_certificates(session, [site.id for site in sites])
    records = [_record(site, certs.get(site.id)) for site in sites]
    distribution.replace_all(get_redis(), get_settings().redis_prefix, records)
    return len(records)
