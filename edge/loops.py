"""Loop detection with ``Via`` (RFC 9110 section 7.6.3).

Every request the edge forwards carries ``Via: 1.1 <pseudonym>``. A request that arrives already
carrying this edge's pseudonym has been round once (a site whose upstream leads back to the
edge, by name, address or another proxy) and is refused with 508 Loop Detected instead of being
forwarded again, which would multiply one request into as many as the pool holds.

The pseudonym is shared by every process of one edge host and says nothing about the host to
whoever reads it: by default a short hash of the host name.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Iterable

__all__ = ["default_pseudonym", "has_looped", "valid_pseudonym", "via_value"]

# A token (RFC 9110 section 5.6.2) of letters, digits, '-', '.', '_': what a Via entry's
# received-by may hold without quoting.
_PSEUDONYM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", re.ASCII)


def default_pseudonym(hostname: str | None = None) -> str:
    name = hostname if hostname is not None else socket.gethostname()
    return "certman-" + hashlib.sha256(name.encode()).hexdigest()[:12]


def valid_pseudonym(value: str) -> bool:
    return _PSEUDONYM.fullmatch(value) is not None


def _received_by(values: Iterable[str]) -> Iterable[str]:
    """The received-by of every Via entry (``[protocol/]version received-by [comment]``)."""
    for value in values:
        for entry in value.split(","):
            parts = entry.split()
            if len(parts) >= 2:
                yield parts[1].lower()


def has_looped(via_values: Iterable[str], pseudonym: str) -> bool:
    return pseudonym.lower() in set(_received_by(via_values))


def via_value(existing: list[str], pseudonym: str, version: str = "1.1") -> str:
    """The Via the upstream receives: what came before, then this hop."""
    hop = f"{version} {pseudonym}"
    prior = ", ".join(v.strip() for v in existing if v.strip())
    return f"{prior}, {hop}" if prior else hop
