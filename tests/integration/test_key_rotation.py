"""Rotating the distribution signing key, as docs/operations.md tells an operator to, against a
real edge: trust old and new, switch the pipeline, re-sign everything, retire the old key."""

from __future__ import annotations

import json
import socket
import ssl

import pytest
import redis
from cryptography import x509

from pipeline.crypto.signing import SigningKey
from pipeline.distribution import layout as distribution
from tests.support.ports import wait_until
from tests.support.system import System

pytestmark = pytest.mark.integration

SITES = ["rotate-one.example.com", "rotate-two.example.org"]


def serial_served(port: int, name: str, root_pem: bytes) -> int:
    """The serial of the certificate the edge serves for SNI ``name``, verified to the root."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=root_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def restart_edge(system: System) -> None:
    """One edge of the fleet restarted (a rolling restart does this edge by edge)."""
    assert system.edge is not None
    system.edge.terminate()
    system.edge.wait(timeout=20)
    system.start_edge()


def signing_rows(system: System) -> dict[str | None, dict[str, object]]:
    rows = json.loads(system.certman("keys", "status", "--json").stdout)
    return {row["key_id"]: row for row in rows if row["purpose"] == "signing"}


def test_signing_key_rotation(system: System, redis_client: redis.Redis) -> None:
    system.start(workers=1)
    for site in SITES:
        system.certman("domains", "add", site)
    system.wait_active(SITES, timeout=120)
    root = system.pebble.root_pem()
    for site in SITES:
        wait_until(lambda s=site: serial_served(system.https_port, s, root), timeout=30,
                   what=f"the edge to serve {site}")  # fmt: skip
    assert system.signing_key_path is not None
    old_path = system.signing_key_path
    old = SigningKey.load(old_path)
    assert set(signing_rows(system)) == {old.key_id, None}

    # 1. The edges trust the new public key as well as the old (rolling restart).
    new_path = system.new_signing_key()
    new = SigningKey.load(new_path)
    system.trust(new_path)
    restart_edge(system)
    # 2. The pipeline switches to the new key (workers restarted with CERTMAN_SIGNING_KEY).
    system.signing_key_path = new_path
    for worker in list(system.workers):
        system.kill_worker(worker)
    system.workers.clear()
    system.start_worker()
    # 3. Everything is signed again with it.
    system.certman("snapshot", "resync")
    # 4. keys status: every record signed by the new key, none by the old, none unsigned.
    rows = signing_rows(system)
    assert rows[new.key_id]["records"] == len(SITES) and rows[new.key_id]["in_use"] is True
    assert old.key_id not in rows
    assert rows[None]["records"] == 0
    # 5. The old public key is retired from the edges: an edge trusting only the new key
    # serves every site.
    (system.trusted_signers / old_path.with_suffix(".pub").name).unlink()
    restart_edge(system)
    for site in SITES:
        wait_until(lambda s=site: serial_served(system.https_port, s, root), timeout=30,
                   what=f"the edge trusting only the new key to serve {site}")  # fmt: skip
    # A site issued after the switch is signed by the new key and served too.
    system.certman("domains", "add", "rotate-after.example.net")
    system.wait_active(["rotate-after.example.net"], timeout=120)
    wait_until(lambda: serial_served(system.https_port, "rotate-after.example.net", root),
               timeout=30, what="the edge to serve a site issued after the switch")  # fmt: skip

    # 6. A record signed by the retired key, published afterwards (a leaked old key, or a
    # pipeline host left on it), is refused: an edge whose first sight of the site is that
    # record (one added to the fleet now, trusting only the new key) has nothing to serve
    # for it. (One that already held the site's good record keeps serving that.)
    retired, kept = SITES
    raw = redis_client.hget(f"{system.redis_prefix}:sites", retired)
    assert raw is not None
    record = distribution.SiteRecord.from_json(raw)
    distribution.publish_site(redis_client, system.redis_prefix, record, signer=old)
    only_new = system.trust(new_path, system.workdir / "trusted-new-only")
    _, port = system.spawn_edge(
        trusted_signers=only_new, data_dir=system.workdir / "new-edge", log_name="new-edge.log"
    )
    wait_until(lambda: serial_served(port, kept, root), timeout=30,
               what="the new edge to serve the site signed by the new key")  # fmt: skip
    with pytest.raises((ssl.SSLError, ConnectionError)):
        serial_served(port, retired, root)
    # The reconcile sees it is not signed by the key in use and signs it again.
    reconciled = json.loads(system.certman("snapshot", "reconcile", "--json").stdout)
    assert reconciled["stale"] == [retired] and reconciled["unsigned"] == [retired]
    for edge_port in (port, system.https_port):
        wait_until(
            lambda p=edge_port: serial_served(p, retired, root),
            timeout=30,
            what="the edges to serve the site once the pipeline signed it again",
        )
