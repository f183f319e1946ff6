"""Every Redis client certman makes, from one description of where Redis is.

``CERTMAN_REDIS_URL`` names either one server (``redis://``, ``rediss://``, ``unix://``) or, for
high availability, the Redis Sentinels that know which server is the master now, in the form
kombu (the Celery broker) accepts::

    CERTMAN_REDIS_URL=sentinel://:password@h1:26379/0;sentinel://h2:26379;sentinel://h3:26379
    CERTMAN_REDIS_SENTINEL_MASTER=certman            # the name the Sentinels monitor it under
    CERTMAN_REDIS_SENTINEL_PASSWORD=...              # only if the Sentinels have a requirepass

kombu reads the database number and Redis's user and password from the first URL only, so
they are accepted there only: anywhere else they would be used by some clients and not others.

From that, this module makes the blocking client (:func:`sync_client`: the limiter, locks, the
snapshot publisher, onboarding), the asyncio one (:func:`async_client`: the edge), Celery's
broker settings (:meth:`RedisTarget.celery_broker`) and redbeat's (:meth:`RedisTarget.redbeat`).
With Sentinel each client asks a Sentinel for the master's address whenever it (re)connects, and
a master demoted to a replica is dropped on its first read-only answer, so that after a failover
the next attempt reaches the new master.

Standard library and redis only (no Celery, no SQLAlchemy): the edge imports it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from pipeline.redis_tls import RedisTls
from pipeline.setting_values import (
    SentinelUrl,
    check_sentinel_settings,
    is_sentinel,
    parse_sentinel_url,
)

if TYPE_CHECKING:
    from pipeline.settings import Settings

__all__ = [
    "RedisTarget",
    "SentinelUrl",
    "async_client",
    "check_sentinel_settings",
    "is_sentinel",
    "parse_sentinel_url",
    "sync_client",
]

# How long a client waits for one Sentinel before asking the next: a Sentinel that is down or
# frozen must not stall finding the master, which every reconnection does.
SENTINEL_SOCKET_TIMEOUT = 2.0


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is and how to reach it: a URL, its TLS options, and with ``sentinel://``
    URLs the master's name and the Sentinels' password."""

    url: str
    tls: RedisTls = field(default_factory=RedisTls)
    sentinel_master: str | None = None
    sentinel_password: str | None = None
    # With sentinel:// URLs: the Sentinels and the servers they name speak TLS, verified as
    # ``tls`` says (CA file, client certificate).
    sentinel_tls: bool = False

    def __post_init__(self) -> None:
        check_sentinel_settings(
            self.url, self.sentinel_master, self.sentinel_password, self.sentinel_tls
        )
        if not is_sentinel(self.url):
            self.tls.redis_kwargs(self.url)  # refuses TLS options in the URL

    @classmethod
    def from_settings(cls, settings: Settings, url: str | None = None) -> RedisTarget:
        """The target the settings describe; ``url`` (the edge's ``--redis-url``) replaces
        ``CERTMAN_REDIS_URL`` and is checked the same way."""
        return cls(
            url or settings.redis_url,
            RedisTls.from_settings(settings),
            settings.redis_sentinel_master,
            settings.redis_sentinel_password,
            settings.redis_sentinel_tls,
        )

    @property
    def sentinel(self) -> SentinelUrl | None:
        return parse_sentinel_url(self.url) if is_sentinel(self.url) else None

    def describe(self) -> str:
        """For log lines: where Redis is, without credentials."""
        parsed = self.sentinel
        if parsed is None:
            split = urlsplit(self.url)
            host = split.hostname or split.path
            port = f":{split.port}" if split.port else ""
            return f"{split.scheme}://{host}{port}{split.path if split.hostname else ''}"
        hosts = ", ".join(f"{host}:{port}" for host, port in parsed.sentinels)
        tls = " over TLS" if self.sentinel_tls else ""
        return f"master {self.sentinel_master!r} (db {parsed.db}) via Sentinels {hosts}{tls}"

    def _sentinel_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        # For the connections to the Sentinels themselves: never longer than the caller's own
        # timeouts, and the Sentinels' password (not Redis's: they are configured apart).
        timeout = min(
            SENTINEL_SOCKET_TIMEOUT,
            kwargs.get("socket_connect_timeout") or SENTINEL_SOCKET_TIMEOUT,
            kwargs.get("socket_timeout") or SENTINEL_SOCKET_TIMEOUT,
        )
        options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if self.sentinel_password:
            options["password"] = self.sentinel_password
        if self.sentinel_tls:
            options.update(self.tls.redis_py_ssl())
        return options

    def _master_kwargs(self, parsed: SentinelUrl, kwargs: dict[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {"db": parsed.db}
        if self.sentinel_tls:
            # redis-py's Sentinel pool then makes TLS connections to whichever server is master.
            options.update(self.tls.redis_py_ssl())
        if parsed.username:
            options["username"] = parsed.username
        if parsed.password is not None:
            options["password"] = parsed.password
        options.update(kwargs)
        return options

    # --- Celery -----------------------------------------------------------------------------
    def celery_broker(self) -> dict[str, Any]:
        """``broker_url``, ``broker_use_ssl`` and the transport options Sentinel needs (to be
        merged into ``broker_transport_options``)."""
        if self.sentinel is None:
            return {
                "broker_url": _with_ssl_query(self.url, self.tls.celery_ssl(self.url)),
                "broker_use_ssl": self.tls.celery_ssl(self.url),
                "transport_options": {},
            }
        return {
            "broker_url": self.url,
            # kombu's Sentinel transport connects to the master with these (and its
            # SentinelManagedSSLConnection); the Sentinels get theirs in sentinel_kwargs.
            "broker_use_ssl": self.tls.celery_options() if self.sentinel_tls else None,
            "transport_options": {
                "master_name": self.sentinel_master,
                "sentinel_kwargs": self._sentinel_kwargs({}),
            },
        }

    def redbeat(self) -> dict[str, Any]:
        """celery-redbeat's ``redbeat_redis_url``, ``redbeat_redis_use_ssl`` and
        ``redbeat_redis_options`` (its lock and schedule live in this Redis)."""
        parsed = self.sentinel
        base_options: dict[str, Any] = {"socket_timeout": 10, "socket_connect_timeout": 5}
        if parsed is None:
            return {
                "redbeat_redis_url": self.url,
                "redbeat_redis_use_ssl": self.tls.celery_ssl(self.url),
                "redbeat_redis_options": base_options,
            }
        options = {
            "sentinels": [list(address) for address in parsed.sentinels],
            "service_name": self.sentinel_master,
            "db": parsed.db,
            "sentinel_kwargs": self._sentinel_kwargs({}),
            **base_options,
        }
        if parsed.username:
            options["username"] = parsed.username
        if parsed.password is not None:
            options["password"] = parsed.password
        # redbeat takes the Sentinel path only for a URL starting "redis-sentinel"; the rest of
        # this URL is not read (the Sentinels come from the options).
        return {
            "redbeat_redis_url": "redis-sentinel://",
            # redbeat turns ssl on for the master's connections when given a dict.
            "redbeat_redis_use_ssl": self.tls.celery_options() if self.sentinel_tls else None,
            "redbeat_redis_options": options,
        }


def _with_ssl_query(url: str, ssl_options: dict[str, Any] | None) -> str:
    """``url`` carrying the TLS options in its query, in kombu's own URL form.

    Celery makes a kombu Connection from the bare ``broker_url``, without ``broker_use_ssl``,
    wherever it masks the URL for display (``celery.app.utils.filter_hidden_settings``: the
    worker's answer to ``inspect conf``, which Flower asks on every refresh); kombu then logs
    "defaulting to insecure SSL" for a rediss:// URL, although that Connection never connects.
    With the same options in the query every Connection made from the URL, masking or real,
    has them: the real one verifies as before (URL options take precedence over
    ``broker_use_ssl`` in kombu, and they are the same), and the masked one has nothing to
    warn about. The URL shown is masked without its query (``Connection.as_uri``).
    """
    if ssl_options is None:
        return url
    query = {}
    for key, value in ssl_options.items():
        if value is None:
            continue
        if key == "ssl_cert_reqs":
            value = {ssl.CERT_REQUIRED: "required", ssl.CERT_OPTIONAL: "optional"}.get(
                value, "none"
            )
        elif isinstance(value, bool):
            value = "true" if value else "false"
        query[key] = value
    separator = "&" if urlsplit(url).query else "?"
    return f"{url}{separator}{urlencode(query, quote_via=quote)}"


if TYPE_CHECKING:
    _SyncRedis = redis.Redis[Any]
    _AsyncRedis = redis.asyncio.Redis[Any]
else:
    _SyncRedis = redis.Redis
    _AsyncRedis = redis.asyncio.Redis


class _SentinelMaster(_SyncRedis):
    """The master, through Sentinels made for this client alone: closing the client closes
    its connections to them too (redis-py leaves them open)."""

    def close(self) -> None:
        super().close()
        for sentinel in self.connection_pool.sentinel_manager.sentinels:
            sentinel.close()


class _AsyncSentinelMaster(_AsyncRedis):
    """:class:`_SentinelMaster` for asyncio (``aclose``, which the installed stubs lack)."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)  # type: ignore[misc]
        for sentinel in self.connection_pool.sentinel_manager.sentinels:
            await sentinel.aclose()


def sync_client(target: RedisTarget, **kwargs: Any) -> redis.Redis[Any]:
    """A blocking client; ``kwargs`` (timeouts, health checks) go to every connection to Redis
    (with Sentinel: to the master's, the Sentinels get short timeouts of their own)."""
    parsed = target.sentinel
    if parsed is None:
        return redis.Redis.from_url(target.url, **kwargs, **target.tls.redis_kwargs(target.url))
    sentinel = redis.sentinel.Sentinel(
        list(parsed.sentinels), sentinel_kwargs=target._sentinel_kwargs(kwargs)
    )
    assert target.sentinel_master is not None  # checked when the target was made
    client: redis.Redis[Any] = sentinel.master_for(
        target.sentinel_master,
        redis_class=_SentinelMaster,
        **target._master_kwargs(parsed, kwargs),
    )
    return client


def async_client(target: RedisTarget, **kwargs: Any) -> redis.asyncio.Redis[Any]:
    """The asyncio client (the edge's), made as :func:`sync_client` makes the blocking one.
    Create it inside the event loop that uses it."""
    parsed = target.sentinel
    if parsed is None:
        return redis.asyncio.Redis.from_url(
            target.url, **kwargs, **target.tls.redis_kwargs(target.url)
        )
    sentinel = redis.asyncio.sentinel.Sentinel(
        list(parsed.sentinels), sentinel_kwargs=target._sentinel_kwargs(kwargs)
    )
    assert target.sentinel_master is not None  # checked when the target was made
    client: redis.asyncio.Redis[Any] = sentinel.master_for(
        target.sentinel_master,
        redis_class=_AsyncSentinelMaster,
        **target._master_kwargs(parsed, kwargs),
    )
    return client
