"""A site's states and the transitions between them: the one place that says which exist.

``pending`` → ``issuing`` → ``active`` ⇄ ``renewing``, with ``retrying`` (an attempt failed,
the next is scheduled) and ``blocked`` (the CA refused a name) off the way, and ``certman
domains retry`` bringing those back. :data:`TRANSITIONS` lists each transition with what
causes it.

Every change of ``sites.state`` goes through :func:`move` (a conditional UPDATE, for claims
that may race: the dispatcher, ``certman domains retry``) or :func:`set_state` (an object the
caller's transaction already holds: an order's step). A transition not in :data:`TRANSITIONS`
is a bug and raises :class:`IllegalTransition`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from pipeline.models import Site, SiteState
from pipeline.models.base import utcnow

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


def set_state(site: Site, new: SiteState) -> None:
    """Move a site the caller's transaction holds (an order's step: the order's lock and its
    step check make the step the only writer)."""
    check(site.state, new)
    site.state = new


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
