"""How a failed attempt is recorded: backoff, blocking, and idempotence."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from pipeline.db import session_scope
from pipeline.errors import AttemptFailed, NameRefused
from pipeline.issuance import fail_order
from pipeline.models import Attempt, Order, OrderStep, Site, SiteState
from pipeline.models.base import utcnow
from pipeline.sites import add_site, parse_site


@pytest.fixture
def order_id(certman_env: dict[str, str], redis_client: object) -> int:
    with session_scope() as session:
        site, _ = add_site(session, parse_site("dealer.example.com"))
        site.state = SiteState.ISSUING
        order = Order(site_id=site.id, names=site.all_names, step=OrderStep.CHALLENGED)
        session.add(order)
        session.flush()
        return order.id


def test_validation_failure_backs_off_one_minute_then_ten(order_id: int) -> None:
    fail_order(order_id, "poll_validation", AttemptFailed("dealer.example.com: connection refused"))
    with session_scope() as session:
        site = session.scalars(select(Site)).one()
        assert site.state == SiteState.RETRYING
        assert site.last_error == "dealer.example.com: connection refused"
        assert site.next_attempt_at is not None
        wait = site.next_attempt_at - utcnow()
        assert timedelta(seconds=50) < wait <= timedelta(minutes=1)
        assert session.get(Order, order_id).step == OrderStep.FAILED  # type: ignore[union-attr]
        attempt = session.scalars(select(Attempt)).one()
        assert (attempt.step, attempt.outcome) == ("poll_validation", "failed")
        site.state = SiteState.ISSUING
        second = Order(site_id=site.id, names=site.all_names, step=OrderStep.PLACED)
        session.add(second)
        session.flush()
        second_id = second.id
    fail_order(second_id, "publish_challenges", AttemptFailed("again"))
    with session_scope() as session:
        site = session.scalars(select(Site)).one()
        assert site.consecutive_failures == 2
        assert site.next_attempt_at is not None
        assert site.next_attempt_at - utcnow() > timedelta(minutes=9)


def test_a_second_report_of_the_same_failure_changes_nothing(order_id: int) -> None:
    fail_order(order_id, "poll_validation", AttemptFailed("first"))
    fail_order(order_id, "poll_validation", AttemptFailed("duplicate"))
    with session_scope() as session:
        site = session.scalars(select(Site)).one()
        assert site.consecutive_failures == 1 and site.last_error == "first"
        assert session.scalar(select(func.count()).select_from(Attempt)) == 1


def test_a_refused_name_blocks_the_site(order_id: int) -> None:
    fail_order(order_id, "place_order", NameRefused("the CA refuses (rejectedIdentifier): no"))
    with session_scope() as session:
        site = session.scalars(select(Site)).one()
        assert site.state == SiteState.BLOCKED
        assert site.next_attempt_at is None
        assert site.last_error is not None and "blocked until someone acts" in site.last_error


def test_no_edge_key_fails_before_the_ca_is_asked(
    order_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline import issuance
    from pipeline.settings import get_settings

    with session_scope() as session:
        order = session.get(Order, order_id)
        assert order is not None
        order.step = OrderStep.QUEUED
    monkeypatch.delenv("CERTMAN_EDGE_PUBLIC_KEY", raising=False)
    get_settings.cache_clear()
    # No ACME directory is reachable in this test: reaching the CA would be a different error.
    monkeypatch.setenv("CERTMAN_ACME_DIRECTORY", "https://127.0.0.1:1/dir")
    with pytest.raises(AttemptFailed, match="CERTMAN_EDGE_PUBLIC_KEY is not set"):
        issuance.place_order(order_id)
