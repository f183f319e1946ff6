"""How issuance fails, told apart the way Let's Encrypt's integration guide asks.

IssuanceProblem
├── RetryLater          try this step again after ``countdown`` seconds (network, badNonce,
│   ├── RateLimited     5xx, a limiter wait, a CA ``rateLimited`` with its Retry-After)
│   └── PollAgain       the CA is still validating or issuing: expected, not trouble
├── AttemptFailed       this attempt is over (validation failed); the next one is scheduled
│                       at 1 min, 10 min, 100 min, then daily
└── NameRefused         the CA will not issue for a name (unauthorized, rejectedIdentifier,
                        caa): blocked until someone acts
"""

from __future__ import annotations


class IssuanceProblem(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(IssuanceProblem):
    def __init__(self, reason: str, countdown: float) -> None:
        super().__init__(reason)
        self.countdown = countdown


class RateLimited(RetryLater):
    """The CA (or our own limiter) said not now."""


class PollAgain(RetryLater):
    """The CA has not finished yet. Every order waits like this once or twice, so it leaves no
    attempt row behind (the step records the poll count itself)."""


class AttemptFailed(IssuanceProblem):
    def __init__(self, reason: str, *, error_type: str | None = None) -> None:
        super().__init__(reason)
        self.error_type = error_type


class NameRefused(AttemptFailed):
    pass
