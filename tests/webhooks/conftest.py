"""Fixtures of the webhook tests: the pipeline key subscriptions are sealed to, subscriptions."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from ipaddress import ip_network

import pytest
from sqlalchemy.orm import Session

from pipeline.crypto.keys import Keyring, PrivateKey
from pipeline.webhooks import events, subscriptions, transport
from tests.support.loopback_only import loopback_only

# Receivers in these tests are on loopback: allowed as an operator of a receiver on this host
# would allow it (CERTMAN_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8,::1/128).
LOCAL = transport.WebhookPolicy(allowed_networks=(ip_network("127.0.0.0/8"), ip_network("::1/128")))

Store = Callable[[], AbstractContextManager[Session]]
Subscribe = Callable[..., tuple[int, str]]


@pytest.fixture
def nothing_leaves_loopback() -> Iterator[None]:
    """Fails the test if anything tried to connect beyond loopback (a module opts in)."""
    with loopback_only() as attempts:
        yield
    assert attempts == []


def record_event(store: Store, domain: str, kind: str = events.SITE_FAILED, **data: object) -> int:
    """An event of ``kind`` for ``domain`` in the outbox (recorded: the test expects it to be);
    its id."""
    with store() as session:
        event = events.record(session, event_type=kind, domain=domain, data=data)
        assert event is not None
        return event.id


@pytest.fixture(scope="module")
def pipeline_key() -> PrivateKey:
    return PrivateKey.generate()


@pytest.fixture
def keyring(pipeline_key: PrivateKey) -> Keyring:
    return Keyring.of([pipeline_key])


@pytest.fixture
def subscribe(store: Store, pipeline_key: PrivateKey) -> Callable[..., tuple[int, str]]:
    """``subscribe(url, "site.active,...")``: a stored subscription's id and secret."""

    def make(url: str, events: str = "site.active,site.failed,site.blocked,"
             "certificate.expiring,site.removed") -> tuple[int, str]:  # fmt: skip
        with store() as session:
            subscription, secret = subscriptions.add(
                session, url, subscriptions.parse_events(events),
                pipeline_key=pipeline_key.public_key(), policy=LOCAL,
            )  # fmt: skip
            return subscription.id, secret

    return make
