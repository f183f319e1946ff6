"""Per-token request rate limits, on the project's Redis limiter (GCRA buckets, one Lua script,
Redis server time: pipeline.acme.ratelimit), in buckets of their own: ``<prefix>:api:rl:b:
token:<id>``. The bucket is named by the token's id, never by the token."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import redis

from pipeline.acme.ratelimit import Decision, Limits, Mode, RateLimiter, Spend
from pipeline.setting_values import Rate


class TokenLimiter:
    """``rate`` requests per token, every API process together."""

    def __init__(self, client: redis.Redis[Any], prefix: str, rate: Rate) -> None:
        self.rate = rate
        # The limiter's catalogue is the CA's; only its generic acquire() is used here.
        self._limiter = RateLimiter(
            client, replace(Limits.production(), enabled=True), prefix=f"{prefix}:api"
        )

    def take(self, token_id: int) -> Decision:
        return self._limiter.acquire([Spend(f"token:{token_id}", self.rate)])


class FailureLimiter:
    """``rate`` failed authentications per client address, every API process together, in
    buckets ``<prefix>:api:rl:b:auth-failures:<address>``: past it the address is refused (429)
    before its token is looked up, so a flood of bad tokens cannot hold the store's threads."""

    def __init__(self, client: redis.Redis[Any], prefix: str, rate: Rate) -> None:
        self.rate = rate
        self._limiter = RateLimiter(
            client, replace(Limits.production(), enabled=True), prefix=f"{prefix}:api"
        )

    def _spend(self, address: str, mode: Mode) -> Spend:
        return Spend(f"auth-failures:{address}", self.rate, mode)

    def check(self, address: str) -> Decision:
        """Whether ``address`` may try a token now (nothing is spent)."""
        return self._limiter.acquire([self._spend(address, "check")])

    def failed(self, address: str) -> None:
        """Count one failed authentication of ``address`` (always counted)."""
        self._limiter.acquire([self._spend(address, "force")])
