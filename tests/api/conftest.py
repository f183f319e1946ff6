"""A running API: the real Tornado application on a loopback port, in a thread of its own,
over this test's store and Redis (certman_env), with tokens made as the CLI makes them."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from pipeline.api.app import ApiConfig, make_app, make_context, make_server
from pipeline.api.handlers import ApiContext
from pipeline.api.tokens import create_token
from pipeline.runtime import Runtime


@dataclass
class RunningApi:
    url: str
    runtime: Runtime
    ctx: ApiContext
    http: requests.Session = field(default_factory=requests.Session)

    def token(self, *scopes: str, name: str | None = None) -> str:
        name = name or f"t{abs(hash(scopes)) % 10**6}-{len(scopes)}"
        with self.runtime.session_scope() as session:
            return create_token(session, name, list(scopes or ("sites:read",)))

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return self.http.request(
            method, self.url + path, json=json, headers=sent, timeout=30, **kwargs
        )


def start_api(runtime: Runtime, config: ApiConfig) -> tuple[RunningApi, Any]:
    """The application served from a thread's event loop; returns it and a stop function."""
    from tornado.netutil import bind_sockets

    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]

    async def setup() -> None:
        ctx = make_context(runtime, config)
        server = make_server(make_app(ctx), config)
        server.add_sockets(sockets)
        holder.update(ctx=ctx, server=server)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(setup())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="api-under-test", daemon=True)
    thread.start()
    assert ready.wait(30), "the API did not start"

    def stop() -> None:
        async def close() -> None:
            holder["server"].stop()
            await holder["server"].close_all_connections()

        asyncio.run_coroutine_threadsafe(close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        holder["ctx"].executor.shutdown(wait=True)
        loop.close()

    return RunningApi(f"http://127.0.0.1:{port}", runtime, holder["ctx"]), stop


@pytest.fixture
def api_config() -> ApiConfig:
    return ApiConfig()


@contextmanager
def serving(config: ApiConfig) -> Iterator[RunningApi]:
    """The API with ``config``, over the store and Redis the test's environment names."""
    from pipeline.settings import get_settings

    runtime = Runtime(get_settings())
    running, stop = start_api(runtime, config)
    try:
        yield running
    finally:
        stop()
        running.http.close()
        runtime.close()


@pytest.fixture
def api(
    certman_env: dict[str, str], api_config: ApiConfig, redis_client: Any
) -> Iterator[RunningApi]:
    """Over an empty Redis database (redis_client flushes it): no rate-limit bucket or
    snapshot left by another test."""
    with serving(api_config) as running:
        yield running
