"""Sites: adding, removing and listing dealer websites in the store."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, false, func, or_, select, update
from sqlalchemy.orm import Session, selectinload

from pipeline.fleet import site_states
from pipeline.fleet.dispatch import UNFINISHED
from pipeline.models import Certificate, Order, OrderStep, Site, SiteName, SiteState
from pipeline.models.base import utcnow
from pipeline.names import InvalidName, normalise
from pipeline.outbound import OutboundPolicy, RefusedUpstream
from pipeline.settings import KeyType, Settings


class SiteError(ValueError):
    """A request about sites that cannot be carried out; the message says why."""


# Kinds of SiteError the API answers with their own problem type (the CLI prints any alike).
class SiteNotFound(SiteError):
    """No site has this name, as primary or alias."""


class UpstreamRefused(SiteError):
    """The upstream URL is malformed or refused by the outbound policy."""


class InvalidSiteRequest(SiteError):
    """The request itself is wrong (a key type, an issuer, too many names), whatever is stored."""


@dataclass(frozen=True)
class NewSite:
    """A validated request to onboard one site."""

    domain: str
    aliases: tuple[str, ...] = ()
    upstream: str | None = None
    customer_ref: str | None = None
    profile: str | None = None  # None: the installation's CERTMAN_ACME_PROFILE
    key_type: str | None = None  # None: the installation's CERTMAN_KEY_TYPE
    issuer: str | None = None  # the issuer to order from first; None: CERTMAN_ISSUERS' first

    @property
    def names(self) -> tuple[str, ...]:
        return (self.domain, *self.aliases)


@dataclass(frozen=True)
class SiteRules:
    """What validating a site needs from the installation's settings, handed in by the entry
    point (the API's runtime, a command's): the outbound policy and the configured issuers."""

    policy: OutboundPolicy
    issuers: tuple[str, ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> SiteRules:
        return cls(
            OutboundPolicy.from_settings(settings),
            tuple(issuer.name for issuer in settings.issuer_list),
        )


def validate_upstream(raw: str | None, policy: OutboundPolicy) -> str | None:
    """The upstream URL normalised, None for none, or :class:`SiteError` saying what is wrong.

    ``policy`` is the installation's (CERTMAN_UPSTREAM_*, :meth:`SiteRules.from_settings`): the
    one the edge applies to every address it connects to, so a URL accepted here is one the
    edge will use.
    """
    if raw is None or not raw.strip():
        return None
    try:
        return policy.check_upstream_url(raw)
    except RefusedUpstream as exc:
        raise UpstreamRefused(str(exc)) from None


def parse_site(
    domain: str,
    aliases: Sequence[str] = (),
    upstream: str | None = None,
    customer_ref: str | None = None,
    *,
    profile: str | None = None,
    key_type: str | None = None,
    issuer: str | None = None,
    rules: SiteRules,
) -> NewSite:
    """Validate and normalise a site request: the one function the CLI, the API and onboarding
    share."""
    if key_type is not None:
        check_key_type(key_type)
    if issuer is not None:
        check_issuer(issuer, rules=rules)
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
        raise InvalidSiteRequest(f"{primary}: more than 100 names in one certificate")
    return NewSite(
        primary, tuple(extra), validate_upstream(upstream, rules.policy), customer_ref,
        profile or None, key_type,
        issuer,
    )  # fmt: skip


def check_key_type(key_type: str) -> None:
    """:class:`SiteError` unless ``key_type`` is one certman issues."""
    if key_type not in {k.value for k in KeyType}:
        raise InvalidSiteRequest(
            f"key type {key_type!r}: must be one of {', '.join(k for k in KeyType)}"
        )


def check_issuer(name: str, *, rules: SiteRules) -> None:
    """:class:`SiteError` unless ``name`` is one of the configured issuers."""
    known = rules.issuers
    if name not in known:
        raise InvalidSiteRequest(f"issuer {name!r} is not configured (CERTMAN_ISSUERS): one of "
                        f"{', '.join(known)}")  # fmt: skip


def add_site(session: Session, new: NewSite, *, now: datetime | None = None) -> tuple[Site, bool]:
    """Store a site; returns it and whether it was created (False: it was already there).

    Re-adding a site as it is stored is a no-op; re-adding it with other names, upstream,
    profile or key type is a :class:`SiteError` that says what differs and points to
    ``certman domains update`` (nothing is changed). A name that already belongs to another
    site is refused, and nothing is written.
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
                "change them with certman domains update"
            )
        differs = _differences(site, new)
        if differs:
            # Re-adding never changes a site: a script re-run must not move an upstream.
            raise SiteError(
                f"{new.domain} is already there with {'; '.join(differs)}: "
                "change it with certman domains update"
            )
        return site, False
    site = Site(
        domain=new.domain,
        upstream=new.upstream,
        customer_ref=new.customer_ref,
        profile=new.profile,
        key_type=new.key_type,
        preferred_issuer=new.issuer,
        state=site_states.INITIAL,
        next_attempt_at=now or utcnow(),
        names=[SiteName(name=name) for name in new.names],
    )
    session.add(site)
    session.flush()
    return site, True


def _differences(site: Site, new: NewSite) -> list[str]:
    """What a re-add asks for that the stored site does not have (options not given: none)."""
    asked = {"upstream": new.upstream, "profile": new.profile, "key type": new.key_type,
             "customer ref": new.customer_ref, "issuer": new.issuer}  # fmt: skip
    stored = {"upstream": site.upstream, "profile": site.profile, "key type": site.key_type,
              "customer ref": site.customer_ref, "issuer": site.preferred_issuer}  # fmt: skip
    return [
        f"{what} {stored[what] or '(none)'}, not {value}"
        for what, value in asked.items()
        if value is not None and value != stored[what]
    ]


def find_site(session: Session, name: str) -> Site:
    """The site that a name (primary or alias) belongs to, or :class:`SiteError`."""
    normalised = normalise(name)
    site = session.scalar(select(Site).join(SiteName).where(SiteName.name == normalised))
    if site is None:
        raise SiteNotFound(f"{normalised} is not a known site or alias")
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


# Sites per query of a listing: each batch is two indexed queries, and only one batch is held.
LIST_BATCH = 1000


def iter_sites(
    session: Session,
    *,
    state: str | None = None,
    expiring_before: datetime | None = None,
    batch: int = LIST_BATCH,
    after: str = "",
) -> Iterator[dict[str, Any]]:
    """The ``certman domains list --json`` objects (docs/architecture.md, "Contracts"), by
    domain, a batch at a time: memory stays flat however many sites there are.

    ``state`` keeps the sites in that state; ``expiring_before`` those whose current
    certificate expires before then (sites without one are left out); ``after`` starts past
    that domain (the API's keyset cursor).
    """
    if session.get_bind().dialect.name == "postgresql" and not session.in_transaction():
        # The batches are read one after another: one snapshot of the store for all of them
        # (a caller's transaction already begun keeps its own level).
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    query = (
        select(
            Site.id,
            Site.domain,
            Site.state,
            Site.upstream,
            Site.last_error,
            Site.next_attempt_at,
            Certificate.not_after,
            Certificate.renew_at,
            Certificate.serial,
        )  # fmt: skip
        .outerjoin(Certificate, and_(Certificate.site_id == Site.id, Certificate.current))
        .order_by(Site.domain)
        .limit(batch)
    )
    if state is not None:
        query = query.where(Site.state == state)
    if expiring_before is not None:
        query = query.where(Certificate.not_after < expiring_before)
    while rows := session.execute(query.where(Site.domain > after)).all():
        names: dict[int, list[str]] = {row.id: [] for row in rows}
        for site_id, name in session.execute(
            select(SiteName.site_id, SiteName.name)
            .where(SiteName.site_id.in_(names))
            .order_by(SiteName.id)
        ).tuples():
            names[site_id].append(name)
        for row in rows:
            yield {
                "domain": row.domain,
                "aliases": [n for n in names[row.id] if n != row.domain],
                "state": row.state,
                "not_after": _iso(row.not_after),
                "renew_at": _iso(row.renew_at),
                "serial": row.serial,
                "upstream": row.upstream,
                "last_error": row.last_error,
                "next_attempt_at": _iso(row.next_attempt_at),
            }
        after = rows[-1].domain


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def list_sites(session: Session) -> list[dict[str, Any]]:
    """Every site's ``certman domains list --json`` object, in one list (small fleets, tests)."""
    return list(iter_sites(session))


# --- changing a site in place ---------------------------------------------------------------------
@dataclass
class SiteUpdate:
    """What ``certman domains update`` changed."""

    domain: str
    changes: list[str]
    # A new certificate is wanted (names, profile or key type changed): its renewal is due now,
    # or the next first-issue attempt uses the new names.
    new_certificate: bool = False
    note: str | None = None


def update_site(
    session: Session,
    name: str,
    *,
    add_aliases: Sequence[str] = (),
    remove_aliases: Sequence[str] = (),
    upstream: str | None = None,
    profile: str | None = None,
    key_type: str | None = None,
    issuer: str | None = None,
    customer_ref: str | None = None,
    now: datetime | None = None,
    rules: SiteRules,
) -> SiteUpdate:
    """Change a site in place; any problem is a :class:`SiteError` and nothing is written.

    A change of names, profile or key type wants a new certificate: a site with one has its
    renewal made due now (dispatch starts it under the in-flight bound and the rate limiter,
    like any renewal) and keeps serving the old certificate until the new one is stored; a site
    still waiting for its first certificate gets it with the new names. Not while an order is
    in flight: it carries the old names, and would be stored as the site's certificate.
    """
    now = now or utcnow()
    site = find_site(session, name)
    names = list(site.all_names)
    changes: list[str] = []
    for raw in add_aliases:
        try:
            alias = normalise(raw)
        except InvalidName as exc:
            raise InvalidName(exc.name, f"alias: {exc.reason}") from None
        if alias in names:
            continue
        owner = session.scalar(select(Site.domain).join(SiteName).where(SiteName.name == alias))
        if owner is not None:
            raise SiteError(f"{alias} already belongs to site {owner}")
        names.append(alias)
        changes.append(f"alias {alias} added")
    for raw in remove_aliases:
        alias = normalise(raw)
        if alias == site.domain:
            raise InvalidSiteRequest(f"{alias} is the site's primary name: it cannot be removed")
        if alias not in names:
            raise SiteError(f"{alias} is not a name of {site.domain}")
        names.remove(alias)
        changes.append(f"alias {alias} removed")
    if len(names) > 100:
        raise InvalidSiteRequest(f"{site.domain}: more than 100 names in one certificate")
    if key_type is not None:
        check_key_type(key_type)
    new_upstream = (
        validate_upstream(upstream, rules.policy) if upstream is not None else site.upstream
    )
    wants_cert = names != site.all_names
    if profile is not None and profile != site.profile:
        wants_cert = True
        changes.append(f"profile {site.profile or '(default)'} -> {profile}")
    if key_type is not None and key_type != site.key_type:
        wants_cert = True
        changes.append(f"key type {site.key_type or '(default)'} -> {key_type}")
    if new_upstream != site.upstream:
        changes.append(f"upstream {site.upstream or '(none)'} -> {new_upstream}")
    if issuer is not None and issuer != site.preferred_issuer:
        # From the next order on (a renewal at its time): the certificate served stays valid.
        check_issuer(issuer, rules=rules)
        changes.append(f"issuer {site.preferred_issuer or '(first)'} -> {issuer}")
    if customer_ref is not None and customer_ref != site.customer_ref:
        changes.append(f"customer ref {site.customer_ref or '(none)'} -> {customer_ref}")
    if wants_cert:
        busy = session.scalar(
            select(Order.step).where(Order.site_id == site.id, Order.step.in_(UNFINISHED))
        )
        if busy is not None:
            raise SiteError(
                f"{site.domain} has an order in flight (step {busy}): change its names, profile "
                "or key type when it ends (certman domains show)"
            )
    result = SiteUpdate(site.domain, changes, new_certificate=wants_cert)
    if not changes:
        return result
    kept = [n for n in site.names if n.name in names]
    if len(kept) != len(site.names):
        site.names = kept
        session.flush()  # the removed names are gone before a new one may take their place
    site.names.extend(SiteName(name=n) for n in names if n not in site.all_names)
    site.upstream = new_upstream
    site.profile = profile if profile is not None else site.profile
    site.key_type = key_type if key_type is not None else site.key_type
    site.preferred_issuer = issuer if issuer is not None else site.preferred_issuer
    site.customer_ref = customer_ref if customer_ref is not None else site.customer_ref
    site.updated_at = now
    # In SQL (version = version + 1), not from what was read: a concurrent change's bump is
    # never lost, and the API's claim_version sees every operator's change.
    site.version = Site.version + 1
    if wants_cert:
        result.note = _order_new_certificate(session, site, now)
    session.flush()
    return result


def claim_version(session: Session, site_id: int, seen: int) -> bool:
    """Whether the site is still at the version ``seen``, its row now held by this
    transaction until it ends.

    A compare-and-set (UPDATE ... WHERE version = ?) rather than SELECT ... FOR UPDATE: SQLite
    ignores FOR UPDATE, and pysqlite starts a transaction only at the first write, so a read
    and a check made before it guard nothing. This write takes the lock on both stores (the
    row's on PostgreSQL, which re-checks the WHERE against a concurrent committed change; the
    database's on SQLite), so what follows in the transaction is serialised with every other
    change of the site; it changes nothing.
    """
    done = session.execute(
        update(Site)
        .where(Site.id == site_id, Site.version == seen)
        .values(version=Site.version)
        .execution_options(synchronize_session=False)
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


def _order_new_certificate(session: Session, site: Site, now: datetime) -> str:
    cert = session.scalar(
        select(Certificate).where(Certificate.site_id == site.id, Certificate.current)
    )
    if site.state == SiteState.BLOCKED:
        return "the site is blocked: certman domains retry starts its next order"
    if cert is None:
        site.next_attempt_at = now
        return "its first certificate is ordered with these names"
    make_due(cert, now)
    return f"a new certificate is ordered; certificate {cert.serial} is served until it arrives"


def make_due(cert: Certificate, at: datetime) -> None:
    """Bring a certificate's renewal forward to ``at`` (never later than it was).

    Its ARI check is put off until then too: a refresh must not move a renewal someone asked
    for back into the CA's window.
    """
    cert.renew_at = min(cert.renew_at, at)
    cert.ari_checked_at = max(cert.ari_checked_at or at, at)


def counts_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Site.state, func.count()).group_by(Site.state)).all()
    return {str(state): int(n) for state, n in rows}
