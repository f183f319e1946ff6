"""When a certificate is due for renewal, and how a failed attempt backs off.

A certificate's renewal time is fixed when it is issued: at ``renew_fraction`` of its actual
lifetime (read from the certificate, never assumed: Let's Encrypt moves to 64- and 45-day
certificates), brought forward by a deterministic per-domain spread so that a bulk onboarding
does not come back as a renewal burst. Where the CA offers ARI, its suggested window wins.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

# Let's Encrypt's integration guide: 1 minute, 10 minutes, 100 minutes, then daily.
BACKOFF = (timedelta(minutes=1), timedelta(minutes=10), timedelta(minutes=100), timedelta(days=1))


def spread_fraction(domain: str) -> float:
    """A stable number in [0, 1) for a domain: the same on every worker and every run."""
    digest = hashlib.sha256(domain.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def lifetime_renew_at(
    domain: str, not_before: datetime, not_after: datetime, *, fraction: float, spread: float
) -> datetime:
    lifetime = not_after - not_before
    return not_before + lifetime * (fraction - spread * spread_fraction(domain))


def ari_renew_at(
    domain: str, window: tuple[datetime, datetime], *, now: datetime, not_after: datetime
) -> datetime | None:
    """A moment in the CA's window, or None when the window is unusable.

    A window already open or past means renew now; one that ends after expiry is nonsense
    (seen with Pebble's short certificates) and falls back to the lifetime rule.
    """
    start, end = window
    if end <= start or end > not_after:
        return None
    if end <= now:
        return now
    start = max(start, now)
    return start + (end - start) * spread_fraction(domain)


def backoff(failures: int) -> timedelta:
    """The wait after the n-th consecutive failure (n >= 1)."""
    return BACKOFF[min(max(failures, 1), len(BACKOFF)) - 1]
