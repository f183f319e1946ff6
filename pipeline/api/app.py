"""The API's Tornado application, built from what it is handed (a Runtime made at start, never
a global), and ``certman api serve``'s server: one process or several, stateless (the store and
Redis are the state), so any number may run behind a load balancer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application

from pipeline.api import handlers
from pipeline.api.clients import Network
from pipeline.api.handlers import ApiContext, access_log, health_check
from pipeline.api.limits import FailureLimiter, TokenLimiter
from pipeline.api.metrics import ApiMetrics
from pipeline.api.sites import SiteService
from pipeline.api.tokens import Authenticator
from pipeline.setting_values import Rate

if TYPE_CHECKING:
    from pipeline.runtime import Runtime

log = logging.getLogger("certman.api")

SITE = r"/v1/sites/([^/]+)"


@dataclass(frozen=True)
class ApiConfig:
    """The API's own limits (``certman api serve`` options)."""

    # Requests per token, all processes together (None: no limit).
    rate: Rate | None = Rate(600, 60)
    # Failed authentications per client address, all processes together (None: no limit).
    auth_failures: Rate | None = Rate(30, 60)
    max_body: int = 1024 * 1024
    max_header: int = 16 * 1024
    max_batch: int = 1000
    threads: int = 8
    # Proxies whose X-Forwarded-For is believed (pipeline/api/clients.py); none by default.
    trusted_proxies: tuple[Network, ...] = ()


def openapi_document() -> bytes:
    """The contract, as kept in the repository (pipeline/api/openapi.json, in the wheel)."""
    return resources.files("pipeline.api").joinpath("openapi.json").read_bytes()


def make_context(runtime: Runtime, config: ApiConfig) -> ApiContext:
    from pipeline.api.hooks import check_edge_key, check_profile, kick_dispatch

    settings = runtime.settings
    service = SiteService(
        runtime,
        kick=kick_dispatch,
        check_profile=lambda profile, issuer: check_profile(settings, profile, issuer),
        check_edge_key=lambda outcome: check_edge_key(settings, outcome),
        max_batch=config.max_batch,
    )
    limiter = (
        TokenLimiter(runtime.redis, settings.redis_prefix, config.rate) if config.rate else None
    )
    failures = (
        FailureLimiter(runtime.redis, settings.redis_prefix, config.auth_failures)
        if config.auth_failures
        else None
    )
    return ApiContext(
        service=service,
        authenticator=Authenticator(runtime.session_scope),
        limiter=limiter,
        failures=failures,
        metrics=ApiMetrics(),
        executor=ThreadPoolExecutor(config.threads, thread_name_prefix="certman-api"),
        openapi=openapi_document(),
        health=health_check(service),
        max_body=config.max_body,
        max_batch=config.max_batch,
        trusted_proxies=config.trusted_proxies,
    )


def make_app(ctx: ApiContext) -> Application:
    routes = [
        (r"/healthz", handlers.Health),
        (r"/metrics", handlers.Metrics),
        (r"/v1/openapi.json", handlers.OpenApi),
        (r"/v1/status", handlers.Status),
        (r"/v1/sites", handlers.Sites),
        (r"/v1/sites/batch", handlers.Batch),
        (SITE, handlers.Site),
        (SITE + "/renew", handlers.Renew),
        (SITE + "/revoke", handlers.Revoke),
    ]
    return Application(
        [(pattern, handler, {"ctx": ctx}) for pattern, handler in routes],
        default_handler_class=handlers.NotFound,
        default_handler_args={"ctx": ctx},
        log_function=access_log,
        compress_response=False,
        xsrf_cookies=False,
    )


def make_server(app: Application, config: ApiConfig) -> HTTPServer:
    # Tornado closes a connection whose body is over max_body_size without an answer; a
    # little over our limit, so that a body between the two gets its 413 problem document.
    return HTTPServer(
        app,
        max_body_size=config.max_body + 64 * 1024,
        max_header_size=config.max_header,
        # The client's address is worked out by pipeline/api/clients.py, which believes
        # X-Forwarded-For only from a trusted proxy; Tornado's xheaders believes anyone.
        xheaders=False,
        idle_connection_timeout=60,
        body_timeout=30,
    )


def serve(
    make_runtime: Callable[[], Runtime],
    *,
    address: str,
    port: int,
    processes: int,
    config: ApiConfig,
) -> None:
    """Listen, fork ``processes`` workers (1: none) sharing the socket, and serve forever.

    ``make_runtime()`` is called in each process after the fork: no connection crosses it.
    """
    from tornado.process import fork_processes

    sockets = bind_sockets(port, address)
    if processes > 1:
        fork_processes(processes)
    runtime = make_runtime()

    async def main() -> None:
        ctx = make_context(runtime, config)
        server = make_server(make_app(ctx), config)
        server.add_sockets(sockets)
        log.info("certman api on http://%s:%d", address, port)
        await asyncio.Event().wait()

    try:
        asyncio.run(main())
    finally:
        runtime.close()
