"""One site's story, for ``certman domains show``: its names and state, the certificate it
serves, when and why that renews, the order in flight, the last attempts and the next one.

A handful of indexed queries by the site's id; the certificate is read from its chain (issuer,
key type), never assumed from the settings.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.fleet.chain import STEPS
from pipeline.fleet.dispatch import UNFINISHED
from pipeline.fleet.renewal import AriStatus
from pipeline.fleet.sites import find_site
from pipeline.models import Attempt, Certificate, Order, Site, SiteChange, SiteState
from pipeline.settings import Settings

_TASK_AT = {step.at: f"certman.issue.{step.name}" for step in STEPS}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def key_type_of(leaf: x509.Certificate) -> str:
    key = leaf.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, key.curve.name)
    if isinstance(key, rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return type(key).__name__


def site_report(
    session: Session,
    name: str,
    *,
    now: datetime,
    settings: Settings,
    attempts: int = 10,
    history: int = 20,
) -> dict[str, Any]:
    """The ``certman domains show --json`` object (docs/architecture.md, "Contracts")."""
    site = find_site(session, name)
    cert = session.scalar(
        select(Certificate).where(Certificate.site_id == site.id, Certificate.current)
    )
    order = session.scalar(
        select(Order)
        .where(Order.site_id == site.id, Order.step.in_(UNFINISHED))
        .order_by(Order.id.desc())
        .limit(1)
    )
    recent = session.scalars(
        select(Attempt)
        .where(Attempt.site_id == site.id)
        .order_by(Attempt.created_at.desc(), Attempt.id.desc())
        .limit(attempts)
    ).all()
    return {
        "domain": site.domain,
        "aliases": [n for n in site.all_names if n != site.domain],
        "state": str(site.state),
        "upstream": site.upstream,
        "customer_ref": site.customer_ref,
        "profile": site.profile,
        "key_type": site.key_type,
        "preferred_issuer": site.preferred_issuer,
        "last_error": site.last_error,
        "consecutive_failures": site.consecutive_failures,
        "certificate": _certificate(session, cert) if cert else None,
        "renewal": _renewal(site, cert, now=now, settings=settings) if cert else None,
        "order": _order(order, site.domain, now=now) if order else None,
        "attempts": [
            {
                "at": _iso(a.created_at),
                "order_id": a.order_id,
                "step": a.step,
                "outcome": a.outcome,
                "error_type": a.error_type,
                "detail": a.detail,
            }
            for a in recent
        ],
        "next_attempt": _next_attempt(site, cert, order),
        # Added key (compatible): who changed the site, newest first.
        "history": site_history(session, site.domain, limit=history),
    }


def site_history(session: Session, domain: str, *, limit: int = 20) -> list[dict[str, Any]]:
    """The last ``limit`` changes of a site and who made them, newest first (a removed site's
    history stays: it is keyed by the domain)."""
    rows = session.scalars(
        select(SiteChange)
        .where(SiteChange.domain == domain)
        .order_by(SiteChange.id.desc())
        .limit(limit)
    )
    return [
        {"at": _iso(row.created_at), "action": row.action, "actor": row.actor,
         "detail": row.detail}
        for row in rows
    ]  # fmt: skip


def _certificate(session: Session, cert: Certificate) -> dict[str, Any]:
    leaf = x509.load_pem_x509_certificate(cert.chain_pem.encode("ascii"))
    profile = (
        session.scalar(select(Order.profile).where(Order.id == cert.order_id))
        if cert.order_id
        else None
    )
    return {
        "serial": cert.serial,
        "issuer": leaf.issuer.rfc4514_string(),
        # The configured issuer (CERTMAN_ISSUERS) that issued it; None: the first, before
        # issuers were recorded.
        "issued_by": cert.issuer,
        "not_before": _iso(cert.not_before),
        "not_after": _iso(cert.not_after),
        "key_type": key_type_of(leaf),
        "scheme": cert.scheme,
        "key_id": cert.key_id,
        "profile": profile,
        "ari_id": cert.ari_id,
        "issued_at": _iso(cert.created_at),
    }


def _renewal(site: Site, cert: Certificate, *, now: datetime, settings: Settings) -> dict[str, Any]:
    lifetime = (cert.not_after - cert.not_before).total_seconds()
    fraction = (cert.renew_at - cert.not_before).total_seconds() / lifetime if lifetime else 0.0
    window = (
        {"start": _iso(cert.ari_window_start), "end": _iso(cert.ari_window_end)}
        if cert.ari_window_start and cert.ari_window_end
        else None
    )
    lowest = settings.renew_fraction - settings.renew_spread
    if site.consecutive_failures and site.state == SiteState.ACTIVE:
        reason = "backoff"
        why = f"retry after {site.consecutive_failures} failed renewal attempts"
    elif (
        cert.ari_window_start
        and cert.ari_window_end
        and cert.ari_window_start <= cert.renew_at <= cert.ari_window_end
    ):
        reason = "ari"
        why = (
            f"inside the CA's ARI window {window and window['start']} - {window and window['end']}"
        )
    elif fraction < lowest - 0.005:
        reason = "brought_forward"
        why = (
            f"brought forward to {fraction:.0%} of its lifetime (certman renew, domains update, "
            "revoke or retry)"
        )
    else:
        reason = "lifetime"
        why = f"at {fraction:.0%} of its lifetime (CERTMAN_RENEW_FRACTION, spread per domain)"
    return {
        "renew_at": _iso(cert.renew_at),
        "due": cert.renew_at <= now,
        "reason": reason,
        "why": why,
        "fraction_of_lifetime": round(fraction, 4),
        "ari_window": window,
        "ari_checked_at": _iso(cert.ari_checked_at),
        "ari": _ari(cert, now=now, settings=settings),
    }


# What each AriStatus means for the renewal, said once.
_ARI_MEANS = {
    AriStatus.WINDOW: "the renewal is scheduled inside it",
    AriStatus.PAST: "it is over: renew now",
    AriStatus.AFTER_EXPIRY: "it ends after the certificate expires: ignored, lifetime rule",
    AriStatus.BEFORE_ISSUANCE: "it closed before the certificate was issued: ignored, "
    "lifetime rule",
    AriStatus.INVALID: "it ends before it starts: ignored, lifetime rule",
}


def _ari(cert: Certificate, *, now: datetime, settings: Settings) -> dict[str, Any]:
    """The CA's ARI window for the certificate, or why none is used, and whether a renewal
    placed now would carry ``replaces`` inside it (exempt from the issuance limits)."""
    start, end = cert.ari_window_start, cert.ari_window_end
    issuer = cert.issuer or settings.issuer_list[0].name
    status = AriStatus(cert.ari_status) if cert.ari_status else None
    if cert.ari_id is None:
        why = "the certificate has no ARI identifier (no Authority Key Identifier): lifetime rule"
    elif status is None:
        why = (
            f"not asked yet (beat asks {issuer} about every certificate within "
            f"CERTMAN_ARI_REFRESH_HOURS={settings.ari_refresh_hours:g})"
        )
    elif status is AriStatus.NO_ARI:
        why = f"issuer {issuer} offers no ARI: lifetime rule"
    elif status is AriStatus.ERROR:
        why = f"{issuer} could not answer for it: {cert.ari_detail}"
    elif start is not None and end is not None:
        why = f"{issuer}'s window {_iso(start)} - {_iso(end)}: {_ARI_MEANS[status]}"
    else:
        why = f"{issuer}'s window {cert.ari_detail}: {_ARI_MEANS[status]}"
    exempt = bool(cert.ari_id and start and end and start <= now <= end)
    return {
        "status": str(status) if status else None,
        "window": {"start": _iso(start), "end": _iso(end)} if start and end else None,
        "offered": cert.ari_detail if status not in (None, AriStatus.ERROR) else None,
        "error": cert.ari_detail if status is AriStatus.ERROR else None,
        "checked_at": _iso(cert.ari_checked_at),
        "why": why,
        "exempt_now": exempt,
    }


def _order(order: Order, domain: str, *, now: datetime) -> dict[str, Any]:
    task = _TASK_AT.get(order.step)
    return {
        "order_id": order.id,
        "kind": str(order.kind),
        "step": str(order.step),
        "names": order.names,
        "profile": order.profile,
        "issuer": order.issuer,
        "fallback_reason": order.fallback_reason,
        # ARI: the certificate it replaces, and whether it was started inside the CA's window
        # (then it spends no issuance tokens here, as the CA counts none).
        "replaces": order.replaces,
        "exempt": order.exempt,
        "created_at": _iso(order.created_at),
        "step_changed_at": _iso(order.step_changed_at),
        "touched_at": _iso(order.touched_at),
        "step_tries": order.step_tries,
        "polls": order.polls,
        "order_url": order.order_url,
        # Celery's task ids are not stored: Flower finds the step's task by its name and
        # arguments (docs/operations.md, section 6).
        "task": task,
        "task_args": [order.id, domain],
        "rate_limit": _waiting(order, now=now),
    }


def _waiting(order: Order, *, now: datetime) -> dict[str, Any] | None:
    """The limiter bucket the order's step waits on, and for how long (None: not waiting)."""
    if order.waiting_bucket is None:
        return None
    until = order.waiting_until
    return {
        "bucket": order.waiting_bucket,
        "until": _iso(until),
        "wait_seconds": round(max((until - now).total_seconds(), 0.0), 1) if until else None,
        "reason": order.waiting_reason,
    }


def _next_attempt(site: Site, cert: Certificate | None, order: Order | None) -> dict[str, Any]:
    if order is not None:
        return {"kind": None, "at": None, "note": f"order {order.id} is in flight"}
    if site.state == SiteState.BLOCKED:
        return {"kind": None, "at": None, "note": "blocked until someone acts: domains retry"}
    if cert is not None:
        return {"kind": "renew", "at": _iso(cert.renew_at), "note": None}
    return {"kind": "issue", "at": _iso(site.next_attempt_at), "note": None}
