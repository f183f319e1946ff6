"""Least privilege in Redis: the edge is a read-only ACL user, the pipeline writes only certman's
keys and the broker's, and a whole issuance runs with nothing refused (Redis's ACL LOG)."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from tests.support.system import System

pytestmark = pytest.mark.integration


def _denied(client: redis.Redis, user: str) -> list[dict[str, Any]]:
    return [entry for entry in client.acl_log() if entry["username"] == user]


def test_the_edge_user_reads_and_subscribes_but_writes_nothing(
    system: System, redis_client: redis.Redis
) -> None:
    redis_client.acl_log_reset()
    system.start(workers=1)
    system.start_beat()
    system.certman("domains", "add", "acl.example.com", "--alias", "www.acl.example.com")
    system.wait_active(["acl.example.com"], timeout=120)
    # The snapshot reconcile and the status commands, as the pipeline user, too.
    system.call_task("certman.maintenance.reconcile_snapshot")
    system.certman("keys", "status", "--json")
    system.certman("snapshot", "reconcile", "--dry-run")
    system.certman("domains", "remove", "www.acl.example.com")
    system.certman("snapshot", "resync")

    # Nothing either user sent in that whole run was refused: the rules are enough.
    assert _denied(redis_client, system.edge_user[0]) == []
    assert _denied(redis_client, system.pipeline_user[0]) == []

    edge = redis.Redis.from_url(system.redis_url_as(system.edge_user))
    try:
        assert edge.hgetall("certman:signed")  # reads what it needs
        assert edge.get("certman:version") is not None
        pubsub = edge.pubsub()
        pubsub.subscribe("certman:events")
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
        pubsub.close()
        for command in (
            ("SET", "certman:challenge:token", "forged"),
            ("HSET", "certman:index", "acl.example.com", "forged"),
            ("HSET", "certman:signed", "acl.example.com", "{}"),
            ("PUBLISH", "certman:events", '{"type":"resync","version":1}'),
            ("DEL", "certman:sites"),
            ("EVAL", "return redis.call('DEL', KEYS[1])", "1", "certman:sites"),
            ("GET", "issuance"),  # not certman's key
            ("FLUSHDB",),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                edge.execute_command(*command)
    finally:
        edge.close()
    pipeline = redis.Redis.from_url(system.redis_url_as(system.pipeline_user))
    try:
        for command in (("SET", "someone-else:key", "x"), ("FLUSHDB",), ("KEYS", "*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                pipeline.execute_command(*command)
    finally:
        pipeline.close()
