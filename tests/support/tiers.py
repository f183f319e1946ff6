"""Which tier each test belongs to, read from what it uses, and a guard for the unit tier.

A test is marked by what it needs: ``redis``, ``postgresql``, ``edge``, ``pebble``, ``worker``
(Celery processes), ``root``, ``netns``, ``build`` (builds the wheel or the image); ``unit``
when it needs none of them. Nobody has to remember to mark a test: the marks come from the
fixtures it requests (with the parameter it gets: ``database_url[sqlite]`` needs no PostgreSQL)
and from the code it runs, followed through the test's own helpers, fixtures and the classes of
``tests/`` down to the harnesses that start a service (``RedisServer``, ``Pebble``, ``System``,
``start_edge``...) or the commands they run. The unit tier is then guarded rather than trusted:
:func:`unit_guard` fails a test that starts a service's process or connects to one.
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
import types
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

UNIT = "unit"
UNIT_MEANS = "needs none of the resources below (scripts/test --fast runs these)"
# Each resource marker and what it means (pyproject.toml declares the same names).
RESOURCES: dict[str, str] = {
    "redis": "needs a Redis server (the run's private redis-server, or one it starts)",
    "postgresql": "needs PostgreSQL (the run's database on 127.0.0.1:5432)",
    "edge": "starts a certman edge (in this process or as certman-edge)",
    "pebble": "starts Pebble, the test ACME server",
    "worker": "starts Celery processes (worker, beat, Flower or celery call)",
    "root": "runs commands as other users (setpriv, unshare): skips unless root",
    "netns": "makes network namespaces (ip netns, unshare --net)",
    "build": "builds the wheel or the image (pip and PyPI, minutes)",
}

# The slowest tests of the suite, marked ``slow`` (every instance of a parametrised one): the 25
# slowest of a --durations run on this machine kind (December 2026, under other load: 345 s for
# test_deployment down to 14 s). CI prints the 25 slowest: follow it here.
SLOW: frozenset[str] = frozenset(
    {
        "tests/deployment/test_deployment.py::test_the_guide_deploys_issues_and_rides_out_a_redis_restart",
        "tests/integration/test_api.py::test_the_platform_drives_sites_through_the_api",
        "tests/integration/test_beat_ha.py::test_standby_beat_takes_over_without_doubling_a_dispatch",
        "tests/integration/test_fallback.py::test_fallback_to_a_second_ca_with_eab_and_back",
        "tests/integration/test_faults.py::test_a_refused_name_is_blocked_and_the_others_unaffected",
        "tests/integration/test_faults.py::test_dns_not_at_the_edge_yet_costs_the_ca_nothing_and_frees_the_slot",
        "tests/integration/test_faults.py::test_flaky_nonces_every_domain_still_issued",
        "tests/integration/test_faults.py::test_worker_killed_mid_chain_the_order_completes_once",
        "tests/integration/test_flower.py::test_the_task_list_shows_domains_and_not_the_dispatcher",
        "tests/integration/test_issuance.py::test_sites_issued_end_to_end_and_served",
        "tests/integration/test_key_rotation.py::test_signing_key_rotation",
        "tests/integration/test_no_clear_keys.py::test_no_private_key_in_clear_anywhere",
        "tests/integration/test_operator.py::test_domains_show_names_the_bucket_a_real_worker_waits_on",
        "tests/integration/test_operator.py::test_update_renew_and_revoke_through_the_edge",
        "tests/integration/test_redis_acl.py::test_a_worker_started_as_its_unit_consumes_under_the_acl",
        "tests/integration/test_redis_acl.py::test_the_edge_user_reads_and_subscribes_but_writes_nothing",
        "tests/integration/test_redis_restart.py::test_redis_restarted_under_the_units",
        "tests/integration/test_renewal.py::test_a_renewal_inside_the_ari_window_with_replaces_spends_no_tokens",
        "tests/integration/test_renewal.py::test_reseal_migration_from_legacy_rsa",
        "tests/integration/test_renewal.py::test_short_certificates_renewed_by_beat_at_two_thirds",
        "tests/integration/test_renewal.py::test_stuck_order_found_and_completed_by_the_sweeper",
        "tests/integration/test_sentinel.py::test_master_killed_during_bulk_issuance",
        "tests/packaging/test_wheel.py::test_installed_wheel_runs_every_role_and_issues",
        "tests/packaging/test_wheel.py::test_the_wheel_carries_the_migrations_and_the_commands",
        "tests/pipeline/test_redis_connect.py::test_over_tls_an_unknown_ca_fails_closed",
    }
)

# The longest of the SLOW tests, longest first (a parallel --durations=0 run of the whole suite
# on this machine kind, December 2026): a parallel run starts them first (see parallel_rank).
LONGEST: tuple[str, ...] = (
    "tests/deployment/test_deployment.py::test_the_guide_deploys_issues_and_rides_out_a_redis_restart",
    "tests/integration/test_redis_restart.py::test_redis_restarted_under_the_units",
    "tests/integration/test_operator.py::test_update_renew_and_revoke_through_the_edge",
    "tests/integration/test_key_rotation.py::test_signing_key_rotation",
    "tests/integration/test_sentinel.py::test_master_killed_during_bulk_issuance",
    "tests/integration/test_renewal.py::test_reseal_migration_from_legacy_rsa",
    "tests/integration/test_fallback.py::test_fallback_to_a_second_ca_with_eab_and_back",
    "tests/integration/test_faults.py::test_flaky_nonces_every_domain_still_issued",
    "tests/integration/test_redis_acl.py::test_the_edge_user_reads_and_subscribes_but_writes_nothing",
)
# Resources whose tests wait on processes (a CA, Celery, a build, a namespace) rather than
# compute: in a parallel run they go before the tests that keep a core busy.
WAITING = ("build", "worker", "pebble", "netns", "root")

# Fixtures that need a resource whatever code they run.
FIXTURES: dict[str, set[str]] = {
    "redis_url": {"redis"},
    "redis_client": {"redis"},
    "pg_database_url": {"postgresql"},
    "start_edge": {"edge"},
    "installed": {"build"},
}
# Fixtures parametrised over stores: only their PostgreSQL instance needs PostgreSQL.
STORE_FIXTURES = frozenset({"database_url", "store"})

# The harnesses of tests/ that start a service, by module and qualified name (not followed).
HARNESSES: dict[str, set[str]] = {
    "tests.support.redis_server.RedisServer": {"redis"},
    "tests.support.redis_tls_server.TlsRedisServer": {"redis"},
    "tests.support.sentinel.SentinelCluster": {"redis"},
    "tests.support.pebble.Pebble": {"pebble"},
    "tests.support.system.System": {"redis", "pebble", "edge", "worker"},
    "tests.edge.conftest.RunningEdge": {"edge"},
    "tests.edge.conftest.start_prefork_edge": {"edge"},
}
# Words in the code a test runs that start a resource's process (a command's words, exactly).
COMMANDS: dict[str, set[str]] = {
    "redis-server": {"redis"},
    "redis-sentinel": {"redis"},
    "pebble": {"pebble"},
    "pebble-challtestsrv": {"pebble"},
    "unshare": {"root"},
    "netns": {"netns"},
    "check-image": {"build", "root"},
    # The deployment scenario, run in its namespace: the whole system, on its own PostgreSQL.
    "tests.deployment.scenario": {"redis", "postgresql", "edge", "pebble", "worker"},
}
# Code that runs the edge's command line in a Python interpreter (tests/edge's edge_command,
# or a command built around it), found inside longer strings.
EDGE_ENTRY = "from edge.cli import main"
# Words that together start a process: python -m build (the wheel); celery -A pipeline ...
# (Module-level, not literals in the scanner's code, so that the scanner never reads itself.)
TOGETHER: dict[frozenset[str], str] = {
    frozenset({"-m", "build"}): "build",
    frozenset({"-A", "pipeline"}): "worker",
}
# Processes a unit test may not start, and ports it may not connect to.
GUARDED_PROGRAMS = frozenset(
    {"redis-server", "redis-sentinel", "redis-cli", "pebble", "pebble-challtestsrv", "celery",
     "certman-edge", "postgres", "initdb", "pg_ctl", "pg_ctlcluster", "psql"}
)  # fmt: skip
GUARDED_PORTS = frozenset({6379, 5432, 26379, 14000, 15000})


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"


def _ours(obj: Any) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module == "tests" or module.startswith("tests.") or module == "conftest"


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _strings(consts: Iterable[Any]) -> Iterator[str]:
    for const in consts:
        if isinstance(const, str):
            yield const
        elif isinstance(const, tuple | frozenset):
            yield from _strings(const)


def _functions_of(obj: Any) -> Iterator[types.FunctionType]:
    """The Python functions behind a function, fixture, method, property or class of ours."""
    if isinstance(obj, type):
        for value in vars(obj).values():
            if isinstance(value, staticmethod | classmethod):
                value = value.__func__
            if isinstance(value, property):
                accessors = (value.fget, value.fset)
                yield from (f for f in accessors if isinstance(f, types.FunctionType))
            elif isinstance(value, types.FunctionType):
                yield value
        return
    function = inspect.unwrap(getattr(obj, "__func__", obj))
    if isinstance(function, types.FunctionType):
        yield function


class Scanner:
    """Follows what a test's code refers to and collects the resources it would use."""

    def __init__(self) -> None:
        self._memo: dict[int, frozenset[str]] = {}
        self._open: set[int] = set()

    def needs(self, obj: Any) -> frozenset[str]:
        key = id(obj)
        if key in self._memo:
            return self._memo[key]
        if key in self._open:
            return frozenset()  # already being read, further up: its needs are counted there
        self._open.add(key)
        try:
            # A harness, or a class of ours made from one (tests/packaging's InstalledSystem).
            lineage = obj.__mro__ if isinstance(obj, type) else (obj,)
            found = set().union(*(HARNESSES.get(_qualname(c), set()) for c in lineage))
            if _qualname(obj) not in HARNESSES:
                for function in _functions_of(obj):
                    found |= self._needs_of_function(function)
        finally:
            self._open.discard(key)
        result = frozenset(found)
        # Remembered only when complete: one read inside a cycle may lack what is above it.
        if not self._open:
            self._memo[key] = result
        return result

    def _needs_of_function(self, function: types.FunctionType) -> set[str]:
        found: set[str] = set()
        namespaces: list[dict[str, Any]] = [function.__globals__]
        if function.__closure__:
            cells = zip(function.__code__.co_freevars, function.__closure__, strict=True)
            closure = {name: cell.cell_contents for name, cell in cells if _cell_filled(cell)}
            namespaces.append(closure)
        names: set[str] = set()
        for code in _code_objects(function.__code__):
            names.update(code.co_names)
            names.update(code.co_freevars)
            strings = set(_strings(code.co_consts))
            for string in strings:
                found |= COMMANDS.get(string, set())
                if EDGE_ENTRY in string:
                    found.add("edge")
            found.update(need for words, need in TOGETHER.items() if words <= strings)
        # A module of tests/ referred to by name: its attributes are looked up too.
        for namespace in list(namespaces):
            for name in names:
                value = namespace.get(name)
                if isinstance(value, types.ModuleType) and _ours_module(value):
                    namespaces.append(vars(value))
        for name in names:
            for namespace in namespaces:
                if name not in namespace:
                    continue
                value = namespace[name]
                if _qualname(value) in HARNESSES or (
                    isinstance(value, type | types.FunctionType) and _ours(value)
                ):
                    found |= self.needs(value)
        return found


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _ours_module(module: types.ModuleType) -> bool:
    return module.__name__ == "tests" or module.__name__.startswith("tests.")


def item_needs(item: pytest.Item, scanner: Scanner) -> set[str]:
    """The resources one collected test uses: its fixtures' and its own code's."""
    found: set[str] = set()
    params: dict[str, Any] = getattr(getattr(item, "callspec", None), "params", {})
    info = getattr(item, "_fixtureinfo", None)
    definitions: dict[str, Any] = info.name2fixturedefs if info is not None else {}
    for name in getattr(item, "fixturenames", ()):
        if name in FIXTURES:
            found |= FIXTURES[name]
            continue
        if name in STORE_FIXTURES:
            if params.get(name) == "postgresql":
                found.add("postgresql")
            continue
        for definition in definitions.get(name, ()):
            if _ours(definition.func):
                found |= scanner.needs(definition.func)
    function = getattr(item, "function", None)
    if function is not None:
        found |= scanner.needs(function)
    return found


def mark_items(items: list[pytest.Item]) -> list[str]:
    """Mark each item by what it needs, or ``unit``; return the items whose marks disagree."""
    scanner = Scanner()
    disagreements: list[str] = []
    for item in items:
        needs = item_needs(item, scanner)
        for name in sorted(needs):
            item.add_marker(name)
        if item.nodeid.split("[", 1)[0] in SLOW:
            item.add_marker("slow")
        if not needs and item.get_closest_marker(UNIT) is None and not _resources_marked(item):
            item.add_marker(UNIT)
        problem = tier_problem(item)
        if problem is not None:
            disagreements.append(f"{item.nodeid}: {problem}")
    return disagreements


def base_nodeid(item: pytest.Item) -> str:
    """The test's node id without its parameters, or the group pytest-xdist's loadgroup adds."""
    return item.nodeid.split("[", 1)[0].split("@", 1)[0]


def parallel_rank(item: pytest.Item) -> tuple[int, int]:
    """Where ``item`` goes in a parallel run's order (lower first): the LONGEST in their order,
    the other SLOW tests, tests that wait on processes, other tests of a resource, unit tests.
    A greedy scheduler (a free worker takes the next test) ends soonest when the long tests
    start first and the short ones fill the gaps at the end."""
    name = base_nodeid(item)
    if name in LONGEST:
        return (0, LONGEST.index(name))
    if item.get_closest_marker("slow") is not None:
        return (1, 0)
    if any(item.get_closest_marker(resource) is not None for resource in WAITING):
        return (2, 0)
    if _resources_marked(item):
        return (3, 0)
    return (4, 0)


def _resources_marked(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(name) is not None for name in RESOURCES)


def tier_problem(item: pytest.Item) -> str | None:
    """Why an item is not in exactly one tier (unit, or one or more resources), or None."""
    resources = [name for name in RESOURCES if item.get_closest_marker(name) is not None]
    unit = item.get_closest_marker(UNIT) is not None
    if unit and resources:
        return f"marked unit but needs {', '.join(resources)}"
    if not unit and not resources:
        return "in no tier"
    return None


# ---- the unit tier's guard ----------------------------------------------------------------

_guard_lock = threading.Lock()
_guard_active = 0
_guard_installed = False


class ServiceTouched(RuntimeError):
    """A unit test started a service's process or connected to a service's port."""


def _guard_hook(event: str, args: tuple[Any, ...]) -> None:
    if not _guard_active:
        return
    if event == "subprocess.Popen":
        executable, argv = args[0], args[1]
        words = [os.fsdecode(executable)] if executable is not None else []
        if isinstance(argv, str | bytes | os.PathLike):
            words.append(os.fsdecode(argv))
        elif argv:
            words.extend(os.fsdecode(a) for a in argv if isinstance(a, str | bytes | os.PathLike))
        programs = {os.path.basename(w.split()[0]) for w in words[:2] if w.split()}
        touched = programs & GUARDED_PROGRAMS
        # Asking a command for its help or version starts no service.
        if {"-h", "--help", "--version"} & set(words):
            return
        if touched or any("edge.cli" in w for w in words):
            raise ServiceTouched(f"a unit test started {' '.join(words[:4])!r}")
    elif event == "socket.connect":
        address = args[1] if len(args) > 1 else None
        if isinstance(address, tuple) and len(address) >= 2 and address[1] in GUARDED_PORTS:
            raise ServiceTouched(f"a unit test connected to {address!r}")


@contextmanager
def unit_guard() -> Iterator[None]:
    """Inside: starting Redis, PostgreSQL, Pebble, Celery or an edge, or connecting to their
    usual ports, fails with :class:`ServiceTouched` (an audit hook, so in every thread)."""
    global _guard_active, _guard_installed
    with _guard_lock:
        if not _guard_installed:
            # Audit hooks cannot be removed: one, switched on and off by the counter.
            sys.addaudithook(_guard_hook)
            _guard_installed = True
        _guard_active += 1
    try:
        yield
    finally:
        with _guard_lock:
            _guard_active -= 1
