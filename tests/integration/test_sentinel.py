"""Redis high availability: the master killed during a bulk issuance, a replica promoted by real
Sentinels, and issuance carrying on with every order placed exactly once at the CA."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.integration.test_issuance import fetch_certificate
from tests.support.ports import wait_until
from tests.support.sentinel import SentinelCluster
from tests.support.system import BIN, System
from tests.support.units import SUPERVISOR_LINE, role_log, start_role

# Three waits of up to 120, 180 and 180 s (issuance, failover, the rest): past the default.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

# certman-edge follows the Sentinels itself (CERTMAN_REDIS_URL=sentinel://...).
EDGE_SPEAKS_SENTINEL = True

SITES = 8


def orders(system: System) -> list[tuple[str, str]]:
    """(domain, step) of every order in the store."""
    engine = create_engine(str(system.database_url))
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text("SELECT s.domain, o.step FROM orders o JOIN sites s ON s.id = o.site_id")
            )
            return [(row[0], row[1]) for row in rows]
    finally:
        engine.dispose()


def certificates_per_site(system: System) -> dict[str, int]:
    engine = create_engine(str(system.database_url))
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT s.domain, COUNT(c.id) FROM sites s "
                    "LEFT JOIN certificates c ON c.site_id = s.id GROUP BY s.domain"
                )
            )
            return {row[0]: int(row[1]) for row in rows}
    finally:
        engine.dispose()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_master_killed_during_bulk_issuance(tmp_path: Path, tls: bool) -> None:
    """With ``tls``: the master, the replica and the Sentinels speak TLS only
    (CERTMAN_REDIS_SENTINEL_TLS), and every role verifies them against the test CA."""
    names = [f"ha{i}.example.com" for i in range(SITES)]
    with SentinelCluster(tls=tls) as cluster:
        env = {
            **cluster.env,
            # Tasks a dead worker had reserved come back within seconds (2 h in production,
            # where the stuck-order sweeper is quicker), and a dead beat's lock lapses in 5 s.
            "CERTMAN_BROKER_VISIBILITY_TIMEOUT": "5",
            "CERTMAN_BEAT_LOCK_TIMEOUT": "5",
        }
        edge_url = None if EDGE_SPEAKS_SENTINEL else f"redis://127.0.0.1:{cluster.replica_port}/0"
        with System(
            redis_url=cluster.url,
            extra_env=env,
            edge_redis_url=edge_url,
            # The ACL users are made on a plain Redis URL; this system reaches Redis by Sentinel.
            acl=False,
            # Validations take a random moment, as a real CA's do, so the issuance is
            # spread out long enough to kill the master in the middle of it.
            pebble_options={"va_sleep": True},
            # As systemd's Restart=always would (and the test checks it never had to).
            supervise=True,
            restart_delay=6,  # past the 5 s visibility timeout: held tasks come back at start
        ) as system:
            try:
                _run(system, cluster, names, tmp_path)
            except BaseException:
                print(system.logs())
                print(cluster.logs())
                raise


def _run(system: System, cluster: SentinelCluster, names: list[str], tmp_path: Path) -> None:
    system.start(workers=0)
    # As the units start them (gossip, mingle and events on): they must ride out the failover.
    roles = {role: start_role(system, role) for role in ("worker", "beat")}
    sites = tmp_path / "sites.csv"
    sites.write_text("".join(f"{name}\n" for name in names))
    # Bulk onboarding through the Sentinels too (it kicks the dispatcher over the broker).
    subprocess.run(
        [str(BIN / "certman-onboard"), str(sites)],
        env=system.env,
        check=True,
        capture_output=True,
        timeout=60,
    )

    def some_done_some_not() -> bool:
        steps = [step for _, step in orders(system)]
        return len(steps) == len(names) and 0 < steps.count("done") < len(names)

    wait_until(some_done_some_not, timeout=120, what="issuance to be under way", every=0.05)
    before = dict(orders(system))
    served_before = [name for name, step in before.items() if step == "done"]
    # A site the edge already serves. (One whose publication the master took in its last
    # instant may never reach the replica, as replication is asynchronous: the reconcile
    # republishes it later, which the end of this test checks.)
    root = system.pebble.root_pem()
    wait_until(
        lambda: fetch_certificate(system.https_port, served_before[0], root),
        timeout=30,
        what="the edge to serve a site issued before the failover",
    )
    killed_at = time.monotonic()
    cluster.kill_master()

    # Nothing is served from Redis on the TLS path of a name already served.
    fetch_certificate(system.https_port, served_before[0], root)
    wait_until(
        lambda: cluster.master_port_now() == cluster.replica_port,
        timeout=30,
        what="the Sentinels to promote the replica",
        every=0.05,
    )
    promoted_after = time.monotonic() - killed_at
    assert cluster.client(cluster.replica_port).info("replication")["role"] == "master"

    def issued_after_kill() -> bool:
        return any(step == "done" and before[d] != "done" for d, step in orders(system))

    # The worker rides out the failover (pipeline.consumer); tasks it held when the master died
    # are in the new master's unacked set and come back at kombu's next scan for tasks past the
    # visibility timeout (about every 100 s), so a run where it held them all takes that long.
    wait_until(
        issued_after_kill, timeout=180, what="a certificate issued after the failover", every=0.05
    )
    resumed_after = time.monotonic() - killed_at
    system.wait_active(names, timeout=180)
    print(
        f"\nSentinel failover: replica promoted {promoted_after:.1f}s after the master was "
        f"killed; issuance resumed (a certificate issued) {resumed_after:.1f}s after; "
        f"{len(names) - len(served_before)} of {len(names)} sites were still in flight"
    )

    # Every onboarded site has exactly one order, done, and one certificate; the CA created
    # exactly one order per site: none lost, none placed twice.
    rows = orders(system)
    assert sorted(domain for domain, _ in rows) == sorted(names)
    assert {step for _, step in rows} == {"done"}
    assert certificates_per_site(system) == dict.fromkeys(names, 1)
    placed = system.pebble.log_text().count('Added order "')
    assert placed == len(names), f"{placed} orders at the CA for {len(names)} sites"

    # Neither the worker nor beat exited: the supervisor never had to start one again (a worker
    # acking a task on the connection the failover took away: pipeline.consumer).
    for role, process in roles.items():
        assert process.poll() is None, f"{role}'s supervisor exited"
        assert SUPERVISOR_LINE not in role_log(system, role), f"{role} exited in the failover"
    assert "CRITICAL" not in role_log(system, "beat")

    # The edge caught up: every site served with the certificate the store holds.
    listed = system.domains()
    for name in names:
        wait_until(
            lambda n=name: format(
                fetch_certificate(system.https_port, n, root).serial_number, "x"
            ) == listed[n]["serial"],
            timeout=30,
            what=f"the edge to serve {name}'s certificate",
        )  # fmt: skip
