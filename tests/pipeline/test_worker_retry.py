"""A step's retry that cannot be sent (the broker away) asks for its message back instead of
dropping it, as Celery would (pipeline.tasks.issuance._retry)."""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import Celery, Task
from celery.exceptions import Reject, Retry

from pipeline.errors import PollAgain, RetryLater
from pipeline.tasks import issuance
from pipeline.tasks.issuance import _retry
from tests.support.ports import free_port
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Celery]:
    # A broker nobody listens on, tried twice in a second rather than for half a minute.
    monkeypatch.setattr(issuance, "RETRY_PUBLISH_POLICY", {"max_retries": 1, "interval_max": 0.5})
    app = Celery("retry-test", broker=f"redis://127.0.0.1:{free_port()}/0", set_as_current=False)
    app.conf.update(broker_connection_timeout=1, task_serializer="json")
    yield app
    app.close()


def step(app: Celery, **request: Any) -> Task:
    @app.task(bind=True, name="retry-test.step", max_retries=None, shared=False)
    def a_step(self: Task, order_id: int) -> None:
        pass

    a_step.push_request(
        id="t-1", args=[7], kwargs={}, delivery_info={}, called_directly=False, **request
    )
    return a_step


def test_a_retry_the_broker_cannot_take_requeues_the_message(app: Celery) -> None:
    task = step(app)
    problem = _retry(task, 5)
    assert isinstance(problem, Reject)
    assert problem.requeue is True


def test_a_retry_that_cannot_be_encoded_is_still_rejected(app: Celery) -> None:
    # Not the broker's absence: requeueing would only fail the same way for ever.
    task = step(app)
    task.request.args = [object()]
    with pytest.raises(Reject) as rejected:
        _retry(task, 5)
    assert rejected.value.requeue is False


def test_a_retry_sent_while_the_broker_comes_back_is_sent(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """As in a Sentinel failover: the broker away for a moment when the step retries."""
    url = urlsplit(redis_url)
    with TcpProxy(url.port or 6379) as broker:
        app = Celery(
            "retry-test",
            broker=url._replace(netloc=f"127.0.0.1:{broker.port}").geturl(),
            set_as_current=False,
        )
        try:
            with app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1)
            broker.stop()
            back = threading.Timer(1.5, broker.start)  # the outage: a promotion's few seconds
            back.start()
            assert isinstance(_retry(step(app), 5), Retry)
            back.join()
        finally:
            app.close()
    # The retry is in the queue, to run after its countdown.
    assert redis_client.llen("celery") == 1


def test_a_retry_sent_is_celerys_retry_raised_without_the_steps_exception(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Returned, not raised inside ``task.retry``: raised as the task raises it, ``from None``
    in the step's handler, it carries no context, so Celery's retry handling formats one short
    traceback rather than every frame of the step's exception too."""
    app = Celery("retry-test", broker=redis_url, set_as_current=False)
    try:
        with pytest.raises(Retry) as raised:
            try:
                raise PollAgain("waiting for the CA to issue", 5)
            except RetryLater:
                raise _retry(step(app), 5) from None
    finally:
        app.close()
    assert raised.value.__suppress_context__
    assert raised.value.__cause__ is None
    text = "".join(traceback.format_exception(raised.value))
    assert "PollAgain" not in text
    assert "waiting for the CA" not in text
    assert redis_client.llen("celery") == 1
