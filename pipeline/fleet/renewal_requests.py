"""Renewals on request: ``certman renew NAME... --now`` and ``certman renew --all --within``.

Nothing here talks to the CA or sends a task: a certificate's renewal time is brought forward
in the store, and dispatch starts the renewal like any other, under the in-flight bound and
the rate limiter (pipeline.fleet.dispatch). The old certificate is served until the new one is
stored. Renewal times are only ever moved earlier.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from pipeline.fleet.sites import SiteError, find_site, make_due
from pipeline.models import Certificate, Site, SiteChange, SiteState

# Certificates per UPDATE of ``renew --all``.
BATCH = 1000


@dataclass(frozen=True)
class Scheduled:
    domain: str
    serial: str
    renew_at: datetime


def renew_now(
    session: Session, names: Sequence[str], *, now: datetime, actor: str | None = None
) -> list[Scheduled]:
    """Make the named sites' renewals due now; a site that cannot be renewed now is a
    :class:`SiteError` saying why, and nothing is written. ``actor``: who asked, recorded in
    each site's history."""
    chosen: dict[int, tuple[Site, Certificate]] = {}
    for name in names:
        site = find_site(session, name)
        cert = session.scalar(
            select(Certificate).where(Certificate.site_id == site.id, Certificate.current)
        )
        if cert is None:
            raise SiteError(
                f"{site.domain} has no certificate yet ({site.state}): nothing to renew"
                + (" (certman domains retry starts its next attempt)" if site.state in
                   (SiteState.RETRYING, SiteState.BLOCKED) else "")
            )  # fmt: skip
        if site.state == SiteState.RENEWING:
            raise SiteError(f"{site.domain} is being renewed already")
        if site.state == SiteState.BLOCKED:
            raise SiteError(f"{site.domain} is blocked: certman domains retry renews it")
        chosen[site.id] = (site, cert)
    out = []
    for site, cert in sorted(chosen.values(), key=lambda pair: pair[0].domain):
        make_due(cert, now)
        out.append(Scheduled(site.domain, cert.serial, cert.renew_at))
        if actor is not None:
            session.add(SiteChange(domain=site.domain, action="renew", actor=actor,
                                   detail=f"renewal of {cert.serial} made due now"))  # fmt: skip
    session.flush()
    return out


def renew_all(session: Session, *, within: timedelta, now: datetime) -> int:
    """Bring forward the renewal of every current certificate, spread evenly over
    ``[now, now + within)``, soonest expiry first (after a switch of CA, or a compromise).

    A renewal already sooner stays; each certificate's ARI check is put off until its new time,
    so that a refresh does not move it back into the CA's window. Returns how many.
    """
    ids = session.scalars(
        select(Certificate.id)
        .where(Certificate.current)
        .order_by(Certificate.not_after, Certificate.id)
    ).all()
    n = len(ids)
    for start in range(0, n, BATCH):
        rows = session.execute(
            select(Certificate.id, Certificate.renew_at, Certificate.ari_checked_at).where(
                Certificate.id.in_(ids[start : start + BATCH])
            )
        ).all()
        at = {cert_id: now + within * ((start + i) / n) for i, cert_id in
              enumerate(ids[start : start + BATCH])}  # fmt: skip
        updates = [
            {
                "id": row.id,
                "renew_at": min(row.renew_at, at[row.id]),
                "ari_checked_at": max(row.ari_checked_at or at[row.id], at[row.id]),
            }
            for row in rows
        ]
        session.execute(update(Certificate), updates)
    return n
