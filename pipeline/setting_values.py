"""The value types of certman's settings and their parsers: rates (``300/3h``), networks
(CIDR lists) and Redis Sentinel URLs.

A leaf beside :mod:`pipeline.settings`, which validates with these, as do the modules that use
the values (:mod:`pipeline.acme.ratelimit`, :mod:`pipeline.outbound`,
:mod:`pipeline.redis_connect`): settings then imports nothing of the pipeline's services.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from urllib.parse import unquote, urlsplit

__all__ = [
    "DEFAULT_SENTINEL_PORT",
    "MICROS",
    "Network",
    "Rate",
    "SentinelUrl",
    "check_sentinel_settings",
    "is_sentinel",
    "parse_networks",
    "parse_rate",
    "parse_sentinel_url",
]

Network = IPv4Network | IPv6Network
MICROS = 1_000_000


# --- rates ----------------------------------------------------------------------------------
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([smhd])\s*$")


@dataclass(frozen=True)
class Rate:
    """``count`` requests per ``period`` seconds: a burst of ``count``, refilled evenly."""

    count: int
    period: float

    def __post_init__(self) -> None:
        if self.count < 1 or not self.period >= 1e-6:
            raise ValueError(f"a rate needs a count >= 1 and a period > 0, not {self}")

    @property
    def period_us(self) -> int:
        """The period in whole µs, the unit the Lua scripts count in."""
        return round(self.period * MICROS)

    @property
    def interval(self) -> float:
        """Seconds to refill one token."""
        return self.period / self.count

    def __str__(self) -> str:
        for unit in ("d", "h", "m"):
            size = _UNITS[unit]
            if self.period % size == 0:
                return f"{self.count}/{self.period // size:g}{unit}"
        return f"{self.count}/{self.period:g}s"


def parse_rate(text: str) -> Rate:
    """Parse ``"300/3h"``, ``"50/7d"``, ``"250/s"``… (units s, m, h, d) into a :class:`Rate`."""
    match = _RATE_RE.match(text)
    if match is None:
        raise ValueError(
            f"invalid rate {text!r}: expected COUNT/PERIOD such as '300/3h', '50/7d' or "
            "'250/s' (units s, m, h, d)"
        )
    count, amount, unit = match.groups()
    period = float(amount or 1) * _UNITS[unit]
    if int(count) < 1 or period <= 0:
        raise ValueError(f"invalid rate {text!r}: the count and the period must be positive")
    return Rate(int(count), period)


# --- networks -------------------------------------------------------------------------------
def parse_networks(raw: str | Iterable[str]) -> tuple[Network, ...]:
    """CIDRs separated by commas and/or spaces (a bare address is its /32 or /128).

    :class:`ValueError` names the entry that is wrong.
    """
    items = raw.replace(",", " ").split() if isinstance(raw, str) else list(raw)
    networks: list[Network] = []
    for item in items:
        try:
            network = ip_network(item, strict=True)
        except ValueError as exc:
            if "has host bits set" in str(exc):
                suggestion = ip_network(item, strict=False)
                raise ValueError(
                    f"{item!r} has host bits set (did you mean {suggestion}?)"
                ) from None
            raise ValueError(f"{item!r} is not a network such as 10.0.0.0/8 or fd00::/8") from None
        if network not in networks:
            networks.append(network)
    return tuple(networks)


# --- Redis Sentinel URLs ----------------------------------------------------------------------
DEFAULT_SENTINEL_PORT = 26379


def is_sentinel(url: str) -> bool:
    return url.lower().startswith("sentinel://")


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``sentinel://`` URL list: the Sentinels, and the master's database and
    credentials (from the first URL, as kombu reads them)."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse ``sentinel://[user:pass@]host:port[/db];sentinel://host:port;...``.

    Raises ValueError saying what is wrong (without repeating a password)."""
    parts = [part.strip() for part in url.split(";") if part.strip()]
    if not parts:
        raise ValueError("no Sentinel address")
    sentinels: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    for position, part in enumerate(parts):
        if not is_sentinel(part):
            raise ValueError(
                f"each ';'-separated address must be a sentinel:// URL (#{position + 1} is not)"
            )
        split = urlsplit(part)
        if split.query or split.fragment:
            raise ValueError("sentinel:// URLs take no options (?...)")
        try:
            host, port = split.hostname, split.port or DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ValueError(f"address #{position + 1} has an invalid port") from None
        if not host:
            raise ValueError(f"address #{position + 1} has no host")
        path = split.path.strip("/")
        if position == 0:
            if path:
                if not path.isdigit():
                    raise ValueError("the database after the first address must be a number")
                db = int(path)
            username = unquote(split.username) if split.username else None
            password = unquote(split.password) if split.password is not None else None
        elif path or split.username or split.password:
            # kombu reads only the first address's database and credentials: elsewhere they
            # would reach redis-py's clients but not the broker.
            raise ValueError(
                "the database number and Redis's user and password go on the first "
                "sentinel:// address only (kombu reads no other)"
            )
        sentinels.append((host, port))
    return SentinelUrl(tuple(sentinels), db, username, password)


def check_sentinel_settings(
    url: str, master: str | None, sentinel_password: str | None, tls: bool = False
) -> None:
    """The settings' check: one line naming the variable that is wrong."""
    if tls and not is_sentinel(url):
        raise ValueError(
            "CERTMAN_REDIS_SENTINEL_TLS is on, but CERTMAN_REDIS_URL is not a sentinel:// URL "
            "(for one Redis over TLS, use a rediss:// URL)"
        )
    if is_sentinel(url):
        try:
            parse_sentinel_url(url)
        except ValueError as exc:
            raise ValueError(f"CERTMAN_REDIS_URL: {exc}") from None
        if not master:
            raise ValueError(
                "CERTMAN_REDIS_SENTINEL_MASTER must be set with a sentinel:// CERTMAN_REDIS_URL: "
                "the name the Sentinels monitor the master under"
            )
        return
    given = [
        name
        for name, value in (
            ("CERTMAN_REDIS_SENTINEL_MASTER", master),
            ("CERTMAN_REDIS_SENTINEL_PASSWORD", sentinel_password),
        )
        if value
    ]
    if given:
        raise ValueError(
            f"{' and '.join(given)} set, but CERTMAN_REDIS_URL is not a sentinel:// URL, "
            "so no Sentinel would be asked"
        )
