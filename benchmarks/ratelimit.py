"""The global rate limiter: how fast it decides, and whether it paces onboarding exactly.

(1) Decisions per second with 8 client processes hammering one Redis, for ``pace`` (2 buckets)
    and ``reserve_new_order`` (7 buckets, 2 of them only checked), with limits high enough
    that every decision is a grant (the path that writes). Baselines measured in the same
    run: a bare Redis ``INCR`` round trip (1 and 8 processes), and the limiter from 1 process.

(2) A simulated-clock onboarding with Let's Encrypt's production limits: 10,000 domains spread
    over 40 registered domains, one account, each order one name + ``www``. Orders go in
    round-robin over the registered domains (a FIFO queue); each is placed at the earliest
    instant the limiter allows, by advancing the clock by the returned ``retry_after``. The
    total is compared with the analytical minimum, and every grant is checked independently
    against every limit: in any window [t1, t2] a bucket of C per P grants at most
    C + (t2 - t1) * C / P (the GCRA / token-bucket rule Let's Encrypt counts with), in exact
    integer arithmetic.

    .venv/bin/python benchmarks/ratelimit.py [--seconds 3] [--redis-url redis://127.0.0.1:6379/12]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

# Run as a script, the repository root is not on sys.path unless certman is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.acme.ratelimit import Limits, RateLimiter, names_key
from pipeline.setting_values import Rate, parse_rate

WORKERS = 8
HUGE = parse_rate("1000000000/1s")
UNLIMITED = Limits(*(HUGE,) * 9)
DOMAINS = 10_000
REGISTERED = 40
START = 1_800_000_000.0  # the simulated clock starts at a real epoch, to exercise µs precision


# --- (1) throughput -------------------------------------------------------------------------


def _worker(
    kind: str, url: str, prefix: str, index: int, seconds: float, go: Any, out: Any
) -> None:
    """One client process: as many operations as it can until the deadline."""
    client = redis.Redis.from_url(url)
    limiter = RateLimiter(client, UNLIMITED, prefix=prefix)
    operations: dict[str, Callable[[int], object]] = {
        "incr": lambda i: client.incr(f"{prefix}:incr"),
        "pace": lambda i: limiter.pace("acme"),
        "order": lambda i: limiter.reserve_new_order(
            f"acct{index % 2}",
            [f"s{index}-{i}.brand{i % 40}.com", f"www.s{index}-{i}.brand{i % 40}.com"],
        ),
    }
    operation = operations[kind]
    operation(0)  # load the script and open the connection before the clock starts
    go.wait()
    done, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        operation(done)
        done += 1
    out.put(done)
    client.close()


def rate_of(kind: str, processes: int, url: str, prefix: str, seconds: float) -> float:
    """Operations per second summed over ``processes`` client processes."""
    context = multiprocessing.get_context("fork")
    go, out = context.Event(), context.Queue()
    workers = [
        context.Process(target=_worker, args=(kind, url, prefix, i, seconds, go, out))
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    go.set()
    total: int = sum(int(out.get(timeout=seconds + 60)) for _ in workers)
    for worker in workers:
        worker.join(timeout=10)
    return total / seconds


def throughput(url: str, prefix: str, seconds: float) -> None:
    print(f"(1) decisions per second, {seconds:g} s each, Redis at {url}, {os.cpu_count()} CPUs")
    incr1 = rate_of("incr", 1, url, prefix, seconds)
    incr8 = rate_of("incr", WORKERS, url, prefix, seconds)
    print(
        f"    {'baseline: bare INCR round trip':30s} 1 process {incr1:8,.0f}/s"
        f"   {WORKERS} processes {incr8:8,.0f}/s"
    )
    for kind, label in (
        ("pace", "pace('acme'), 2 buckets"),
        ("order", "reserve_new_order, 7 buckets"),
    ):
        one = rate_of(kind, 1, url, prefix, seconds)
        eight = rate_of(kind, WORKERS, url, prefix, seconds)
        print(
            f"    {label:30s} 1 process {one:8,.0f}/s   {WORKERS} processes {eight:8,.0f}/s"
            f"   = {eight / one:.2f} x single, {eight / incr8:.2f} x INCR"
        )


# --- (2) simulated onboarding ----------------------------------------------------------------


def orders(registered_domains: int) -> list[tuple[str, list[str]]]:
    """(registered domain, names) per order, interleaved round-robin over registered domains."""
    result = []
    for i in range(DOMAINS):
        registered = f"brand{i % registered_domains}.com"
        name = f"site{i}.{registered}"
        result.append((registered, [name, f"www.{name}"]))
    return result


def theoretical_minimum(limits: Limits, registered_domains: int) -> dict[str, float]:
    """Per limit, the earliest the last order can go: (n - burst) * interval for its busiest
    bucket, n being the orders that bucket sees. The schedule can be no shorter than the largest.
    """
    per_domain = -(-DOMAINS // registered_domains)  # the busiest registered domain's orders

    def bound(n: int, rate: Rate) -> float:
        return max(0, n - rate.count) * rate.interval

    return {
        "new orders per account (300/3h)": bound(DOMAINS, limits.new_orders),
        "certificates per registered domain (50/7d)": bound(per_domain, limits.certs_per_domain),
        "exact set of names (5/7d)": bound(1, limits.duplicate_certs),
        "new-order pacing (300/s)": bound(DOMAINS, limits.pace_new_order),
        "all-requests pacing (250/s)": bound(DOMAINS, limits.pace_acme),
    }


def violations(times_us: Sequence[int], rate: Rate) -> int:
    """How far the worst window [t_i, t_j] goes over C + (t_j - t_i) * C / P (<= 0: none).

    In integers: (j - i + 1) * P - (t_j - t_i) * C <= C * P for all i <= j; with
    a_j = (j + 1) * P - t_j * C and b_i = i * P - t_i * C that is max(a_j - min b_i) <= C * P.
    """
    count, period = rate.count, rate.period_us
    worst, lowest_b = -(10**30), 10**30
    for j, t in enumerate(sorted(times_us)):
        lowest_b = min(lowest_b, j * period - t * count)
        worst = max(worst, (j + 1) * period - t * count - lowest_b)
    return worst - count * period


def check_the_checker() -> None:
    """The independent check must catch a schedule that goes over, or it proves nothing."""
    two_per_second = parse_rate("2/1s")
    assert violations([0, 0], two_per_second) <= 0
    assert violations([0, 0, 500_000], two_per_second) <= 0  # one token back after 0.5 s
    assert violations([0, 0, 499_999], two_per_second) > 0
    assert violations([0, 0, 500_000, 600_000], two_per_second) > 0


def simulate(url: str, prefix: str, registered_domains: int) -> bool:
    print(
        f"\n(2) simulated onboarding: {DOMAINS:,} domains over {registered_domains:,} registered"
        " domains, production limits, one account"
    )
    limits = Limits.production()
    client = redis.Redis.from_url(url)
    limiter = RateLimiter(client, limits, prefix=prefix)
    now_us = round(START * 1_000_000)
    grants: dict[tuple[str, str], list[int]] = defaultdict(list)
    waits = 0
    began = time.perf_counter()
    for registered, names in orders(registered_domains):
        while True:
            decision = limiter.reserve_new_order("acct", names, now=now_us / 1_000_000)
            if decision.allowed:
                break
            waits += 1
            now_us += round(decision.retry_after * 1_000_000)
        # Bucket keys recomputed here from what we know by construction, not from the limiter.
        for bucket in (
            ("new orders per account", "acct"),
            ("certificates per registered domain", registered),
            ("exact set of names", names_key(names)),
            ("new-order pacing", ""),
            ("all-requests pacing", ""),
        ):
            grants[bucket].append(now_us)
    wall = time.perf_counter() - began
    client.close()

    total = (now_us - round(START * 1_000_000)) / 1_000_000
    bounds = theoretical_minimum(limits, registered_domains)
    minimum = max(bounds.values())
    for label, value in bounds.items():
        print(f"    lower bound from {label:44s} {value:12,.1f} s")
    print(f"    theoretical minimum (the largest bound, attained)         {minimum:12,.1f} s")
    print(
        f"    simulated total                                           {total:12,.1f} s"
        f"  ({total / 86400:.2f} days; {total / minimum:.6f} x the minimum)"
    )
    print(f"    limiter calls: {DOMAINS + waits:,} ({waits:,} answered 'wait'), wall {wall:.1f} s")

    rates = {
        "new orders per account": limits.new_orders,
        "certificates per registered domain": limits.certs_per_domain,
        "exact set of names": limits.duplicate_certs,
        "new-order pacing": limits.pace_new_order,
        "all-requests pacing": limits.pace_acme,
    }
    checked: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for (family, _), times in grants.items():
        checked[family][0] += 1
        checked[family][1] += violations(times, rates[family]) > 0
    for family, (buckets, bad) in checked.items():
        label = f"{family} ({rates[family]})"
        print(f"    checked {label:46s} {buckets:6,} bucket(s), over the limit: {bad}")
    over = sum(bad for _, bad in checked.values())
    exact = abs(total - minimum) <= 0.01 * minimum
    print(f"    total within 1% of the minimum: {exact}; no request over a limit: {over == 0}")
    return exact and over == 0


def cleanup(url: str, prefix: str) -> None:
    """Remove every key this run made (the order buckets would otherwise live for 7 days)."""
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}*", count=5000):
        client.unlink(key)
    client.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("CERTMAN_BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
    )
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    prefix = f"bench-ratelimit-{os.getpid()}"
    check_the_checker()
    try:
        if not args.skip_throughput:
            throughput(args.redis_url, prefix + "-t", args.seconds)
        ok = simulate(args.redis_url, prefix + "-s", REGISTERED)
        # The same with every domain its own registered domain: the account's limit binds.
        ok = simulate(args.redis_url, prefix + "-a", DOMAINS) and ok
    finally:
        cleanup(args.redis_url, prefix)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
