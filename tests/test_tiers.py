"""The test tiers: every collected test in exactly one, read correctly, and the unit tier guarded.

The samples the scanner reads are reached through ``SAMPLES`` (a dict, which the scanner does
not follow), so that this file's own tests stay in the unit tier.
"""

from __future__ import annotations

import ast
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TIER_PROBLEMS
from tests.support import tiers
from tests.support.pebble import Pebble
from tests.support.redis_server import RedisServer
from tests.support.system import System


def _starts_redis(directory: Path) -> None:
    RedisServer(directory, append_only=False).start().close()


def _helper_that_starts_redis(directory: Path) -> None:
    _starts_redis(directory)  # one step removed: followed through this module's functions


def _starts_pebble(port: int) -> None:
    Pebble(port).start()


class _OwnSystem(System):
    """A harness of ours made from one: needs what its base needs."""


def _runs_a_celery_worker() -> None:
    subprocess.run(["celery", "-A", "pipeline", "worker"], check=False)


def _runs_the_edge_in_a_namespace() -> None:
    code = "from edge.cli import main; main()"
    subprocess.run(["unshare", "-m", sys.executable, "-c", code], check=False)


def _pure(text: str) -> str:
    return text.upper()


SAMPLES: dict[str, Any] = {
    "redis": _starts_redis,
    "redis, one step removed": _helper_that_starts_redis,
    "pebble": _starts_pebble,
    "system": _OwnSystem,
    "worker": _runs_a_celery_worker,
    "edge as root": _runs_the_edge_in_a_namespace,
    "pure": _pure,
}


def test_every_collected_test_is_in_exactly_one_tier(pytestconfig: pytest.Config) -> None:
    # unit, or one or more of the resources: never both, never neither.
    problems = pytestconfig.stash[TIER_PROBLEMS]
    assert not problems, "\n".join(problems)


def test_every_slow_test_named_is_there() -> None:
    root = Path(__file__).resolve().parents[1]
    missing = []
    for nodeid in sorted(tiers.SLOW):
        path, _, name = nodeid.partition("::")
        file = root / path
        tree = ast.parse(file.read_text()) if file.is_file() else ast.Module(body=[])
        defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
        if name not in defined:
            missing.append(nodeid)
    assert not missing, f"tiers.SLOW names tests that are gone: {missing}"


def test_the_longest_are_slow_and_start_first_in_a_parallel_run(
    request: pytest.FixtureRequest,
) -> None:
    assert set(tiers.LONGEST) <= tiers.SLOW
    assert len(set(tiers.LONGEST)) == len(tiers.LONGEST)
    # Ranked as a parallel run orders them: longest, slow, waiting, other resources, unit.
    assert tiers.parallel_rank(request.node) == (4, 0)
    for item in request.session.items:
        rank = tiers.parallel_rank(item)
        if tiers.base_nodeid(item) in tiers.LONGEST:
            assert rank == (0, tiers.LONGEST.index(tiers.base_nodeid(item)))
        elif item.get_closest_marker("slow") is not None:
            assert rank == (1, 0), item.nodeid
        elif item.get_closest_marker("unit") is not None:
            assert rank == (4, 0), item.nodeid
        else:
            assert rank[0] in (2, 3), item.nodeid


def test_temporary_directories_go_into_the_runs_own() -> None:
    # The session's directory, removed at its end (tests/conftest.py): nothing lands in /tmp.
    run = Path(tempfile.mkdtemp(prefix="certman-")).parent
    assert run.name.startswith("certman-tests-"), run
    assert run.stat().st_mode & 0o777 == 0o755


def test_this_test_is_in_the_unit_tier(request: pytest.FixtureRequest) -> None:
    assert request.node.get_closest_marker("unit") is not None
    assert tiers.tier_problem(request.node) is None


@pytest.mark.parametrize(
    ("sample", "needs"),
    [
        ("redis", {"redis"}),
        ("redis, one step removed", {"redis"}),
        ("pebble", {"pebble"}),
        ("system", {"redis", "pebble", "edge", "worker"}),
        ("worker", {"worker"}),
        ("edge as root", {"edge", "root"}),
        ("pure", set()),
    ],
)
def test_the_scanner_follows_code_to_the_harnesses(sample: str, needs: set[str]) -> None:
    assert tiers.Scanner().needs(SAMPLES[sample]) == needs


def test_a_store_fixture_needs_postgresql_only_for_its_postgresql_instance(
    request: pytest.FixtureRequest,
) -> None:
    scanner = tiers.Scanner()
    # The tests of this run that take database_url: each instance by its parameter.
    taking = [
        item
        for item in request.session.items
        if "database_url" in getattr(item, "fixturenames", ())
    ]
    sqlite = [item for item in taking if "[sqlite" in item.nodeid]
    postgresql = [item for item in taking if "[postgresql" in item.nodeid]
    if not taking:
        pytest.skip("no test taking database_url is selected in this run")
    assert all("postgresql" not in tiers.item_needs(i, scanner) for i in sqlite)
    assert all("postgresql" in tiers.item_needs(i, scanner) for i in postgresql)


def test_the_guard_stops_a_service_process_and_a_service_port() -> None:
    server = "-".join(("redis", "server"))  # not a constant the scanner would read
    with tiers.unit_guard():
        with pytest.raises(tiers.ServiceTouched, match="started"):
            subprocess.Popen([server, "--port", "0"])
        with pytest.raises(tiers.ServiceTouched, match="started"):
            subprocess.Popen([sys.executable, "-c", "import edge.cli"])
        with socket.socket() as sock, pytest.raises(tiers.ServiceTouched, match="connected"):
            sock.connect(("127.0.0.1", 6379))
        # Asking a command for its version starts nothing.
        done = subprocess.run([sys.executable, "--version"], capture_output=True, check=True)
        assert done.returncode == 0
