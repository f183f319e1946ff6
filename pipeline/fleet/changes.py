"""A command's change to a site and its publication to the edges, together: the change reaches
the store and the edges both, or neither (``certman domains add|update|remove``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from pipeline.db import SessionScope
from pipeline.distribution.publishing import Publisher, site_record
from pipeline.fleet.sites import SiteError
from pipeline.models import Site, SiteChange
from pipeline.webhooks import events

log = logging.getLogger(__name__)


def record_change(
    session: Session, domain: str, action: str, actor: str, detail: str | None = None
) -> None:
    """Add a line to ``domain``'s history in the caller's transaction: a change and the record
    of who made it are committed together, or neither is. ``actor`` is ``api:<token name>``
    or ``cli:<unix user>``."""
    session.add(SiteChange(domain=domain, action=action, actor=actor[:128], detail=detail))


def publish_and_commit(
    publisher: Publisher,
    sessions: SessionScope,
    session: Session,
    site: Site,
    *,
    unless_current: bool = False,
) -> bool:
    """Publish ``site`` as this session's transaction has it, then commit: a command's change
    reaches the store and the edges together, or neither.

    Called last in a command's session scope. Whatever fails first (the signing key
    unreadable, Redis down, the publishing script refusing) raises before the commit, and the
    scope rolls the change back: nothing is stored, and running the command again does the
    whole job. Should the commit itself fail after the publication, the snapshot is put back
    to what the store says. ``unless_current``: publish only if the edges do not already have
    exactly this record (a re-run changes nothing that is done). Returns whether it published.
    ``sessions`` opens the session that reads what to put back.
    """
    record = site_record(session, site)
    published = not (unless_current and publisher.is_published(record))
    if published:
        with _refused_in_one_line():
            publisher.publish(record)
    _commit_or_put_back(publisher, sessions, session, site.domain, published)
    return published


def unpublish_and_commit(
    publisher: Publisher, sessions: SessionScope, session: Session, domain: str
) -> None:
    """As :func:`publish_and_commit`, for a site this transaction removes: its signed tombstone
    first, then the commit (a removal that cannot reach the edges is not made). The platform's
    ``site.removed`` event is written in the same transaction: sent only if the removal is."""
    events.record(session, event_type=events.SITE_REMOVED, domain=domain, data={})
    with _refused_in_one_line():
        publisher.unpublish(domain)
    _commit_or_put_back(publisher, sessions, session, domain, True)


@contextmanager
def _refused_in_one_line() -> Iterator[None]:
    # The publishing script refused every version we signed (another publisher of the same
    # domain kept getting in first): the command's error, in one line, and nothing committed.
    try:
        yield
    except RuntimeError as exc:
        raise SiteError(f"{exc}; nothing was changed, try again") from None


def _commit_or_put_back(
    publisher: Publisher, sessions: SessionScope, session: Session, domain: str, published: bool
) -> None:
    try:
        session.commit()
    except BaseException:
        if published:
            _put_back(publisher, sessions, domain)
        raise


def _put_back(publisher: Publisher, sessions: SessionScope, domain: str) -> None:
    """Publish what the store holds for ``domain`` after a commit failed (its tombstone if it
    holds nothing). Best effort: the store may be what failed, and beat's reconcile is the
    backstop that finds the difference within its interval."""
    try:
        with sessions() as session:
            site = session.scalar(
                select(Site).where(Site.domain == domain).options(selectinload(Site.names))
            )
            record = site_record(session, site) if site is not None else None
        if record is not None:
            publisher.publish(record)
        else:
            publisher.unpublish(domain)
    except Exception as exc:  # the commit's own error is the one to raise
        log.warning("edge snapshot: %s not put back after a failed commit (%s); the snapshot "
                    "reconcile will", domain, exc)  # fmt: skip
