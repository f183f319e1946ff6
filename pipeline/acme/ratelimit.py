"""The global rate limiter: GCRA buckets in Redis, shared by every worker.

Let's Encrypt counts its limits with GCRA (a bucket of ``count`` tokens that refills one token
every ``period / count``), so we count the same way and in the same units, and a request we let
through is one the CA would let through too — provided nobody else spends from the same
account or registered domain. When somebody does, the CA answers ``rateLimited``;
:meth:`RateLimiter.block_for_problem` then blocks the matching bucket until the CA's
Retry-After so that every worker stops asking.

One bucket is one Redis hash ``<prefix>:rl:b:<name>`` holding ``tat`` and ``rem`` (the GCRA
theoretical arrival time: ``tat + rem / count`` µs, kept exact) and ``blocked`` (a block's end,
µs). A request usually needs
several buckets (an order spends on its account, on each registered domain, on its exact set
of names, and on the endpoint pacing); :data:`ACQUIRE_LUA` checks them all and reserves them
all or none in one script, so two workers can never both take the last token.

Bucket names, by kind (the first ``:``-separated part)::

    new-orders:<account>              certs-per-domain:<registered domain>
    duplicate-certs:<hash of names>   authz-failures:<account>:<name>
    new-accounts:<ip>                 pace:<endpoint>   (new-nonce, new-account, new-order, acme)
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.names import comparison_form, registered_domain
from pipeline.setting_values import MICROS, Rate, parse_rate

if TYPE_CHECKING:
    import redis

    from pipeline.settings import Issuer, Settings

log = logging.getLogger(__name__)


BLOCKS = Counter(
    "certman_ratelimit_blocks",
    "Buckets blocked after a rateLimited answer from the CA (once per block, across workers).",
    ["kind"],
)
CA_REFUSALS = Counter(
    "certman_ratelimit_ca_refusals",
    "rateLimited answers received from the CA (every one; the target is zero).",
    ["kind"],
)

# --- rates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The catalogue. Each field ``x`` comes from the setting ``limit_x`` (``CERTMAN_LIMIT_X``)."""

    new_orders: Rate
    certs_per_domain: Rate
    duplicate_certs: Rate
    authz_failures: Rate
    new_accounts: Rate
    pace_new_nonce: Rate
    pace_new_account: Rate
    pace_new_order: Rate
    pace_acme: Rate
    enabled: bool = True  # False lifts every limit: nothing is asked of Redis

    @classmethod
    def production(cls) -> Limits:
        """Let's Encrypt production's limits (https://letsencrypt.org/docs/rate-limits/)."""
        return cls(
            new_orders=parse_rate("300/3h"),
            certs_per_domain=parse_rate("50/7d"),
            duplicate_certs=parse_rate("5/7d"),
            authz_failures=parse_rate("5/1h"),
            new_accounts=parse_rate("10/3h"),
            pace_new_nonce=parse_rate("20/1s"),
            pace_new_account=parse_rate("5/1s"),
            pace_new_order=parse_rate("300/1s"),
            pace_acme=parse_rate("250/1s"),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """Build from settings; a bad rate raises ValueError naming its environment variable."""
        rates: dict[str, Rate] = {}
        for field in fields(cls):
            if field.name == "enabled":
                continue
            attribute = f"limit_{field.name}"
            try:
                rates[field.name] = parse_rate(getattr(settings, attribute))
            except ValueError as exc:
                raise ValueError(f"CERTMAN_{attribute.upper()}: {exc}") from None
        return cls(**rates, enabled=bool(settings.rate_limits))

    def for_issuer(self, issuer: Issuer) -> Limits:
        """This catalogue with an issuer's own overrides (CERTMAN_ISSUER_<NAME>_RATE_LIMITS)."""
        overrides = {name: parse_rate(rate) for name, rate in issuer.limit_overrides}
        return replace(self, **overrides, enabled=self.enabled and issuer.limits_enabled)

    def rate_of(self, bucket: str) -> Rate | None:
        """The rate of a bucket, from its name's kind; None for a name we do not know."""
        kind, _, rest = bucket.partition(":")
        if kind == "pace":
            kind = f"pace-{rest}"
        attribute = kind.replace("-", "_")
        value = getattr(self, attribute, None) if attribute != "enabled" else None
        return value if isinstance(value, Rate) else None


# --- the scripts ----------------------------------------------------------------------------

ACQUIRE_LUA = """
-- Check and reserve GCRA buckets: all of them or none.
--
-- KEYS[i]     bucket hash: 'tat' = theoretical arrival time (whole µs) + 'rem' / count µs,
--             'blocked' = end of a block (µs)
-- ARGV[1]     now in µs, or '' for the Redis server clock (the one clock all workers share)
-- ARGV[3i-1]  count of bucket i (its burst)
-- ARGV[3i]    period of bucket i in whole µs (one token comes back every period / count)
-- ARGV[3i+1]  mode: 'spend' takes a token, 'check' only asks whether one is there,
--             'force' takes one even when there is none (an observation, never refused)
-- Returns {1, 0, 0} when granted, else {0, µs to wait, index of the bucket that waits longest}.
--
-- Times are kept exact, as whole µs plus a remainder in 1/count µs: a double cannot hold
-- today's time in µs with a fraction (300/s is 3333.33 µs a token), and rounding at every
-- grant would let a busy bucket drift faster than its rate.

local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end

local new_tats, new_rems, blocks = {}, {}, {}
local wait, refused = 0, 0

-- First pass: decide for every bucket and write nothing, so a refusal leaves all untouched.
for i, key in ipairs(KEYS) do
  local count = tonumber(ARGV[3 * i - 1])
  local period = tonumber(ARGV[3 * i])
  local mode = ARGV[3 * i + 1]
  local state = redis.call('HMGET', key, 'tat', 'rem', 'blocked')
  local tat = tonumber(state[1])
  local rem = math.min(tonumber(state[2]) or 0, count - 1)  -- the count may have been changed
  local blocked = tonumber(state[3]) or 0
  local was_tat, was_rem = tat, rem

  -- A missing key, or a TAT in the past, is a full bucket: count from now.
  if not tat or tat < now then tat, rem = now, 0 end
  -- One token later: + period / count µs, carried exactly.
  local sum = rem + period
  local new_tat, new_rem = tat + math.floor(sum / count), sum % count

  local bucket_wait = 0
  if mode == 'force' then
    -- The CA counted it, but its bucket cannot go below empty: cap at "empty now", that is
    -- at now + period, unless the TAT was already past that.
    local cap_tat, cap_rem = now + period, 0
    if was_tat and (was_tat > cap_tat or (was_tat == cap_tat and was_rem > 0)) then
      cap_tat, cap_rem = was_tat, was_rem
    end
    if new_tat > cap_tat or (new_tat == cap_tat and new_rem > cap_rem) then
      new_tat, new_rem = cap_tat, cap_rem
    end
  else
    -- GCRA: the request conforms when the new TAT lies at most one period ahead of now.
    -- Wait in whole µs, rounded up, so that now + wait is never a hair too early.
    local allow_wait = new_tat - period - now
    if new_rem > 0 then allow_wait = allow_wait + 1 end
    if allow_wait > 0 then bucket_wait = allow_wait end
    if blocked > now then bucket_wait = math.max(bucket_wait, blocked - now) end
  end
  if bucket_wait > wait then
    wait, refused = bucket_wait, i
  end
  new_tats[i], new_rems[i], blocks[i] = new_tat, new_rem, blocked
end

if refused > 0 then
  return {0, wait, refused}
end

-- Second pass: reserve.
for i, key in ipairs(KEYS) do
  if ARGV[3 * i + 1] ~= 'check' then
    redis.call('HSET', key, 'tat', string.format('%d', new_tats[i]), 'rem', new_rems[i])
    -- Idle keys vanish once the bucket is full again and no block is pending, but not
    -- sooner than 2 s: a caller's own clock (ARGV's now) may run behind Redis's expiry, and a
    -- fast bucket (250/s) spent by one token would otherwise expire 4 ms later, between two of
    -- that caller's calls, handing it a whole burst again. A full bucket read is a full bucket
    -- whether its key is there or not, so keeping it a little longer changes no decision.
    local full_at = new_tats[i] + (new_rems[i] > 0 and 1 or 0)
    local ttl = math.max(full_at, blocks[i]) - now
    redis.call('PEXPIRE', key, math.max(2000, math.ceil(ttl / 1000)))
  end
end
return {1, 0, 0}
"""

BLOCK_LUA = """
-- Block one bucket until now + ARGV[1] µs (a CA's Retry-After); never shorten a longer block.
--
-- KEYS[1]  bucket hash (see the acquire script)
-- ARGV[1]  µs to block; ARGV[2] count (0 if the bucket's rate is unknown); ARGV[3] period µs
-- ARGV[4]  now in µs, or '' for the Redis server clock
-- Returns the block's end in µs.

local now
if ARGV[4] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[4])
end
local count, period = tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tat', 'rem', 'blocked')
local tat, rem = tonumber(state[1]) or now, tonumber(state[2]) or 0
local blocked = math.max(tonumber(state[3]) or 0, now + tonumber(ARGV[1]))

if count > 0 then
  -- The CA says its bucket is empty until then: empty ours to match, so that at the block's
  -- end one token is back (as at the CA) instead of a whole burst the CA would refuse.
  -- That is a TAT of blocked + period - period / count, kept exact as in the acquire script.
  local spent = period * (count - 1)
  local aligned_tat, aligned_rem = blocked + math.floor(spent / count), spent % count
  if aligned_tat > tat or (aligned_tat == tat and aligned_rem > rem) then
    tat, rem = aligned_tat, aligned_rem
  end
end
redis.call('HSET', KEYS[1], 'tat', string.format('%d', tat), 'rem', rem,
           'blocked', string.format('%d', blocked))
local full_at = tat + (rem > 0 and 1 or 0)
redis.call('PEXPIRE', KEYS[1], math.ceil((math.max(full_at, blocked) - now) / 1000))
return blocked
"""


# --- the limiter ----------------------------------------------------------------------------

Mode = Literal["spend", "check", "force"]
ENDPOINTS = ("new-nonce", "new-account", "new-order", "acme")


@dataclass(frozen=True)
class Decision:
    """The limiter's answer: go now, or wait ``retry_after`` seconds for ``bucket``."""

    allowed: bool
    retry_after: float  # seconds; 0 when allowed
    bucket: str | None = None  # the refusing bucket that needs the longest wait


ALLOWED = Decision(True, 0.0)


@dataclass(frozen=True)
class Spend:
    """One bucket a request needs: its name, its rate, and what to do with it."""

    name: str
    rate: Rate
    mode: Mode = "spend"


@dataclass(frozen=True)
class BucketStatus:
    """One bucket as it stands in Redis."""

    name: str
    limit: Rate | None  # None for a bucket whose kind this version does not know
    level: int  # whole tokens available now (0 while blocked)
    full_at: float  # epoch seconds when the bucket is full again (<= now when it is)
    blocked_until: float | None  # epoch seconds, or None when not blocked

    @property
    def kind(self) -> str:
        """The bucket's kind: ``new-orders``, ``pace``… (the name's first part)."""
        return self.name.partition(":")[0]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, for ``certman status --json`` (times in epoch seconds)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "limit": str(self.limit) if self.limit else None,
            "level": self.level,
            "full_at": self.full_at,
            "blocked_until": self.blocked_until,
        }


def names_key(names: Iterable[str]) -> str:
    """Key of an exact set of names: order and case do not matter, as at the CA."""
    joined = "\n".join(sorted({comparison_form(n) for n in names}))
    return hashlib.sha256(joined.encode()).hexdigest()[:32]


def _now_arg(now: float | None) -> str:
    # Whole µs, so that ``now + retry_after`` on a simulated clock lands exactly on the grant.
    return "" if now is None else str(round(now * MICROS))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RateLimiter:
    """Reserve tokens before every ACME request; block buckets the CA says are exhausted."""

    def __init__(
        self,
        redis: redis.Redis[Any],
        limits: Limits,
        *,
        prefix: str = "certman",
        issuer: str | None = None,
    ) -> None:
        self.redis = redis
        self.limits = limits
        self.prefix = prefix
        # One set of buckets per issuer: "default" (CERTMAN_ACME_*) keeps the names it always
        # had, <prefix>:rl:b:<bucket>; any other issuer's are <prefix>:rl:i:<issuer>:b:<bucket>.
        self.issuer = issuer
        scoped = issuer is not None and issuer != "default"
        self._scope = f"{prefix}:rl:i:{issuer}:" if scoped else f"{prefix}:rl:"
        self._bucket_prefix = f"{self._scope}b:"
        self._acquire = redis.register_script(ACQUIRE_LUA)
        self._block = redis.register_script(BLOCK_LUA)

    @classmethod
    def from_settings(cls, redis: redis.Redis[Any], settings: Settings) -> RateLimiter:
        """The limiter the settings describe: their limits, under their Redis key prefix."""
        return cls(redis, Limits.from_settings(settings), prefix=settings.redis_prefix)

    @classmethod
    def for_issuer(cls, redis: redis.Redis[Any], settings: Settings, issuer: Issuer) -> RateLimiter:
        """An issuer's limiter: the catalogue with its overrides, in buckets of its own."""
        limits = Limits.from_settings(settings).for_issuer(issuer)
        return cls(redis, limits, prefix=settings.redis_prefix, issuer=issuer.name)

    # --- generic ------------------------------------------------------------------------

    def key(self, bucket: str) -> str:
        """The Redis key of a bucket."""
        return self._bucket_prefix + bucket

    def acquire(self, spends: Sequence[Spend], *, now: float | None = None) -> Decision:
        """Check and reserve every bucket of ``spends`` at once, all or none.

        ``now`` (epoch seconds) replaces the Redis clock, for simulations and tests.
        """
        if not self.limits.enabled or not spends:
            return ALLOWED
        # The same bucket twice would be read twice and written once: merge (stronger mode wins).
        merged: dict[str, Spend] = {}
        for spend in spends:
            previous = merged.get(spend.name)
            if previous is None or previous.mode == "check":
                merged[spend.name] = spend
        ordered = list(merged.values())
        args: list[str] = [_now_arg(now)]
        for spend in ordered:
            args += [str(spend.rate.count), str(spend.rate.period_us), spend.mode]
        allowed, wait, index = self._acquire(keys=[self.key(s.name) for s in ordered], args=args)
        if allowed:
            return ALLOWED
        return Decision(False, int(wait) / MICROS, ordered[int(index) - 1].name)

    # --- what the pipeline calls ----------------------------------------------------------

    def order_spends(
        self, account: str, names: Sequence[str], *, exempt: bool = False, pacing: bool = True
    ) -> list[Spend]:
        """The buckets a new order needs (see :meth:`reserve_new_order`)."""
        limits = self.limits
        unique = sorted({comparison_form(n) for n in names})
        spends: list[Spend] = []
        if not exempt:
            spends.append(Spend(f"new-orders:{account}", limits.new_orders))
            # An order for several names spends once on each distinct registered domain.
            for domain in sorted({registered_domain(n) for n in unique}):
                spends.append(Spend(f"certs-per-domain:{domain}", limits.certs_per_domain))
            spends.append(Spend(f"duplicate-certs:{names_key(unique)}", limits.duplicate_certs))
        # A name that keeps failing would fail again: refuse, but spend nothing (failures do).
        for name in unique:
            spends.append(Spend(f"authz-failures:{account}:{name}", limits.authz_failures, "check"))
        if pacing:
            spends += self._pace_spends("new-order")
        return spends

    def reserve_new_order(
        self,
        account: str,
        names: Sequence[str],
        *,
        exempt: bool = False,
        pacing: bool = True,
        now: float | None = None,
    ) -> Decision:
        """Reserve what a newOrder needs, its request pacing included (do not also ``pace`` it).

        ``exempt`` is for ARI renewals carrying ``replaces`` inside their window, which Let's
        Encrypt exempts: they spend no new-order, per-domain or per-set token, but still wait
        for failed names and still pace the endpoint. ``pacing=False`` leaves the endpoint's
        pacing to a transport that paces every request itself.
        """
        spends = self.order_spends(account, names, exempt=exempt, pacing=pacing)
        return self.acquire(spends, now=now)

    def _pace_spends(self, endpoint: str) -> list[Spend]:
        if endpoint not in ENDPOINTS:
            raise ValueError(f"unknown ACME endpoint {endpoint!r}; expected one of {ENDPOINTS}")
        spends = [Spend("pace:acme", self.limits.pace_acme)]
        if endpoint != "acme":
            rate = getattr(self.limits, f"pace_{endpoint.replace('-', '_')}")
            spends.insert(0, Spend(f"pace:{endpoint}", rate))
        return spends

    def pace(self, endpoint: str, *, now: float | None = None) -> Decision:
        """Pace one request to an ACME endpoint (it also spends the global ``acme`` bucket)."""
        return self.acquire(self._pace_spends(endpoint), now=now)

    def reserve_new_account(
        self, ip: str = "local", *, pacing: bool = True, now: float | None = None
    ) -> Decision:
        """Reserve a newAccount request (per source IP at the CA), its pacing included unless
        ``pacing=False`` (for a transport that paces every request itself)."""
        spends = [Spend(f"new-accounts:{ip}", self.limits.new_accounts)]
        if pacing:
            spends += self._pace_spends("new-account")
        return self.acquire(spends, now=now)

    def record_authorization_failure(
        self, account: str, name: str, *, now: float | None = None
    ) -> None:
        """Count a failed authorization; never refused (the CA has counted it already)."""
        bucket = f"authz-failures:{account}:{comparison_form(name)}"
        self.acquire([Spend(bucket, self.limits.authz_failures, "force")], now=now)

    def block(self, bucket: str, seconds: float, *, now: float | None = None) -> float:
        """Refuse ``bucket`` to every worker for ``seconds``; returns the block's end (epoch s).

        The bucket is also emptied so that it refills from the block's end at its own rate,
        as the CA's does, instead of offering a whole burst the CA would refuse.
        """
        if not self.limits.enabled:
            return 0.0
        rate = self.limits.rate_of(bucket)
        count, period_us = (rate.count, rate.period_us) if rate else (0, 0)
        duration = str(math.ceil(max(seconds, 0.0) * MICROS))
        args = [duration, str(count), str(period_us), _now_arg(now)]
        until = self._block(keys=[self.key(bucket)], args=args)
        return int(until) / MICROS

    def problem_buckets(
        self, detail: str, *, account: str, names: Sequence[str], ip: str = "local"
    ) -> list[str]:
        """The bucket(s) a CA ``rateLimited`` problem detail is about (see the wording below)."""
        text = detail.lower()
        unique = sorted({comparison_form(n) for n in names})
        # Let's Encrypt names the domain in quotes ("example.com"); the old wording after "for: ".
        quoted = [comparison_form(q) for q in re.findall(r"\"([^\"\s]+)\"", text)]
        quoted += [comparison_form(q) for q in re.findall(r"issued for: ([^\s:,]+)", text)]
        if "exact set" in text or "exact same set" in text:
            return [f"duplicate-certs:{names_key(unique)}"]
        if "too many certificates" in text:
            domains = [registered_domain(q) for q in quoted] or sorted(
                {registered_domain(n) for n in unique}
            )
            return [f"certs-per-domain:{d}" for d in dict.fromkeys(domains)]
        if "failed authorization" in text:
            failed = [q for q in quoted if q in unique] or unique
            return [f"authz-failures:{account}:{n}" for n in failed]
        if "new accounts" in text or "registrations" in text:
            return [f"new-accounts:{ip}"]
        # "too many new orders", and anything we do not recognise: stop ordering on the account.
        return [f"new-orders:{account}"]

    def block_for_problem(
        self,
        detail: str,
        retry_after: float,
        *,
        account: str,
        names: Sequence[str],
        ip: str = "local",
    ) -> str:
        """Block the bucket(s) a CA ``rateLimited`` answer concerns until its Retry-After.

        Several workers hit by the same refusal log it and count it once between them.
        Returns the (first) bucket's name.
        """
        buckets = self.problem_buckets(detail, account=account, names=names, ip=ip)
        kind = buckets[0].partition(":")[0]
        CA_REFUSALS.labels(kind).inc()
        if not self.limits.enabled:
            log.warning("CA rate limit hit with local limits lifted: %s", detail)
            return buckets[0]
        for bucket in buckets:
            until = self.block(bucket, retry_after)
            guard = f"{self._scope}logged:{bucket}"
            ttl_ms = max(1000, math.ceil(retry_after * 1000))
            if self.redis.set(guard, "1", nx=True, px=ttl_ms):
                BLOCKS.labels(kind).inc()
                log.warning(
                    "rate limited by the CA: bucket %s blocked for %.0f s (until %.0f): %s",
                    bucket,
                    retry_after,
                    until,
                    detail,
                )
        return buckets[0]

    # --- the issuer as a whole --------------------------------------------------------------

    @property
    def _down_key(self) -> str:
        return f"{self._scope}issuer-down"

    def mark_issuer_down(self, seconds: float, reason: str) -> None:
        """New orders skip this issuer for ``seconds`` (it failed on its side: unreachable,
        5xx, a long rateLimited); kept even with local limits lifted. The mark lapses by
        itself: that is how renewals come back to a preferred issuer once it is healthy."""
        self.redis.set(self._down_key, reason[:500], px=max(1, math.ceil(seconds * 1000)))

    def issuer_down(self) -> tuple[str, float] | None:
        """(reason, seconds left) while this issuer is marked down, else None."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self._down_key)
            pipe.pttl(self._down_key)
            reason, ttl = pipe.execute()
        if reason is None:
            return None
        return _text(reason), max(0.0, int(ttl) / 1000)

    def clear_issuer_down(self) -> None:
        self.redis.delete(self._down_key)

    # --- observing ------------------------------------------------------------------------

    def server_time(self) -> float:
        """The Redis clock, epoch seconds (the clock buckets are kept in)."""
        seconds, micros = self.redis.time()
        return float(seconds) + float(micros) / MICROS

    def iter_bucket_names(self) -> Iterator[str]:
        """Names of every bucket now in Redis."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self._bucket_prefix) + "*"
        start = len(self._bucket_prefix)
        for key in self.redis.scan_iter(match=pattern, count=1000):
            yield _text(key)[start:]

    def status(self, *, now: float | None = None) -> list[BucketStatus]:
        """Every bucket in Redis, sorted by name; ``now`` defaults to the Redis clock."""
        names = sorted(self.iter_bucket_names())
        with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(self.key(name), "tat", "rem", "blocked")
            states: list[list[Any]] = pipe.execute()
        at = self.server_time() if now is None else now
        result = []
        for name, (tat_raw, rem_raw, blocked_raw) in zip(names, states, strict=True):
            if tat_raw is None and blocked_raw is None:
                continue  # expired between SCAN and HMGET
            rate = self.limits.rate_of(name)
            tat = float(tat_raw) / MICROS if tat_raw is not None else at
            if rate is not None and rem_raw is not None:
                tat += float(rem_raw) / rate.count / MICROS
            blocked = float(blocked_raw) / MICROS if blocked_raw is not None else 0.0
            blocked_until = blocked if blocked > at else None
            level = 0
            if rate is not None and blocked_until is None:
                # Tokens = the part of one period the TAT leaves free, in intervals (+ float slack).
                free = (at + rate.period - max(tat, at)) / rate.interval
                level = max(0, min(rate.count, math.floor(free + 1e-9)))
            result.append(BucketStatus(name, rate, level, max(tat, at), blocked_until))
        return result


class RateLimitCollector(Collector):
    """Prometheus view of the buckets, read from Redis at each scrape.

    Per-bucket gauges only for the few, fixed buckets (pacing, accounts' new orders, new
    accounts); the per-domain, per-set and per-name kinds come in thousands, so they are
    summed per kind: how many buckets exist, how many are empty, how many are blocked.
    """

    PER_BUCKET_KINDS = frozenset({"pace", "new-orders", "new-accounts"})

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the gauges (the prometheus_client collector protocol)."""
        tokens = GaugeMetricFamily(
            "certman_ratelimit_tokens", "Tokens available now in a bucket.", labels=["bucket"]
        )
        capacity = GaugeMetricFamily(
            "certman_ratelimit_capacity", "A bucket's burst (its limit's count).", labels=["bucket"]
        )
        buckets = GaugeMetricFamily(
            "certman_ratelimit_buckets", "Buckets in Redis, by kind.", labels=["kind"]
        )
        empty = GaugeMetricFamily(
            "certman_ratelimit_buckets_empty", "Buckets with no token left.", labels=["kind"]
        )
        blocked = GaugeMetricFamily(
            "certman_ratelimit_buckets_blocked",
            "Buckets blocked after a CA rateLimited answer.",
            labels=["kind"],
        )
        counts: dict[str, list[int]] = {}
        for bucket in self.limiter.status():
            per_kind = counts.setdefault(bucket.kind, [0, 0, 0])
            per_kind[0] += 1
            per_kind[1] += bucket.level == 0
            per_kind[2] += bucket.blocked_until is not None
            if bucket.kind in self.PER_BUCKET_KINDS:
                tokens.add_metric([bucket.name], bucket.level)
                if bucket.limit is not None:
                    capacity.add_metric([bucket.name], bucket.limit.count)
        for kind, (total, n_empty, n_blocked) in sorted(counts.items()):
            buckets.add_metric([kind], total)
            empty.add_metric([kind], n_empty)
            blocked.add_metric([kind], n_blocked)
        yield from (tokens, capacity, buckets, empty, blocked)
