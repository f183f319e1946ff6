"""Request targets (RFC 9112 section 3.2) and the upstream URLs composed from them.

Tornado's HTTP/1 server accepts any visible characters as the request target, so
``GET @10.0.0.1:8080/x`` or ``GET :6379/`` reach the handler as they are. Glued onto a site's
upstream, such a target moves the request to another host or port (server-side request
forgery), and glued onto a redirect it sends the client to another site. So a target is parsed
into its path and query here, and the upstream URL is built from the upstream's own scheme,
host and port plus those two parts, then checked to have kept the upstream's origin.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

from edge.headerrules import BadHeader, parse_host
from edge.paths import BadPath, normalize_path

__all__ = ["BadTarget", "Target", "parse_target", "upstream_url"]

# Visible ASCII without '#' (a fragment is never sent) and without '\' (which browsers treat as
# '/' and some servers as a path separator; no legitimate client sends it unencoded).
_ORIGIN_FORM = re.compile(r"/[\x21-\x22\x24-\x5b\x5d-\x7e]*")


class BadTarget(ValueError):
    """The request target is not one the edge forwards; the message says why."""


class Target(NamedTuple):
    """An origin-form target: what is sent upstream and used in redirects."""

    path: str
    query: str

    @property
    def uri(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


# OPTIONS * (RFC 9110 section 9.3.7) asks about the server, not a resource.
ASTERISK = Target("*", "")


def parse_target(method: str, raw: str, host: str) -> Target:
    """The origin-form parts of ``raw``; ``host`` is the request's own site name (normalised).

    Origin-form (``/path?query``) is taken with its path normalised (:mod:`edge.paths`);
    absolute-form (``http://name/path``) only when its authority is the request's own site
    name, and then reduced to origin-form; ``*`` only with OPTIONS. Anything else
    (authority-form, ``@host/…``, ``:port/…``) is refused.
    """
    if raw == "*":
        if method != "OPTIONS":
            raise BadTarget("'*' is a target for OPTIONS only")
        return ASTERISK
    if not raw.startswith("/"):
        raw = _from_absolute_form(raw, host)
    if _ORIGIN_FORM.fullmatch(raw) is None:
        raise BadTarget("the target has characters a request target cannot have")
    path, _, query = raw.partition("?")
    if "%" not in path and "/." not in path:
        # Nothing to decode and no dot-segment: normalize_path would return it as it is.
        return Target(path, query)
    try:
        # As the upstream will read it: a '..' must not climb out of the upstream's prefix.
        path = normalize_path(path)
    except BadPath as exc:
        raise BadTarget(str(exc)) from None
    return Target(path, query)


def _from_absolute_form(raw: str, host: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme.lower() not in ("http", "https") or not raw.lower().startswith(
        f"{parts.scheme.lower()}://"
    ):
        raise BadTarget("the target must be a path (origin-form) or an http(s) URL of this site")
    if "@" in parts.netloc:
        raise BadTarget("the target's authority must not carry user information")
    try:
        # The Host header's own rules: the authority must not pass where the same Host would not.
        name, _ = parse_host(parts.netloc)
    except BadHeader:
        raise BadTarget("the target's authority is malformed") from None
    if not name or name != host:
        raise BadTarget("the target names another host than the request's")
    path = parts.path or "/"
    return f"{path}?{parts.query}" if parts.query else path


@functools.lru_cache(maxsize=16384)
def _origin_and_prefix(upstream: str) -> tuple[str, str]:
    base = urlsplit(upstream)
    return urlunsplit((base.scheme, base.netloc, "", "", "")), base.path.rstrip("/")


def upstream_url(upstream: str, target: Target) -> str:
    """``upstream``'s scheme, host, port and path prefix with ``target``'s path and query."""
    origin, prefix = _origin_and_prefix(upstream)
    if not target.path.startswith("/"):
        # Unreachable for a target parse_target accepted; kept as the last line of defence:
        # after the origin, a path that starts with '/' cannot move the authority.
        raise BadTarget("the target would leave the site's upstream")
    if target.query:
        return f"{origin}{prefix}{target.path}?{target.query}"
    return f"{origin}{prefix}{target.path}"
