"""scripts/demo says which Redis database it clears, and clears only one holding nothing but its
own keys unless told to (--force)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import redis

REPO = Path(__file__).resolve().parents[2]


def _demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_script", REPO / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split(redis_url: str) -> tuple[str, int]:
    base, _, db = redis_url.rpartition("/")
    return base, int(db or 0)


def test_the_demo_names_its_database_and_refuses_one_holding_others_keys(
    redis_url: str, redis_client: redis.Redis
) -> None:
    base, db = _split(redis_url)
    redis_client.set("someone-else:session", "theirs")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--redis", base,
         "--redis-db", str(db)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0] == f"demo: uses Redis database {db} at {base} and clears it at start"
    assert result.returncode == 1
    assert "1 keys that no demo marked as its own ('someone-else:session')" in result.stdout
    assert "--force" in lines[-1] and "Traceback" not in result.stdout + result.stderr
    assert redis_client.get("someone-else:session") == b"theirs"  # nothing cleared


def test_the_demo_clears_only_a_database_it_marked_and_with_force_anything(
    redis_url: str, redis_client: redis.Redis
) -> None:
    demo = _demo()
    _, db = _split(redis_url)
    # Another Celery app's keys look like a demo's broker keys: without the marker, refused.
    for key in ("issuance", "unacked", "_kombu.binding.celery", "w0@host.celery.pidbox"):
        redis_client.set(key, "another app's")
    refused = demo.claim_database(redis_client, db, force=False)
    assert refused is not None and "--redis-db" in refused
    assert redis_client.dbsize() == 4

    assert demo.claim_database(redis_client, db, force=True) is None
    assert redis_client.keys() == [demo.OWNER_KEY.encode()]
    # A database a demo marked is the demo's, whatever else it holds now.
    redis_client.set("certman-demo:index", "demo's")
    redis_client.set("issuance", "demo's")
    assert demo.claim_database(redis_client, db, force=False) is None
    assert redis_client.keys() == [demo.OWNER_KEY.encode()]
