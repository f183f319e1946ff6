"""Least privilege in Redis: the edge is a read-only ACL user, the pipeline writes only certman's
keys and the broker's, and a whole issuance runs with nothing refused (Redis's ACL LOG), with
workers started as their systemd unit starts them (gossip and mingle on)."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from pipeline.distribution.acl import pipeline_rules
from tests.deployment.units import UNITS, read_unit
from tests.support import system as system_module
from tests.support.ports import free_port, wait_until
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


def test_a_worker_started_as_its_unit_consumes_under_the_acl(
    system: System, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The unit's own ExecStart (gossip, mingle and events on) as the pipeline user: the worker
    subscribes, consumes and issues, and Redis refuses it nothing."""
    unit = read_unit(UNITS / "certman-worker.service")
    argv = unit.exec_start
    assert argv[0].startswith("/opt/certman/bin/")
    argv[0] = str(system_module.BIN / Path(argv[0]).name)
    assert not any(arg.startswith("--without-") for arg in argv)  # gossip and mingle stay on
    metrics_dir = tmp_path / "runtime"  # the unit's RuntimeDirectory
    metrics_dir.mkdir()
    redis_client.acl_log_reset()
    system.start(workers=0)
    env = system.env | unit.environment
    env |= {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "CERTMAN_WORKER_METRICS_PORT": str(free_port())}  # fmt: skip
    with (system.workdir / "unit-worker.log").open("ab") as log:
        worker = subprocess.Popen(
            argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    system.workers.append(worker)
    try:
        # Gossip's and remote control's pattern subscriptions, granted.
        wait_until(lambda: redis_client.execute_command("PUBSUB", "NUMPAT") >= 2,
                   timeout=60, what="the worker's pattern subscriptions")  # fmt: skip
        system.certman("domains", "add", "unit-worker.example.com")
        system.wait_active(["unit-worker.example.com"], timeout=120)
    except (TimeoutError, AssertionError):
        print(system.logs())
        raise
    assert worker.poll() is None, "the worker exited"
    assert _denied(redis_client, system.pipeline_user[0]) == []
    log_text = (system.workdir / "unit-worker.log").read_text()
    assert "NoPermissionError" not in log_text and "Traceback" not in log_text


def test_without_the_gossip_pattern_redis_refuses_the_subscription(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Why the pattern is listed: Redis compares a PSUBSCRIBE pattern with the ACL's as text."""
    user, password = f"certman-acl-{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    rules = [rule for rule in pipeline_rules() if rule != "&/0.celeryev/worker.*"]
    redis_client.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", *rules)
    try:
        parts = urlsplit(redis_url)
        client = redis.Redis(host=parts.hostname, port=parts.port or 6379, username=user,
                             password=password)  # fmt: skip
        pubsub = client.pubsub()
        with pytest.raises(redis.exceptions.NoPermissionError):
            pubsub.psubscribe("/0.celeryev/worker.*")
            pubsub.get_message(timeout=5)
        pubsub.close()
        client.close()
    finally:
        redis_client.execute_command("ACL", "DELUSER", user)
