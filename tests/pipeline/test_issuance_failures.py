"""How a failed attempt is recorded: backoff, blocking, and idempotence.

At the service level: the steps over a runtime whose store is a transaction rolled back after
each test (the ``store`` fixture), with a publisher that records.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.errors import AttemptFailed, NameRefused
from pipeline.fleet.sites import add_site, parse_site
from pipeline.issuance import OrderSteps
from pipeline.models import Attempt, Order, OrderStep, Site, SiteState
from pipeline.models.base import utcnow
from pipeline.runtime import Runtime
from pipeline.settings import Settings
from tests.support.fake_acme import RecordingPublisher
from tests.support.from_settings import site_rules

Store = Callable[[], AbstractContextManager[Session]]


class _NoCA:
    """A CA the test must not reach."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the CA was asked ({name})")


def _steps(store: Store, tmp_path: Path) -> OrderSteps:
    # No CERTMAN_EDGE_PUBLIC_KEY: nothing to seal a key to.
    settings = Settings(data_dir=tmp_path, edge_public_key=None, self_check=False)
    return OrderSteps(
        Runtime(
            settings,
            sessions=store,
            acme=_NoCA(),  # type: ignore[arg-type]
            publisher=RecordingPublisher(),  # type: ignore[arg-type]
        )
    )


@pytest.fixture
def steps(store: Store, tmp_path: Path) -> OrderSteps:
    return _steps(store, tmp_path)


@pytest.fixture
def order_id(store: Store) -> int:
    with store() as session:
        site, _ = add_site(session, parse_site("dealer.example.com", rules=site_rules()))
        site.state = SiteState.ISSUING  # as the dispatcher leaves it
        order = Order(site_id=site.id, names=site.all_names, step=OrderStep.CHALLENGED)
        session.add(order)
        session.flush()
        return order.id


def test_validation_failure_backs_off_one_minute_then_ten(
    store: Store, steps: OrderSteps, order_id: int
) -> None:
    steps.fail_order(
        order_id, "poll_validation", AttemptFailed("dealer.example.com: connection refused")
    )
    with store() as session:
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
    steps.fail_order(second_id, "publish_challenges", AttemptFailed("again"))
    with store() as session:
        site = session.scalars(select(Site)).one()
        assert site.consecutive_failures == 2
        assert site.next_attempt_at is not None
        assert site.next_attempt_at - utcnow() > timedelta(minutes=9)


def test_a_second_report_of_the_same_failure_changes_nothing(
    store: Store, steps: OrderSteps, order_id: int
) -> None:
    steps.fail_order(order_id, "poll_validation", AttemptFailed("first"))
    steps.fail_order(order_id, "poll_validation", AttemptFailed("duplicate"))
    with store() as session:
        site = session.scalars(select(Site)).one()
        assert site.consecutive_failures == 1 and site.last_error == "first"
        assert session.scalar(select(func.count()).select_from(Attempt)) == 1


def test_a_refused_name_blocks_the_site(store: Store, steps: OrderSteps, order_id: int) -> None:
    steps.fail_order(
        order_id, "place_order", NameRefused("the CA refuses (rejectedIdentifier): no")
    )
    with store() as session:
        site = session.scalars(select(Site)).one()
        assert site.state == SiteState.BLOCKED
        assert site.next_attempt_at is None
        assert site.last_error is not None and "blocked until someone acts" in site.last_error


def test_no_edge_key_fails_before_the_ca_is_asked(
    store: Store, steps: OrderSteps, order_id: int
) -> None:
    with store() as session:
        order = session.get(Order, order_id)
        assert order is not None
        order.step = OrderStep.QUEUED
    with pytest.raises(AttemptFailed, match="CERTMAN_EDGE_PUBLIC_KEY is not set"):
        steps.place_order(order_id)
