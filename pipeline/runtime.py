"""The pipeline's composition root: one :class:`Runtime` per process owns what the process holds.

Settings, the store's sessions, the Redis client, the global rate limiter, the ACME client and
the publisher to the edges are made here, lazily, and handed to the services as arguments
(``OrderSteps(runtime)``, ``dispatch.start_due(session, ...)``, ``Publisher``); the services
never reach for a process-wide singleton themselves. A worker makes its runtime on first use;
after a fork, :func:`reset` drops it (and everything it made) in one place, so that no
connection, TLS session or key crosses into the child.

Tests build a :class:`Runtime` directly, giving it the parts they want to replace (a fake ACME
client, sessions bound to a transaction that is rolled back, a publisher that records).

It is the top of the import graph below the entry points: the worker's tasks, each ``certman``
command (through click's context object, :func:`pipeline.cli.common.command_runtime`), the
exporter and the scripts build or receive one; no service imports it (the import-linter
contracts in ``pyproject.toml`` hold that).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import redis
from sqlalchemy.orm import Session

from pipeline import db
from pipeline.acme.ratelimit import RateLimiter
from pipeline.db import SessionScope
from pipeline.redis_connect import RedisTarget, sync_client
from pipeline.settings import Settings, get_settings

if TYPE_CHECKING:
    from pipeline.acme.client import AcmeClient
    from pipeline.crypto.signing import SigningKey
    from pipeline.distribution.publishing import Publisher


class Runtime:
    """Everything one worker process holds, made on first use and dropped together.

    Any part may be given at construction (tests, benchmarks); the rest is made from
    ``settings`` when first asked for.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        sessions: SessionScope | None = None,
        redis_client: redis.Redis[Any] | None = None,
        limiter: RateLimiter | None = None,
        acme: AcmeClient | None = None,
        publisher: Publisher | None = None,
        signing_key: SigningKey | None = None,
        acmes: dict[str, AcmeClient] | None = None,
        limiters: dict[str, RateLimiter] | None = None,
    ) -> None:
        self.settings = settings
        self._sessions = sessions
        self._redis = redis_client
        # Per issuer (settings.issuer_list); ``acme`` and ``limiter`` are the first issuer's.
        first = settings.issuer_list[0].name
        self._acmes: dict[str, AcmeClient] = dict(acmes or {})
        self._limiters: dict[str, RateLimiter] = dict(limiters or {})
        if acme is not None:
            self._acmes.setdefault(first, acme)
        if limiter is not None:
            self._limiters.setdefault(first, limiter)
        self._publisher = publisher
        self._signing_key = signing_key

    # --- the store --------------------------------------------------------------------------
    def session_scope(self) -> AbstractContextManager[Session]:
        """A session committed on success and rolled back on any error."""
        if self._sessions is not None:
            return self._sessions()
        return db.session_scope(self.settings.effective_database_url)

    # --- Redis ------------------------------------------------------------------------------
    @property
    def redis(self) -> redis.Redis[Any]:
        if self._redis is None:
            # One server, or the master the Sentinels name (asked again on every reconnection,
            # so that after a failover the next call reaches the new master).
            self._redis = sync_client(
                RedisTarget.from_settings(self.settings),
                socket_timeout=10,
                health_check_interval=30,
            )
        return self._redis

    @property
    def limiter(self) -> RateLimiter:
        """The first (most preferred) issuer's limiter."""
        return self.limiter_for(None)

    def limiter_for(self, issuer: str | None) -> RateLimiter:
        """An issuer's limiter: its buckets, its limits (None: the first issuer's)."""
        spec = self.settings.issuer(issuer)
        limiter = self._limiters.get(spec.name)
        if limiter is None:
            limiter = RateLimiter.for_issuer(self.redis, self.settings, spec)
            self._limiters[spec.name] = limiter
        return limiter

    # --- the CAs ----------------------------------------------------------------------------
    @property
    def acme(self) -> AcmeClient:
        """The first issuer's ACME client (registered on first use)."""
        return self.acme_for(None)

    def acme_for(self, issuer: str | None) -> AcmeClient:
        """The ACME client for an issuer's stored account, registered on first use (None: the
        first issuer's). Not kept when making it fails: the next call tries again."""
        spec = self.settings.issuer(issuer)
        client = self._acmes.get(spec.name)
        if client is None:
            from pipeline.acme.accounts import build_client

            client = build_client(
                self.settings, self.session_scope, self.redis, self.limiter_for(spec.name), spec
            )
            self._acmes[spec.name] = client
        return client

    # --- the edges --------------------------------------------------------------------------
    @property
    def signing_key(self) -> SigningKey:
        if self._signing_key is None:
            from pipeline.crypto.signing_key_file import load_or_create_signing_key

            self._signing_key = load_or_create_signing_key(self.settings.effective_signing_key)
        return self._signing_key

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            from pipeline.distribution.publishing import Publisher

            # The key is read when first used: a process that never publishes never makes one.
            self._publisher = Publisher(
                self.redis, self.settings.redis_prefix, lambda: self.signing_key
            )
        return self._publisher

    # --- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Close what this runtime opened (not after a fork: the parent still uses it)."""
        if self._redis is not None:
            self._redis.close()


_current: Runtime | None = None


def current() -> Runtime:
    """This process's runtime, made from the settings on first use."""
    global _current
    if _current is None:
        _current = Runtime(get_settings())
    return _current


def reset(*, close: bool = False, settings: bool = False) -> None:
    """Forget everything the process holds: the one place it is done.

    After a fork (``close=False``) connections are only dropped: closing them would shut the
    sockets the parent still uses. ``close=True`` closes them (tests, the end of a script);
    ``settings=True`` also forgets the settings read from the environment.
    """
    global _current
    if close and _current is not None:
        _current.close()
    _current = None
    db.dispose_engines(close=close)
    if settings:
        get_settings.cache_clear()
