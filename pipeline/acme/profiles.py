"""The ACME profiles the CA offers (its directory's ``meta.profiles``), for commands that take
``--profile``: a profile the CA does not offer is refused here, in one line, instead of being
replaced by the CA's default when the order is placed."""

from __future__ import annotations

from typing import Any

import requests

from pipeline.settings import Issuer


class UnknownProfile(ValueError):
    """A profile the CA does not offer; the message lists those it does."""


def offered_profiles(issuer: Issuer, *, timeout: float = 15) -> dict[str, str]:
    """Profile name -> description, from the issuer's directory.

    One unauthenticated GET: no account, no nonce. An unreachable directory is an OSError
    (requests' errors are), which commands show as one line.
    """
    session = requests.Session()
    session.trust_env = False  # as the ACME client: no proxy variables or ~/.netrc for the CA
    try:
        response = session.get(
            issuer.directory,
            timeout=timeout,
            verify=str(issuer.ca_bundle) if issuer.ca_bundle else True,
        )
        response.raise_for_status()
        directory: Any = response.json()
    finally:
        session.close()
    meta = directory.get("meta") if isinstance(directory, dict) else None
    profiles = meta.get("profiles") if isinstance(meta, dict) else None
    return {str(k): str(v) for k, v in profiles.items()} if isinstance(profiles, dict) else {}


def check_profile(profile: str, offered: dict[str, str], directory_url: str) -> None:
    if profile in offered:
        return
    if not offered:
        raise UnknownProfile(f"profile {profile!r}: the CA at {directory_url} offers no profiles")
    raise UnknownProfile(
        f"profile {profile!r} is not offered by the CA at {directory_url}: "
        f"one of {', '.join(sorted(offered))}"
    )
