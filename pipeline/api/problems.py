"""RFC 9457 problem documents: every failure the API answers is one, with a stable ``type``.

The ``type`` URIs are identifiers (docs/api.md lists them), not pages to fetch; a client
branches on them, never on ``detail``, which is the human sentence (the CLI's message).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tornado.web import HTTPError

PROBLEM_BASE = "https://certman.dev/problems/"
CONTENT_TYPE = "application/problem+json"


@dataclass(frozen=True)
class Kind:
    """One kind of failure: its ``type`` slug, HTTP status and ``title``."""

    slug: str
    status: int
    title: str

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug


BAD_NAME = Kind("bad-name", 400, "Not a name certman can get a certificate for")
REFUSED_UPSTREAM = Kind("refused-upstream", 400, "Upstream refused by the outbound policy")
INVALID_REQUEST = Kind("invalid-request", 400, "The request is not valid")
UNAUTHORISED = Kind("unauthorised", 401, "A valid bearer token is needed")
FORBIDDEN = Kind("forbidden", 403, "The token lacks the scope this needs")
NOT_FOUND = Kind("not-found", 404, "No such site")
NO_ROUTE = Kind("no-route", 404, "No such resource")
METHOD_NOT_ALLOWED = Kind("method-not-allowed", 405, "Method not allowed on this resource")
CONFLICT = Kind("conflict", 409, "The change conflicts with what is stored")
PRECONDITION_FAILED = Kind("precondition-failed", 412, "The site changed since its ETag")
TOO_LARGE = Kind("too-large", 413, "The request is larger than allowed")
TOO_MANY_SITES = Kind("too-many-sites", 400, "More sites in one batch than allowed")
UNSUPPORTED_MEDIA = Kind("unsupported-media-type", 415, "The body must be application/json")
RATE_LIMITED = Kind("rate-limited", 429, "Too many requests for this token")
CA_REFUSED = Kind("ca-refused", 502, "The CA did not do what was asked")
UNAVAILABLE = Kind("unavailable", 503, "A backing service is unavailable")
INTERNAL = Kind("internal", 500, "Internal error")

KINDS = (
    BAD_NAME, REFUSED_UPSTREAM, INVALID_REQUEST, UNAUTHORISED, FORBIDDEN, NOT_FOUND, NO_ROUTE,
    METHOD_NOT_ALLOWED, CONFLICT, PRECONDITION_FAILED, TOO_LARGE, TOO_MANY_SITES, UNSUPPORTED_MEDIA,
    RATE_LIMITED,
    CA_REFUSED, UNAVAILABLE, INTERNAL,
)  # fmt: skip


class Problem(HTTPError):
    """Raised by a handler or a service call; answered as a problem document (an HTTPError, so
    Tornado hands it to the handler's ``write_error`` as the failure it is, not as a crash)."""

    def __init__(
        self,
        kind: Kind,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(kind.status, reason=kind.title)
        self.kind = kind
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def document(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.kind.type,
            "title": self.kind.title,
            "status": self.kind.status,
        }
        if self.detail:
            body["detail"] = self.detail
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


def kind_for_status(status: int) -> Kind:
    """The kind of a failure Tornado itself answers (an unknown method, a malformed request)."""
    for kind in KINDS:
        if kind.status == status and kind not in (NOT_FOUND, BAD_NAME, REFUSED_UPSTREAM,
                                                  TOO_MANY_SITES):  # fmt: skip
            return kind
    return INVALID_REQUEST if 400 <= status < 500 else INTERNAL
