"""Request header rules: what a client's header block must satisfy before it is forwarded.

Each rule closes a way of making the upstream read a request differently from the edge:

- ``Connection`` may name hop-by-hop fields only. Naming an end-to-end field (``Host``,
  ``Content-Length``, ``Transfer-Encoding``, ...) makes a proxy drop it, so the upstream would
  see the request with another host or framing than the edge judged (``Connection: Host`` gave
  the upstream its own address as Host).
- ``Content-Length`` is ``[0-9]+`` (RFC 9110 section 8.6), in ASCII: ``str.isdigit`` also takes
  ``²`` and other Unicode digits, which ``int`` then refuses.
- A field name with ``_`` that reads as a framing or routing field with ``-`` (``Content_Length``,
  ``Transfer_Encoding``): CGI-style servers and some frameworks fold ``_`` into ``-``, so the
  upstream would frame the body by a field the edge never looked at.
- ``Host`` is one name, in lower case, with at most one trailing dot and an optional port of
  1-5 digits in range; what is forwarded is that normalised form.

Pure functions, no I/O: any data path can call them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "HOP_BY_HOP",
    "BadHeader",
    "check_connection",
    "check_content_length",
    "check_field_names",
    "parse_host",
]

# RFC 9110 section 7.6.1, plus the non-standard ones proxies have always dropped.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# End-to-end fields a client must not ask a proxy to drop (RFC 9110 section 7.6.1: a proxy
# removes whatever Connection names): framing, routing, and what the upstream authenticates by.
END_TO_END = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "content-type",
        "content-encoding",
        "content-range",
        "authorization",
        "cookie",
        "via",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
    }
)
# Fields whose '_' spelling is refused outright: framing and routing, where a second reading
# is a request smuggled past the edge.
_FRAMING = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "proxy-connection",
        "te",
        "upgrade",
        "expect",
    }
)
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
# A DNS name (letters, digits, '-', '_' as some hosts use), dot-separated labels, one optional
# trailing dot; or a bracketed IPv6 literal. Then an optional port.
_HOST = re.compile(
    r"(?P<name>(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.?"
    r"|\[[0-9a-f:.]+\])(?::(?P<port>[0-9]{1,5}))?",
    re.ASCII,
)


class BadHeader(ValueError):
    """A header block the edge refuses (400); the message says which field and why."""


def check_connection(values: Iterable[str]) -> None:
    """``values``: every ``Connection`` field value. Refuses one naming an end-to-end field."""
    for value in values:
        for token in value.split(","):
            name = token.strip().lower()
            if name in END_TO_END:
                raise BadHeader(f"Connection must not name the end-to-end field {name!r}")


def check_content_length(values: list[str]) -> int | None:
    """The body length ``Content-Length`` gives (None without one), or :class:`BadHeader`."""
    if not values:
        return None
    lengths = {v.strip() for value in values for v in value.split(",")}
    if len(lengths) != 1:
        raise BadHeader("Content-Length has differing values")
    (length,) = lengths
    if _DIGITS.fullmatch(length) is None:
        raise BadHeader("Content-Length must be decimal digits only")
    return int(length)


def check_field_names(names: Iterable[str]) -> None:
    """Refuses a field name with ``_`` that reads as a framing field with ``-``."""
    for name in names:
        if "_" in name and name.lower().replace("_", "-") in _FRAMING:
            raise BadHeader(f"the field name {name!r} is ambiguous with an underscore")


def parse_host(raw: str) -> tuple[str, int | None]:
    """``Host`` as (name in lower case without a trailing dot, port or None)."""
    match = _HOST.fullmatch(raw.strip().lower())
    if match is None:
        raise BadHeader("Host is not a host name with an optional port")
    name = match.group("name").removesuffix(".")
    port_text = match.group("port")
    port = int(port_text) if port_text is not None else None
    if port is not None and not 1 <= port <= 65535:
        raise BadHeader("Host has a port out of range")
    return name, port
