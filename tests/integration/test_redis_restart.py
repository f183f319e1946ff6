"""A Redis restart under the running pipeline, as the units start it: nothing exits, nothing is
lost, the edges' snapshot comes back.

The worker and beat are started with the exact ``ExecStart`` of deploy/systemd's units (gossip,
mingle and task events on, as in production), under a supervisor that restarts them as
``Restart=always`` would, and counts the restarts: there must be none. Redis is restarted twice
over: with its data (an append-only file) and without (as a Redis without persistence).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from tests.integration.test_faults import orders_placed
from tests.integration.test_sentinel import certificates_per_site, orders
from tests.support.ports import wait_until
from tests.support.redis_server import RedisServer
from tests.support.system import System
from tests.support.units import SUPERVISOR_LINE, role_log, start_role

pytestmark = pytest.mark.integration

SITES = 6


def failed_validations(system: System) -> int:
    engine = create_engine(str(system.database_url))
    try:
        with engine.connect() as connection:
            return int(
                connection.scalar(
                    text(
                        "SELECT COUNT(*) FROM attempts "
                        "WHERE step = 'poll_validation' AND outcome = 'failed'"
                    )
                )
                or 0
            )
    finally:
        engine.dispose()


@pytest.fixture(params=["with its data", "empty"])
def redis_server(request: pytest.FixtureRequest) -> Iterator[tuple[RedisServer, bool]]:
    keeps_data = request.param == "with its data"
    directory = Path(tempfile.mkdtemp(prefix="certman-redis-"))
    server = RedisServer(directory, append_only=keeps_data)
    server.start().close()
    yield server, keeps_data
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_redis_restarted_under_the_units(redis_server: tuple[RedisServer, bool]) -> None:
    server, keeps_data = redis_server
    names = [f"rs{i}.example.com" for i in range(SITES)]
    env = {
        # Tasks a worker held come back within seconds (2 h in production, where the
        # stuck-order sweeper is quicker), and a lost beat lock lapses in 5 s.
        "CERTMAN_BROKER_VISIBILITY_TIMEOUT": "5",
        "CERTMAN_BEAT_LOCK_TIMEOUT": "5",
    }
    with System(
        redis_url=server.url,
        extra_env=env,
        # Validations take a random moment, so the restart falls in the middle of issuance.
        pebble_options={"va_sleep": True},
        supervise=True,
        restart_delay=2,  # the units' RestartSec
    ) as system:
        try:
            _run(system, server, keeps_data, names)
        except BaseException:
            print(system.logs())
            raise


def _run(system: System, server: RedisServer, keeps_data: bool, names: list[str]) -> None:
    system.start(workers=0)
    worker = start_role(system, "worker")
    beat = start_role(system, "beat")
    before_names, after_name = names[:-1], names[-1]
    for name in before_names:
        system.certman("domains", "add", name)

    def some_done_some_not() -> bool:
        steps = [step for _, step in orders(system)]
        return len(steps) == len(before_names) and 0 < steps.count("done") < len(before_names)

    wait_until(some_done_some_not, timeout=90, what="issuance to be under way", every=0.05)
    issued_before = [domain for domain, step in orders(system) if step == "done"]

    server.stop()
    # Down long enough for beat to find it gone (it looks once a second), as a real restart is.
    wait_until(
        lambda: "beat: Redis unreachable" in role_log(system, "beat"),
        timeout=20,
        what="beat to find Redis gone",
    )
    server.start().close()
    # ACL users live in memory only (production loads them from an ACL file at start).
    system.apply_acl()
    prefix = system.redis_prefix
    client = redis.Redis.from_url(server.url)
    if not keeps_data:
        assert not client.exists(f"{prefix}:index"), "the restart should have lost the snapshot"

    system.certman("domains", "add", after_name)
    system.wait_active(names, timeout=150)

    # The edges' snapshot is back: sites issued before the restart (which no issuance
    # republishes) are in it again.
    wait_until(
        lambda: all(client.hexists(f"{prefix}:index", name) for name in issued_before),
        # Bounded, not tight: in a parallel run (scripts/test -n) the worker shares the cores.
        timeout=60,
        what="the snapshot to be republished",
    )
    client.close()
    # Every site issued once: nothing lost, nothing doubled. The CA saw one order per site,
    # and one more for each validation that failed: the answers to HTTP-01 challenges live in
    # Redis, and a CA asking while Redis is down (or after it came back empty) gets a 404,
    # after which the site tries again with a new order, as after any failed validation.
    assert certificates_per_site(system) == dict.fromkeys(names, 1)
    assert orders_placed(system) == len(names) + failed_validations(system)

    # Every role rode it out: still the first process, never restarted by the supervisor.
    for role, process in (("worker", worker), ("beat", beat)):
        assert process.poll() is None, f"{role}'s supervisor exited"
        assert SUPERVISOR_LINE not in role_log(system, role), f"{role} exited during the restart"
    # Celery's consumer steps stopped and started again without errors (gossip's stop used to
    # log an AttributeError with a traceback on every reconnection).
    assert "Error on " not in role_log(system, "worker")
    beat_log = role_log(system, "beat")
    assert "CRITICAL" not in beat_log and "Traceback" not in beat_log
    assert "beat: Redis reachable again" in beat_log
    if not keeps_data:
        assert "beat: Redis has lost beat's schedule" in beat_log
