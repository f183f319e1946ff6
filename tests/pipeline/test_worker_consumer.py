"""The worker's consumer (pipeline.consumer) acknowledging a task after its broker connection was
lost: kombu's real Redis transport on the run's Redis, the connection detached as Celery's
consumer detaches it when the broker goes away (``Connection.collect()``)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
import redis
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import Connection, Exchange, Queue
from kombu.asynchronous import Hub
from kombu.message import Message

from pipeline.consumer import TASK_EVENT_FLUSH_INTERVAL, Consumer, lost_with_its_connection
from tests.support.tcp_proxy import TcpProxy

log = logging.getLogger(__name__)


@pytest.fixture
def queue(redis_client: redis.Redis) -> Queue:
    name = f"consumer-test-{uuid.uuid4().hex}"
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


@pytest.fixture
def broker(redis_url: str) -> Iterator[TcpProxy]:
    """The run's Redis behind a forwarder that can be cut, as a failover cuts a worker's link."""
    with TcpProxy(urlsplit(redis_url).port or 6379) as proxy:
        yield proxy


@pytest.fixture
def connection(redis_url: str, broker: TcpProxy) -> Iterator[Connection]:
    url = urlsplit(redis_url)._replace(netloc=f"127.0.0.1:{broker.port}").geturl()
    # A visibility timeout of 0: a message left unacknowledged is due back at the first scan.
    with Connection(url, transport_options={"visibility_timeout": 0}) as connection:
        yield connection


def received(connection: Connection, queue: Queue) -> Message:
    """A task message published to ``queue`` and taken by a consumer (in Redis's unacked set)."""
    with connection.Producer() as producer:
        producer.publish({"task": "x"}, exchange=queue.exchange, routing_key=queue.routing_key,
                         declare=[queue])  # fmt: skip
    channel = connection.channel()
    message = queue(channel).get(no_ack=False)
    assert message is not None
    return message


def lose(connection: Connection, broker: TcpProxy, message: Message) -> None:
    """The broker gone (its connections cut, refusing new ones) and what Celery's consumer then
    does: detach the connection (``collect()``, whose closing of the channels fails quietly
    before restoring anything), and reconnect once the broker is back (a promoted replica)."""
    broker.stop()
    connection.collect()
    broker.start()
    # Where a Sentinel failover leaves the message's channel: the close dropped its pool and
    # could not make another (a Sentinel channel's pool asks the Sentinels for the master, none
    # known yet). A plain Redis channel makes its pool without connecting, so it keeps one.
    message.channel._disconnect_pools()


def consumer_on(hub: Hub) -> Consumer:
    # Only the event loop is needed from the consumer to queue an acknowledgement.
    consumer: Consumer = Consumer.__new__(Consumer)
    consumer.hub = hub
    return consumer


def test_kombu_still_fails_to_ack_on_a_detached_connection(
    connection: Connection, broker: TcpProxy, queue: Queue
) -> None:
    """What pipeline.consumer guards against, with the kombu this project pins: if this starts
    failing, kombu handles the detached connection itself and the guard can go."""
    message = received(connection, queue)
    lose(connection, broker, message)
    with pytest.raises(AttributeError, match="hostname"):
        message.ack_log_error(log, connection.connection_errors)


def test_an_ack_on_a_lost_connection_is_let_go_and_the_task_comes_back(
    redis_url: str,
    connection: Connection,
    broker: TcpProxy,
    queue: Queue,
    caplog: pytest.LogCaptureFixture,
) -> None:
    message = received(connection, queue)
    errors = connection.connection_errors
    lose(connection, broker, message)
    assert lost_with_its_connection(message)

    # As Celery's ack promise queues it, and as the worker's event loop then runs it: raising
    # here is what ended the worker.
    with caplog.at_level(logging.WARNING, logger="pipeline.consumer"):
        queued = consumer_on(Hub()).call_soon_ack(message.ack_log_error, log, errors)
        queued()
    assert not message.acknowledged
    (line,) = [r.getMessage() for r in caplog.records if r.name == "pipeline.consumer"]
    assert message.delivery_tag in line and "visibility timeout" in line

    # The task is not lost: past the visibility timeout, the next connection's scan puts it back
    # in its queue, and it is delivered again.
    with Connection(redis_url, transport_options={"visibility_timeout": 0}) as again:
        channel = again.channel()
        channel.qos.restore_visible(interval=1)
        redelivered = queue(channel).get(no_ack=False)
        assert redelivered is not None
        assert redelivered.payload == {"task": "x"}
        redelivered.ack()
        assert queue(channel).get(no_ack=False) is None


def test_an_ack_on_a_live_connection_acknowledges(connection: Connection, queue: Queue) -> None:
    message = received(connection, queue)
    assert not lost_with_its_connection(message)
    consumer_on(Hub()).call_soon_ack(message.ack_log_error, log, connection.connection_errors)()
    assert message.acknowledged
    # Acknowledged in Redis too: nothing comes back at the scan for unacknowledged tasks.
    channel = connection.channel()
    channel.qos.restore_visible(interval=1)
    assert queue(channel).get(no_ack=False) is None


def test_an_ack_on_a_lost_connection_still_goes_through_where_it_can(
    connection: Connection, broker: TcpProxy, queue: Queue
) -> None:
    """Over a plain Redis, back at the same address, the lost channel's pool reaches it: the
    acknowledgement is made, not left for a redelivery."""
    message = received(connection, queue)
    broker.stop()
    connection.collect()
    broker.start()
    assert lost_with_its_connection(message)
    consumer_on(Hub()).call_soon_ack(message.ack_log_error, log, connection.connection_errors)()
    assert message.acknowledged
    channel = connection.channel()
    channel.qos.restore_visible(interval=1)
    assert queue(channel).get(no_ack=False) is None


def test_a_rejection_on_a_lost_connection_is_let_go(
    connection: Connection, broker: TcpProxy, queue: Queue
) -> None:
    message = received(connection, queue)
    errors = connection.connection_errors
    lose(connection, broker, message)
    consumer_on(Hub()).call_soon_ack(message.reject_log_error, log, errors, requeue=True)()
    assert not message.acknowledged


class _Hub:
    """The event loop's timer, recorded: (delay, callback) for each call_later."""

    def __init__(self) -> None:
        self.later: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> None:
        self.later.append((delay, callback))


class _Dispatcher:
    def __init__(self) -> None:
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def _consumer_with(hub: _Hub, dispatcher: _Dispatcher) -> Consumer:
    consumer: Consumer = Consumer.__new__(Consumer)  # only the event buffer's part is used
    consumer.hub = hub
    consumer.event_dispatcher = dispatcher
    return consumer


def test_buffered_task_events_are_flushed_once_per_interval() -> None:
    hub, dispatcher = _Hub(), _Dispatcher()
    consumer = _consumer_with(hub, dispatcher)
    for _ in range(10):
        consumer.on_send_event_buffered()
    # One flush asked for, an interval on, for all ten events; none sent yet.
    assert [delay for delay, _ in hub.later] == [TASK_EVENT_FLUSH_INTERVAL]
    assert dispatcher.flushes == 0
    hub.later[0][1]()
    assert dispatcher.flushes == 1
    consumer.on_send_event_buffered()  # the next event asks for the next flush
    assert len(hub.later) == 2


def test_a_lost_flush_is_asked_for_again() -> None:
    # The loop's timers were reset (a reconnection) with a flush pending: the next event must
    # not wait for a full buffer.
    hub, dispatcher = _Hub(), _Dispatcher()
    consumer = _consumer_with(hub, dispatcher)
    consumer.on_send_event_buffered()
    consumer._event_flush_due = time.monotonic() - 3 * TASK_EVENT_FLUSH_INTERVAL
    consumer.on_send_event_buffered()
    assert len(hub.later) == 2


def test_shutdown_flushes_what_is_buffered(monkeypatch: pytest.MonkeyPatch) -> None:
    hub, dispatcher = _Hub(), _Dispatcher()
    consumer = _consumer_with(hub, dispatcher)
    consumer.on_send_event_buffered()
    monkeypatch.setattr(CeleryConsumer, "shutdown", lambda self: None)
    consumer.shutdown()
    assert dispatcher.flushes == 1
