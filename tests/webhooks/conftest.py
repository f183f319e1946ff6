"""Fixtures of the webhook tests: the pipeline key subscriptions are sealed to, subscriptions."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
from sqlalchemy.orm import Session

from pipeline.crypto.keys import Keyring, PrivateKey
from pipeline.webhooks import subscriptions

Store = Callable[[], AbstractContextManager[Session]]


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
                pipeline_key=pipeline_key.public_key(),
            )  # fmt: skip
            return subscription.id, secret

    return make
