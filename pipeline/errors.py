"""How issuance fails, told apart the way Let's Encrypt's integration guide asks.

IssuanceProblem
├── RetryLater          try this step again after ``countdown`` seconds (network, badNonce,
│   ├── RateLimited     5xx, a limiter wait, a CA ``rateLimited`` with its Retry-After;
│   │                   ``by_ca`` tells the CA's refusal from our own limiter's wait)
│   └── PollAgain       the CA is still validating or issuing: expected, not trouble
└── AttemptFailed       this attempt is over (validation failed); the next one is scheduled
    │                   at 1 min, 10 min, 100 min, then daily. ``error_type`` is the ACME
    │                   error type; ``already_replaced`` flags an ARI renewal the CA refuses
    │                   because the certificate already has a replacement order
    ├── NameRefused     the CA will not issue for a name (rejectedIdentifier, caa,
    │                   unauthorized when ordering): blocked until someone acts
    └── AccountRefused  the CA would not register our account with it (a wrong External
                        Account Binding, say): that issuer is unusable, not the site

:func:`fallback_cause` says which of these are the CA's side of things, worth trying the next
issuer for (docs/architecture.md, "Issuers and fallback"); a site's own problems never are.

:data:`ACME_ERRORS` is the one table of ACME error types (RFC 8555 section 6.7, RFC 9773) and
what each means to the pipeline, when a request is answered with it and when a challenge's
validation ends with it; :func:`meaning` reads it, and every step goes through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class IssuanceProblem(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(IssuanceProblem):
    def __init__(self, reason: str, countdown: float) -> None:
        super().__init__(reason)
        self.countdown = countdown


class RateLimited(RetryLater):
    """The CA (``by_ca``) or our own limiter said not now."""

    def __init__(
        self, reason: str, countdown: float, *, by_ca: bool = False, bucket: str | None = None
    ) -> None:
        super().__init__(reason, countdown)
        self.by_ca = by_ca
        self.bucket = bucket  # the limiter bucket concerned, where known


class PollAgain(RetryLater):
    """The CA has not finished yet. Every order waits like this once or twice, so it leaves no
    attempt row behind (the step records the poll count itself)."""


class AttemptFailed(IssuanceProblem):
    def __init__(
        self, reason: str, *, error_type: str | None = None, already_replaced: bool = False
    ) -> None:
        super().__init__(reason)
        self.error_type = error_type
        self.already_replaced = already_replaced


class NameRefused(AttemptFailed):
    pass


class AccountRefused(AttemptFailed):
    """The issuer refused to register our account (newAccount failed for good)."""


# --- when to try another issuer ------------------------------------------------------------------
class FallbackCause(StrEnum):
    """Why an order left an issuer for the next one (orders.fallback_reason starts with it)."""

    UNAVAILABLE = "unavailable"  # unreachable, 5xx, serverInternal, badNonce beyond retries
    RATE_LIMITED = "rate-limited"  # rateLimited (or our limiter for it) beyond the max wait
    ACCOUNT = "account-refused"  # no account there (External Account Binding refused, ...)


# Buckets about a site's own names: a name that keeps failing validation fails alike elsewhere.
SITE_BUCKETS = ("authz-failures",)


def fallback_cause(problem: IssuanceProblem, *, max_wait: float) -> FallbackCause | None:
    """The CA's side of things, worth the next issuer; None for what would fail alike anywhere
    (DNS, CAA, rejectedIdentifier, validation) or is only worth waiting for."""
    if isinstance(problem, PollAgain):
        return None
    if isinstance(problem, AccountRefused):
        return FallbackCause.ACCOUNT
    if isinstance(problem, RateLimited):
        if problem.bucket is not None and problem.bucket.startswith(SITE_BUCKETS):
            return None
        # Pacing waits are short; a refusal for longer than is worth waiting sends us on.
        return FallbackCause.RATE_LIMITED if problem.countdown > max_wait else None
    if isinstance(problem, RetryLater):
        return FallbackCause.UNAVAILABLE
    return None


# --- the table -----------------------------------------------------------------------------------
class Outcome(StrEnum):
    """What an ACME error means to the pipeline."""

    RETRY = "retry"  # RetryLater: the same step again, after a countdown
    RATE_LIMITED = "rate-limited"  # RateLimited(by_ca=True): every worker waits for the bucket
    END_ATTEMPT = "end-attempt"  # AttemptFailed: the site backs off and tries again
    REFUSED = "refused"  # NameRefused: blocked until someone runs `certman domains retry`


@dataclass(frozen=True)
class Meaning:
    """An error type's outcome when a request is answered with it, and when a challenge's
    validation ends with it."""

    request: Outcome
    validation: Outcome = Outcome.END_ATTEMPT


ACME_ERRORS: dict[str, Meaning] = {
    # Transient: the same request may well succeed (badNonce is retried inside the request
    # first; orderNotReady when finalising an order the CA has not marked ready yet).
    "badNonce": Meaning(Outcome.RETRY),
    "serverInternal": Meaning(Outcome.RETRY),
    "orderNotReady": Meaning(Outcome.RETRY),
    "rateLimited": Meaning(Outcome.RATE_LIMITED),
    # The CA will not issue for the name whatever we serve.
    "rejectedIdentifier": Meaning(Outcome.REFUSED, Outcome.REFUSED),
    "caa": Meaning(Outcome.REFUSED, Outcome.REFUSED),
    "unsupportedIdentifier": Meaning(Outcome.REFUSED, Outcome.REFUSED),
    # Refused when ordering (the account may not have the name); in a challenge's error it is
    # what the CA says when it fetched the token and got a 404 or the wrong body (DNS or an
    # AAAA record pointing elsewhere), which the customer can fix: back off, do not block.
    "unauthorized": Meaning(Outcome.REFUSED, Outcome.END_ATTEMPT),
    # RFC 9773: the certificate named in ``replaces`` already has a replacement order.
    "alreadyReplaced": Meaning(Outcome.END_ATTEMPT),
    # Validation failures proper: the dealer's DNS, server or network.
    "connection": Meaning(Outcome.END_ATTEMPT),
    "dns": Meaning(Outcome.END_ATTEMPT),
    "incorrectResponse": Meaning(Outcome.END_ATTEMPT),
    "tls": Meaning(Outcome.END_ATTEMPT),
    # Everything else RFC 8555 names ends the attempt too (malformed, badCSR, ...).
}
UNKNOWN = Meaning(Outcome.END_ATTEMPT)
# A failure without any ACME error type (a 5xx with no problem document): retried.
NO_TYPE = Meaning(Outcome.RETRY)


def meaning(code: str | None) -> Meaning:
    """What the ACME error type ``code`` means (None: an answer without a problem type)."""
    if not code:
        return NO_TYPE
    return ACME_ERRORS.get(code, UNKNOWN)


def validation_problem(detail: str, code: str | None) -> AttemptFailed:
    """The problem for a challenge whose validation ended with error type ``code``."""
    if meaning(code).validation is Outcome.REFUSED:
        return NameRefused(detail, error_type=code)
    return AttemptFailed(detail, error_type=code)
