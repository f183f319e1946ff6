"""Rows for the store, made the way the pipeline makes them, for tests of what reads them."""

from __future__ import annotations

from datetime import datetime, timedelta
from itertools import count

from sqlalchemy.orm import Session

from pipeline.models import Certificate, Site, SiteName, SiteState

NOW = datetime.fromisoformat("2026-03-01T12:00:00+00:00")
_serials = count(1)


def make_site(
    session: Session, domain: str, *, state: SiteState = SiteState.ACTIVE, failures: int = 0
) -> Site:
    site = Site(
        domain=domain,
        state=state,
        consecutive_failures=failures,
        last_error="boom" if failures else None,
        names=[SiteName(name=domain)],
    )
    session.add(site)
    session.flush()
    return site


def make_cert(
    session: Session,
    site: Site,
    *,
    not_before: datetime = NOW - timedelta(days=10),
    lifetime: timedelta = timedelta(days=90),
    renew_at: datetime | None = None,
    scheme: str = "hpke-x25519",
    key_id: str = "edge-new",
) -> Certificate:
    cert = Certificate(
        site_id=site.id,
        chain_pem=f"chain of {site.domain}",
        key_envelope="sealed",
        scheme=scheme,
        key_id=key_id,
        serial=f"{next(_serials):x}",
        ari_id=f"aki.{site.domain}",
        not_before=not_before,
        not_after=not_before + lifetime,
        renew_at=renew_at or not_before + lifetime * 2 / 3,
        current=True,
    )
    session.add(cert)
    session.flush()
    return cert
