"""pipeline.redis_connect against real Sentinels: the clients find the master, and find the new
one after a failover; Celery's and redbeat's settings say the same as the clients do."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection

from pipeline.redis_connect import (
    RedisTarget,
    SentinelUrl,
    async_client,
    parse_sentinel_url,
    sync_client,
)
from pipeline.redis_tls import RedisTls
from tests.support.ports import wait_until
from tests.support.redis_tls_server import make_ca
from tests.support.sentinel import MASTER_NAME, SentinelCluster


def test_a_sentinel_url_is_parsed_as_kombu_reads_it() -> None:
    parsed = parse_sentinel_url("sentinel://u:p%40ss@h1:1/4;sentinel://h2:2;sentinel://h3")
    assert parsed == SentinelUrl((("h1", 1), ("h2", 2), ("h3", 26379)), 4, "u", "p@ss")


def test_celery_and_redbeat_settings_for_sentinel() -> None:
    target = RedisTarget(
        "sentinel://:pw@h1:1/4;sentinel://h2:2", sentinel_master="m", sentinel_password="sp"
    )
    broker = target.celery_broker()
    assert broker["broker_url"] == target.url  # kombu parses it itself
    assert broker["broker_use_ssl"] is None
    assert broker["transport_options"]["master_name"] == "m"
    assert broker["transport_options"]["sentinel_kwargs"]["password"] == "sp"
    beat = target.redbeat()
    assert beat["redbeat_redis_url"].startswith("redis-sentinel")  # redbeat's Sentinel path
    options = beat["redbeat_redis_options"]
    assert options["sentinels"] == [["h1", 1], ["h2", 2]]
    assert (options["service_name"], options["db"], options["password"]) == ("m", 4, "pw")
    assert options["sentinel_kwargs"]["password"] == "sp"
    assert "pw" not in target.describe() and "h2:2" in target.describe()


def test_a_single_server_keeps_its_tls_options(tmp_path: object) -> None:
    target = RedisTarget("rediss://redis.internal:6380/0", RedisTls())
    assert target.celery_broker()["broker_use_ssl"]["ssl_check_hostname"] is True
    assert target.redbeat()["redbeat_redis_use_ssl"]["ssl_check_hostname"] is True
    with pytest.raises(ValueError, match="TLS options"):
        RedisTarget("rediss://redis.internal:6380/0?ssl_cert_reqs=none")


@pytest.fixture(scope="module")
def cluster() -> Iterator[SentinelCluster]:
    with SentinelCluster() as cluster:
        yield cluster


def test_clients_find_the_master_and_then_the_promoted_replica(cluster: SentinelCluster) -> None:
    target = RedisTarget(cluster.url, sentinel_master=MASTER_NAME)
    client = sync_client(target, socket_timeout=2, socket_connect_timeout=1)
    try:
        _failover(cluster, target, client)
    finally:
        client.close()


def _failover(cluster: SentinelCluster, target: RedisTarget, client: redis.Redis) -> None:
    client.set("k", "before")
    assert cluster.client(cluster.master_port).get("k") == b"before"

    async def read_async() -> bytes | None:
        aclient = async_client(target, socket_timeout=2, socket_connect_timeout=1)
        try:
            value: bytes | None = await aclient.get("k")
            return value
        finally:
            await aclient.aclose()  # type: ignore[attr-defined]  # (stubs predate it)

    assert asyncio.run(read_async()) == b"before"
    wait_until(
        lambda: cluster.client(cluster.replica_port).get("k") == b"before",
        timeout=10,
        what="the write to reach the replica",
    )
    cluster.kill_master()

    def written_after_failover() -> bool:
        try:
            client.set("k", "after")
        except redis.ConnectionError:
            return False  # the old master, until the Sentinels promote the replica
        return True

    wait_until(
        written_after_failover, timeout=30, what="a write to reach the new master", every=0.1
    )
    assert cluster.client(cluster.replica_port).get("k") == b"after"
    assert asyncio.run(read_async()) == b"after"


# --- Redis over TLS through Sentinel (CERTMAN_REDIS_SENTINEL_TLS) ------------------------------
def test_sentinel_tls_settings_for_every_client(tmp_path: Path) -> None:
    ca = make_ca(tmp_path, "ca").file
    target = RedisTarget(
        "sentinel://h1:1;sentinel://h2:2", RedisTls(ca), sentinel_master="m", sentinel_tls=True
    )
    broker = target.celery_broker()
    assert broker["broker_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert broker["broker_use_ssl"]["ssl_ca_certs"] == str(ca)
    sentinels = broker["transport_options"]["sentinel_kwargs"]
    assert sentinels["ssl"] is True and sentinels["ssl_ca_certs"] == str(ca)
    beat = target.redbeat()
    assert beat["redbeat_redis_use_ssl"]["ssl_ca_certs"] == str(ca)
    assert beat["redbeat_redis_options"]["sentinel_kwargs"]["ssl_cert_reqs"] == "required"
    assert "over TLS" in target.describe()
    with pytest.raises(ValueError, match="CERTMAN_REDIS_SENTINEL_TLS is on, but"):
        RedisTarget("rediss://redis.internal:6380/0", RedisTls(ca), sentinel_tls=True)


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[SentinelCluster]:
    with SentinelCluster(tls=True) as cluster:
        yield cluster


def test_over_tls_clients_find_the_master_and_then_the_promoted_replica(
    tls_cluster: SentinelCluster,
) -> None:
    target = RedisTarget(
        tls_cluster.url, RedisTls(tls_cluster.ca.file), MASTER_NAME, sentinel_tls=True
    )
    client = sync_client(target, socket_timeout=2, socket_connect_timeout=1)
    try:
        # The broker (kombu's Sentinel transport) as Celery makes it from the settings.
        broker = target.celery_broker()
        with Connection(
            broker["broker_url"],
            ssl=broker["broker_use_ssl"],
            transport_options=broker["transport_options"],
        ) as connection:
            connection.ensure_connection(max_retries=1)
            queue = connection.SimpleQueue("certman-sentinel-tls")
            queue.put({"over": "tls"})
            assert queue.get(timeout=5).payload == {"over": "tls"}
            queue.close()
        _failover(tls_cluster, target, client)
    finally:
        client.close()


def test_over_tls_an_unknown_ca_fails_closed(tls_cluster: SentinelCluster, tmp_path: Path) -> None:
    other = make_ca(tmp_path, "not the cluster's CA").file
    target = RedisTarget(tls_cluster.url, RedisTls(other), MASTER_NAME, sentinel_tls=True)
    client = sync_client(target, socket_timeout=2, socket_connect_timeout=1)
    try:
        with pytest.raises(redis.ConnectionError):
            client.set("k", "unverified")
    finally:
        client.close()
