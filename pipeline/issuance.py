"""The issuance steps, one per task of the chain, and the ends of an attempt.

Each step is keyed by the order's id, checks where the order stands before doing anything, and
records its progress in the database, so that running a step twice, or after a crash, neither
loses the order nor places a second one. A step that must wait raises :class:`RetryLater`;
the task turns that into ``self.retry(countdown=...)``; nothing here sleeps.

The steps are methods of :class:`OrderSteps`, which is handed its dependencies (the store's
sessions, the ACME client, the rate limiter, the publisher to the edges, the settings) by the
process's runtime (:mod:`pipeline.runtime`) or by a test; nothing here reaches for them.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import timedelta
from typing import Any, Protocol

import redis
from acme import messages
from sqlalchemy import Row, Select, Table, Update, bindparam, select, update
from sqlalchemy.orm import Session, joinedload
from sqlalchemy.sql.elements import KeyedColumnElement

from pipeline import worker_metrics
from pipeline.acme import selfcheck
from pipeline.acme.client import NOT_FOUND, AcmeClient
from pipeline.acme.ratelimit import RateLimiter
from pipeline.crypto import envelope
from pipeline.crypto.certificates import ChainMismatch, inspect_chain, new_sealed_request
from pipeline.crypto.keys import KeyFileError, PublicKey
from pipeline.distribution.publishing import Publisher, site_record
from pipeline.errors import (
    AttemptFailed,
    FallbackCause,
    IssuanceProblem,
    NameRefused,
    PollAgain,
    RateLimited,
    RetryLater,
    fallback_cause,
    validation_problem,
)
from pipeline.fleet import renewal, site_states
from pipeline.fleet.chain import Step
from pipeline.models import Attempt, Certificate, Order, OrderKind, OrderStep, SiteState
from pipeline.models.base import utcnow
from pipeline.settings import KeyType, Settings

log = logging.getLogger(__name__)

PROBE_TTL = 30  # per name: a pre-flight probe lives only as long as its fetches
CHALLENGE_TTL = 24 * 3600  # an authorization stays pending for days; the token must outlive polls
MAX_COUNTDOWN = 15 * 60  # under the broker's visibility timeout


class OrderGone(Exception):
    """The order was removed (its site deleted): nothing left to do."""


# The site loaded with its order, for the steps that read it: one statement where the lazy
# load made two.
_WITH_SITE = (joinedload(Order.site),)


def _order(session: Session, order_id: int, *, with_site: bool = False) -> Order:
    # No write here: every way out of a step writes the order (its next step, note_retry or
    # fail_order), and that write is what tells the sweeper the order is alive.
    order = session.get(Order, order_id, options=_WITH_SITE if with_site else ())
    if order is None:
        raise OrderGone(order_id)
    return order


def _advance(order: Order, step: OrderStep) -> None:
    order.step = step
    order.step_changed_at = order.touched_at = utcnow()
    order.step_tries = 0
    order.polls = 0
    _stop_waiting(order)


# The orders table, for the steps' hottest statements: Core statements built once and run with
# their parameters. An ORM UPDATE built for every call spends most of its CPU in SQLAlchemy's
# own work (the cache key of a statement built anew, the ORM's bulk-update machinery), not in
# the database: docs/architecture.md section 6 has the figures. Nothing here is loaded into a
# session: no identity map goes stale.
_ORDERS: Table = Order.__table__  # type: ignore[assignment]  # declared as a Table
_ADVANCES: dict[tuple[OrderStep, OrderStep, bool, tuple[str, ...]], Update] = {}


def _advance_statement(
    step: OrderStep, to: OrderStep, with_url: bool, names: tuple[str, ...]
) -> Update:
    key = (step, to, with_url, names)
    statement = _ADVANCES.get(key)
    if statement is None:
        columns = _ORDERS.c
        where = [columns.id == bindparam("order_id"), columns.step == str(step)]
        if with_url:
            where.append(columns.order_url == bindparam("if_order_url"))
        now = bindparam("now", type_=columns.touched_at.type)
        statement = _ADVANCES[key] = (
            update(_ORDERS)
            .where(*where)
            .values(
                step=str(to),
                step_changed_at=now,
                touched_at=now,
                step_tries=0,
                polls=0,
                waiting_bucket=None,
                waiting_until=None,
                waiting_reason=None,
                # Bind names apart from the columns' (SQLAlchemy reserves those for itself).
                **{name: bindparam(f"v_{name}", type_=columns[name].type) for name in names},
            )
        )
    return statement


def _advance_from(
    session: Session,
    order_id: int,
    step: OrderStep,
    to: OrderStep,
    *,
    if_order_url: str | None = None,
    **values: Any,
) -> bool:
    """:func:`_advance` in one conditional UPDATE: the order moves from ``step`` to ``to``, with
    ``values`` written, only where it still stands at ``step`` (and, given ``if_order_url``,
    still holds that CA order). False when another run moved it first, or it is gone: either
    way this run has nothing to record.

    One statement where loading the order and flushing the change took two (the load, the
    unit of work and the ORM UPDATE were a large part of the workers' SQLAlchemy samples in
    py-spy, 1,000 sites).
    """
    names = tuple(sorted(values))
    statement = _advance_statement(step, to, if_order_url is not None, names)
    params: dict[str, Any] = {"order_id": order_id, "now": utcnow()}
    if if_order_url is not None:
        params["if_order_url"] = if_order_url
    params.update({f"v_{name}": values[name] for name in names})
    moved = session.connection().execute(statement, params)
    return moved.rowcount == 1


_COUNT_POLL = (
    update(_ORDERS)
    .where(_ORDERS.c.id == bindparam("order_id"))
    .values(
        polls=_ORDERS.c.polls + 1,
        touched_at=bindparam("now", type_=_ORDERS.c.touched_at.type),
    )
    .returning(_ORDERS.c.polls)
)


def _claim(resuming: bool) -> Update:
    """place_order's record of the CA order it placed, over what the run read: the order still
    queued with the same issuer, and no CA order recorded (or, ``resuming``, the same one)."""
    columns = _ORDERS.c
    return (
        update(_ORDERS)
        .where(
            columns.id == bindparam("order_id"),
            columns.step == str(OrderStep.QUEUED),
            columns.issuer == bindparam("if_issuer"),
            columns.order_url == bindparam("recorded") if resuming else columns.order_url.is_(None),
        )
        # The limiter let the order through: it no longer waits on a bucket.
        .values(
            order_url=bindparam("v_order_url"),
            finalize_url=bindparam("v_finalize_url"),
            waiting_bucket=None,
            waiting_until=None,
            waiting_reason=None,
        )
    )


_CLAIMS = {resuming: _claim(resuming) for resuming in (False, True)}

# finalise's new key (sealed) and CSR, only where no run has stored one.
_STORE_REQUEST = (
    update(_ORDERS)
    .where(_ORDERS.c.id == bindparam("order_id"), _ORDERS.c.csr_pem.is_(None))
    .values(key_envelope=bindparam("v_key_envelope"), csr_pem=bindparam("v_csr_pem"))
)


def _reads(*columns: KeyedColumnElement[Any]) -> Select[Any]:
    return select(*columns).where(_ORDERS.c.id == bindparam("order_id"))


# What publish_challenges and poll_validation read of their order (a Core row, not an Order).
_PUBLISH_READS = _reads(_ORDERS.c.step, _ORDERS.c.authorizations, _ORDERS.c.issuer)
_POLL_READS = _reads(
    _ORDERS.c.step, _ORDERS.c.order_url, _ORDERS.c.authorizations, _ORDERS.c.issuer
)


def _read(session: Session, statement: Select[Any], order_id: int) -> Row[Any]:
    row = session.connection().execute(statement, {"order_id": order_id}).first()
    if row is None:
        raise OrderGone(order_id)
    return row


def _stop_waiting(order: Order) -> None:
    """The step no longer waits on the rate limiter (it proceeded, or waits on something else)."""
    order.waiting_bucket = order.waiting_until = order.waiting_reason = None


def _poll_delay(polls: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return float(min(max(retry_after, 0.5), MAX_COUNTDOWN))
    return float(min(0.5 * 2**polls, 30.0))


class StepDependencies(Protocol):
    """What the steps are handed: the process's :class:`pipeline.runtime.Runtime`, or a test's
    stand-in. Named here so that this module need not import the composition root."""

    @property
    def settings(self) -> Settings: ...

    def session_scope(self) -> AbstractContextManager[Session]: ...

    @property
    def acme(self) -> AcmeClient: ...

    def acme_for(self, issuer: str | None) -> AcmeClient: ...

    @property
    def limiter(self) -> RateLimiter: ...

    def limiter_for(self, issuer: str | None) -> RateLimiter: ...

    @property
    def publisher(self) -> Publisher: ...


class OrderSteps:
    """The five steps, and the ends of an attempt, over one runtime's dependencies.

    The ACME client, the limiter and the publisher are asked of the runtime only when a step
    needs them (a step that finds its order done talks to nobody).
    """

    def __init__(self, runtime: StepDependencies) -> None:
        self.runtime = runtime
        self.settings: Settings = runtime.settings
        self.sessions = runtime.session_scope

    @property
    def acme(self) -> AcmeClient:
        return self.runtime.acme

    @property
    def limiter(self) -> RateLimiter:
        return self.runtime.limiter

    @property
    def publisher(self) -> Publisher:
        return self.runtime.publisher

    def run(self, step: Step, order_id: int) -> None:
        """Run ``step`` for the order."""
        getattr(self, step.name)(order_id)

    def _count_poll(self, order_id: int) -> int:
        # A poll is a task run like any other: it tells the sweeper the order is alive. One
        # UPDATE ... RETURNING (SQLite 3.35+, PostgreSQL), not a load and a flush.
        with self.sessions() as session:
            polls = (
                session.connection()
                .execute(_COUNT_POLL, {"order_id": order_id, "now": utcnow()})
                .scalar()
            )
        if polls is None:
            raise OrderGone(order_id)
        return int(polls)

    # --- step 1 ---------------------------------------------------------------------------
    def place_order(self, order_id: int) -> None:
        with self.sessions() as session:
            order = _order(session, order_id, with_site=True)
            if order.step != OrderStep.QUEUED:
                return
            preferred = order.site.preferred_issuer
            if order.issuer is None or not self._known(order.issuer):
                # The first run (or the issuer left the settings before any CA order): the
                # site's preferred issuer, else the installation's first.
                order.issuer = self._candidates(preferred)[0]
                order.touched_at = utcnow()
            issuer = order.issuer
            names = list(order.names)
            profile = order.site.profile or self.settings.issuer(issuer).profile or order.profile
            # ARI's replaces only with the issuer that issued the certificate it names.
            replaces = self._replaces_for(session, order, issuer)
            exempt = order.kind == OrderKind.RENEW and replaces is not None and order.exempt
            recorded = order_url = order.order_url
        # Nothing to seal the new key to means no certificate: find out before asking the CA.
        self._edge_key()
        if recorded is None and self._skip_marked_down(order_id, issuer, preferred):
            return self.place_order(order_id)  # once: it now names an issuer not marked down
        with self._fallback_on_ca_trouble(order_id, issuer, preferred):
            client = self._client(issuer)
            body = self._ca_order_to_resume(client, recorded) if recorded else None
        if body is None:
            if self.settings.self_check:
                self._preflight(names)
            with self._fallback_on_ca_trouble(order_id, issuer, preferred):
                order_url, body = self._new_ca_order(client, names, profile, replaces, exempt)
            # Recorded before the authorizations are fetched: if fetching them fails (a network
            # blip, a crash), the re-run resumes this CA order instead of placing a second one,
            # which would count against the CA's order limits and, for an ARI renewal, be
            # refused as a second replacement of the same certificate. Only over what this run
            # read: a copy of the step that outlived its lock may have recorded its own order.
            with self.sessions() as session:
                params = {"order_id": order_id, "if_issuer": issuer, "v_order_url": order_url,
                          "v_finalize_url": body.finalize}  # fmt: skip
                if recorded is not None:
                    params["recorded"] = recorded
                claimed = session.connection().execute(_CLAIMS[recorded is not None], params)
                if claimed.rowcount != 1:
                    # Left pending at the CA, which expires it; named here for whoever counts.
                    log.warning("order %s: another run recorded its CA order first; %s unused",
                                order_id, order_url)  # fmt: skip
                    return
        authorizations: dict[str, Any] = {}
        with self._fallback_on_ca_trouble(order_id, issuer, preferred):
            for authz_url in body.authorizations:
                authz = client.get_authorization(authz_url)
                http01 = [c for c in authz.challenges if c.chall.typ == "http-01"]
                if not http01:
                    raise AttemptFailed(
                        f"{authz.identifier.value}: the CA offers no http-01 challenge"
                    )
                authorizations[authz_url] = {
                    "name": authz.identifier.value,
                    "token": http01[0].chall.encode("token"),
                    "challenge_url": http01[0].uri,
                    "status": authz.status.name,
                }
        with self.sessions() as session:
            # Not where another run moved on, or replaced the CA order this one fetched.
            _advance_from(
                session,
                order_id,
                OrderStep.QUEUED,
                OrderStep.PLACED,
                if_order_url=order_url,
                authorizations=authorizations,
            )
        return None

    # --- issuers and fallback -------------------------------------------------------------
    def _known(self, issuer: str) -> bool:
        return any(spec.name == issuer for spec in self.settings.issuer_list)

    def _candidates(self, preferred: str | None) -> list[str]:
        """Issuers in the order this site tries them: its own preference first, if known."""
        names = [spec.name for spec in self.settings.issuer_list]
        if preferred in names:
            names.remove(preferred)
            names.insert(0, preferred)
        elif preferred:
            log.warning("site prefers issuer %r, which the settings do not have", preferred)
        return names

    def _client_of(self, issuer: str | None) -> AcmeClient:
        """The client of the issuer an order was placed with (None: before issuers were
        recorded, the first)."""
        return self._client(issuer) if issuer is not None else self.runtime.acme

    def _client(self, issuer: str) -> AcmeClient:
        try:
            return self.runtime.acme_for(issuer)
        except KeyError:
            raise AttemptFailed(
                f"issuer {issuer} is no longer in CERTMAN_ISSUERS", error_type="issuerGone"
            ) from None

    def _issuer_limiter(self, issuer: str | None) -> RateLimiter:
        return self.runtime.limiter_for(issuer)

    def _replaces_for(self, session: Session, order: Order, issuer: str) -> str | None:
        if order.replaces is None:
            return None
        issued_by = session.scalar(
            select(Certificate.issuer).where(
                Certificate.site_id == order.site_id, Certificate.ari_id == order.replaces
            )
        )
        if (issued_by or self.settings.issuer_list[0].name) != issuer:
            return None
        return order.replaces

    def _next_issuer(self, preferred: str | None, current: str) -> str | None:
        """The first issuer after ``current`` in the site's order (wrapping round) that is not
        marked down; None when every other one is."""
        candidates = self._candidates(preferred)
        at = candidates.index(current) if current in candidates else -1
        for name in candidates[at + 1 :] + candidates[: max(at, 0)]:
            if name != current and self._issuer_limiter(name).issuer_down() is None:
                return name
        return None

    def _skip_marked_down(self, order_id: int, issuer: str, preferred: str | None) -> bool:
        """Move an order not yet placed off an issuer marked down (by an earlier order's
        fallback), without asking that issuer anything. True if the order moved."""
        if len(self.settings.issuer_list) < 2:
            return False
        down = self._issuer_limiter(issuer).issuer_down()
        if down is None:
            return False
        target = self._next_issuer(preferred, issuer)
        if target is None:
            return False  # every issuer is marked down: try this one anyway
        reason, left = down
        return self._fall_back(
            order_id, issuer, target, "marked-down",
            f"{issuer} skipped for {left:.0f} s more after: {reason}",
        )  # fmt: skip

    @contextmanager
    def _fallback_on_ca_trouble(
        self, order_id: int, issuer: str, preferred: str | None
    ) -> Iterator[None]:
        """Around requests to the CA while placing an order: trouble on the CA's side moves the
        order to the next issuer (and marks this one down for new orders); anything else, and
        trouble when there is nowhere to go, is raised as it is."""
        try:
            yield
        except IssuanceProblem as problem:
            if len(self.settings.issuer_list) < 2:
                raise
            cause = fallback_cause(problem, max_wait=self.settings.fallback_max_wait)
            if cause is None:
                raise
            mark_for = self.settings.fallback_recheck
            if cause is FallbackCause.RATE_LIMITED and isinstance(problem, RetryLater):
                mark_for = max(mark_for, problem.countdown)
            try:
                self._issuer_limiter(issuer).mark_issuer_down(
                    mark_for, f"{cause}: {problem.reason}"
                )
            except redis.RedisError as exc:
                log.warning("could not mark issuer %s down: %s", issuer, exc)
            target = self._next_issuer(preferred, issuer)
            if target is None:
                raise
            self._fall_back(order_id, issuer, target, str(cause), problem.reason)
            raise RetryLater(
                f"issuer {issuer} failed on its side ({cause}); order moved to {target}", 1
            ) from problem

    def _fall_back(self, order_id: int, issuer: str, target: str, cause: str, detail: str) -> bool:
        """Move a queued order from ``issuer`` to ``target``, recording why; forget any CA order
        placed with ``issuer`` (it expires there). False if another run moved it first."""
        reason = f"{cause}: {issuer} → {target}: {detail}"[:1000]
        with self.sessions() as session:
            moved = session.execute(
                update(Order)
                .where(Order.id == order_id, Order.step == OrderStep.QUEUED, Order.issuer == issuer)
                .values(
                    issuer=target,
                    fallback_reason=reason,
                    order_url=None,
                    finalize_url=None,
                    authorizations=None,
                    touched_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                return False
            order = _order(session, order_id)
            session.add(
                Attempt(site_id=order.site_id, order_id=order_id, step="fallback",
                        outcome="retry", error_type=None, detail=reason)
            )  # fmt: skip
        worker_metrics.fell_back(issuer, cause)
        log.warning("order %s: falling back from issuer %s to %s (%s)", order_id, issuer, target,
                    cause)  # fmt: skip
        return True

    def _preflight(self, names: list[str]) -> None:
        """Fetch a probe token from every name the way the CA will fetch the real one.

        Before the CA is asked for anything: a dealer who has not pointed DNS at the edges yet
        costs no order, no pending authorization (the CA allows an account only so many) and
        no failed validation, and holds no in-flight slot while waiting. The attempt ends and
        the site tries again on the usual backoff.
        """
        settings = self.settings
        token, expected = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        try:
            # Long enough for every name's fetches, each of which may take its full timeout.
            self.publisher.set_challenge(token, expected, PROBE_TTL * len(names))
        except redis.RedisError as exc:
            raise RetryLater(f"cannot store the self-check's probe in Redis: {exc}", 10) from exc
        try:
            problems = [
                problem
                for name in names
                if (problem := selfcheck.check(name, token, expected, port=settings.http01_port,
                                               resolver=settings.dns_resolver))
            ]  # fmt: skip
        finally:
            try:
                self.publisher.remove_challenge(token)
            except redis.RedisError as exc:  # it expires on its own
                log.warning("could not remove the self-check's probe: %s", exc)
        if any(problem.ours for problem in problems):
            # Our outage, not the dealer's DNS: wait for it to end rather than count a failure
            # against the site and push it onto the daily backoff.
            reasons = "; ".join(problem.reason for problem in problems if problem.ours)
            raise RetryLater(reasons, 30)
        if problems:
            # Every name at once: a dealer fixing DNS should not find the next broken alias
            # only on the next attempt, a backoff later.
            reasons = "; ".join(problem.reason for problem in problems)
            raise AttemptFailed(f"{reasons}; no order placed", error_type="selfCheck")

    def _new_ca_order(
        self,
        client: AcmeClient,
        names: list[str],
        profile: str | None,
        replaces: str | None,
        exempt: bool,
    ) -> tuple[str, messages.Order]:
        try:
            return self._request_order(client, names, profile, replaces, exempt=exempt)
        except AttemptFailed as exc:
            if replaces is None or not exc.already_replaced:
                raise
        # An earlier attempt's order (it failed, or was abandoned) already names the
        # certificate as the one it replaces, and the CA takes only one: ask without naming
        # it, rather than send the same refused request on every attempt until the certificate
        # expires. Without it the order is no longer exempt from the CA's limits.
        log.warning("renewal of %s: the CA says %s already has a replacement order; ordering "
                    "without naming it", names[0], replaces)  # fmt: skip
        # An exempt request spent nothing from our limiter; a counted one has spent already.
        return self._request_order(client, names, profile, None, exempt=False, reserve=exempt)

    def _request_order(
        self,
        client: AcmeClient,
        names: list[str],
        profile: str | None,
        replaces: str | None,
        *,
        exempt: bool,
        reserve: bool = True,
    ) -> tuple[str, messages.Order]:
        account = client.account_uri
        limiter = self._issuer_limiter(getattr(client, "issuer", None))
        if reserve:
            # pacing=False: the transport paces the new-order request itself.
            decision = limiter.reserve_new_order(account, names, exempt=exempt, pacing=False)
            if not decision.allowed:
                raise RateLimited(
                    f"waiting for rate limit {decision.bucket}",
                    decision.retry_after,
                    bucket=decision.bucket,
                )
        try:
            return client.new_order(names, profile=profile, replaces=replaces)
        except RateLimited as exc:
            # Block the matching bucket for every worker, not just this task.
            exc.bucket = limiter.block_for_problem(
                exc.reason, exc.countdown, account=account, names=names
            )
            raise

    def _ca_order_to_resume(self, client: AcmeClient, order_url: str) -> messages.Order | None:
        """The CA order an earlier run of this step placed, or None if it can no longer be
        used."""
        try:
            body, _ = client.get_order(order_url)
        except AttemptFailed as exc:
            if exc.error_type not in ("malformed", NOT_FOUND):
                raise
            # What Boulder (404, malformed) and Pebble (a bare 404) answer for an order they no
            # longer hold: after a restart, or once it expired and was cleaned up.
            log.info("CA order %s is unknown to the CA (%s); placing a new one", order_url, exc)
            return None
        if body.status not in (messages.STATUS_PENDING, messages.STATUS_READY):
            # Expired, or an authorization deactivated (RFC 8555 says "invalid"; Pebble says
            # "deactivated"): nothing of it can be finished, so start afresh.
            log.info("CA order %s is %s; placing a new one", order_url, body.status)
            return None
        return body

    # --- step 2 ---------------------------------------------------------------------------
    def publish_challenges(self, order_id: int) -> None:
        with self.sessions() as session:
            order = _read(session, _PUBLISH_READS, order_id)
            if order.step != OrderStep.PLACED:
                return
            pending = {
                url: authz
                for url, authz in (order.authorizations or {}).items()
                if authz["status"] != "valid"
            }
            issuer = order.issuer
        client = self._client_of(issuer)
        # Every edge must be able to answer before the CA asks: store and announce first.
        # (That DNS reaches the edges was checked before the order was placed: _preflight.)
        for authz in pending.values():
            key_auth = client.key_authorization(authz["token"])
            self.publisher.set_challenge(authz["token"], key_auth, CHALLENGE_TTL)
        for authz_url, authz in pending.items():
            self._answer(client, authz_url, authz["challenge_url"])
        with self.sessions() as session:
            _advance_from(session, order_id, OrderStep.PLACED, OrderStep.CHALLENGED)

    @staticmethod
    def _answer(client: AcmeClient, authz_url: str, challenge_url: str) -> None:
        try:
            client.answer_challenge(challenge_url)
        except AttemptFailed:
            # A re-run after a crash between answering and recording it finds the challenge
            # answered already, and the CA refuses a second answer (Pebble: "malformed ... only
            # status pending"). The first answer stands: poll_validation reads its outcome.
            challenge = next(
                (
                    c
                    for c in client.get_authorization(authz_url).challenges
                    if c.uri == challenge_url
                ),
                None,
            )
            if challenge is None or challenge.status.name == "pending":
                raise

    # --- step 3 ---------------------------------------------------------------------------
    def poll_validation(self, order_id: int) -> None:
        with self.sessions() as session:
            order = _read(session, _POLL_READS, order_id)
            if order.step != OrderStep.CHALLENGED:
                return
            order_url = order.order_url
            assert order_url
            authorizations = dict(order.authorizations or {})
            issuer = order.issuer
        client = self._client_of(issuer)
        body, retry_after = client.get_order(order_url)
        status = body.status.name
        if status in ("ready", "processing", "valid"):
            with self.sessions() as session:
                _advance_from(session, order_id, OrderStep.CHALLENGED, OrderStep.READY)
            return
        if status == "invalid":
            raise self._validation_failure(client, authorizations, body)
        raise PollAgain(
            "waiting for the CA to validate", _poll_delay(self._count_poll(order_id), retry_after)
        )

    def _validation_failure(
        self, client: AcmeClient, authorizations: dict[str, Any], body: Any
    ) -> AttemptFailed:
        account = client.account_uri
        for authz_url, info in authorizations.items():
            authz = client.get_authorization(authz_url)
            if authz.status.name != "invalid":
                continue
            limiter = self._issuer_limiter(getattr(client, "issuer", None))
            limiter.record_authorization_failure(account, info["name"])
            for challenge in authz.challenges:
                if challenge.error is not None:
                    code = challenge.error.code or "validation failed"
                    detail = f"{info['name']}: {code}: {challenge.error.detail}"
                    # What a validation error means is the table's (pipeline.errors): the
                    # CA's "unauthorized" here is a token it fetched and found wrong, which
                    # the customer can fix, so the site backs off rather than blocks.
                    return validation_problem(detail, code)
        error = body.error
        if error is not None:
            return AttemptFailed(f"{error.code}: {error.detail}", error_type=error.code)
        return AttemptFailed("the CA marked the order invalid without a reason")

    # --- step 4 ---------------------------------------------------------------------------
    def finalise(self, order_id: int) -> None:
        settings = self.settings
        with self.sessions() as session:
            order = _order(session, order_id, with_site=True)
            if order.step != OrderStep.READY:
                return
            csr_pem = order.csr_pem
            first_try = csr_pem is None
            if first_try:
                # The key is sealed before anything leaves this step; a re-run posts the same
                # CSR.
                request = new_sealed_request(
                    list(order.names),
                    KeyType(order.site.key_type or settings.key_type),
                    self._edge_key(),
                    domain=order.site.domain,
                )
                # Only where no run has stored one: a copy of this step that outlived its lock
                # may have, and the CSR posted must be the one whose key is kept.
                stored = session.connection().execute(
                    _STORE_REQUEST,
                    {
                        "order_id": order_id,
                        "v_key_envelope": request.key_envelope,
                        "v_csr_pem": request.csr_pem,
                    },
                )
                first_try = stored.rowcount == 1
                if first_try:
                    csr_pem = request.csr_pem  # stored as it is: no need to read it back
                else:
                    session.refresh(order, ["csr_pem"])  # the other run's, the one to post
                    csr_pem = order.csr_pem
            order_url, finalize_url = order.order_url, order.finalize_url
            issuer = order.issuer
        assert order_url and finalize_url and csr_pem
        client = self._client_of(issuer)
        # poll_validation just saw the order ready: on the first try, finalise without asking
        # again (an order that is not ready after all answers orderNotReady, which is retried).
        body: Any = None
        retry_after: float | None = None
        if not first_try:
            body, retry_after = client.get_order(order_url)
        if body is None or body.status.name == "ready":
            from cryptography import x509
            from cryptography.hazmat.primitives import serialization

            csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
            body = client.finalize(finalize_url, csr.public_bytes(serialization.Encoding.DER))
        status = body.status.name
        if status == "invalid":
            error = body.error
            raise AttemptFailed(f"finalisation refused: {error.detail if error else 'no reason'}")
        if status != "valid" or not body.certificate:
            raise PollAgain(
                "waiting for the CA to issue", _poll_delay(self._count_poll(order_id), retry_after)
            )
        chain = client.download(body.certificate)
        with self.sessions() as session:
            _advance_from(
                session,
                order_id,
                OrderStep.READY,
                OrderStep.ISSUED,
                certificate_url=body.certificate,
                chain_pem=chain,
            )

    def _edge_key(self) -> PublicKey:
        path = self.settings.edge_public_key
        if path is None:
            raise AttemptFailed("CERTMAN_EDGE_PUBLIC_KEY is not set: nothing to seal keys to")
        try:
            return PublicKey.load(path)
        except KeyFileError as exc:
            raise AttemptFailed(f"CERTMAN_EDGE_PUBLIC_KEY: {exc}") from None

    # --- step 5 ---------------------------------------------------------------------------
    def encrypt_and_store(self, order_id: int) -> None:
        settings = self.settings
        with self.sessions() as session:
            order = _order(session, order_id, with_site=True)
            if order.step not in (OrderStep.ISSUED, OrderStep.DONE):
                return
            site = order.site
            stored: Certificate | None = None  # the certificate this run stores
            if order.step == OrderStep.ISSUED:
                assert order.chain_pem and order.csr_pem and order.key_envelope
                try:
                    info = inspect_chain(order.chain_pem, order.csr_pem)
                except ChainMismatch as exc:
                    raise AttemptFailed(str(exc)) from None
                renew_at = renewal.lifetime_renew_at(
                    site.domain,
                    info.not_before,
                    info.not_after,
                    fraction=settings.renew_fraction,
                    spread=settings.renew_spread,
                )
                session.execute(
                    update(Certificate)
                    .where(Certificate.site_id == site.id, Certificate.current)
                    .values(current=False)
                )
                # The envelope says which key it is sealed to; the setting may have moved since.
                sealed_to = envelope.read_header(
                    envelope.from_text(order.key_envelope, domain=site.domain), domain=site.domain
                )
                stored = Certificate(
                    site_id=site.id,
                    order_id=order.id,
                    chain_pem=order.chain_pem,
                    key_envelope=order.key_envelope,
                    scheme=str(sealed_to.scheme),
                    key_id=sealed_to.key_id,
                    serial=info.serial,
                    ari_id=info.ari_id,
                    issuer=order.issuer or settings.issuer_list[0].name,
                    not_before=info.not_before,
                    not_after=info.not_after,
                    renew_at=renew_at,
                    current=True,
                )
                session.add(stored)
                site_states.set_state(site, SiteState.ACTIVE)
                site.last_error = None
                site.consecutive_failures = 0
                site.next_attempt_at = None
                _advance(order, OrderStep.DONE)
                order.finished_at = utcnow()
                # The order's copy of the envelope is no longer needed: the certificate has it.
                order.key_envelope = None
                session.add(Attempt(site_id=site.id, order_id=order.id, step="store", outcome="ok"))
                worker_metrics.issued(
                    order.issuer or settings.issuer_list[0].name,
                    fallback=order.fallback_reason is not None,
                )
            session.flush()
            # This run's certificate is the site's current one: not read back from the store.
            record = site_record(session, site, current=stored)
            tokens = [a["token"] for a in (order.authorizations or {}).values()]
        # Published after the commit, and again on a re-run: the snapshot follows the store.
        try:
            self.publisher.publish(record)
            for token in tokens:
                self.publisher.remove_challenge(token)
        except redis.RedisError as exc:
            # Stored but not on the edges yet: the retry, at DONE, publishes again (and if even
            # the retry cannot be sent, beat's snapshot reconcile finds the difference).
            raise RetryLater(f"stored, but not yet published to the edges: {exc}", 5) from exc

    # --- the ends of an attempt -----------------------------------------------------------
    def fail_order(self, order_id: int, step: str, problem: AttemptFailed) -> None:
        """End this attempt: record why, and schedule the next one (or block the site)."""
        now = utcnow()
        with self.sessions() as session:
            order = session.get(Order, order_id)
            if order is None or OrderStep(order.step).finished:
                return  # already ended: a second report of the same failure changes nothing
            site = order.site
            order.step = OrderStep.FAILED
            order.error = problem.reason
            _stop_waiting(order)
            order.finished_at = order.step_changed_at = now
            tokens = [a["token"] for a in (order.authorizations or {}).values()]
            site.last_error = problem.reason
            site.consecutive_failures += 1
            has_cert = session.scalar(
                select(Certificate.id).where(Certificate.site_id == site.id, Certificate.current)
            )
            if isinstance(problem, NameRefused):
                site_states.set_state(site, SiteState.BLOCKED, error=problem.reason)
                site.next_attempt_at = None
                site.last_error = f"{problem.reason} (blocked until someone acts)"
                outcome = "blocked"
            else:
                retry_at = now + renewal.backoff(site.consecutive_failures)
                if has_cert:
                    # A renewal failed: keep serving the old certificate, try again later.
                    site_states.set_state(
                        site, SiteState.ACTIVE, error=problem.reason, retry_at=retry_at
                    )
                    session.execute(
                        update(Certificate)
                        .where(Certificate.site_id == site.id, Certificate.current)
                        .values(renew_at=retry_at)
                    )
                else:
                    site_states.set_state(
                        site, SiteState.RETRYING, error=problem.reason, retry_at=retry_at
                    )
                    site.next_attempt_at = retry_at
                outcome = "failed"
            session.add(
                Attempt(
                    site_id=site.id,
                    order_id=order.id,
                    step=step,
                    outcome=outcome,
                    error_type=problem.error_type,
                    detail=problem.reason,
                )
            )
            domain = site.domain
        log.warning("order %s for %s failed at %s: %s", order_id, domain, step, problem.reason)
        for token in tokens:
            self.publisher.remove_challenge(token)

    def note_retry(self, order_id: int, step: str, problem: RetryLater) -> None:
        """Keep a trace of transient trouble without ending the attempt.

        A wait on the rate limiter (ours, or a bucket the CA's ``rateLimited`` blocked) is
        recorded on the order, bucket and end, for ``certman domains show``; any other trouble
        clears it.
        """
        with self.sessions() as session:
            order = session.get(Order, order_id)
            if order is None:
                return
            now = order.touched_at = utcnow()
            if isinstance(problem, RateLimited):
                order.waiting_bucket = (problem.bucket or "(the CA's, unnamed)")[:300]
                order.waiting_until = now + timedelta(seconds=max(problem.countdown, 0.0))
                order.waiting_reason = (
                    f"the CA refused: {problem.reason}" if problem.by_ca else problem.reason
                )
            else:
                _stop_waiting(order)
            # Our own limiter's waits are routine pacing: only the CA's refusals are recorded.
            if not isinstance(problem, RateLimited) or problem.by_ca:
                session.add(
                    Attempt(
                        site_id=order.site_id,
                        order_id=order.id,
                        step=step,
                        outcome="retry",
                        detail=problem.reason,
                    )
                )
