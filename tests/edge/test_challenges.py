"""The negative cache of challenge misses: the same unknown tokens asked again and again cost no
Redis round trip each, and a token published after a miss is answered at once."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import redis
import redis.asyncio

from edge.challenges import MISS_LIMIT, MISS_TTL, ChallengeStore
from pipeline.distribution.layout import set_challenge

from .conftest import Keys, RunningEdge, wait_for

TOKENS = [f"unknownToken{i}_abcdefghijklmnopqrstuvwxyz0123" for i in range(4)]


def _challenge(edge: RunningEdge, token: str) -> tuple[int, bytes]:
    status, _, body = edge.http("any.test", f"/.well-known/acme-challenge/{token}")
    return status, body


def _mget_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return int(stats.get("cmdstat_mget", {}).get("calls", 0))


def test_repeated_misses_cost_far_fewer_round_trips_than_requests(
    redis_client: redis.Redis, start_edge: Callable[..., RunningEdge]
) -> None:
    edge = start_edge()
    edge.wait_ready()
    before = _mget_calls(redis_client)
    started = time.monotonic()
    requests = 200
    for i in range(requests):
        assert _challenge(edge, TOKENS[i % len(TOKENS)])[0] == 404
    elapsed = time.monotonic() - started
    trips = _mget_calls(redis_client) - before
    # Each token asked of Redis once per MISS_TTL at most.
    bound = len(TOKENS) * (math.ceil(elapsed / MISS_TTL) + 1)
    assert len(TOKENS) <= trips <= bound, (trips, bound, elapsed)
    assert trips * 10 < requests


def test_a_token_published_after_a_miss_is_answered_at_once(
    keys: Keys, redis_client: redis.Redis, prefix: str, start_edge: Callable[..., RunningEdge]
) -> None:
    edge = start_edge()
    edge.wait_ready()
    token = TOKENS[0]
    assert _challenge(edge, token)[0] == 404  # the miss is remembered from here on
    published = time.monotonic()
    set_challenge(redis_client, prefix, token, token + ".ours", ttl=60, signer=keys.signer)
    wait_for(
        lambda: _challenge(edge, token) == (200, (token + ".ours").encode()),
        timeout=MISS_TTL / 2,
        what="the published token answered before the miss would have expired",
    )
    assert time.monotonic() - published < MISS_TTL


def test_misses_remembered_are_bounded(keys: Keys, redis_url: str, prefix: str) -> None:
    async def scenario() -> int:
        client = redis.asyncio.Redis.from_url(redis_url)
        store = ChallengeStore(client, prefix, keys.signers)
        try:
            for i in range(MISS_LIMIT + 50):
                assert await store.get(f"t{i}") is None
            # The oldest went first: the newest is still a miss without a round trip.
            assert f"t{MISS_LIMIT + 49}" in store._misses and "t0" not in store._misses
            return len(store._misses)
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) == MISS_LIMIT
