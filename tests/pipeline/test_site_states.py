"""A site's state machine: the transitions it has, and that nothing else changes a state."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from pipeline.fleet import site_states
from pipeline.fleet.site_states import (
    ACTIVE,
    BLOCKED,
    INITIAL,
    ISSUING,
    PENDING,
    RENEWING,
    RETRYING,
    TRANSITIONS,
    IllegalTransition,
)
from pipeline.models import Site, SiteName, SiteState

Store = Callable[[], AbstractContextManager[Session]]
PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"


def test_the_transitions_are_these_and_no_others() -> None:
    assert set(TRANSITIONS) == {
        (PENDING, ISSUING),
        (RETRYING, ISSUING),
        (ACTIVE, RENEWING),
        (ISSUING, ACTIVE),
        (RENEWING, ACTIVE),
        (ISSUING, RETRYING),
        (ISSUING, BLOCKED),
        (RENEWING, BLOCKED),
        (RETRYING, PENDING),
        (BLOCKED, PENDING),
        (BLOCKED, ACTIVE),
        (ACTIVE, ACTIVE),
    }
    assert all(cause for cause in TRANSITIONS.values())  # each says what causes it
    assert INITIAL == PENDING


def test_every_state_is_reached_and_none_is_a_dead_end() -> None:
    reached = {INITIAL}
    while True:
        more = {new for old, new in TRANSITIONS if old in reached} - reached
        if not more:
            break
        reached |= more
    assert reached == set(SiteState)
    assert all(any(old == state for old, _ in TRANSITIONS) for state in SiteState)


@pytest.mark.parametrize(
    ("old", "new"),
    [(old, new) for old in SiteState for new in SiteState if (old, new) not in TRANSITIONS],
)
def test_a_transition_not_listed_is_refused(old: SiteState, new: SiteState) -> None:
    site = Site(domain="x.example.com", state=old)
    with pytest.raises(IllegalTransition, match=f"from {old} to {new}"):
        site_states.set_state(site, new)
    assert site.state == old


def test_the_dispatcher_starts_only_from_the_states_that_lead_to_issuing() -> None:
    assert site_states.sources(ISSUING) == [PENDING, RETRYING]


def test_a_move_is_a_claim_only_one_claimant_wins(store: Store) -> None:
    with store() as session:
        site = Site(domain="claimed.example.com", state=PENDING,
                    names=[SiteName(name="claimed.example.com")])  # fmt: skip
        session.add(site)
        session.flush()
        site_id = site.id
    with store() as session:
        assert site_states.move(session, site_id, PENDING, ISSUING)
    with store() as session:
        assert not site_states.move(session, site_id, PENDING, ISSUING)  # already taken
        with pytest.raises(IllegalTransition):
            site_states.move(session, site_id, ISSUING, PENDING)
        assert session.get(Site, site_id).state == ISSUING  # type: ignore[union-attr]


def test_no_module_but_the_state_machine_writes_a_sites_state() -> None:
    assignment = re.compile(
        r"\.state\s*=[^=]|\bstate\s*=\s*SiteState\.|[\"']state[\"']\s*:\s*SiteState\."
    )
    offenders = [
        f"{path.relative_to(PIPELINE.parent)}:{number}"
        for path in sorted(PIPELINE.rglob("*.py"))
        if path.name != "site_states.py" and "models" not in path.parts
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if assignment.search(line)
    ]
    assert offenders == []
