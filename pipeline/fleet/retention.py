"""Retention: attempt rows older than CERTMAN_ATTEMPTS_RETENTION_DAYS are deleted by beat.

In batches, each in a transaction of its own, so that a first run over years of history
neither holds locks for long nor builds one huge transaction; a run stops after
``max_batches`` and the next one carries on. The oldest rows go first, found through the
attempts(created_at, outcome) index.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from pipeline.models import Attempt

BATCH = 5000
MAX_BATCHES = 200


def prune_attempts(
    session_scope: Callable[[], AbstractContextManager[Session]],
    *,
    before: datetime,
    batch: int = BATCH,
    max_batches: int = MAX_BATCHES,
) -> int:
    """Delete attempts created before ``before``; returns how many rows went."""
    deleted = 0
    for _ in range(max_batches):
        with session_scope() as session:
            ids = session.scalars(
                select(Attempt.id)
                .where(Attempt.created_at < before)
                .order_by(Attempt.created_at)
                .limit(batch)
            ).all()
            if ids:
                session.execute(
                    delete(Attempt)
                    .where(Attempt.id.in_(ids))
                    .execution_options(synchronize_session=False)
                )
        deleted += len(ids)
        if len(ids) < batch:
            break
    return deleted
