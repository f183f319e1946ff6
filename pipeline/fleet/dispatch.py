"""Choosing what to start: due first issues, retries and renewals, never more than the bound.

Onboarding 10,000 sites writes 10,000 rows, not 10,000 queued tasks: this module starts orders
as the in-flight bound allows (Pebble 2.4 deadlocked with ~200 orders in flight, and the CA's
limits pace us anyway), so the broker never holds hours of waiting work.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from pipeline.fleet import site_states
from pipeline.models import Certificate, Order, OrderKind, OrderStep, Site, SiteState
from pipeline.models.base import utcnow

UNFINISHED = (
    OrderStep.QUEUED,
    OrderStep.PLACED,
    OrderStep.CHALLENGED,
    OrderStep.READY,
    OrderStep.ISSUED,
)


@dataclass(frozen=True)
class Started:
    order_id: int
    domain: str
    kind: OrderKind
    step: OrderStep = OrderStep.QUEUED

    @property
    def queue(self) -> str:
        return "renewals" if self.kind == OrderKind.RENEW else "issuance"


def in_flight(session: Session) -> int:
    return int(
        session.scalar(select(func.count()).select_from(Order).where(Order.step.in_(UNFINISHED)))
        or 0
    )


def start_due(
    session: Session,
    *,
    limit: int,
    profile: str | None = None,
    now: datetime | None = None,
) -> list[Started]:
    """Create orders for what is due, up to ``limit`` minus what is in flight.

    ``profile`` is the installation's ACME profile (CERTMAN_ACME_PROFILE), for sites that do
    not name their own.

    New sites go first: a renewal has weeks of slack, a new customer has none. Each site is
    claimed with a conditional UPDATE, so two dispatchers never start the same site twice.
    """
    now = now or utcnow()
    capacity = limit - in_flight(session)
    started: list[Started] = []
    if capacity <= 0:
        return started
    new_sites = session.scalars(
        select(Site)
        .where(
            Site.state.in_(site_states.sources(SiteState.ISSUING)),
            Site.next_attempt_at <= now,
        )
        .order_by(Site.next_attempt_at)
        .limit(capacity)
        .options(selectinload(Site.names))
    ).all()
    for site in new_sites:
        if site_states.move(session, site.id, site.state, SiteState.ISSUING):
            started.append(_new_order(session, site, OrderKind.ISSUE, None, now, profile))
    capacity -= len(started)
    if capacity <= 0:
        return started
    due_certs = session.scalars(
        select(Certificate)
        .join(Site)
        .where(Certificate.current, Certificate.renew_at <= now, Site.state == SiteState.ACTIVE)
        .order_by(Certificate.renew_at)
        .limit(capacity)
    ).all()
    for cert in due_certs:
        site = cert.site
        if site_states.move(session, site.id, SiteState.ACTIVE, SiteState.RENEWING):
            started.append(_new_order(session, site, OrderKind.RENEW, cert, now, profile))
    return started


def _new_order(
    session: Session,
    site: Site,
    kind: OrderKind,
    cert: Certificate | None,
    now: datetime,
    profile: str | None,
) -> Started:
    exempt = bool(
        cert is not None
        and cert.ari_id
        and cert.ari_window_start is not None
        and cert.ari_window_end is not None
        and cert.ari_window_start <= now <= cert.ari_window_end
    )
    order = Order(
        site_id=site.id,
        kind=kind,
        names=site.all_names,
        profile=site.profile or profile,
        replaces=cert.ari_id if cert is not None else None,
        exempt=exempt,
        step=OrderStep.QUEUED,
        step_changed_at=now,
        touched_at=now,
    )
    session.add(order)
    session.flush()
    return Started(order.id, site.domain, kind)
