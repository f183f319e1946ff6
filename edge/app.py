"""Composition root: builds one edge process's services and its three Tornado servers.

``Edge`` is what the CLI runs after (maybe) forking, and what tests run in-process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from tornado.httpserver import HTTPServer
from tornado.log import access_log

from edge import handshakes
from edge.challenges import ChallengeHandler, ChallengeStore
from edge.connections import (
    BudgetedAcceptor,
    ConnectionBudget,
    ConnectionLimits,
    accept_error_log,
)
from edge.exchange import Lifecycle, Proxy, ProxySettings
from edge.forwarding import TrustedProxies
from edge.https import SiteServer
from edge.loops import default_pseudonym
from edge.metrics import EdgeMetrics
from edge.mirror import Mirror
from edge.pool import UpstreamPool
from edge.proxy import SiteHandler
from edge.proxy_protocol import ProxyProtocolAcceptor
from edge.ratelog import RateLimitedLog
from edge.reach import SelfReach
from edge.shares import ShareLimits, Shares
from edge.sni import ContextCache, SiteContexts, SiteUnavailable, SniSelector
from edge.state import SiteIndex, StatementUnavailable
from edge.sync import Syncer, aclose
from edge.verifier import Verifier
from pipeline.crypto.keys import Keyring
from pipeline.crypto.signing import TrustedSigners
from pipeline.distribution.layout import SiteRecord
from pipeline.outbound import OutboundPolicy
from pipeline.redis_connect import RedisTarget, async_client, sync_client
from pipeline.redis_tls import RedisTls

__all__ = ["Edge", "EdgeConfig", "make_metrics_app", "make_site_app"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeConfig:
    redis_url: str
    prefix: str = "certman"
    cache_size: int = 10_000
    warm: bool = False
    https_public_port: int = 443
    reconcile_interval: float = 5.0
    connect_timeout: float = 5.0
    request_timeout: float = 300.0
    idle_timeout: float = 60.0
    shutdown_grace: float = 30.0
    max_upstream_connections: int = 1000
    # Fair shares of max_upstream_connections (edge.shares): per site, per client address, and
    # a bounded queue (with its longest wait) for when only the total is full.
    upstream_per_site: int = 100
    upstream_per_client: int = 32
    upstream_queue: int = 256
    upstream_queue_timeout: float = 2.0
    # How long one request may hold a slot without progress: silence within its body, and the
    # wait for the upstream's response header block.
    body_idle_timeout: float = 10.0
    min_body_rate: int = 500  # bytes a second, once body_idle_timeout is over; 0: off
    upstream_response_timeout: float = 60.0
    # ... and the client's: the longest wait for it to take one chunk of the response.
    send_timeout: float = 60.0
    # Client connections of one process (edge.connections): total (0: half the open-file
    # limit), per client address, and the time to a connection's first request byte.
    max_connections: int = 0
    max_connections_per_address: int = 128
    first_byte_timeout: float = 10.0
    # Loopback upstreams (refused unless allowed: a loop back into the edge, edge.reach), and
    # this edge's name in Via (edge.loops; None: derived from the host name).
    allow_loopback_upstream: bool = False
    via_pseudonym: str | None = None
    # Idle keep-alive connections kept per upstream (0: a new connection per request), and how
    # long one may stay idle: under every common server's keep-alive timeout (Node's is 5 s).
    upstream_keepalive: int = 32
    upstream_idle_timeout: float = 2.0
    # Mozilla's server profile for the listening context (edge.tls.PROFILES); the CLI builds
    # that context before forking, from this.
    tls_profile: str = "intermediate"
    # The local sealed mirror of this process (edge.mirror); None keeps it in memory, so
    # nothing survives a restart.
    mirror_path: Path | None = None
    # Until its mirror has been filled once, an edge's SNI callback fetches a missing blob from
    # Redis, blocking the event loop: a short timeout, so that a stalled Redis costs one
    # handshake, not every connection the process holds. Never used once the mirror is full.
    handshake_redis_timeout: float = 0.5
    # Peers (an HTTP load balancer) whose forwarding headers are kept: addresses or networks.
    trusted_proxies: tuple[str, ...] = ()
    # Every connection on both site ports starts with a PROXY protocol header (v1 or v2) from
    # an L4 load balancer, carrying the client's address.
    proxy_protocol: bool = False
    # A header block above this gets 431; Tornado itself closes a connection at twice it.
    max_header_size: int = 32 * 1024
    max_body_size: int = 100 * 1024 * 1024
    # /healthz answers 503 once the sync with Redis has been down this long (0: never, the
    # default: an edge serving from its mirror is healthy, and a Redis outage would otherwise
    # take every edge out of the load balancer at once).
    sync_down_limit: float = 0.0
    outbound: OutboundPolicy = OutboundPolicy()
    # How a rediss:// server is verified (the system's store by default): never unverified.
    redis_tls: RedisTls = RedisTls()
    # Where Redis is when it is more than a URL (Sentinel); None: redis_url with redis_tls.
    redis_target: RedisTarget | None = None
    # The public halves of the pipeline's signing keys: only what they signed is served.
    signers: TrustedSigners = field(default_factory=lambda: TrustedSigners({}))


def make_site_app(
    proxy: Proxy, scheme: str, challenges: ChallengeStore | None
) -> tornado.web.Application:
    routes: list[Any] = []
    if challenges is not None:
        routes.append(
            (r"/\.well-known/acme-challenge/([^/]+)", ChallengeHandler, {"challenges": challenges})
        )
    routes.append((r".*", SiteHandler, {"proxy": proxy, "scheme": scheme}))
    return tornado.web.Application(
        routes, log_function=RequestLog(proxy.settings.metrics.request_counts(scheme))
    )


class RequestLog:
    """The site ports' ``log_function``, which Tornado calls once per answered request of any
    handler (the proxy, challenges, its own errors): counts it by status class, then logs it."""

    __slots__ = ("_counts",)

    def __init__(self, counts: list[int]) -> None:
        # certman_edge_requests_total's plain counts (edge.metrics.RequestMetrics), indexed by
        # status // 100, 0 for anything out of range: the same numbers the proxy core adds to.
        self._counts = counts

    def __call__(self, handler: tornado.web.RequestHandler) -> None:
        status = handler.get_status()
        klass = status // 100
        self._counts[klass if 0 < klass < 6 else 0] += 1
        log_request(handler, status)


def log_request(handler: tornado.web.RequestHandler, status: int | None = None) -> None:
    """Tornado's access log line, but a 4xx (the site's or its client's answer, passed through)
    is INFO like any other answer rather than an edge WARNING; a 5xx stays an ERROR. So
    ``--log-level WARNING`` really turns per-request logging off."""
    if status is None:
        status = handler.get_status()
    _access_line(handler, status, logging.ERROR if status >= 500 else logging.INFO)


def _access_line(handler: tornado.web.RequestHandler, status: int, level: int) -> None:
    if access_log.isEnabledFor(level):
        req = handler.request
        access_log.log(
            level,
            "%d %s %s (%s) %.2fms",
            status,
            req.method,
            req.uri,
            req.remote_ip,
            1000.0 * req.request_time(),
        )


class MetricsHandler(tornado.web.RequestHandler):
    def initialize(self, metrics: EdgeMetrics) -> None:
        self._metrics = metrics

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(generate_latest(self._metrics.registry))


@dataclass(frozen=True)
class Health:
    """What /healthz says, for a load balancer.

    200 while the edge serves: in sync with Redis, or from what it holds (its mirror) while
    Redis is out of reach, said in the body ("serving, snapshot stale since T") and in the
    ``X-Certman-Snapshot-Synced`` header (epoch seconds). 503 while it is not ready (no
    snapshot yet: no mirror, and Redis has not answered), once its sync loop has stopped, or,
    only if ``sync_down_limit`` is set, once Redis has been out of reach longer than that.
    """

    syncer: Syncer
    sync_down_limit: float
    sync_task: asyncio.Task[None] | None = None

    def check(self) -> tuple[bool, str]:
        syncer = self.syncer
        if not syncer.ready.is_set():
            return False, "not ready: no snapshot yet (no local mirror, and Redis has not answered)"
        if self.sync_task is not None and self.sync_task.done():
            return False, f"sync stopped; serving version {syncer.version}"
        if syncer.connected:
            return True, f"ok, version {syncer.version}, in sync"
        lag = syncer.lag()
        since = (
            datetime.fromtimestamp(syncer.synced_at, UTC).isoformat(timespec="seconds")
            if syncer.synced_at
            else "never"
        )
        if 0 < self.sync_down_limit < lag:
            return False, (
                f"sync down for {lag:.0f}s (limit {self.sync_down_limit:.0f}s); "
                f"serving version {syncer.version}, snapshot stale since {since}"
            )
        return True, (
            f"serving, snapshot stale since {since} (version {syncer.version}); "
            f"Redis unreachable, reconnecting"
        )


class HealthHandler(tornado.web.RequestHandler):
    def initialize(self, health: Health) -> None:
        self._health = health

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        healthy, text = self._health.check()
        synced = self._health.syncer.synced_at
        self.set_header("X-Certman-Snapshot-Synced", f"{synced:.0f}" if synced else "0")
        if not healthy:
            self.set_status(503)
        self.finish(text + "\n")


def make_metrics_app(metrics: EdgeMetrics, health: Health) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/metrics", MetricsHandler, {"metrics": metrics}),
            (r"/healthz", HealthHandler, {"health": health}),
        ],
        log_function=log_probe,
    )


def log_probe(handler: tornado.web.RequestHandler) -> None:
    """The metrics port's access log: scrapes and probes at DEBUG, and a /healthz 503 at INFO.
    A 503 there is the answer a load balancer asked for (this process is not ready), not an
    error of the edge: it must not fill an ERROR log every few seconds while Redis is away."""
    status = handler.get_status()
    _access_line(handler, status, logging.DEBUG if status < 500 else logging.INFO)


class Edge:
    """One edge process. Create and use it inside a running event loop."""

    def __init__(self, config: EdgeConfig, keyring: Keyring, listening: ssl.SSLContext) -> None:
        self.config = config
        self.metrics = m = EdgeMetrics()
        handshakes.install(m)
        self.verifier = Verifier(config.signers, m.registry)
        self.index = SiteIndex(
            config.signers,
            on_refused=self._refused_site,
            on_verified=self.verifier.verified_on_loop.inc,
        )
        self._refusals_logged: dict[str, tuple[int, str]] = {}
        self._unsigned_log = RateLimitedLog(log, logging.ERROR, 60.0)
        target = config.redis_target or RedisTarget(config.redis_url, config.redis_tls)
        self._async_redis: redis.asyncio.Redis[Any] = async_client(
            target, socket_connect_timeout=1, socket_timeout=2
        )
        # The SNI callback runs inside OpenSSL's handshake, which cannot await: it reads blobs
        # from the local mirror, and from Redis only before the mirror was ever filled.
        self.mirror = Mirror(config.mirror_path, source=config.prefix, signers=config.signers)
        self._first_fill_redis: redis.Redis[Any] = sync_client(
            target,
            socket_connect_timeout=min(0.2, config.handshake_redis_timeout),
            socket_timeout=config.handshake_redis_timeout,
        )
        self.challenges = ChallengeStore(
            self._async_redis,
            config.prefix,
            config.signers,
            on_refused=lambda kind: m.signature_failures.labels("challenge", kind).inc(),
        )
        self.syncer = Syncer(
            config.redis_url,
            config.prefix,
            self.index,
            self.challenges,
            m,
            mirror=self.mirror,
            reconcile_interval=config.reconcile_interval,
            target=target,
            verifier=self.verifier,
            fetch_statement=self._first_fill_statement,
        )
        self.contexts = SiteContexts(
            self.index, keyring, self._blob, ContextCache(config.cache_size, m), m
        )
        listening.sni_callback = SniSelector(self.index, self.contexts, m)
        self.listening = listening
        m.certificates_known.set_function(self.index.certificates_known)
        m.soonest_expiry.set_function(self.index.soonest_expiry)
        m.cached_contexts.set_function(lambda: len(self.contexts.cache))
        m.mirror_sites.set_function(self.mirror.sites)
        m.mirror_bytes.set_function(self.mirror.bytes_on_disk)
        self.lifecycle = Lifecycle()
        self.reach = SelfReach(config.allow_loopback_upstream)
        self.shares = Shares(
            ShareLimits(
                total=config.max_upstream_connections,
                per_site=config.upstream_per_site,
                per_client=config.upstream_per_client,
                queue=config.upstream_queue,
                queue_timeout=config.upstream_queue_timeout,
            )
        )
        m.upstream_slots_in_use.set_function(lambda: self.shares.in_use)
        m.upstream_slots_waiting.set_function(self.shares.waiting)
        self.connections = ConnectionBudget(
            ConnectionLimits(
                config.max_connections,
                config.max_connections_per_address,
                config.first_byte_timeout,
            )
        )
        m.connections_open.set_function(lambda: self.connections.open)
        self._accept_errors = accept_error_log()  # one for every port of this process
        self._pool = UpstreamPool(
            config.upstream_keepalive,
            config.upstream_idle_timeout,
            connect_timeout=config.connect_timeout,
            policy=config.outbound,
            reach=self.reach,
        )
        self._servers: list[HTTPServer | SiteServer] = []
        self._acceptors: list[ProxyProtocolAcceptor | BudgetedAcceptor] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    def start(
        self,
        http: list[socket.socket],
        https: list[socket.socket],
        metrics: list[socket.socket],
    ) -> None:
        settings = ProxySettings(
            index=self.index,
            metrics=self.metrics,
            pool=self._pool,
            lifecycle=self.lifecycle,
            https_port=self.config.https_public_port,
            request_timeout=self.config.request_timeout,
            trusted_proxies=TrustedProxies(self.config.trusted_proxies),
            max_header_size=self.config.max_header_size,
            max_body_size=self.config.max_body_size,
            pseudonym=self.config.via_pseudonym or default_pseudonym(),
            shares=self.shares,
            body_idle_timeout=self.config.body_idle_timeout,
            min_body_rate=self.config.min_body_rate,
            upstream_response_timeout=self.config.upstream_response_timeout,
            send_timeout=self.config.send_timeout,
        )
        proxy = Proxy(settings)
        # Every port of this edge, /metrics and /healthz included, is refused as an upstream.
        self.reach.listening = SelfReach.of_sockets(False, [*http, *https, *metrics]).listening
        options: dict[str, Any] = {
            "idle_connection_timeout": self.config.idle_timeout,
            "body_timeout": self.config.idle_timeout,
            # The hard limit, where Tornado closes the connection without an answer; the
            # handler answers 431 from max_header_size, below it.
            "max_header_size": 2 * self.config.max_header_size,
        }
        plain = HTTPServer(make_site_app(proxy, "http", self.challenges), **options)
        tls = SiteServer(
            proxy,
            self.listening,
            self.metrics,
            self.lifecycle,
            idle_timeout=self.config.idle_timeout,
            max_header_size=self.config.max_header_size,
            first_byte_timeout=self.config.first_byte_timeout,
        )
        tls.on_handshake = self.metrics.handshake_seconds.observe
        sync_task = asyncio.create_task(self.syncer.run(), name="certman-sync")
        self._tasks.append(sync_task)
        health = Health(self.syncer, self.config.sync_down_limit, sync_task)
        stats = HTTPServer(make_metrics_app(self.metrics, health))
        self._accept(stats, metrics, None, None)
        self._servers += [plain, tls, stats]
        for server, socks, tls_context in ((plain, http, None), (tls, https, self.listening)):
            if self.config.proxy_protocol:
                # Accepted by edge.connections' loop (Tornado's spins at the open-file limit),
                # handed to the PROXY header reader, then to the same budget as without it, by
                # the client the header names. Stopped after that loop, which closes the sockets.
                budgeted = self._budgeted(server, tls_context, self.connections)
                reader = ProxyProtocolAcceptor(
                    budgeted.admit,
                    self.connections,
                    on_refused=self._proxy_header_refused,
                    on_over_budget=self._connection_refused,
                )
                self._accept(server, socks, tls_context, None, hand_over=reader.accepted)
                self._acceptors.append(reader)
            else:
                self._accept(server, socks, tls_context, self.connections)
        if self.config.warm:
            self._tasks.append(asyncio.create_task(self._warm(), name="certman-warm"))

    def _accept(
        self,
        server: HTTPServer | SiteServer,
        socks: list[socket.socket],
        tls: ssl.SSLContext | None,
        budget: ConnectionBudget | None,
        hand_over: Callable[[socket.socket, Any], None] | None = None,
    ) -> None:
        """Accept on ``socks`` with the edge's own loop (edge.connections), not Tornado's."""
        acceptor = self._budgeted(server, tls, budget, socks, hand_over)
        acceptor.start()
        self._acceptors.append(acceptor)

    def _budgeted(
        self,
        server: HTTPServer | SiteServer,
        tls: ssl.SSLContext | None,
        budget: ConnectionBudget | None,
        socks: list[socket.socket] | None = None,
        hand_over: Callable[[socket.socket, Any], None] | None = None,
    ) -> BudgetedAcceptor:
        m = self.metrics
        return BudgetedAcceptor(
            server,
            socks or [],
            tls,
            budget,
            hand_over=hand_over,
            balancer=TrustedProxies(self.config.trusted_proxies).trusts,
            error_log=self._accept_errors,
            on_refused=self._connection_refused,
            on_accept_error=lambda reason: m.accept_errors.labels(reason).inc(),
        )

    def _connection_refused(self, reason: str) -> None:
        self.metrics.connections_refused.labels(reason).inc()

    def _blob(self, domain: str) -> bytes | None:
        """A site's blob for a handshake: the mirror's; Redis's only during the first fill."""
        blob = self.mirror.blob(domain)
        if blob is not None or self.syncer.mirror_complete:
            return blob
        if not self.syncer.connected:
            raise SiteUnavailable(domain)  # fail fast rather than wait on a connect per handshake
        try:
            value = self._first_fill_redis.hget(f"{self.config.prefix}:sites", domain)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise SiteUnavailable(domain) from exc
        return value if isinstance(value, bytes) or value is None else str(value).encode()

    def _first_fill_statement(self, domain: str) -> bytes | None:
        """A site's statement during the first fill, before all of them are read: from Redis,
        within the handshake's short timeout."""
        try:
            value = self._first_fill_redis.hget(f"{self.config.prefix}:signed", domain)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StatementUnavailable(domain) from exc
        return value if isinstance(value, bytes) or value is None else str(value).encode()

    def _refused_site(self, domain: str, kind: str, detail: str, version: int) -> None:
        """A site's statement was refused: counted always, logged once per version and kind
        (unsigned ones, which an unmigrated snapshot has by the thousand, once a minute)."""
        self.metrics.signature_failures.labels("site", kind).inc()
        if kind == "unsigned":
            self._unsigned_log.log("refusing the record of %s: %s", domain, detail)
            return
        if self._refusals_logged.get(domain) != (version, kind):
            self._refusals_logged[domain] = (version, kind)
            log.error("refusing the record of %s (version %d): %s", domain, version, detail,
                      extra={"domain": domain})  # fmt: skip

    def _proxy_header_refused(self, reason: str) -> None:
        self.metrics.requests_rejected.labels(f"proxy_protocol_{reason}").inc()

    async def _warm(self) -> None:
        """Build contexts for as many sites as the cache holds, in the background."""
        await self.syncer.mirror_filled.wait()
        started = time.monotonic()
        # Domains only: verifying every statement up front would cost seconds at 100,000 sites.
        domains = self.index.domains()[: self.contexts.cache.size]
        built = 0
        for i in range(0, len(domains), 100):
            batch = [d for d in domains[i : i + 100] if d not in self.contexts.cache]
            if not batch:
                continue
            for domain in batch:
                raw = self.mirror.blob(domain)
                meta = self.index.get(domain)
                if raw is None or meta is None or self.contexts.failed(meta):
                    continue
                if self.contexts.install(SiteRecord.from_json(raw), meta) is not None:
                    built += 1
                # Let handshakes and requests in between two ~1.5 ms builds.
                await asyncio.sleep(0)
        log.info("warm-up: %d contexts in %.1f s", built, time.monotonic() - started)

    async def wait_ready(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self.syncer.ready.wait(), timeout)

    def request_stop(self) -> None:
        self._stopping.set()

    async def run_until_stopped(self) -> None:
        await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the grace period), then close."""
        self.lifecycle.draining = True
        for acceptor in self._acceptors:
            acceptor.stop()
        for server in self._servers:
            server.stop()
        if self.lifecycle.in_flight:
            log.info("draining %d in-flight requests", self.lifecycle.in_flight)
            try:
                await asyncio.wait_for(self.lifecycle.idle.wait(), self.config.shutdown_grace)
            except TimeoutError:
                log.warning("%d requests still running at shutdown", self.lifecycle.in_flight)
        for server in self._servers:
            await server.close_all_connections()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._pool.close()
        await aclose(self._async_redis)
        self._first_fill_redis.close()
        self.verifier.close()
        self.mirror.close()
        handshakes.uninstall(self.metrics)
