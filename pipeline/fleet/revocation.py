"""Revoking a site's certificate (``certman revoke``), then ordering its replacement.

The CA that issued the certificate is asked, through the process's ACME client for that
issuer (its ``revokeCert``, signed with the account key: the certificate's own key is sealed
to the edges and the pipeline cannot use it). The replacement is an ordinary renewal made due
now, so dispatch starts it under the in-flight bound and the rate limiter; the revoked
certificate is served until it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum

from cryptography import x509
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.acme.client import AcmeClient
from pipeline.errors import IssuanceProblem
from pipeline.fleet.sites import SiteError, find_site, make_due
from pipeline.models import Attempt, Certificate, SiteChange


class Reason(IntEnum):
    """RFC 5280 reason codes that Let's Encrypt accepts from a subscriber."""

    unspecified = 0
    keyCompromise = 1  # the RFC 5280 names, as operators type them
    affiliationChanged = 3
    superseded = 4
    cessationOfOperation = 5


class RevocationFailed(ValueError):
    """The CA did not revoke the certificate; the message says why."""


@dataclass(frozen=True)
class Revoked:
    domain: str
    serial: str
    reason: Reason
    already: bool  # the CA had revoked it before (a re-run)


def revoke_site(
    session_scope: Callable[[], AbstractContextManager[Session]],
    client_for: Callable[[str | None], AcmeClient],
    name: str,
    *,
    reason: Reason,
    now: datetime,
    actor: str | None = None,
) -> Revoked:
    """Revoke the site's current certificate at the CA, then make its renewal due now.
    ``actor``: who asked, recorded in the site's history."""
    with session_scope() as session:
        site = find_site(session, name)
        cert = session.scalar(
            select(Certificate).where(Certificate.site_id == site.id, Certificate.current)
        )
        if cert is None:
            raise SiteError(f"{site.domain} has no certificate to revoke ({site.state})")
        site_id, domain = site.id, site.domain
        cert_id, serial, chain, issuer = cert.id, cert.serial, cert.chain_pem, cert.issuer
    leaf = x509.load_pem_x509_certificate(chain.encode("ascii"))
    already = False
    try:
        # Only the CA that issued a certificate can revoke it (None: the first issuer's).
        client_for(issuer).revoke(leaf, int(reason))
    except IssuanceProblem as exc:
        if "alreadyRevoked" not in exc.reason:
            raise RevocationFailed(
                f"{domain}: the CA did not revoke {serial}: {exc.reason}"
            ) from None
        already = True
    # Outside the CA call: the certificate may have been renewed meanwhile; only the revoked
    # one's renewal is brought forward (a newer current one was not revoked).
    with session_scope() as session:
        cert = session.get(Certificate, cert_id)
        if cert is not None and cert.current:
            make_due(cert, now)
        session.add(
            Attempt(
                site_id=site_id,
                step="revoke",
                outcome="ok",
                detail=f"certificate {serial} revoked ({reason.name})"
                + (", already revoked at the CA" if already else ""),
            )
        )
        if actor is not None:
            detail = f"certificate {serial} revoked ({reason.name})"
            session.add(SiteChange(domain=domain, action="revoke", actor=actor, detail=detail))
    return Revoked(domain, serial, reason, already)
