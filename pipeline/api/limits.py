"""Per-token request rate limits, on the project's Redis limiter (GCRA buckets, one Lua script,
Redis server time: pipeline.acme.ratelimit), in buckets of their own: ``<prefix>:api:rl:b:
token:<id>``. The bucket is named by the token's id, never by the token."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import redis

from pipeline.acme.ratelimit import Decision, Limits, RateLimiter, Spend
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
