"""What each site request does, over the services the CLI uses (pipeline.fleet): blocking calls
the handlers run in the API's thread pool. The representation of a site is
:func:`pipeline.fleet.site_report.site_report`, the one ``certman domains show --json`` prints.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from itertools import islice
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from pipeline.api.problems import (
    CONFLICT,
    INVALID_REQUEST,
    NOT_FOUND,
    PRECONDITION_FAILED,
    UNAVAILABLE,
    Problem,
)
from pipeline.db import get_engine
from pipeline.fleet.changes import publish_and_commit, record_change, unpublish_and_commit
from pipeline.fleet.onboarding import Line, Onboarding, OnboardingError, Options, Outcome
from pipeline.fleet.renewal_requests import renew_now
from pipeline.fleet.revocation import Reason, revoke_site
from pipeline.fleet.site_report import site_report
from pipeline.fleet.sites import (
    SiteRules,
    add_site,
    claim_version,
    iter_sites,
    parse_site,
    remove_site,
    update_site,
)
from pipeline.models import Site, SiteName
from pipeline.models.base import utcnow
from pipeline.names import InvalidName, normalise

if TYPE_CHECKING:
    from pipeline.acme.client import AcmeClient
    from pipeline.runtime import Runtime

log = logging.getLogger(__name__)

# What a PUT may set; anything else in the body is refused (a typo must not pass silently).
PUT_FIELDS = {"upstream", "aliases", "customer_ref", "profile", "key_type", "issuer"}
BATCH_FIELDS = {"domain", "upstream", "aliases"}


@dataclass
class Answer:
    """A change's answer: the HTTP status, the body, and the site's ETag if it still exists."""

    status: int
    body: dict[str, Any]
    etag: str | None = None


class SiteService:
    """The site requests of one API process, over its runtime's store, Redis and publisher."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        kick: Callable[[], None],
        check_profile: Callable[[str, str | None], None],
        check_edge_key: Callable[[str], None],
        max_batch: int,
    ) -> None:
        self.runtime = runtime
        self.rules = SiteRules.from_settings(runtime.settings)
        self.kick = kick
        self.check_profile = check_profile
        self.check_edge_key = check_edge_key
        self.max_batch = max_batch

    # --- reading ----------------------------------------------------------------------------
    def show(self, domain: str) -> Answer:
        with self.runtime.session_scope() as session:
            site = _site_named(session, domain)
            report = site_report(session, site.domain, now=utcnow(), settings=self.runtime.settings)
            return Answer(200, report, etag_of(site))

    def listing(
        self, *, state: str | None, expiring_within: int | None, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        after = decode_cursor(cursor) if cursor else ""
        before = utcnow() + timedelta(seconds=expiring_within) if expiring_within else None
        with self.runtime.session_scope() as session:
            rows = list(
                islice(
                    iter_sites(
                        session, state=state, expiring_before=before, batch=limit + 1, after=after
                    ),
                    limit + 1,
                )
            )
        more = len(rows) > limit
        rows = rows[:limit]
        return {
            "sites": rows,
            "next_cursor": encode_cursor(rows[-1]["domain"]) if more and rows else None,
        }

    def status(self) -> dict[str, Any]:
        from pipeline.fleet.status import collect

        runtime = self.runtime
        return collect(runtime.session_scope, runtime.limiter_for, runtime.settings)

    # --- changing ---------------------------------------------------------------------------
    def put(
        self,
        domain: str,
        body: dict[str, Any],
        *,
        actor: str,
        if_match: str | None,
        if_none_match: str | None,
    ) -> Answer:
        """Create (201) or update in place (200), idempotent; If-Match refuses a lost update."""
        _only(body, PUT_FIELDS)
        primary = normalise(domain)
        upstream = _opt_str(body, "upstream")
        aliases = _aliases(body)
        customer_ref = _opt_str(body, "customer_ref")
        profile = _opt_str(body, "profile")
        key_type = _opt_str(body, "key_type")
        issuer = _opt_str(body, "issuer")
        runtime = self.runtime
        new_certificate = created = False
        shown = Answer(500, {})
        # Without If-Match a change that got in first is applied over (the caller asked for
        # no check), so the transaction is run again; with it, the caller is told (412).
        for attempt in range(1, STALE_ATTEMPTS + 1):
            with runtime.session_scope() as session:
                site = session.scalar(
                    select(Site)
                    .where(Site.domain == primary)
                    .options(selectinload(Site.names))
                    .with_for_update()
                )
                _preconditions(site, if_match, if_none_match)
                if site is None:
                    new = parse_site(
                        primary, aliases or (), upstream, customer_ref, profile=profile,
                        key_type=key_type, issuer=issuer, rules=self.rules,
                    )  # fmt: skip
                    if profile:
                        self.check_profile(profile, issuer)
                    self.check_edge_key("nothing was added")
                    site, created = add_site(session, new)
                    record_change(session, new.domain, "add", actor, "names " + " ".join(new.names))
                    shown = self._answer(session, site, 201)
                    publish_and_commit(runtime.publisher, runtime.session_scope, session, site)
                    break
                if not claim_version(session, site.id, site.version):
                    if if_match is not None or attempt == STALE_ATTEMPTS:
                        raise _stale(if_match)
                    continue
                # Read again under the claim: a worker may have moved the state since.
                session.expire(site)
                add: Sequence[str] = ()
                remove: Sequence[str] = ()
                if aliases is not None:
                    wanted = {normalise(a) for a in aliases} - {site.domain}
                    have = set(site.all_names) - {site.domain}
                    add = [a for a in aliases if normalise(a) not in have]
                    remove = sorted(have - wanted)
                if profile:
                    self.check_profile(profile, issuer or site.preferred_issuer)
                done = update_site(
                    session, site.domain, add_aliases=add, remove_aliases=remove,
                    # null clears the upstream, as an empty --upstream would
                    upstream=(upstream or "") if "upstream" in body else None,
                    profile=profile, key_type=key_type, issuer=issuer,
                    customer_ref=customer_ref, rules=self.rules,
                )  # fmt: skip
                new_certificate = done.new_certificate
                if new_certificate:
                    self.check_edge_key("nothing was changed")
                if done.changes:
                    record_change(session, site.domain, "update", actor, "; ".join(done.changes))
                shown = self._answer(session, site, 200)
                publish_and_commit(
                    runtime.publisher, runtime.session_scope, session, site, unless_current=True
                )
                break
        if created or new_certificate:
            self.kick()
        return shown

    def _answer(self, session: Session, site: Site, status: int) -> Answer:
        # Read in the change's own transaction, before its commit: the site as this request
        # left it, never a later change (another request's, a worker's) read after it.
        session.flush()
        report = site_report(session, site.domain, now=utcnow(), settings=self.runtime.settings)
        return Answer(status, report, etag_of(site))

    def delete(self, domain: str, *, actor: str, if_match: str | None) -> Answer:
        runtime = self.runtime
        with runtime.session_scope() as session:
            site = _site_named(session, domain)
            _preconditions(site, if_match, None)
            # The read above holds no lock: a change committed since the check must not be
            # deleted with it (without If-Match the caller asked for no check).
            if if_match is not None and not claim_version(session, site.id, site.version):
                raise _stale(if_match)
            removed = remove_site(session, site.domain).domain
            record_change(session, removed, "remove", actor)
            # The signed tombstone first, then the commit: a removal the edges cannot hear of
            # is not made (as certman domains remove).
            unpublish_and_commit(runtime.publisher, runtime.session_scope, session, removed)
        return Answer(202, {"domain": removed, "removed": True})

    def renew(self, domain: str, *, actor: str) -> Answer:
        with self.runtime.session_scope() as session:
            site = _site_named(session, domain)
            [done] = renew_now(session, [site.domain], now=utcnow(), actor=actor)
        self.kick()
        return Answer(
            202,
            {"domain": done.domain, "serial": done.serial, "renew_at": done.renew_at.isoformat()},
        )

    def revoke(self, domain: str, reason: str, *, actor: str) -> Answer:
        if reason not in Reason.__members__:
            raise Problem(INVALID_REQUEST, f"reason {reason!r}: one of "
                          f"{', '.join(Reason.__members__)}")  # fmt: skip
        runtime = self.runtime
        with runtime.session_scope() as session:
            primary = _site_named(session, domain).domain
        done = revoke_site(
            runtime.session_scope, self._acme_client, primary, reason=Reason[reason],
            now=utcnow(), actor=actor,
        )  # fmt: skip
        self.kick()
        return Answer(
            200,
            {"domain": done.domain, "serial": done.serial, "reason": done.reason.name,
             "already_revoked": done.already},
        )  # fmt: skip

    def _acme_client(self, issuer: str | None) -> AcmeClient:
        """The revoking client, on this host's pipeline key: loaded, never made here.

        The ACME account key is sealed to the pipeline's key: without the workers' key nothing
        can sign a revocation, and the client would make a new key (which opens nothing) or
        fail on a read-only disk showing its path."""
        if not self.runtime.settings.effective_pipeline_key.is_file():
            raise Problem(
                UNAVAILABLE,
                "revoking needs the pipeline key on this host "
                "(CERTMAN_PIPELINE_KEY: the workers' key, mounted read-only)",
            )
        return self.runtime.acme_for(issuer)

    def batch(self, items: list[Any], *, actor: str) -> dict[str, Any]:
        """Many sites in one request, with bulk onboarding's rules: one transaction, every
        line answered (added, already, duplicate, rejected with the reason)."""
        from pipeline.distribution import publishing

        # As PUT: a site whose certificate could never be sealed is refused before any is stored.
        self.check_edge_key("nothing was added")
        runtime = self.runtime
        settings = runtime.settings
        engine = get_engine(settings.effective_database_url)
        results: dict[int, dict[str, Any]] = {}
        unpublished: set[str] = set()

        def heard(number: int, outcome: Outcome, reason: str | None) -> None:
            results[number] = {"outcome": outcome, "reason": reason}

        def publishing_of(publish: Callable[[], None], domains: Sequence[str]) -> None:
            # After the commit: the sites are stored whatever happens here, so a failure is
            # not the request's (no 503 for stored sites) but each line's, and sending the
            # batch again publishes them (its sites are "already" there: healed).
            try:
                publish()
            except Exception:
                log.warning("api batch: %d stored sites not published", len(domains),
                            exc_info=True)  # fmt: skip
                unpublished.update(domains)

        client = runtime.redis
        prefix = settings.redis_prefix
        job = Onboarding(
            engine,
            Options(batch_size=self.max_batch, rules=self.rules, actor=actor),
            publish_batch=lambda sites: publishing_of(
                lambda: publishing.publish_records(client, prefix, sites, runtime.signing_key),
                [site.domain for site in sites],
            ),
            publish_existing=lambda domains: publishing_of(
                lambda: publishing.heal_snapshot(
                    engine, client, prefix, domains, runtime.signing_key
                ),
                domains,
            ),
            kick=self.kick,
            on_result=heard,
        )
        lines = []
        for number, item in enumerate(items, start=1):
            line, problem = _batch_line(number, item)
            if problem is not None:
                results[number] = {"outcome": "rejected", "reason": problem}
            else:
                lines.append(line)
        try:
            job.run(lines)
        except OnboardingError as exc:
            # Another writer kept taking the names of a batch: the earlier batches are stored,
            # and sending the whole request again answers them "already".
            raise Problem(CONFLICT, f"{exc}; the sites before it are stored") from None
        out = []
        for number, item in enumerate(items, start=1):
            domain = item.get("domain") if isinstance(item, dict) else None
            answer = results.get(number, {"outcome": "rejected", "reason": "not processed"})
            row = {"line": number, "domain": domain if isinstance(domain, str) else None,
                   **answer}  # fmt: skip
            if answer["outcome"] in ("added", "already"):
                stored = _stored_name(domain)
                row["published"] = stored not in unpublished
                if not row["published"]:
                    row["reason"] = ("stored, but not yet sent to the edges (Redis or the "
                                     "signing key failed); send the batch again")  # fmt: skip
            out.append(row)
        counts = {k: 0 for k in ("added", "already", "duplicate", "rejected")}
        for row in out:
            counts[row["outcome"]] += 1
        return {"results": out, **counts}


# --- helpers ---------------------------------------------------------------------------------
def etag_of(site: Site) -> str:
    """A strong ETag of what a PUT sets (names, upstream, profile, key type, issuer, customer
    reference), the site's id and creation time (a site removed and added again is another
    site; SQLite may give it the same id) and its version (moved by every operator's change):
    the state and certificate move on their own and must not fail an If-Match, so neither is
    in it."""
    settings = [site.id, site.created_at.isoformat(), site.version, site.domain,
                site.all_names, site.upstream, site.profile, site.key_type,
                site.preferred_issuer, site.customer_ref]  # fmt: skip
    digest = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:32]
    return f'"{digest}"'


# A PUT without If-Match that finds the site changed under it tries this many times in all.
STALE_ATTEMPTS = 3


def _stale(if_match: str | None) -> Problem:
    if if_match is not None:
        return Problem(PRECONDITION_FAILED, "the site changed since that ETag")
    return Problem(CONFLICT, "the site was changed by another request at the same time; try again")


def _preconditions(site: Site | None, if_match: str | None, if_none_match: str | None) -> None:
    if if_match is not None:
        tags = [t.strip() for t in if_match.split(",")]
        if site is None or ("*" not in tags and etag_of(site) not in tags):
            raise Problem(
                PRECONDITION_FAILED,
                "the site does not exist" if site is None else "the site changed since that ETag",
            )
    if if_none_match is not None and site is not None:
        tags = [t.strip() for t in if_none_match.split(",")]
        if "*" in tags or etag_of(site) in tags:
            raise Problem(PRECONDITION_FAILED, f"{site.domain} exists")


def _site_named(session: Session, domain: str) -> Site:
    """The site whose primary name is ``domain`` (an alias is not a site's address here)."""
    primary = normalise(domain)
    site = session.scalar(
        select(Site).where(Site.domain == primary).options(selectinload(Site.names))
    )
    if site is None:
        owner = session.scalar(select(Site.domain).join(SiteName).where(SiteName.name == primary))
        hint = f": it is an alias of {owner}" if owner else ""
        raise Problem(NOT_FOUND, f"{primary} is not a known site{hint}")
    return site


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise Problem(INVALID_REQUEST, f"unknown field {unknown[0]!r}: one of "
                      f"{', '.join(sorted(allowed))}")  # fmt: skip


# The columns' sizes: a longer value is refused here, not by the store's type.
MAX_LENGTH = {"upstream": 2048, "customer_ref": 255, "profile": 64, "key_type": 16, "issuer": 64}


def _opt_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise Problem(INVALID_REQUEST, f"{key}: a string or null")
    if value is not None and len(value) > MAX_LENGTH[key]:
        raise Problem(INVALID_REQUEST, f"{key}: at most {MAX_LENGTH[key]} characters")
    return value


def _aliases(body: dict[str, Any]) -> list[str] | None:
    value = body.get("aliases")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise Problem(INVALID_REQUEST, "aliases: a list of names")
    if len(value) > 100:
        raise Problem(INVALID_REQUEST, "aliases: at most 100 names in one certificate")
    return value


def _batch_line(number: int, item: Any) -> tuple[Line, str | None]:
    """A batch item as an onboarding line (domain, upstream, aliases), or why it is not one."""
    text = json.dumps(item)[:1000]
    if not isinstance(item, dict):
        return Line(number, text, ()), "not an object"
    unknown = sorted(set(item) - BATCH_FIELDS)
    if unknown:
        return Line(number, text, ()), f"unknown field {unknown[0]!r}"
    domain, upstream, aliases = item.get("domain"), item.get("upstream"), item.get("aliases", [])
    if not isinstance(domain, str):
        return Line(number, text, ()), "domain: a name is needed"
    if upstream is not None and not isinstance(upstream, str):
        return Line(number, text, ()), "upstream: a string or null"
    if upstream is not None and len(upstream) > MAX_LENGTH["upstream"]:
        return Line(number, text, ()), f"upstream: at most {MAX_LENGTH['upstream']} characters"
    if aliases is None:
        aliases = []
    if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
        return Line(number, text, ()), "aliases: a list of names"
    if any(not a.strip() or any(c.isspace() for c in a.strip()) for a in aliases):
        return Line(number, text, ()), "aliases: a name has a space in it"
    return Line(number, text, (domain, upstream or "", " ".join(a.strip() for a in aliases))), None


def _stored_name(domain: Any) -> str | None:
    """A batch line's domain as the store has it (normalised), to match what was published."""
    try:
        return normalise(domain) if isinstance(domain, str) else None
    except InvalidName:
        return None


def encode_cursor(domain: str) -> str:
    return base64.urlsafe_b64encode(domain.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        domain = base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        domain = ""
    if not domain or encode_cursor(domain) != cursor:
        raise Problem(INVALID_REQUEST, "cursor: not one this API gave")
    return domain
