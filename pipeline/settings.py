"""One typed settings object, read from ``CERTMAN_*`` environment variables.

pydantic-settings does the reading and the validation: it names the offending variable in its
error, handles booleans ("on", "off", "1", "true") and paths, and saves us a hand-rolled parser.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
from collections.abc import Mapping
from enum import StrEnum
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipeline.setting_values import check_sentinel_settings, parse_networks, parse_rate

LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    RSA_2048 = "rsa-2048"


DEFAULT_ISSUER = "default"
ISSUER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
# The per-issuer variables: CERTMAN_ISSUER_<NAME>_<SUFFIX>.
ISSUER_SUFFIXES = (
    "DIRECTORY",
    "CA_BUNDLE",
    "CONTACT_EMAIL",
    "PROFILE",
    "EAB_KID",
    "EAB_HMAC_KEY",
    "EAB_HMAC_KEY_FILE",
    "RATE_LIMITS",
)
# The limits an issuer's CERTMAN_ISSUER_<NAME>_RATE_LIMITS may set (the CERTMAN_LIMIT_* names).
LIMIT_NAMES = (
    "new_orders",
    "certs_per_domain",
    "duplicate_certs",
    "authz_failures",
    "new_accounts",
    "pace_new_nonce",
    "pace_new_account",
    "pace_new_order",
    "pace_acme",
)


class Issuer(BaseModel):
    """One ACME CA certman may order from (``CERTMAN_ISSUER_<NAME>_*``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    directory: str
    ca_bundle: Path | None = None
    contact_email: str | None = None
    profile: str | None = None
    # External Account Binding (RFC 8555 section 7.3.4): both or neither. The HMAC key is a
    # SecretStr: its repr, str and any error message show it as '**********'.
    eab_kid: str | None = None
    eab_hmac_key: SecretStr | None = None
    # Overrides of the CERTMAN_LIMIT_* catalogue for this issuer ("off": no local limits).
    limits_enabled: bool = True
    limit_overrides: tuple[tuple[str, str], ...] = ()

    @property
    def has_eab(self) -> bool:
        return self.eab_kid is not None and self.eab_hmac_key is not None


def _issuer_env(name: str, suffix: str) -> str:
    return f"CERTMAN_ISSUER_{name.upper()}_{suffix}"


def _is_base64url(value: str) -> bool:
    if not value or not re.fullmatch(r"[A-Za-z0-9_-]+=*", value):
        return False
    try:
        base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return False
    return True


def _parse_rate_limits(var: str, value: str) -> tuple[bool, tuple[tuple[str, str], ...]]:
    """``off``, ``on``/empty (the catalogue), or ``new_orders=100/1h,pace_acme=20/1s``."""
    text = value.strip()
    if text.lower() in ("", "on", "letsencrypt"):
        return True, ()
    if text.lower() == "off":
        return False, ()
    overrides: list[tuple[str, str]] = []
    for part in re.split(r"[,\s]+", text):
        if not part:
            continue
        key, sep, rate = part.partition("=")
        key = key.strip().lower().removeprefix("limit_")
        if not sep or key not in LIMIT_NAMES:
            raise ValueError(
                f"{var}: {part!r} is not NAME=RATE with NAME one of {', '.join(LIMIT_NAMES)} "
                "(or 'off', or 'letsencrypt' for the CERTMAN_LIMIT_* catalogue)"
            )
        try:
            parse_rate(rate)
        except ValueError as exc:
            raise ValueError(f"{var}: {exc}") from None
        overrides.append((key, rate.strip()))
    return True, tuple(overrides)


def parse_issuers(settings: Settings, environ: Mapping[str, str]) -> tuple[Issuer, ...]:
    """The ordered issuers from ``CERTMAN_ISSUERS`` and ``CERTMAN_ISSUER_<NAME>_*``.

    Without ``CERTMAN_ISSUERS`` there is one issuer, ``default``, made of ``CERTMAN_ACME_*``
    (its ``CERTMAN_ISSUER_DEFAULT_*`` variables may add EAB or its own limits). Every error
    names its variable, never a secret's value.
    """
    names = settings.issuers or (DEFAULT_ISSUER,)
    known = {name.upper() for name in names}
    for env_name in sorted(environ):
        if not env_name.startswith("CERTMAN_ISSUER_"):
            continue
        rest = env_name.removeprefix("CERTMAN_ISSUER_")
        suffix = next((s for s in ISSUER_SUFFIXES if rest.endswith("_" + s)), None)
        owner = rest[: -len(suffix) - 1] if suffix else None
        if suffix is None or owner not in known:
            listed = ", ".join(names)
            raise ValueError(
                f"{env_name}: no such setting (issuers: {listed}; per issuer: "
                f"CERTMAN_ISSUER_<NAME>_{{{','.join(ISSUER_SUFFIXES)}}})"
            )
    legacy = settings.issuers == ()
    issuers: list[Issuer] = []
    for name in names:

        def get(suffix: str, name: str = name) -> str | None:
            value = environ.get(_issuer_env(name, suffix))
            return value.strip() if value is not None and value.strip() else None

        def var(suffix: str, name: str = name) -> str:
            return _issuer_env(name, suffix)

        directory = get("DIRECTORY") or (settings.acme_directory if legacy else None)
        if directory is None:
            raise ValueError(
                f"{var('DIRECTORY')}: missing (issuer {name} is named in CERTMAN_ISSUERS)"
            )
        if not directory.startswith(("https://", "http://")):
            raise ValueError(f"{var('DIRECTORY')}: must be an http(s):// URL")
        bundle_text = get("CA_BUNDLE")
        ca_bundle = Path(bundle_text) if bundle_text else None
        if legacy and ca_bundle is None:
            ca_bundle = settings.acme_ca_bundle
        if bundle_text and not Path(bundle_text).is_file():
            raise ValueError(f"{var('CA_BUNDLE')}: {bundle_text} is not a file")
        kid = get("EAB_KID")
        hmac_text = get("EAB_HMAC_KEY")
        hmac_file = get("EAB_HMAC_KEY_FILE")
        if hmac_text and hmac_file:
            raise ValueError(
                f"{var('EAB_HMAC_KEY')} and {var('EAB_HMAC_KEY_FILE')}: set one, not both"
            )
        if hmac_file:
            try:
                hmac_text = Path(hmac_file).read_text().strip() or None
            except OSError as exc:
                raise ValueError(
                    f"{var('EAB_HMAC_KEY_FILE')}: {hmac_file} cannot be read: {exc.strerror}"
                ) from None
        hmac_var = var("EAB_HMAC_KEY_FILE" if hmac_file else "EAB_HMAC_KEY")
        if kid and not hmac_text:
            raise ValueError(
                f"{var('EAB_HMAC_KEY')}: missing: {var('EAB_KID')} is set and needs its HMAC key"
            )
        if hmac_text and not kid:
            raise ValueError(
                f"{var('EAB_KID')}: missing: {hmac_var} is set and needs the key id it belongs to"
            )
        if hmac_text and not _is_base64url(hmac_text):
            # Never the value itself: it is a secret.
            raise ValueError(f"{hmac_var}: not base64url (RFC 4648 section 5, as the CA gives it)")
        limits_var = _issuer_env(name, "RATE_LIMITS")
        enabled, overrides = _parse_rate_limits(limits_var, get("RATE_LIMITS") or "")
        issuers.append(
            Issuer(
                name=name,
                directory=directory,
                ca_bundle=ca_bundle,
                contact_email=get("CONTACT_EMAIL")
                or (settings.acme_contact_email if legacy else None),
                profile=get("PROFILE") or (settings.acme_profile if legacy else None),
                eab_kid=kid,
                eab_hmac_key=SecretStr(hmac_text) if hmac_text else None,
                limits_enabled=enabled,
                limit_overrides=overrides,
            )
        )
    return tuple(issuers)


class Settings(BaseSettings):
    """Every setting, with the environment variable it comes from (``CERTMAN_`` + name)."""

    model_config = SettingsConfigDict(env_prefix="CERTMAN_", extra="ignore", frozen=True)

    # --- store and broker -----------------------------------------------------------------
    data_dir: Path = Field(Path(".certman"), description="Where the embedded defaults live.")
    database_url: str = Field("", description="SQLAlchemy URL; default: a SQLite file in data_dir.")
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = Field("certman", description="Prefix of every Redis key and channel.")
    broker_visibility_timeout: int = Field(
        7200, ge=1, description="Seconds before an unacknowledged task is delivered again."
    )
    # Redis over TLS (rediss://): the server's certificate is always verified, against this CA
    # file or, without one, the system's store; a client certificate for tls-auth-clients.
    redis_ca_file: Path | None = Field(None, description="CA bundle to verify Redis with.")
    redis_cert_file: Path | None = Field(None, description="Client certificate for Redis.")
    redis_key_file: Path | None = Field(None, description="Client certificate's key for Redis.")

    # --- ACME -------------------------------------------------------------------------------
    acme_directory: str = LETS_ENCRYPT_STAGING
    acme_ca_bundle: Path | None = Field(None, description="CA file for the ACME server's TLS.")
    acme_contact_email: str | None = None
    acme_profile: str | None = Field(None, description="ACME profile for new orders, if offered.")
    key_type: KeyType = KeyType.EC_P256
    max_orders_in_flight: int = Field(100, ge=1)
    # Several CAs, in order of preference (CERTMAN_ISSUER_<NAME>_* each; see parse_issuers).
    # Empty: one issuer, "default", made of the CERTMAN_ACME_* settings above.
    issuers: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Issuer names, most preferred first."
    )
    fallback_max_wait: float = Field(
        300, ge=0, description="A CA's Retry-After worth waiting rather than falling back."
    )
    fallback_recheck: float = Field(
        60, gt=0, description="Seconds new orders skip an issuer that failed on its side."
    )
    _issuer_list: tuple[Issuer, ...] = PrivateAttr(default=())

    # --- keys -------------------------------------------------------------------------------
    edge_public_key: Path | None = Field(None, description="Public key file the pipeline seals to.")
    edge_key_dir: Path | None = Field(
        None, description="Private keys an edge opens envelopes with."
    )
    pipeline_key: Path | None = Field(
        None, description="Pipeline's own key; default data_dir/pipeline.key."
    )
    # Signed distribution (pipeline.crypto.signing): the pipeline signs what it publishes, edges
    # trust only the public halves they are given.
    signing_key: Path | None = Field(
        None, description="Pipeline's Ed25519 signing key; default data_dir/signing.key."
    )
    edge_trusted_signers: Path | None = Field(
        None, description="An edge's trusted signing public keys: a .pub file, or a directory."
    )

    # --- HTTP-01 self-check -----------------------------------------------------------------
    http01_port: int = Field(80, ge=1, le=65535)
    dns_resolver: str | None = Field(None, description="host:port of a DNS server for self-checks.")
    self_check: bool = True

    # --- rate limits (N/period: s, m, h, d; "off" in rate_limits lifts them all) -------------
    rate_limits: bool = True
    limit_new_orders: str = "300/3h"
    limit_certs_per_domain: str = "50/7d"
    limit_duplicate_certs: str = "5/7d"
    limit_authz_failures: str = "5/1h"
    limit_new_accounts: str = "10/3h"
    limit_pace_new_nonce: str = "20/1s"
    limit_pace_new_account: str = "5/1s"
    limit_pace_new_order: str = "300/1s"
    limit_pace_acme: str = "250/1s"

    # --- renewal and alerts -----------------------------------------------------------------
    renew_fraction: float = Field(2 / 3, gt=0, lt=1, description="Renew at this part of lifetime.")
    renew_spread: float = Field(
        0.1, ge=0, lt=1, description="Per-domain spread, as a fraction of the lifetime."
    )
    alert_fraction: float = Field(1 / 6, gt=0, lt=1, description="Alert below this life left.")
    alert_webhook: str | None = None

    # --- upkeep (beat) ----------------------------------------------------------------------
    stuck_after: int = Field(1800, ge=60, description="Seconds an order may sit untouched.")
    stuck_max_tries: int = Field(3, ge=1, description="Re-enqueues before a stuck order fails.")
    ari_refresh_hours: float = Field(12, gt=0, description="Refresh each ARI window this often.")
    alert_consecutive_failures: int = Field(
        5, ge=1, description="Alert when a site has failed this many times in a row."
    )

    # --- outbound requests to dealers' upstreams (pipeline.outbound) -------------------------
    upstream_allow_link_local: bool = Field(
        False, description="Allow link-local upstreams (never the metadata addresses)."
    )
    # NoDecode: a comma- or space-separated list, not the JSON pydantic-settings expects.
    upstream_allowed_networks: Annotated[tuple[IPv4Network | IPv6Network, ...], NoDecode] = Field(
        (), description="Only these networks may be upstreams; empty: any not refused."
    )

    # --- webhooks to the platform (pipeline.webhooks.transport) -------------------------------
    webhook_allowed_networks: Annotated[tuple[IPv4Network | IPv6Network, ...], NoDecode] = Field(
        (),
        description="Internal networks (loopback, private) webhook receivers may be on; "
        "empty: public addresses only.",
    )

    # --- worker hosts' metrics (pipeline.worker_metrics; PROMETHEUS_MULTIPROC_DIR turns it on) ---
    worker_metrics_address: str = Field(
        "127.0.0.1", description="Where a worker host serves /metrics."
    )
    worker_metrics_port: int = Field(
        9109, ge=0, le=65535, description="Port of a worker host's /metrics (0: none)."
    )

    # --- Redis Sentinel and beat's lock (pipeline.redis_connect) -----------------------------
    # High availability: CERTMAN_REDIS_URL names the Sentinels, in the form kombu accepts
    # (sentinel://h1:26379;sentinel://h2:26379/0; Redis's own user and password in the first
    # URL), and this names the master they watch.
    redis_sentinel_master: str | None = Field(
        None, description="Master name the Sentinels watch (with sentinel:// URLs)."
    )
    redis_sentinel_password: str | None = Field(
        None, description="The Sentinels' own password (their requirepass), if any."
    )
    # Redis over TLS through Sentinel: the Sentinels and the servers they name all speak TLS
    # (a sentinel:// URL has no TLS form of its own), verified with CERTMAN_REDIS_CA_FILE and
    # presenting CERTMAN_REDIS_CERT_FILE/_KEY_FILE where given.
    redis_sentinel_tls: bool = Field(
        False, description="With sentinel:// URLs: the Sentinels and Redis speak TLS only."
    )
    # A beat holds a lock in Redis while it schedules; another beat waiting for it takes over
    # this many seconds after the holder stopped renewing it (it renews on every tick).
    beat_lock_timeout: int = Field(30, ge=2, description="Seconds beat's lock outlives its holder.")

    # --- edge -------------------------------------------------------------------------------
    edge_cache_size: int = Field(10_000, ge=1, description="TLS contexts kept per edge process.")
    edge_processes: int = Field(1, ge=1)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        if value and "://" not in value:
            raise ValueError("must be an SQLAlchemy URL such as sqlite:///certman.db")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
            raise ValueError("must start with redis://, rediss://, unix:// or sentinel://")
        tls_options = sorted(
            {k for k, _ in parse_qsl(urlsplit(value).query) if k.lower().startswith("ssl")}
        )
        if tls_options:
            # redis-py and kombu let URL options override the ones certman passes, so
            # ?ssl_cert_reqs=none would quietly turn verification off.
            raise ValueError(
                f"must not carry TLS options ({', '.join(tls_options)}): use "
                "CERTMAN_REDIS_CA_FILE, CERTMAN_REDIS_CERT_FILE and CERTMAN_REDIS_KEY_FILE"
            )
        return value

    @field_validator("redis_ca_file", "redis_cert_file", "redis_key_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("redis_ca_file", "redis_cert_file", "redis_key_file")
    @classmethod
    def _readable_file(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if not value.is_file():
            raise ValueError(f"{value} is not a file")
        try:
            with value.open("rb"):
                pass
        except OSError as exc:
            raise ValueError(f"{value} cannot be read: {exc.strerror}") from None
        return value

    @field_validator("signing_key", "edge_trusted_signers", mode="before")
    @classmethod
    def _empty_path_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("signing_key")
    @classmethod
    def _signing_key(cls, value: Path | None) -> Path | None:
        # Created on first use when missing; a directory here is a mistake for a file name.
        if value is not None and value.is_dir():
            raise ValueError(
                f"{value} is a directory: name the key file (it is created if missing)"
            )
        return value

    @field_validator("edge_trusted_signers")
    @classmethod
    def _trusted_signers(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(
                f"{value} does not exist: name the signing .pub file or a directory of them"
            )
        return value

    @field_validator("upstream_allowed_networks", "webhook_allowed_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_networks(value)
        return value

    @model_validator(mode="after")
    def _redis_tls(self) -> Settings:
        if (self.redis_cert_file is None) != (self.redis_key_file is None):
            raise ValueError(
                "CERTMAN_REDIS_CERT_FILE and CERTMAN_REDIS_KEY_FILE go together: "
                "set both for a client certificate, or neither"
            )
        given = [
            f"CERTMAN_{name.upper()}"
            for name in ("redis_ca_file", "redis_cert_file", "redis_key_file")
            if getattr(self, name) is not None
        ]
        tls_by_sentinel = self.redis_sentinel_tls and self.redis_url.startswith("sentinel://")
        if given and not self.redis_url.startswith("rediss://") and not tls_by_sentinel:
            # Most likely a URL left at redis://: the operator expects TLS and would not get it.
            raise ValueError(
                f"{' and '.join(given)} set, but CERTMAN_REDIS_URL is not a rediss:// URL "
                "(nor a sentinel:// one with CERTMAN_REDIS_SENTINEL_TLS on), so Redis would be "
                "used without TLS"
            )
        return self

    @field_validator("redis_sentinel_master", "redis_sentinel_password", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _redis_sentinel(self) -> Settings:
        check_sentinel_settings(
            self.redis_url,
            self.redis_sentinel_master,
            self.redis_sentinel_password,
            self.redis_sentinel_tls,
        )
        return self

    @field_validator("issuers", mode="before")
    @classmethod
    def _issuer_names(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = tuple(part for part in re.split(r"[,\s]+", value.strip().lower()) if part)
        names = tuple(value)
        for name in names:
            if not ISSUER_NAME.match(str(name)):
                raise ValueError(
                    f"{name!r} is not an issuer name (lower-case letters, digits and _, "
                    "starting with a letter)"
                )
        if len(set(names)) != len(names):
            raise ValueError("names an issuer twice")
        return names

    @model_validator(mode="after")
    def _issuers(self) -> Settings:
        self._issuer_list = parse_issuers(self, os.environ)
        return self

    @field_validator("dns_resolver")
    @classmethod
    def _dns_resolver(cls, value: str | None) -> str | None:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError("must be host:port, such as 127.0.0.1:53")
        return value or None

    @property
    def issuer_list(self) -> tuple[Issuer, ...]:
        """The issuers, most preferred first (never empty)."""
        return self._issuer_list

    def issuer(self, name: str | None) -> Issuer:
        """The issuer called ``name``; None (orders and certificates from before issuers were
        recorded): the first one. KeyError for a name the settings no longer have."""
        if name is None:
            return self._issuer_list[0]
        for issuer in self._issuer_list:
            if issuer.name == name:
                return issuer
        raise KeyError(name)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'certman.db'}"

    @property
    def effective_pipeline_key(self) -> Path:
        return self.pipeline_key or self.data_dir / "pipeline.key"

    @property
    def effective_signing_key(self) -> Path:
        return self.signing_key or self.data_dir / "signing.key"

    # --- retention (issue 16): beat prunes attempt rows older than this -----------------------
    attempts_retention_days: float = Field(90, gt=0, description="Days attempt rows are kept.")


class SettingsError(Exception):
    """A setting is wrong; the message names the environment variable."""


def load_settings() -> Settings:
    """Read the environment, turning pydantic's report into one line per bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            if not error["loc"]:
                # A check across several variables: its message names them.
                problems.append(str(error["msg"]).removeprefix("Value error, "))
                continue
            field = str(error["loc"][0])
            problems.append(f"CERTMAN_{field.upper()}: {error['msg']}")
        raise SettingsError("; ".join(problems)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
