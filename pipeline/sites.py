"""Sites: adding, removing and listing dealer websites in the store."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, false, func, or_, select, update
from sqlalchemy.orm import Session, selectinload

from pipeline import site_states
from pipeline.dispatch import UNFINISHED
from pipeline.models import Certificate, Order, OrderStep, Site, SiteName, SiteState
from pipeline.models.base import utcnow
from pipeline.names import InvalidName, normalise
from pipeline.outbound import OutboundPolicy, RefusedUpstream
from pipeline.settings import KeyType, get_settings


class SiteError(ValueError):
    """A request about sites that cannot be carried out; the message says why."""


@dataclass(frozen=True)
class NewSite:
    """A validated request to onboard one site."""

    domain: str
    aliases: tuple[str, ...] = ()
    upstream: str | None = None
    customer_ref: str | None = None
    profile: str | None = None  # None: the installation's CERTMAN_ACME_PROFILE
    key_type: str | None = None  # None: the installation's CERTMAN_KEY_TYPE

    @property
    def names(self) -> tuple[str, ...]:
        return (self.domain, *self.aliases)


def validate_upstream(raw: str | None, policy: OutboundPolicy | None = None) -> str | None:
    """The upstream URL normalised, None for none, or :class:`SiteError` saying what is wrong.

    ``policy`` defaults to the installation's (CERTMAN_UPSTREAM_*): the one the edge applies
    to every address it connects to, so a URL accepted here is one the edge will use.
    """
    if raw is None or not raw.strip():
        return None
    if policy is None:
        policy = OutboundPolicy.from_settings(get_settings())
    try:
        return policy.check_upstream_url(raw)
    except RefusedUpstream as exc:
        raise SiteError(str(exc)) from None


def parse_site(
    domain: str,
    aliases: Sequence[str] = (),
    upstream: str | None = None,
    customer_ref: str | None = None,
    *,
    profile: str | None = None,
    key_type: str | None = None,
) -> NewSite:
    """Validate and normalise a site request: the one function the CLI and onboarding share."""
    if key_type is not None and key_type not in {k.value for k in KeyType}:
        raise SiteError(f"key type {key_type!r}: must be one of {', '.join(k for k in KeyType)}")
    primary = normalise(domain)
    extra: list[str] = []
    for raw in aliases:
        try:
            alias = normalise(raw)
        except InvalidName as exc:
            raise InvalidName(exc.name, f"alias: {exc.reason}") from None
        if alias != primary and alias not in extra:
            extra.append(alias)
    # Let's Encrypt's limit on names per certificate.
    if len(extra) + 1 > 100:
        raise SiteError(f"{primary}: more than 100 names in one certificate")
    return NewSite(
        primary, tuple(extra), validate_upstream(upstream), customer_ref, profile or None, key_type
    )


def add_site(session: Session, new: NewSite, *, now: datetime | None = None) -> tuple[Site, bool]:
    """Store a site; returns it and whether it was created (False: it was already there).

    Re-adding a site with the same names is a no-op that may update its upstream; a name that
    already belongs to another site is refused, and nothing is written.
    """
    owners: dict[str, str] = dict(
        session.execute(  # type: ignore[arg-type]
            select(SiteName.name, Site.domain).join(Site).where(SiteName.name.in_(new.names))
        ).all()
    )
    taken = {name: owner for name, owner in owners.items() if owner != new.domain}
    if taken:
        name, owner = next(iter(taken.items()))
        raise SiteError(f"{name} already belongs to site {owner}")
    site = session.scalar(
        select(Site).where(Site.domain == new.domain).options(selectinload(Site.names))
    )
    if site is not None:
        if set(site.all_names) != set(new.names):
            raise SiteError(
                f"{new.domain} exists with names {', '.join(site.all_names)}; "
                "remove it first to change its names"
            )
        if new.upstream and new.upstream != site.upstream:
            site.upstream = new.upstream
        return site, False
    site = Site(
        domain=new.domain,
        upstream=new.upstream,
        customer_ref=new.customer_ref,
        profile=new.profile,
        key_type=new.key_type,
        state=site_states.INITIAL,
        next_attempt_at=now or utcnow(),
        names=[SiteName(name=name) for name in new.names],
    )
    session.add(site)
    session.flush()
    return site, True


def find_site(session: Session, name: str) -> Site:
    """The site that a name (primary or alias) belongs to, or :class:`SiteError`."""
    normalised = normalise(name)
    site = session.scalar(select(Site).join(SiteName).where(SiteName.name == normalised))
    if site is None:
        raise SiteError(f"{normalised} is not a known site or alias")
    return site


def _waiting(*, blocked: bool, retrying: bool) -> ColumnElement[bool]:
    """Sites that wait on a failure: blocked by a refusal, and/or waiting to try again."""
    clauses: list[ColumnElement[bool]] = []
    if blocked:
        clauses.append(Site.state == SiteState.BLOCKED)
    if retrying:
        clauses.append(Site.state == SiteState.RETRYING)
        # A failed renewal leaves its site active (the old certificate is still served), with
        # the failure counted and the renewal pushed back.
        clauses.append(and_(Site.state == SiteState.ACTIVE, Site.consecutive_failures > 0))
    return or_(false(), *clauses)


def retry_sites(
    session: Session,
    names: Sequence[str] = (),
    *,
    blocked: bool = False,
    retrying: bool = False,
    now: datetime | None = None,
) -> list[tuple[str, str]]:
    """Make sites that wait on a failure due now: those named, every blocked one, and/or every
    one waiting to try again (a first issue or a renewal).

    For after someone has acted: DNS pointed at the edges, a CAA record changed, a refused
    name sorted out with the CA. A site with a certificate is due for renewal now; one without
    is pending again. Its failure count stays, so a site that fails again keeps its backoff.
    Returns (domain, the state it was in) for each site made due; a named site that is not
    waiting is a :class:`SiteError`, and nothing is written. A site the dispatcher starts
    meanwhile is left to it.
    """
    now = now or utcnow()
    chosen: dict[int, Site] = {}
    for name in names:
        site = find_site(session, name)
        named = select(Site.id).where(Site.id == site.id, _waiting(blocked=True, retrying=True))
        if session.scalar(named) is None:
            raise SiteError(f"{site.domain} is {site.state}, not waiting on a failure")
        chosen[site.id] = site
    if blocked or retrying:
        for site in session.scalars(
            select(Site).where(_waiting(blocked=blocked, retrying=retrying))
        ):
            chosen[site.id] = site
    retried = []
    for site in sorted(chosen.values(), key=lambda s: s.domain):
        was = SiteState(site.state)
        has_cert = session.scalar(
            select(Certificate.id).where(Certificate.site_id == site.id, Certificate.current)
        )
        # Only from the state read above, as the dispatcher claims a site: one it started since
        # is not set back, which would start a second order.
        moved = site_states.move(
            session,
            site.id,
            was,
            SiteState.ACTIVE if has_cert else SiteState.PENDING,
            now=now,
            next_attempt_at=None if has_cert else now,
        )
        if not moved:
            continue
        if has_cert:
            session.execute(
                update(Certificate)
                .where(Certificate.site_id == site.id, Certificate.current)
                .values(renew_at=now)
            )
        retried.append((site.domain, str(was)))
    return retried


def remove_site(session: Session, name: str) -> Site:
    """Delete a site with its names, orders and certificates; unfinished orders are cancelled."""
    site = find_site(session, name)
    session.execute(
        update(Order)
        .where(Order.site_id == site.id, Order.step.in_(UNFINISHED))
        .values(step=OrderStep.CANCELLED, finished_at=utcnow())
    )
    session.delete(site)
    session.flush()
    return site


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


def list_sites(session: Session) -> list[dict[str, Any]]:
    """The ``certman domains list --json`` objects (docs/architecture.md, "Contracts")."""
    sites = session.scalars(
        select(Site).options(selectinload(Site.names)).order_by(Site.domain)
    ).all()
    # Every site is listed, so every current certificate is wanted: its dates, not its chain.
    certs = {
        row.site_id: row
        for row in session.execute(
            select(
                Certificate.site_id, Certificate.not_after, Certificate.renew_at, Certificate.serial
            ).where(Certificate.current)
        )
    }
    out = []
    for site in sites:
        cert = certs.get(site.id)
        out.append(
            {
                "domain": site.domain,
                "aliases": [n for n in site.all_names if n != site.domain],
                "state": site.state,
                "not_after": cert.not_after.isoformat() if cert else None,
                "renew_at": cert.renew_at.isoformat() if cert else None,
                "serial": cert.serial if cert else None,
                "upstream": site.upstream,
                "last_error": site.last_error,
                "next_attempt_at": site.next_attempt_at.isoformat()
                if site.next_attempt_at
                else None,
            }
        )
    return out


def counts_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Site.state, func.count()).group_by(Site.state)).all()
    return {str(state): int(n) for state, n in rows}
