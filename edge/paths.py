"""Request paths as the upstream will read them (RFC 3986 sections 2.3, 6.2.2 and 5.2.4).

A site's upstream may be a path prefix on a shared server (``http://host/dealers/a``). The
target's path is appended to that prefix, so a ``..`` segment in it, once the upstream (or a
framework in front of it) removes dot-segments, climbs out of the prefix into another dealer's
pages. So the edge sends the path already normalised: percent-encoded unreserved characters
decoded (``%2e`` is ``.``, ``%7E`` is ``~``), then dot-segments removed, with the root as the
floor, exactly as a conforming upstream would do it.

What normalisation cannot settle is a segment that only becomes a dot-segment on a server that
also decodes reserved characters or reads other separators: ``..%2f``, ``..%5c``, ``..;`` (Tomcat
and Spring drop a ``;`` parameter before judging ``..``). Those are sent as they came if they
stay inside the prefix under that reading too, and refused when they would leave it.

Pure functions, no I/O: any data path can call them.
"""

from __future__ import annotations

import re

__all__ = ["BadPath", "normalize_path"]

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
# What some servers read as a path separator once decoded: '/' itself and '\' (IIS, Windows).
_DECODED_SEPARATOR = re.compile(r"%2[fF]|%5[cC]|\\")


class BadPath(ValueError):
    """A request path the edge does not forward; the message says why."""


def _decode_unreserved(path: str) -> str:
    def one(match: re.Match[str]) -> str:
        char = chr(int(match.group(1), 16))
        # Kept encoded otherwise, with RFC 3986's upper-case hex (section 6.2.2.1).
        return char if char in _UNRESERVED else f"%{match.group(1).upper()}"

    return _PERCENT.sub(one, path)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 for an absolute path (it starts with '/')."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def _leaves_root(path: str) -> bool:
    """Whether ``path``, read by a server that decodes ``%2F``/``%5C``, takes ``\\`` as a
    separator and drops ``;`` parameters, climbs above its first segment's parent."""
    depth = 0
    for segment in _DECODED_SEPARATOR.sub("/", path).split("/")[1:]:
        name = segment.split(";", 1)[0]
        if name == "..":
            depth -= 1
            if depth < 0:
                return True
        elif name not in ("", "."):
            depth += 1
    return False


def normalize_path(path: str) -> str:
    """``path`` (origin-form, starting with '/', no query) as the upstream should receive it.

    Raises :class:`BadPath` when an encoded separator or a ``;``-parameter makes a dot-segment
    that would leave the path's root (the upstream's prefix).
    """
    if not path.startswith("/"):
        raise BadPath("the path must start with '/'")
    normalized = _remove_dot_segments(_decode_unreserved(path))
    if _leaves_root(normalized):
        raise BadPath("the path climbs above the site's root with an encoded separator")
    return normalized
