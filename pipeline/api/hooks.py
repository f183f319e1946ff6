"""What the API calls beyond the services, as ``certman domains add`` does: the dispatcher's
kick (Celery), the CA directory's profiles, the edge key's presence. Kept apart so that tests
can hand the application others."""

from __future__ import annotations

import logging

from pipeline.crypto.keys import PublicKey
from pipeline.settings import Settings

log = logging.getLogger("certman.api")


def kick_dispatch() -> None:
    """Ask for a dispatch now, after the commit; beat's dispatcher starts the site at its next
    tick if the broker cannot take the message, so a failure here only says so."""
    from pipeline.tasks.maintenance import kick_dispatch as kick

    try:
        kick()
    except Exception as exc:  # kombu's OperationalError, a Redis error: the message only
        log.warning("dispatch not asked for now (%s); beat's dispatcher starts it", exc)


def check_profile(settings: Settings, profile: str, issuer: str | None) -> None:
    """A profile the issuer the site orders from first offers (its directory's meta.profiles)."""
    from pipeline.acme.profiles import check_profile as check
    from pipeline.acme.profiles import offered_profiles

    known = {spec.name for spec in settings.issuer_list}
    spec = settings.issuer(issuer if issuer in known else None)
    check(profile, offered_profiles(spec), spec.directory)


def check_edge_key(settings: Settings, outcome: str) -> None:
    """The edge public key certificates are sealed to, readable when one is named: a site whose
    certificate could never be sealed is refused before anything is written (a KeyFileError:
    the API answers 503, the installation is at fault, not the request)."""
    path = settings.edge_public_key
    if path is not None:
        PublicKey.load(path)
