"""Redis over TLS, verified: the options every Redis client of certman is made with.

With a ``rediss://`` URL the server's certificate is always verified (chain and host name),
against ``CERTMAN_REDIS_CA_FILE`` or, without it, the system's store; a client certificate is
presented when Redis runs with ``tls-auth-clients``. The clients left to themselves do not all
do that: kombu (the Celery broker) falls back to ``CERT_NONE`` when given a rediss:// URL and no
options, and older redis-py releases did not check the host name. So every client is given the
options explicitly: :meth:`RedisTls.redis_kwargs` for redis-py (blocking and asyncio: the
limiter, the snapshot publisher, the edge), :meth:`RedisTls.celery_ssl` for Celery's
``broker_use_ssl`` and ``redis_backend_use_ssl``.

Standard library only (and the settings): the edge imports it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

if TYPE_CHECKING:
    from pipeline.settings import Settings

__all__ = ["RedisTls", "uses_tls"]


def uses_tls(url: str) -> bool:
    return url.lower().startswith("rediss://")


def _refuse_tls_options_in(url: str) -> None:
    # Both redis-py and kombu let options in the URL override those passed alongside it.
    options = sorted({k for k, _ in parse_qsl(urlsplit(url).query) if k.lower().startswith("ssl")})
    if options:
        raise ValueError(
            f"Redis URL carries TLS options ({', '.join(options)}), which would override "
            "certificate verification: give them as CERTMAN_REDIS_* settings instead"
        )


@dataclass(frozen=True)
class RedisTls:
    """How to verify Redis (``ca_file`` None: the system's store) and the client certificate."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a Redis client certificate needs both its certificate and key file")

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisTls:
        return cls(settings.redis_ca_file, settings.redis_cert_file, settings.redis_key_file)

    def redis_kwargs(self, url: str) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis.from_url`` / ``redis.asyncio.Redis.from_url``
        with ``url``: none for redis:// and unix://, which take no TLS options."""
        if not uses_tls(url):
            return {}
        _refuse_tls_options_in(url)
        return self._redis_py_options()

    def _redis_py_options(self) -> dict[str, Any]:
        return {
            "ssl_cert_reqs": "required",
            "ssl_check_hostname": True,
            "ssl_ca_certs": _str(self.ca_file),
            "ssl_certfile": _str(self.cert_file),
            "ssl_keyfile": _str(self.key_file),
        }

    def redis_py_ssl(self) -> dict[str, Any]:
        """redis-py's options for a TLS connection, verified, whatever the URL: for Redis
        reached through Sentinels (and the Sentinels themselves), which no URL describes."""
        return {"ssl": True, **self._redis_py_options()}

    def celery_ssl(self, url: str) -> dict[str, Any] | None:
        """Celery's ``broker_use_ssl`` (and ``redis_backend_use_ssl``) for ``url``; None when
        it is not a rediss:// URL."""
        if not uses_tls(url):
            return None
        _refuse_tls_options_in(url)
        return self.celery_options()

    def celery_options(self) -> dict[str, Any]:
        """``broker_use_ssl`` whatever the URL (with Sentinel: the master's connections)."""
        return {
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            # kombu hands these to redis-py's SSLConnection, whose default this repeats, so
            # that an older redis-py (whose default was False) still checks the name.
            "ssl_check_hostname": True,
            "ssl_ca_certs": _str(self.ca_file),
            "ssl_certfile": _str(self.cert_file),
            "ssl_keyfile": _str(self.key_file),
        }


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
