"""What a test takes from the process's settings, as a command would: the tests set
``CERTMAN_*`` in the environment (``certman_env``), and the services themselves take their store
and rules from their callers, never from the settings (issue 26: no service falls back to a
process-wide object)."""

from __future__ import annotations

from contextlib import AbstractContextManager

from sqlalchemy.orm import Session

from pipeline import db, runtime
from pipeline.fleet.sites import SiteRules
from pipeline.settings import get_settings


def session_scope(url: str | None = None) -> AbstractContextManager[Session]:
    """A session on ``url``, or on the store the current settings name."""
    if url is not None:
        return db.session_scope(url)
    return runtime.current().session_scope()


def site_rules() -> SiteRules:
    """The installation's outbound policy and issuers, from the current settings."""
    return SiteRules.from_settings(get_settings())
