"""The global rate limiter on a real Redis: GCRA arithmetic against hand-computed schedules
(on an explicit clock), all-or-none reservations, blocks, expiry, and 8 processes at once."""

from __future__ import annotations

import logging
import multiprocessing
import time
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY, CollectorRegistry

from pipeline.acme.ratelimit import (
    Decision,
    Limits,
    Rate,
    RateLimitCollector,
    RateLimiter,
    Spend,
    names_key,
    parse_rate,
)
from pipeline.names import registered_domain
from pipeline.settings import Settings

T0 = 1_800_000_000.0  # an explicit clock of today's magnitude, so µs precision is exercised


@pytest.fixture
def limiter(redis_client: redis.Redis) -> RateLimiter:
    return RateLimiter(redis_client, Limits.production(), prefix="t")


def take(limiter: RateLimiter, rate: str, at: float, name: str = "b") -> Decision:
    return limiter.acquire([Spend(name, parse_rate(rate))], now=at)


# --- rates and the catalogue ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("300/3h", 300, 10800),
        ("50/7d", 50, 604800),
        ("5/1h", 5, 3600),
        ("20/1s", 20, 1),
        ("250/s", 250, 1),
        ("10/30m", 10, 1800),
        (" 2 / 0.5s ", 2, 0.5),
    ],
)
def test_parse_rate(text: str, count: int, period: float) -> None:
    assert parse_rate(text) == Rate(count, period)


@pytest.mark.parametrize("text", ["", "300", "300/3", "300/3w", "0/1s", "-1/1s", "1/0s", "a/1h"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_rate_prints_as_parsed() -> None:
    assert [str(parse_rate(t)) for t in ("300/3h", "50/7d", "250/s", "2/0.5s")] == [
        "300/3h",
        "50/7d",
        "250/1s",
        "2/0.5s",
    ]


def test_limits_from_settings_defaults_are_production() -> None:
    assert Limits.from_settings(Settings()) == Limits.production()


def test_limits_from_settings_names_the_variable() -> None:
    with pytest.raises(ValueError, match="CERTMAN_LIMIT_PACE_NEW_NONCE: invalid rate '20 per s'"):
        Limits.from_settings(Settings(limit_pace_new_nonce="20 per s"))


def test_lifted_limits_never_touch_redis(redis_client: redis.Redis) -> None:
    limits = Limits.from_settings(Settings(rate_limits=False, limit_new_orders="1/1d"))
    limiter = RateLimiter(redis_client, limits)
    for _ in range(5):
        assert limiter.reserve_new_order("acct", ["a.example.com"]).allowed
        assert limiter.pace("new-nonce").allowed
        limiter.record_authorization_failure("acct", "a.example.com")
    limiter.block("new-orders:acct", 60)
    assert redis_client.dbsize() == 0


def test_registered_domains_and_name_sets() -> None:
    assert registered_domain("www.Example.co.uk.") == "example.co.uk"
    assert registered_domain("*.shop.example.com") == "example.com"
    assert registered_domain("co.uk") == "co.uk"  # a public suffix counts for itself
    assert names_key(["B.example.com", "a.example.com"]) == names_key(
        ["a.example.com", "b.example.com."]
    )
    assert names_key(["a.example.com"]) != names_key(["a.example.com", "b.example.com"])


# --- GCRA arithmetic, hand-computed -----------------------------------------------------------


def test_burst_then_exact_spacing(limiter: RateLimiter) -> None:
    # 5 per 10 s: a burst of 5, then one token every 2 s. The TAT starts at "now" (full bucket)
    # and moves 2 s per grant; a request at t is allowed when TAT + 2 - 10 <= t.
    schedule = [
        # (t - T0, allowed, retry_after)
        (0, True, 0),  # TAT 2
        (0, True, 0),  # 4
        (0, True, 0),  # 6
        (0, True, 0),  # 8
        (0, True, 0),  # 10: the burst is spent
        (0, False, 2),  # would need TAT 12: allowed at 12 - 10 = 2
        (1, False, 1),
        (2, True, 0),  # TAT 12
        (2, False, 2),
        (5, True, 0),  # TAT 14 (allowed since 4)
        (5, False, 1),  # TAT 16 -> allowed at 6
        (6, True, 0),
        (30, True, 0),  # idle long enough: TAT restarts from now (30 -> 32), full bucket again
        (30, True, 0),
        (30, True, 0),
        (30, True, 0),
        (30, True, 0),  # TAT 40
        (30, False, 2),
    ]
    got = [
        (t, d.allowed, d.retry_after)
        for t, d in ((t, take(limiter, "5/10s", T0 + t)) for t, _, _ in schedule)
    ]
    assert got == schedule


def test_following_retry_after_gives_exact_spacing(limiter: RateLimiter) -> None:
    # 3 per second: a 1/3 s interval that no µs count represents. The script carries the
    # thirds exactly and rounds each wait up to the µs, so the k-th spaced grant lands on
    # ceil(k / 3 s) exactly, with no drift after many grants, and a client that waits exactly
    # retry_after is granted on its first try. (The clock is kept in whole µs here so that the
    # test's own float sums cannot drift either.)
    now_us, grants, refusals = round(T0 * 1e6), [], 0
    while len(grants) < 3 + 300:
        decision = take(limiter, "3/1s", now_us / 1e6)
        if decision.allowed:
            grants.append(now_us)
        else:
            refusals += 1
            now_us += round(decision.retry_after * 1e6)
    t0_us = round(T0 * 1e6)
    assert grants[:3] == [t0_us] * 3
    assert refusals == 300  # exactly one refusal (the wait) per spaced grant
    assert [g - t0_us for g in grants[3:]] == [-(-k * 1_000_000 // 3) for k in range(1, 301)]


def test_retry_after_is_the_longest_wait_and_names_its_bucket(limiter: RateLimiter) -> None:
    fast, slow = parse_rate("1/2s"), parse_rate("1/60s")
    assert limiter.acquire([Spend("fast", fast), Spend("slow", slow)], now=T0).allowed
    refused = limiter.acquire([Spend("fast", fast), Spend("slow", slow)], now=T0 + 1)
    assert refused == Decision(False, 59.0, "slow")
    refused = limiter.acquire([Spend("fast", fast)], now=T0 + 1)
    assert refused == Decision(False, 1.0, "fast")


def test_all_or_none(limiter: RateLimiter, redis_client: redis.Redis) -> None:
    rate = parse_rate("2/1h")
    assert take(limiter, "2/1h", T0, "full").allowed
    assert take(limiter, "2/1h", T0, "full").allowed  # "full" is now empty
    assert take(limiter, "2/1h", T0, "used").allowed
    used_before = redis_client.hgetall(limiter.key("used"))
    full_before = redis_client.hgetall(limiter.key("full"))

    spends = [Spend("fresh", rate), Spend("used", rate), Spend("full", rate)]
    decision = limiter.acquire(spends, now=T0 + 60)
    assert decision == Decision(False, 1800.0 - 60, "full")

    # Nothing was spent on the buckets that had tokens.
    assert not redis_client.exists(limiter.key("fresh"))
    assert redis_client.hgetall(limiter.key("used")) == used_before
    assert redis_client.hgetall(limiter.key("full")) == full_before
    assert limiter.acquire(spends, now=T0 + 1800).allowed


def test_new_order_spends_each_registered_domain_once(limiter: RateLimiter) -> None:
    names = ["a.example.com", "www.a.example.com", "shop.example.co.uk"]
    assert limiter.reserve_new_order("acct", names, now=T0).allowed
    levels = {s.name: s.level for s in limiter.status(now=T0)}
    key = names_key(names)
    assert levels == {
        "new-orders:acct": 299,
        "certs-per-domain:example.com": 49,
        "certs-per-domain:example.co.uk": 49,
        f"duplicate-certs:{key}": 4,
        "pace:new-order": 299,
        "pace:acme": 249,
    }  # the authorization-failure buckets are only checked: none was created


def test_duplicate_set_limit(limiter: RateLimiter) -> None:
    for i in range(5):
        names = ["www.example.com", "example.com"] if i % 2 else ["EXAMPLE.com", "www.example.com"]
        assert limiter.reserve_new_order(f"acct{i}", names, now=T0 + i).allowed
    refused = limiter.reserve_new_order("acct9", ["example.com", "www.example.com"], now=T0 + 5)
    # 5 per 7 days: one token per 33.6 h, counted from the first grant at T0.
    assert refused == Decision(
        False, 7 * 86400 / 5 - 5, f"duplicate-certs:{names_key(['example.com', 'www.example.com'])}"
    )
    # Another set on the same registered domain is still fine (50 per 7 days there).
    assert limiter.reserve_new_order("acct9", ["example.com"], now=T0 + 5).allowed


def test_new_orders_per_account(redis_client: redis.Redis) -> None:
    limits = Limits.from_settings(Settings(limit_new_orders="3/3h"))
    limiter = RateLimiter(redis_client, limits, prefix="t")
    for i in range(3):
        assert limiter.reserve_new_order("acct", [f"n{i}.example.net"], now=T0).allowed
    assert limiter.reserve_new_order("acct", ["n3.example.net"], now=T0) == Decision(
        False, 3600.0, "new-orders:acct"
    )
    assert limiter.reserve_new_order("other", ["n3.example.net"], now=T0).allowed


def test_exempt_renewal_spends_only_pacing(limiter: RateLimiter) -> None:
    for _ in range(10):  # more than the 5 duplicate certificates a week
        assert limiter.reserve_new_order("acct", ["example.com"], exempt=True, now=T0).allowed
    assert {s.name: s.level for s in limiter.status(now=T0)} == {
        "pace:new-order": 290,
        "pace:acme": 240,
    }


def test_pacing_can_be_left_to_the_transport(limiter: RateLimiter) -> None:
    assert limiter.reserve_new_order("acct", ["example.com"], pacing=False, now=T0).allowed
    assert limiter.reserve_new_account(pacing=False, now=T0).allowed
    assert not {s.name for s in limiter.status(now=T0)} & {"pace:new-order", "pace:acme"}


def test_from_settings_and_json_status(redis_client: redis.Redis) -> None:
    settings = Settings(redis_prefix="p", limit_new_orders="10/1h")
    limiter = RateLimiter.from_settings(redis_client, settings)
    limiter.block("new-orders:acct", 60, now=T0)
    [status] = limiter.status(now=T0)
    assert redis_client.exists("p:rl:b:new-orders:acct")
    assert status.as_dict() == {
        "name": "new-orders:acct",
        "kind": "new-orders",
        "limit": "10/1h",
        "level": 0,
        "full_at": T0 + 60 + 3600 - 360,
        "blocked_until": T0 + 60,
    }


def test_authorization_failures_stop_orders_for_that_name(limiter: RateLimiter) -> None:
    for _ in range(7):  # an observation: never refused, and the bucket does not go below empty
        limiter.record_authorization_failure("acct", "Bad.example.com", now=T0)
    refused = limiter.reserve_new_order("acct", ["ok.example.com", "bad.example.com"], now=T0)
    assert refused == Decision(False, 720.0, "authz-failures:acct:bad.example.com")  # 1h / 5
    assert limiter.reserve_new_order("acct", ["ok.example.com"], now=T0).allowed
    assert limiter.reserve_new_order("other", ["bad.example.com"], now=T0).allowed
    # One failure token is back after 12 min, and checking it never spends it.
    assert limiter.reserve_new_order("acct", ["bad.example.com"], now=T0 + 720).allowed
    assert limiter.reserve_new_order("acct", ["bad.example.com"], now=T0 + 720).allowed
    limiter.record_authorization_failure("acct", "bad.example.com", now=T0 + 720)
    assert limiter.reserve_new_order("acct", ["bad.example.com"], now=T0 + 720) == Decision(
        False, 720.0, "authz-failures:acct:bad.example.com"
    )


def test_pace(limiter: RateLimiter) -> None:
    for _ in range(20):
        assert limiter.pace("new-nonce", now=T0).allowed
    assert limiter.pace("new-nonce", now=T0) == Decision(False, 0.05, "pace:new-nonce")
    # Every request also spends the global bucket (250/s): 230 left of it.
    for _ in range(230):
        assert limiter.pace("acme", now=T0).allowed
    assert limiter.pace("new-order", now=T0) == Decision(False, 0.004, "pace:acme")
    with pytest.raises(ValueError, match="endpoint"):
        limiter.pace("revoke-cert")


def test_new_accounts(limiter: RateLimiter) -> None:
    for _ in range(5):  # new-account pacing (5/s) binds before the 10/3h
        assert limiter.reserve_new_account(now=T0).allowed
    assert limiter.reserve_new_account(now=T0) == Decision(False, 0.2, "pace:new-account")
    for i in range(5):
        assert limiter.reserve_new_account(now=T0 + 1 + i).allowed
    assert limiter.reserve_new_account(now=T0 + 10) == Decision(
        False, 1080.0 - 10, "new-accounts:local"
    )


# --- blocks -----------------------------------------------------------------------------------


def test_block_until_then_refill_at_the_cas_pace(limiter: RateLimiter) -> None:
    assert limiter.reserve_new_order("acct", ["a.example.com"], now=T0).allowed
    until = limiter.block("new-orders:acct", 30, now=T0)
    assert until == T0 + 30
    assert limiter.block("new-orders:acct", 10, now=T0) == T0 + 30  # never shortened
    assert limiter.reserve_new_order("acct", ["b.example.com"], now=T0) == Decision(
        False, 30.0, "new-orders:acct"
    )
    assert limiter.reserve_new_order("acct", ["b.example.com"], now=T0 + 29.5).retry_after == 0.5
    [status] = [s for s in limiter.status(now=T0 + 1) if s.name == "new-orders:acct"]
    assert (status.blocked_until, status.level) == (T0 + 30, 0)
    # At the block's end one token is back, as at the CA, then one per 36 s (300 / 3 h).
    assert limiter.reserve_new_order("acct", ["b.example.com"], now=T0 + 30).allowed
    assert limiter.reserve_new_order("acct", ["c.example.com"], now=T0 + 30) == Decision(
        False, 36.0, "new-orders:acct"
    )


def test_block_unknown_bucket_only_blocks(limiter: RateLimiter) -> None:
    limiter.block("something:else", 5, now=T0)
    assert take(limiter, "1/1s", T0, "something:else") == Decision(False, 5.0, "something:else")
    assert take(limiter, "1/1s", T0 + 5, "something:else").allowed


@pytest.mark.parametrize(
    ("detail", "bucket"),
    [
        (
            "too many new orders (300) from this account in the last 3h0m0s, retry after "
            "2026-09-26 11:04:12 UTC",
            "new-orders:acct",
        ),
        (
            'too many certificates (50) already issued for "example.com" in the last 168h0m0s, '
            "retry after 2026-09-26 11:04:12 UTC: see https://letsencrypt.org/docs/rate-limits/",
            "certs-per-domain:example.com",
        ),
        (
            "Error creating new order :: too many certificates already issued for registered "
            "domain: example.com",
            "certs-per-domain:example.com",
        ),
        (
            "too many certificates (5) already issued for this exact set of identifiers in the "
            "last 168h0m0s, retry after 2026-09-26 11:04:12 UTC",
            f"duplicate-certs:{names_key(['a.example.com', 'www.a.example.com'])}",
        ),
        (
            'too many failed authorizations (5) for "www.a.example.com" in the last 1h0m0s',
            "authz-failures:acct:www.a.example.com",
        ),
        (
            "too many new registrations (10) from this IP address in the last 3h0m0s",
            "new-accounts:local",
        ),
        ("too many new accounts from this IP", "new-accounts:local"),
        ("something we have never seen", "new-orders:acct"),
    ],
)
def test_block_for_problem_maps_the_wording(limiter: RateLimiter, detail: str, bucket: str) -> None:
    names = ["a.example.com", "www.a.example.com"]
    assert limiter.block_for_problem(detail, 60, account="acct", names=names) == bucket
    [status] = [s for s in limiter.status() if s.name == bucket]
    assert status.blocked_until is not None
    assert 58 < status.blocked_until - limiter.server_time() <= 60


def test_block_for_problem_logs_and_counts_once(
    redis_client: redis.Redis, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    def blocks() -> float:
        value = REGISTRY.get_sample_value("certman_ratelimit_blocks_total", {"kind": "new-orders"})
        return value or 0.0

    before = blocks()
    workers = [
        RateLimiter(redis.Redis.from_url(redis_url), Limits.production(), prefix="t")
        for _ in range(8)
    ]
    detail = "too many new orders (300) from this account in the last 3h0m0s"
    with caplog.at_level(logging.WARNING, logger="pipeline.acme.ratelimit"):
        for worker in workers:
            worker.block_for_problem(detail, 120 + 0.1, account="acct", names=["a.example.com"])
    assert len([r for r in caplog.records if "blocked" in r.getMessage()]) == 1
    assert blocks() - before == 1
    assert not workers[3].reserve_new_order("acct", ["b.example.com"]).allowed
    for worker in workers:
        worker.redis.close()


# --- expiry, status, metrics ------------------------------------------------------------------


def test_keys_expire_when_full_again(limiter: RateLimiter, redis_client: redis.Redis) -> None:
    take(limiter, "5/1h", T0)
    assert 719_000 < redis_client.pttl(limiter.key("b")) <= 720_000  # one interval: 12 min
    for _ in range(4):
        take(limiter, "5/1h", T0)
    assert 3_599_000 < redis_client.pttl(limiter.key("b")) <= 3_600_000  # the whole period
    limiter.block("b", 7200, now=T0)
    assert 7_199_000 < redis_client.pttl(limiter.key("b")) <= 7_200_000  # the block outlives it


def test_idle_key_disappears_on_the_real_clock(
    limiter: RateLimiter, redis_client: redis.Redis
) -> None:
    # One token spent: the key lives one interval (1 s), long enough to see it before it goes
    # even on a slow machine (0.1 s was not).
    assert limiter.acquire([Spend("short", parse_rate("2/2s"))]).allowed
    assert redis_client.exists(limiter.key("short"))
    deadline = time.monotonic() + 10
    while redis_client.exists(limiter.key("short")):
        assert time.monotonic() < deadline, "the bucket key never expired"
        time.sleep(0.02)
    # Gone means full: a whole burst again.
    for _ in range(2):
        assert limiter.acquire([Spend("short", parse_rate("2/2s"))]).allowed


def test_status_reports_levels_and_refill(limiter: RateLimiter) -> None:
    for _ in range(3):
        limiter.reserve_new_order("acct", ["a.example.com"], now=T0)
    by_name = {s.name: s for s in limiter.status(now=T0 + 40)}
    orders = by_name["new-orders:acct"]
    assert orders.limit == parse_rate("300/3h")
    # 3 tokens spent at T0, one back per 36 s: 298 at T0 + 40, full at T0 + 108.
    assert (orders.level, orders.full_at, orders.blocked_until) == (298, T0 + 108, None)
    assert by_name["pace:acme"].level == 250  # refilled long ago: full_at is now
    assert by_name["pace:acme"].full_at == T0 + 40


def test_collector_exposes_bucket_levels(limiter: RateLimiter) -> None:
    limiter.reserve_new_order("acct", ["a.example.com"])
    limiter.block("certs-per-domain:example.com", 600)
    registry = CollectorRegistry()
    registry.register(RateLimitCollector(limiter))
    value = registry.get_sample_value
    assert value("certman_ratelimit_tokens", {"bucket": "new-orders:acct"}) == 299
    assert value("certman_ratelimit_capacity", {"bucket": "new-orders:acct"}) == 300
    assert value("certman_ratelimit_buckets", {"kind": "certs-per-domain"}) == 1
    assert value("certman_ratelimit_buckets_blocked", {"kind": "certs-per-domain"}) == 1
    assert value("certman_ratelimit_buckets_empty", {"kind": "duplicate-certs"}) == 0
    assert value("certman_ratelimit_tokens", {"bucket": "certs-per-domain:example.com"}) is None


# --- concurrency ------------------------------------------------------------------------------

WORKERS = 8
SECONDS = 2.5
CONCURRENCY_LIMITS = {
    "limit_pace_new_nonce": "20/1s",
    "limit_pace_new_order": "30/1s",
    "limit_pace_acme": "40/1s",
}


def _hammer(redis_url: str, index: int, start: Any, results: Any) -> None:
    """One worker process: take tokens as fast as it can until the shared deadline."""
    client = redis.Redis.from_url(redis_url)
    limiter = RateLimiter(client, Limits.from_settings(Settings(**CONCURRENCY_LIMITS)), prefix="c")
    endpoint = "new-nonce" if index % 2 else "new-order"
    granted = refused = 0
    start.wait()
    deadline = time.time() + SECONDS
    while time.time() < deadline:
        if limiter.pace(endpoint).allowed:
            granted += 1
        else:
            refused += 1
    results.put((endpoint, granted, refused))
    client.close()


def test_eight_processes_never_exceed_the_limits(redis_client: redis.Redis, redis_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    processes = [
        context.Process(target=_hammer, args=(redis_url, i, start, results)) for i in range(WORKERS)
    ]
    for process in processes:
        process.start()
    began = time.time()
    start.set()
    reports = [results.get(timeout=60) for _ in processes]
    elapsed = time.time() - began  # covers every worker's window, so the bound below is safe
    for process in processes:
        process.join(timeout=10)
        assert process.exitcode == 0

    granted = {"new-nonce": 0, "new-order": 0}
    for endpoint, count, _ in reports:
        granted[endpoint] += count
    limits = Limits.from_settings(Settings(**CONCURRENCY_LIMITS))

    def bound(rate: Rate) -> float:
        return rate.count + rate.count / rate.period * elapsed + 1

    assert 0 < granted["new-nonce"] <= bound(limits.pace_new_nonce)
    assert 0 < granted["new-order"] <= bound(limits.pace_new_order)
    total = sum(granted.values())
    # The shared bucket binds: 40/s for both endpoints together, from a full burst of 40.
    assert limits.pace_acme.count <= total <= bound(limits.pace_acme)
    assert sum(r[2] for r in reports) > 0, "the workers never hit the limit: not a test"
