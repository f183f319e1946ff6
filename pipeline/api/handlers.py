"""The API's request handlers: authentication, scopes, rate limit and body limits in
``prepare``, problem documents for every failure, the blocking work in the thread pool."""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial, wraps
from typing import Any, TypeVar

import redis
import sqlalchemy.exc
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from tornado.ioloop import IOLoop
from tornado.web import HTTPError, RequestHandler, stream_request_body

from pipeline.acme.profiles import UnknownProfile
from pipeline.api import problems
from pipeline.api.clients import Network, client_address
from pipeline.api.limits import FailureLimiter, TokenLimiter
from pipeline.api.metrics import ApiMetrics
from pipeline.api.problems import Problem
from pipeline.api.sites import Answer, SiteService
from pipeline.api.tokens import Authenticator, Caller, TokenError
from pipeline.crypto.envelope import EnvelopeError
from pipeline.crypto.keys import KeyFileError
from pipeline.errors import IssuanceProblem
from pipeline.fleet.revocation import RevocationFailed
from pipeline.fleet.sites import (
    InvalidSiteRequest,
    SiteError,
    SiteNotFound,
    UpstreamRefused,
)
from pipeline.names import InvalidName

log = logging.getLogger("certman.api")
T = TypeVar("T")

READ, WRITE, OPERATE = "sites:read", "sites:write", "sites:operate"
STATES = ("pending", "issuing", "active", "renewing", "retrying", "blocked")
MAX_LIMIT = 1000


@dataclass
class ApiContext:
    """What every handler is given (``initialize``): made once per process at start."""

    service: SiteService
    authenticator: Authenticator
    limiter: TokenLimiter | None
    metrics: ApiMetrics
    executor: Executor
    openapi: bytes
    health: Callable[[], None]
    max_body: int
    max_batch: int
    failures: FailureLimiter | None = None
    trusted_proxies: tuple[Network, ...] = ()


def as_problem(exc: BaseException) -> Problem | None:
    """The problem a service's exception is for the caller; None for a bug (a 500)."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, InvalidName):
        return Problem(problems.BAD_NAME, str(exc))
    if isinstance(exc, SiteNotFound):
        return Problem(problems.NOT_FOUND, str(exc))
    if isinstance(exc, UpstreamRefused):
        return Problem(problems.REFUSED_UPSTREAM, str(exc))
    if isinstance(exc, InvalidSiteRequest | UnknownProfile | TokenError):
        return Problem(problems.INVALID_REQUEST, str(exc))
    if isinstance(exc, RevocationFailed):
        return Problem(problems.CA_REFUSED, str(exc))
    if isinstance(exc, IssuanceProblem):
        return Problem(problems.CA_REFUSED, exc.reason)
    if isinstance(exc, SiteError | sqlalchemy.exc.IntegrityError):
        # A name another site holds, a change while an order is in flight, a re-add that
        # differs: what is stored conflicts with the request.
        detail = str(exc) if isinstance(exc, SiteError) else "a concurrent change; try again"
        return Problem(problems.CONFLICT, detail)
    if isinstance(exc, sqlalchemy.exc.OperationalError):
        return Problem(problems.UNAVAILABLE, "the store is unavailable")
    if isinstance(exc, redis.exceptions.RedisError):
        return Problem(problems.UNAVAILABLE, "Redis is unavailable")
    if isinstance(exc, EnvelopeError):
        # A sealed secret (the ACME account key) this host's pipeline key cannot open: the
        # installation's fault (another key than the workers'), not the request's.
        return Problem(problems.UNAVAILABLE, "a sealed key cannot be opened with this host's "
                       "pipeline key (CERTMAN_PIPELINE_KEY must be the workers' key)")  # fmt: skip
    if isinstance(exc, KeyFileError):
        return Problem(problems.UNAVAILABLE, str(exc))
    if isinstance(exc, OSError):
        return Problem(problems.UNAVAILABLE, f"a backing service is unreachable ({exc})")
    return None


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except Exception as exc:
        problem = as_problem(exc)
        if problem is None:
            raise
        raise problem from None


@stream_request_body
class ApiHandler(RequestHandler):
    """Base of every handler. ``scopes``: the scope each method needs (None: public).

    The body is streamed: ``prepare`` runs on the headers alone, so a body over the limit is
    refused by its Content-Length with a problem document before any of it is read (and the
    connection closed), and one sent in chunks is cut off at the limit. Any other refusal
    (unauthorised, forbidden, rate limited) is found in ``prepare`` and answered when the body
    is in, by every HTTP method of every subclass (wrapped here): an answer sent while the
    request is still being read would make Tornado close a keep-alive connection.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("get", "head", "post", "put", "delete", "patch", "options"):
            method = cls.__dict__.get(name)
            if method is not None:
                setattr(cls, name, _admitted(method))

    route = "unknown"
    scopes: dict[str, str | None] = {}
    # The query parameters the resource takes: any other is refused (a typo such as
    # ?expiring_in= must not quietly list every site).
    query: frozenset[str] = frozenset()

    def initialize(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.caller: Caller | None = None
        self._started = time.monotonic()
        self._body = bytearray()
        self._refusal: Problem | None = None

    async def blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking service call (the store, Redis, the CA) off the event loop."""
        return await IOLoop.current().run_in_executor(
            self.ctx.executor, _call, partial(fn, *args, **kwargs)
        )

    async def prepare(self) -> None:
        self.set_header("Cache-Control", "no-store")
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.ctx.max_body:
            self.ctx.metrics.refused.labels("too_large").inc()
            # Answered before the body is read: the connection cannot be used again.
            raise Problem(problems.TOO_LARGE, f"the body is over {self.ctx.max_body} bytes",
                          headers={"Connection": "close"})  # fmt: skip
        connection = self.request.connection
        if connection is not None and hasattr(connection, "set_max_body_size"):
            connection.set_max_body_size(self.ctx.max_body)
        try:
            await self._admit()
        except Problem as refusal:
            self._refusal = refusal

    async def _admit(self) -> None:
        """Authenticate, rate-limit and authorise the request (a Problem if refused)."""
        method = self.request.method or "GET"
        if method not in self.scopes:
            return  # Tornado answers 405 for a method the handler lacks
        need = self.scopes[method]
        if need is None:
            return
        header = self.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="certman"'}
        if scheme.lower() != "bearer" or not token.strip():
            self.ctx.metrics.refused.labels("unauthorised").inc()
            raise Problem(problems.UNAUTHORISED, "send Authorization: Bearer <token>",
                          headers=challenge)  # fmt: skip
        failures = self.ctx.failures
        address = client_address(
            self.request.remote_ip,
            self.request.headers.get_list("X-Forwarded-For"),
            self.ctx.trusted_proxies,
        )
        if failures is not None:
            decision = await self.blocking(failures.check, address)
            if not decision.allowed:
                self.ctx.metrics.refused.labels("auth_failures").inc()
                wait = max(1, math.ceil(decision.retry_after))
                raise Problem(problems.RATE_LIMITED,
                              f"too many failed authentications; try again in {wait} s",
                              headers={"Retry-After": str(wait)})  # fmt: skip
        caller = await self.blocking(self.ctx.authenticator.caller, token.strip())
        if caller is None:
            self.ctx.metrics.refused.labels("unauthorised").inc()
            if failures is not None:
                await self.blocking(failures.failed, address)
            raise Problem(problems.UNAUTHORISED, "unknown or revoked token", headers=challenge)
        self.caller = caller
        if self.ctx.limiter is not None:
            decision = await self.blocking(self.ctx.limiter.take, caller.token_id)
            if not decision.allowed:
                self.ctx.metrics.refused.labels("rate_limited").inc()
                wait = max(1, math.ceil(decision.retry_after))
                raise Problem(problems.RATE_LIMITED, f"try again in {wait} s",
                              headers={"Retry-After": str(wait)})  # fmt: skip
        if need not in caller.scopes:
            self.ctx.metrics.refused.labels("forbidden").inc()
            raise Problem(problems.FORBIDDEN, f"this needs a token with the scope {need}")
        unknown = sorted(set(self.request.query_arguments) - self.query)
        if unknown:
            takes = ", ".join(sorted(self.query)) or "none"
            detail = f"unknown query parameter {unknown[0]!r} (this takes: {takes})"
            raise Problem(problems.INVALID_REQUEST, detail)

    def data_received(self, chunk: bytes) -> None:
        # A refused request's body is read off the connection (to answer on it) but not kept.
        if self._refusal is None:
            self._body += chunk

    def compute_etag(self) -> str | None:
        # Only a site has an ETag (what a PUT sets, pipeline.api.sites.etag_of), never one
        # Tornado derives from a body.
        return None

    @property
    def actor(self) -> str:
        assert self.caller is not None
        return self.caller.actor

    def json_body(self) -> Any:
        kind = self.request.headers.get("Content-Type", "application/json")
        media = kind.split(";", 1)[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and
                                                media.endswith("+json")):  # fmt: skip
            raise Problem(problems.UNSUPPORTED_MEDIA, f"Content-Type {media!r}")
        if not self._body:
            return {}
        try:
            return json.loads(self._body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise Problem(problems.INVALID_REQUEST, f"the body is not JSON ({exc})") from None
        except RecursionError:
            # The stdlib parser recurses once per level and stops at the interpreter's limit
            # (about 1000): a deeper body is a bad request, not a crash.
            raise Problem(problems.INVALID_REQUEST, "the body nests too deeply") from None

    def json_object(self) -> dict[str, Any]:
        body = self.json_body()
        if not isinstance(body, dict):
            raise Problem(problems.INVALID_REQUEST, "the body must be a JSON object")
        return body

    def send_json(self, status: int, body: Any, etag: str | None = None) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        if etag is not None:
            self.set_header("ETag", etag)
        self.finish(json.dumps(body, default=str))

    def send_answer(self, answer: Answer) -> None:
        self.send_json(answer.status, answer.body, answer.etag)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, Problem):
            problem = exc
        elif isinstance(exc, HTTPError):
            kind = problems.kind_for_status(status_code)
            problem = Problem(kind, exc.log_message if exc.log_message and status_code < 500
                              else None)  # fmt: skip
            if status_code == 405:
                allowed = [m for m in self.scopes if m != "OPTIONS"]
                problem.headers["Allow"] = ", ".join(allowed)
        else:
            # A bug: logged with its traceback here (log_exception), never sent.
            problem = Problem(problems.INTERNAL, None)
        self.set_status(problem.kind.status)
        self.set_header("Content-Type", problems.CONTENT_TYPE)
        self.set_header("Cache-Control", "no-store")
        for name, value in problem.headers.items():
            self.set_header(name, value)
        self.finish(json.dumps(problem.document(self.request.path)))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, HTTPError):
            return  # an answer, not a fault: the access log line has it
        log.error("api: %s %s failed", self.request.method, self.route, exc_info=(typ, value, tb))

    def on_finish(self) -> None:
        # A label from the request only if it is one of the few Tornado serves: any other
        # method (a client may send any token) would make a new time series each.
        method = self.request.method or "?"
        if method not in self.SUPPORTED_METHODS:
            method = "OTHER"
        self.ctx.metrics.observe(
            self.route, method, self.get_status(), time.monotonic() - self._started
        )


def _admitted(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` run only for a request ``prepare`` admitted; a refused one gets its problem."""

    @wraps(method)
    async def answer(self: ApiHandler, *args: Any) -> None:
        if self._refusal is not None:
            raise self._refusal
        result = method(self, *args)
        if inspect.isawaitable(result):
            await result

    return answer


def access_log(handler: RequestHandler) -> None:
    """One line per request: method, path, status, time, the token's name. Never a header
    (the Authorization header holds the token), never the query string."""
    request = handler.request
    caller = getattr(handler, "caller", None)
    log.info(
        "%s %s %d %.1fms %s",
        request.method,
        request.path,
        handler.get_status(),
        1000.0 * request.request_time(),
        caller.actor if caller is not None else "-",
    )


class NotFound(ApiHandler):
    route = "unknown"

    async def prepare(self) -> None:
        # Answered by the method, once the request is read (see ApiHandler).
        self._refusal = Problem(problems.NO_ROUTE, f"no resource at {self.request.path}")

    def _unreachable(self, *args: str) -> None:
        raise AssertionError("a refused request reached its method")

    get = head = post = put = delete = patch = options = _unreachable


class Health(ApiHandler):
    route = "healthz"
    scopes = {"GET": None}

    async def get(self) -> None:
        await self.blocking(self.ctx.health)
        self.send_json(200, {"status": "ok"})


class Metrics(ApiHandler):
    route = "metrics"
    scopes = {"GET": None}

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self.ctx.metrics.registry))


class OpenApi(ApiHandler):
    route = "openapi"
    scopes = {"GET": None}

    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "public, max-age=300")
        self.finish(self.ctx.openapi)


class Status(ApiHandler):
    route = "status"
    scopes = {"GET": READ}

    async def get(self) -> None:
        self.send_json(200, await self.blocking(self.ctx.service.status))


class Sites(ApiHandler):
    route = "sites"
    scopes = {"GET": READ}
    query = frozenset({"state", "expiring_within", "limit", "cursor"})

    async def get(self) -> None:
        state = self.get_query_argument("state", None)
        if state is not None and state not in STATES:
            raise Problem(problems.INVALID_REQUEST, f"state: one of {', '.join(STATES)}")
        limit = _int_arg(self, "limit", 100, 1, MAX_LIMIT)
        within = _int_arg(self, "expiring_within", None, 1, 10 * 365 * 86400)
        cursor = self.get_query_argument("cursor", None)
        page = await self.blocking(
            self.ctx.service.listing,
            state=state, expiring_within=within, limit=limit, cursor=cursor,
        )  # fmt: skip
        self.send_json(200, page)


def _int_arg(handler: RequestHandler, name: str, default: int | None, low: int, high: int) -> Any:
    raw = handler.get_query_argument(name, None)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise Problem(problems.INVALID_REQUEST, f"{name}: a whole number from {low} to {high}")
    return value


class Site(ApiHandler):
    route = "site"
    scopes = {"GET": READ, "PUT": WRITE, "DELETE": WRITE}

    async def get(self, domain: str) -> None:
        self.send_answer(await self.blocking(self.ctx.service.show, domain))

    async def put(self, domain: str) -> None:
        body = self.json_object()
        answer = await self.blocking(
            self.ctx.service.put, domain, body, actor=self.actor,
            if_match=self.request.headers.get("If-Match"),
            if_none_match=self.request.headers.get("If-None-Match"),
        )  # fmt: skip
        self.send_answer(answer)

    async def delete(self, domain: str) -> None:
        answer = await self.blocking(
            self.ctx.service.delete, domain, actor=self.actor,
            if_match=self.request.headers.get("If-Match"),
        )  # fmt: skip
        self.send_answer(answer)


class Renew(ApiHandler):
    route = "renew"
    scopes = {"POST": OPERATE}

    async def post(self, domain: str) -> None:
        self.send_answer(await self.blocking(self.ctx.service.renew, domain, actor=self.actor))


class Revoke(ApiHandler):
    route = "revoke"
    scopes = {"POST": OPERATE}

    async def post(self, domain: str) -> None:
        body = self.json_object()
        unknown = sorted(set(body) - {"reason"})
        if unknown:
            raise Problem(problems.INVALID_REQUEST, f"unknown field {unknown[0]!r}: only reason")
        reason = body.get("reason", "unspecified")
        if not isinstance(reason, str):
            raise Problem(problems.INVALID_REQUEST, "reason: a string")
        answer = await self.blocking(self.ctx.service.revoke, domain, reason, actor=self.actor)
        self.send_answer(answer)


class Batch(ApiHandler):
    route = "batch"
    scopes = {"POST": WRITE}

    async def post(self) -> None:
        body = self.json_object()
        unknown = sorted(set(body) - {"sites"})
        if unknown:
            raise Problem(problems.INVALID_REQUEST, f"unknown field {unknown[0]!r}: only sites")
        items = body.get("sites")
        if not isinstance(items, list):
            raise Problem(problems.INVALID_REQUEST, "sites: a list of site objects")
        if len(items) > self.ctx.max_batch:
            most = self.ctx.max_batch
            raise Problem(problems.TOO_MANY_SITES, f"{len(items)} sites; at most {most} a request")
        self.send_json(200, await self.blocking(self.ctx.service.batch, items, actor=self.actor))


def health_check(service: SiteService) -> Callable[[], None]:
    """The store answers a query and Redis a PING: what the API needs to do anything."""

    def check() -> None:
        with service.runtime.session_scope() as session:
            session.execute(text("SELECT 1"))
        service.runtime.redis.ping()

    return check
