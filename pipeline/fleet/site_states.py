"""A site's states and the transitions between them: the one place that says which exist.

``pending`` → ``issuing`` → ``active`` ⇄ ``renewing``, with ``retrying`` (an attempt failed,
the next is scheduled) and ``blocked`` (the CA refused a name) off the way, and ``certman
domains retry`` bringing those back. :data:`TRANSITIONS` lists each transition with what
causes it.

Every change of ``sites.state`` goes through :func:`move` (a conditional UPDATE, for claims
that may race: the dispatcher, ``certman domains retry``) or :func:`set_state` (an object the
caller's transaction already holds: an order's step). A transition not in :data:`TRANSITIONS`
is a bug and raises :class:`IllegalTransition`.

The transitions the platform hears of (``site.active``, ``site.failed``, ``site.blocked``) are
written to the webhook outbox by :func:`set_state`, in the same transaction as the change
(:func:`pipeline.webhooks.events.record`): an attempt's end is always an order's step.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, object_session

from pipeline.models import Certificate, Site, SiteState
from pipeline.models.base import utcnow
from pipeline.webhooks import events

PENDING, ISSUING, ACTIVE = SiteState.PENDING, SiteState.ISSUING, SiteState.ACTIVE
RENEWING, RETRYING, BLOCKED = SiteState.RENEWING, SiteState.RETRYING, SiteState.BLOCKED

# The state a new site is stored in (certman domains add, bulk onboarding).
INITIAL = PENDING

TRANSITIONS: dict[tuple[SiteState, SiteState], str] = {
    (PENDING, ISSUING): "dispatch starts the first order",
    (RETRYING, ISSUING): "dispatch starts the next attempt",
    (ACTIVE, RENEWING): "dispatch starts a renewal",
    (ISSUING, ACTIVE): "the certificate is stored",
    (RENEWING, ACTIVE): "the renewal is stored, or failed (the old certificate stays served)",
    (ISSUING, RETRYING): "the attempt failed; the next one is scheduled (backoff)",
    (ISSUING, BLOCKED): "the CA refused a name",
    (RENEWING, BLOCKED): "the CA refused a name of a renewal",
    (RETRYING, PENDING): "certman domains retry: due now",
    (BLOCKED, PENDING): "certman domains retry: due now (no certificate)",
    (BLOCKED, ACTIVE): "certman domains retry: renewal due now (a certificate)",
    (ACTIVE, ACTIVE): "certman domains retry of a failed renewal: renewal due now",
}


class IllegalTransition(RuntimeError):
    """A change of a site's state that the state machine does not have."""


def check(old: SiteState | str, new: SiteState) -> None:
    if (SiteState(old), new) not in TRANSITIONS:
        raise IllegalTransition(f"a site cannot go from {old} to {new}")


def sources(new: SiteState) -> list[SiteState]:
    """The states from which a site may move to ``new`` (in the enum's order)."""
    return [old for old in SiteState if (old, new) in TRANSITIONS]


def set_state(
    site: Site,
    new: SiteState,
    *,
    error: str | None = None,
    retry_at: datetime | None = None,
) -> None:
    """Move a site the caller's transaction holds (an order's step: the order's lock and its
    step check make the step the only writer).

    ``error``: the attempt ended in failure, for this reason (a failed renewal goes back to
    ``active`` too, and is a ``site.failed`` event, not a ``site.active`` one); ``retry_at``:
    when the next attempt is due. The event goes to the outbox in the same transaction.
    """
    old = SiteState(site.state)
    check(old, new)
    site.state = new
    session = object_session(site)
    event = _event(old, new, failed=error is not None)
    if session is None or event is None:
        return
    if event == events.SITE_ACTIVE:
        events.record(session, event_type=event, domain=site.domain,
                      data=lambda: _served(session, site, renewal=old == RENEWING))  # fmt: skip
        return
    data: dict[str, Any] = {"state": str(new), "error": error}
    if event == events.SITE_FAILED:
        data["retry_at"] = retry_at.isoformat() if retry_at else None
        data["certificate_served"] = new == ACTIVE  # a renewal failed: the old one stays
    events.record(session, event_type=event, domain=site.domain, data=data)


def _event(old: SiteState, new: SiteState, *, failed: bool) -> str | None:
    if new == BLOCKED:
        return events.SITE_BLOCKED
    if new == RETRYING:
        return events.SITE_FAILED
    if new == ACTIVE and old in (ISSUING, RENEWING):
        return events.SITE_FAILED if failed else events.SITE_ACTIVE
    return None  # claims by the dispatcher, certman domains retry: nothing to tell


def _served(session: Session, site: Site, *, renewal: bool) -> dict[str, Any]:
    """``site.active``'s data: the certificate now stored (flushed first: the order's step
    added it to this transaction)."""
    session.flush()
    certificate = session.execute(
        select(
            Certificate.serial, Certificate.not_before, Certificate.not_after, Certificate.issuer
        )
        .where(Certificate.site_id == site.id, Certificate.current)
        .order_by(Certificate.id.desc())
        .limit(1)
    ).first()
    return {
        "state": str(ACTIVE),
        "renewal": renewal,
        "names": [n.name for n in site.names],
        "certificate": None
        if certificate is None
        else {
            "serial": certificate.serial,
            "not_before": certificate.not_before.isoformat(),
            "not_after": certificate.not_after.isoformat(),
            "issuer": certificate.issuer,
        },
    }


def move(
    session: Session,
    site_id: int,
    old: SiteState | str,
    new: SiteState,
    *,
    now: datetime | None = None,
    **values: Any,
) -> bool:
    """Move a site from ``old`` to ``new`` only if it is still in ``old``; whether it moved.

    A conditional UPDATE, so that two claimants (two dispatchers, a dispatch and a retry)
    never both move the same site.
    """
    check(old, new)
    result = session.execute(
        update(Site)
        .where(Site.id == site_id, Site.state == SiteState(old))
        .values(state=new, updated_at=now or utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
