"""Sites that wait on a failure, tried again on an operator's word (certman domains retry)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from pipeline.fleet.sites import SiteError, retry_sites
from pipeline.models import Certificate, Site, SiteState
from tests.pipeline.test_cli import certman
from tests.support.factories import NOW, make_cert, make_site
from tests.support.from_settings import session_scope


def _state(domain: str) -> tuple[str, object, object]:
    with session_scope() as session:
        site = session.scalar(select(Site).where(Site.domain == domain))
        assert site is not None
        renew_at = session.scalar(
            select(Certificate.renew_at).where(Certificate.site_id == site.id, Certificate.current)
        )
        return str(site.state), site.next_attempt_at, renew_at


def test_a_new_site_is_pending_again_and_a_renewal_due_now(certman_env: dict[str, str]) -> None:
    with session_scope() as session:
        make_site(session, "blocked.example.com", state=SiteState.BLOCKED, failures=3)
        renewing = make_site(session, "refused-renewal.example.com", state=SiteState.BLOCKED)
        make_cert(session, renewing)
        make_site(session, "retrying.example.com", state=SiteState.RETRYING, failures=1)
    with session_scope() as session:
        retried = retry_sites(session, blocked=True, now=NOW)
    assert retried == [
        ("blocked.example.com", "blocked"),
        ("refused-renewal.example.com", "blocked"),
    ]
    assert _state("blocked.example.com") == ("pending", NOW, None)
    assert _state("refused-renewal.example.com") == ("active", None, NOW)
    assert _state("retrying.example.com")[0] == "retrying"  # not asked for
    with session_scope() as session:
        failures = session.scalar(
            select(Site.consecutive_failures).where(Site.domain == "blocked.example.com")
        )
    assert failures == 3  # a site that fails again keeps its backoff


def test_a_failed_renewal_counts_as_waiting(certman_env: dict[str, str]) -> None:
    # fail_order leaves a site whose renewal failed active, its failure counted and its renewal
    # pushed back: --retrying and its name both bring the renewal forward.
    with session_scope() as session:
        failing = make_site(session, "failing-renewal.example.com", failures=2)
        make_cert(session, failing, renew_at=NOW + timedelta(days=1))
        healthy = make_site(session, "healthy.example.com")
        make_cert(session, healthy, renew_at=NOW + timedelta(days=1))
    with session_scope() as session:
        retried = retry_sites(session, retrying=True, now=NOW)
    assert retried == [("failing-renewal.example.com", "active")]
    assert _state("failing-renewal.example.com") == ("active", None, NOW)
    assert _state("healthy.example.com")[2] == NOW + timedelta(days=1)


def test_a_site_the_dispatcher_claimed_meanwhile_is_left_to_it(
    certman_env: dict[str, str],
) -> None:
    with session_scope() as session:
        make_site(session, "raced.example.com", state=SiteState.RETRYING, failures=1)
    with session_scope() as session:
        site = session.scalar(select(Site).where(Site.domain == "raced.example.com"))
        assert site is not None and site.state == SiteState.RETRYING  # read as waiting...
        with session_scope() as dispatcher:  # ...then the dispatcher claims it and commits
            dispatcher.execute(
                update(Site).where(Site.id == site.id).values(state=SiteState.ISSUING)
            )
        assert retry_sites(session, retrying=True, now=NOW) == []
    assert _state("raced.example.com")[0] == "issuing"  # not set back to pending


def test_a_named_site_that_is_not_waiting_is_refused_and_nothing_written(
    certman_env: dict[str, str],
) -> None:
    with session_scope() as session:
        make_site(session, "waiting.example.com", state=SiteState.RETRYING)
        make_site(session, "fine.example.com", state=SiteState.ACTIVE)
    refused = pytest.raises(SiteError, match="fine.example.com is active, not waiting")
    with refused, session_scope() as session:
        retry_sites(session, ["waiting.example.com", "fine.example.com"])
    assert _state("waiting.example.com")[0] == "retrying"
    with pytest.raises(SiteError, match="not a known site"), session_scope() as session:
        retry_sites(session, ["nowhere.example.com"])


def test_cli(certman_env: dict[str, str], tmp_path: Path) -> None:
    env = certman_env | {"CERTMAN_PIPELINE_KEY": str(tmp_path / "pipeline.key")}
    with session_scope() as session:
        make_site(session, "a.example.com", state=SiteState.RETRYING)
        make_site(session, "b.example.com", state=SiteState.BLOCKED)
    usage = certman(env, "domains", "retry")
    assert usage.returncode == 2 and "--blocked" in usage.stderr
    named = certman(env, "domains", "retry", "A.example.com", "--json")
    assert named.returncode == 0, named.stderr
    assert json.loads(named.stdout) == [{"domain": "a.example.com", "was": "retrying"}]
    again = certman(env, "domains", "retry", "a.example.com")
    assert again.returncode == 1 and "a.example.com is pending, not waiting" in again.stderr
    every = certman(env, "domains", "retry", "--blocked", "--retrying")
    assert every.returncode == 0 and every.stdout == "b.example.com: was blocked; queued\n"
