"""kombu's Redis transport as certman's Celery uses it (pipeline.celery): one redis-py client per
connection pool, the same URL, messages and keys as kombu's own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Exchange, Queue

from pipeline.celery import RedisChannel, RedisTransport, SentinelTransport, app


@pytest.fixture
def connection(redis_url: str) -> Iterator[Connection]:
    with Connection(redis_url) as connection:
        yield connection


def test_certmans_celery_uses_it_and_names_the_broker_as_before() -> None:
    connection = app.connection_for_write()
    try:
        assert connection.transport_cls == "redis"
        assert isinstance(connection.transport, RedisTransport)
        # Flower tells the broker's kind from the URL's scheme.
        assert connection.as_uri().startswith("redis://")
    finally:
        connection.release()
    assert isinstance(Connection("sentinel://127.0.0.1:26379").transport, SentinelTransport)


def test_one_client_per_pool(connection: Connection) -> None:
    channel = connection.channel()
    assert isinstance(channel, RedisChannel)
    with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
        assert first is second
        assert first.connection_pool is channel.pool
    # As after a lost connection or a fork: a new pool, and a client for it.
    channel._disconnect_pools()
    with channel.conn_or_acquire() as third:
        assert third is not first
        assert third.connection_pool is channel.pool
    given = redis.Redis(connection_pool=channel.pool)
    with channel.conn_or_acquire(given) as client:
        assert client is given
    channel.close()


def test_messages_go_through_as_with_kombus_own(
    connection: Connection, redis_client: redis.Redis
) -> None:
    name = f"transport-test-{uuid.uuid4().hex}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with connection.Producer() as producer:
        for n in range(3):
            producer.publish({"n": n}, exchange=queue.exchange, routing_key=name, declare=[queue])
    # kombu's layout: the queue is a Redis list under its name.
    assert redis_client.llen(name) == 3
    channel = connection.channel()
    got = []
    for _ in range(3):
        message = queue(channel).get(no_ack=False)
        assert message is not None
        got.append(message.payload["n"])
        message.ack()
    assert sorted(got) == [0, 1, 2]
    assert redis_client.llen(name) == 0
    # Acknowledged: nothing left in kombu's unacked hash for these.
    assert not [tag for tag, raw in redis_client.hgetall("unacked").items() if name.encode() in raw]
