"""Renewal policy: when a certificate is due, how a failed attempt backs off, the CA's ARI
windows, and re-sealing to a new edge key or scheme.

A certificate's renewal time is fixed when it is issued: at ``renew_fraction`` of its actual
lifetime (read from the certificate, never assumed: Let's Encrypt moves to 64- and 45-day
certificates), brought forward by a deterministic per-domain spread so that a bulk onboarding
does not come back as a renewal burst. Where the CA offers ARI, its suggested window wins
(refreshed by beat: :func:`refresh_ari`). A renewal re-seals to the current edge key, so
bringing renewals forward (:func:`schedule_reseal`) is how a key or scheme is retired.

The store functions are a handful of indexed queries whatever the size of the fleet (the
indexes: certificates(current, renew_at), certificates(scheme, key_id)), and safe to run twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from pipeline.crypto.schemes import Scheme
from pipeline.errors import AttemptFailed, RetryLater
from pipeline.models import Certificate, Site

log = logging.getLogger(__name__)

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


# --- ARI -----------------------------------------------------------------------------------------
Window = tuple[datetime, datetime]


@dataclass(frozen=True)
class AriCandidate:
    cert_id: int
    domain: str
    chain_pem: str
    not_before: datetime
    not_after: datetime
    renew_at: datetime
    key_id: str
    failing: bool


def ari_batch_size(total: int, *, interval: float, period: float, floor: int = 10) -> int:
    """Certificates per run so that each is checked about once per ``period`` (seconds)."""
    return max(floor, math.ceil(total * interval / period))


def count_current(session: Session) -> int:
    return int(
        session.scalar(select(func.count()).select_from(Certificate).where(Certificate.current))
        or 0
    )


def ari_due(
    session: Session,
    *,
    now: datetime,
    period: timedelta,
    limit: int,
    issuer: str | None = None,
    first_issuer: bool = True,
) -> list[AriCandidate]:
    """Current certificates whose ARI window is oldest (never checked first).

    ``issuer``: only that issuer's certificates (ARI is asked of the issuer that issued a
    certificate, nobody else); with ``first_issuer``, also those with no recorded issuer.
    """
    only = (
        []
        if issuer is None
        else [
            (Certificate.issuer == issuer) | (Certificate.issuer.is_(None))
            if first_issuer
            else Certificate.issuer == issuer
        ]
    )
    rows = session.execute(
        select(
            Certificate.id,
            Site.domain,
            Certificate.chain_pem,
            Certificate.not_before,
            Certificate.not_after,
            Certificate.renew_at,
            Certificate.key_id,
            Site.consecutive_failures,
        )
        .join(Site, Site.id == Certificate.site_id)
        .where(
            Certificate.current,
            Certificate.ari_id.is_not(None),
            (Certificate.ari_checked_at.is_(None)) | (Certificate.ari_checked_at <= now - period),
            *only,
        )
        .order_by(Certificate.ari_checked_at.nulls_first(), Certificate.id)
        .limit(limit)
    ).all()
    return [
        AriCandidate(
            cert_id=r.id,
            domain=r.domain,
            chain_pem=r.chain_pem,
            not_before=r.not_before,
            not_after=r.not_after,
            renew_at=r.renew_at,
            key_id=r.key_id,
            failing=r.consecutive_failures > 0,
        )
        for r in rows
    ]


class AriStatus(StrEnum):
    """What a refresh made of the CA's ARI answer for a certificate (``certman domains show``)."""

    WINDOW = "window"  # a usable window: the renewal is scheduled in it
    PAST = "window_past"  # the window is over (a revocation, an incident): renew now
    AFTER_EXPIRY = "ends_after_expiry"  # nonsense (Pebble's short certificates): lifetime rule
    BEFORE_ISSUANCE = "ends_before_issuance"  # nonsense too: lifetime rule
    INVALID = "invalid_window"  # ends before it starts: lifetime rule
    ERROR = "error"  # the CA could not answer for this certificate: left as it was
    NO_ARI = "no_ari"  # the issuer offers no ARI: lifetime rule


def ari_status(candidate: AriCandidate, window: Window | None, *, now: datetime) -> AriStatus:
    """Why the CA's window is used, or why not (the same tests as :func:`ari_decision`)."""
    if window is None:
        return AriStatus.NO_ARI
    start, end = window
    if end <= start:
        return AriStatus.INVALID
    if end <= candidate.not_before:
        return AriStatus.BEFORE_ISSUANCE
    if end > candidate.not_after:
        return AriStatus.AFTER_EXPIRY
    return AriStatus.PAST if end <= now else AriStatus.WINDOW


def ari_decision(
    candidate: AriCandidate, window: Window | None, *, now: datetime, edge_key_id: str | None
) -> tuple[Window | None, datetime]:
    """The window worth keeping (None: unusable) and the renewal time it implies.

    - A window that closes before the certificate was even issued, or after it expires, is
      nonsense (Pebble's short certificates): the lifetime rule's time stands.
    - A renewal time already inside the window stays put, so refreshes do not shuffle it.
    - ARI never postpones a retry's backoff, nor a re-seal (a certificate sealed to a key other
      than the current edge key was brought forward on purpose by ``certman renew``).
    """
    if window is None:
        return None, candidate.renew_at
    start, end = window
    at = None
    if end > candidate.not_before:
        at = ari_renew_at(candidate.domain, window, now=now, not_after=candidate.not_after)
    if at is None:
        return None, candidate.renew_at
    if start <= candidate.renew_at <= end:
        return window, candidate.renew_at
    resealing = edge_key_id is not None and candidate.key_id != edge_key_id
    if candidate.failing:
        at = max(at, candidate.renew_at)
    elif resealing:
        at = min(at, candidate.renew_at)
    return window, at


@dataclass
class AriRefresh:
    checked: int = 0
    moved: int = 0
    errors: int = 0


def refresh_ari(
    session_scope: Callable[[], Any],
    window_for: Callable[[bytes], Window | None],
    *,
    now: datetime,
    period: timedelta,
    limit: int,
    edge_key_id: str | None = None,
    issuer: str | None = None,
    first_issuer: bool = True,
) -> AriRefresh:
    """Ask the CA for the window of the ``limit`` stalest certificates and store what it says,
    and what was made of it (:class:`AriStatus`). ``window_for`` answers None where the CA
    offers no ARI: those certificates are recorded as such, once per ``period`` like the rest.

    The CA is asked outside any transaction; the results are written in one bulk UPDATE.
    """
    result = AriRefresh()
    with session_scope() as session:
        candidates = ari_due(
            session, now=now, period=period, limit=limit, issuer=issuer, first_issuer=first_issuer
        )
    updates: list[dict[str, Any]] = []
    detail: str | None
    for candidate in candidates:
        try:
            window = window_for(candidate.chain_pem.encode("ascii"))
        except RetryLater as exc:
            # The CA is unreachable or busy: the rest of the batch waits for the next run.
            log.warning("ARI refresh stopped at %s: %s", candidate.domain, exc.reason)
            break
        except AttemptFailed as exc:
            # This certificate only (unknown to the CA, say): checked, and left as it is.
            log.warning("ARI refresh for %s failed: %s", candidate.domain, exc.reason)
            result.errors += 1
            window, status, detail = None, AriStatus.ERROR, exc.reason[:1000]
        else:
            status = ari_status(candidate, window, now=now)
            # The CA's own words where they are not used, so that the operator sees them.
            detail = None
            if window is not None and status not in (AriStatus.WINDOW, AriStatus.PAST):
                detail = f"{window[0].isoformat()} - {window[1].isoformat()}"
        kept, renew_at = ari_decision(candidate, window, now=now, edge_key_id=edge_key_id)
        result.checked += 1
        result.moved += renew_at != candidate.renew_at
        updates.append(
            {
                "id": candidate.cert_id,
                "ari_checked_at": now,
                "ari_window_start": kept[0] if kept else None,
                "ari_window_end": kept[1] if kept else None,
                "ari_status": str(status),
                "ari_detail": detail,
                "renew_at": renew_at,
            }
        )
    if updates:
        with session_scope() as session:
            session.execute(update(Certificate), updates)  # by primary key, one executemany
    return result


# --- re-seal migration ---------------------------------------------------------------------------
def schedule_reseal(
    session: Session,
    *,
    scheme: str | None = None,
    key_id: str | None = None,
    within: timedelta,
    now: datetime,
) -> int:
    """Bring forward the renewal of every current certificate sealed with ``scheme``/``key_id``.

    Renewal times are spread evenly over ``[now, now + within)`` (soonest expiry first), and
    never moved later: a renewal re-seals to the current edge key, so this is how a scheme or
    key is retired without a burst at the CA. Returns how many certificates were scheduled.
    """
    if scheme is None and key_id is None:
        raise ValueError("give a scheme or a key id")
    # scheme IN (every scheme) lets a key-id-only filter use the (scheme, key_id) index.
    schemes: Sequence[str] = [scheme] if scheme else [s.value for s in Scheme]
    query = (
        select(Certificate.id, Certificate.renew_at)
        .where(Certificate.current, Certificate.scheme.in_(schemes))
        .order_by(Certificate.not_after, Certificate.id)
    )
    if key_id:
        query = query.where(Certificate.key_id == key_id)
    rows = session.execute(query).all()
    n = len(rows)
    updates = [
        {"id": cert_id, "renew_at": min(renew_at, now + within * (i / n))}
        for i, (cert_id, renew_at) in enumerate(rows)
    ]
    if updates:
        session.execute(update(Certificate), updates)
    return n
