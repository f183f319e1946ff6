"""Certificates chosen by SNI, changed live, refused when unknown or unopenable."""

from __future__ import annotations

import logging
import sqlite3
import ssl
from collections.abc import Callable
from dataclasses import replace

import pytest
import redis
from cryptography import x509

from pipeline.distribution.layout import content_hash, publish_site, remove_site, replace_all

from .conftest import Keys, RunningEdge, Sites, serial_of, wait_for


def _sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return ext.value.get_values_for_type(x509.DNSName)


def test_each_name_gets_its_certificate(
    redis_client: redis.Redis, prefix: str, sites: Sites, start_edge: Callable[..., RunningEdge]
) -> None:
    a = sites.record("a.test", "www.a.test")
    b = sites.record("b.test")
    publish_site(redis_client, prefix, a)
    publish_site(redis_client, prefix, b)
    edge = start_edge()
    edge.wait_ready()
    for name, record in (("a.test", a), ("www.a.test", a), ("b.test", b)):
        cert = edge.peer_cert(name)  # verified against the test CA with hostname checking
        assert serial_of(cert) == record.serial
        assert name in _sans(cert)
    assert "certman_edge_certificates_known 2.0" in edge.metrics()


def test_replaced_and_removed_live(
    keys: Keys,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
) -> None:
    edge = start_edge()
    edge.wait_ready()
    first = sites.record("live.test")
    publish_site(redis_client, prefix, first)
    wait_for(lambda: serial_of(edge.peer_cert("live.test")) == first.serial, what="first cert")
    second = sites.record("live.test")
    publish_site(redis_client, prefix, second)
    wait_for(lambda: serial_of(edge.peer_cert("live.test")) == second.serial, what="new serial")
    remove_site(redis_client, prefix, "live.test", signer=keys.signer)

    def refused() -> bool:
        # Served until the edge hears of the removal: False, and poll again. (A pytest.raises
        # here would end the wait at once: its failure is not an Exception.)
        try:
            edge.peer_cert("live.test")
        except ssl.SSLError as exc:
            assert "UNRECOGNIZED_NAME" in str(exc)
            return True
        return False

    wait_for(refused, what="removed site refused")


def test_names_dropped_from_a_certificate_stop_resolving(
    redis_client: redis.Redis, prefix: str, sites: Sites, start_edge: Callable[..., RunningEdge]
) -> None:
    publish_site(redis_client, prefix, sites.record("c.test", "old.c.test"))
    publish_site(redis_client, prefix, sites.record("c.test", "new.c.test"))
    assert redis_client.hget(f"{prefix}:names", "old.c.test") is None
    assert redis_client.hget(f"{prefix}:names", "new.c.test") == b"c.test"
    edge = start_edge()
    edge.wait_ready()
    assert "new.c.test" in _sans(edge.peer_cert("new.c.test"))
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        edge.peer_cert("old.c.test")


def test_unknown_and_missing_sni_refused(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tornado.general")
    publish_site(redis_client, prefix, sites.record("known.test"))
    publish_site(redis_client, prefix, sites.record("nocert.test", cert=False))
    edge = start_edge()
    edge.wait_ready()
    for name in ("unknown.test", "nocert.test", None):
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            edge.tls(name).close()
    assert edge.peer_cert("known.test")
    metrics = edge.metrics()
    assert 'certman_edge_sni_total{outcome="unknown_name"} 2.0' in metrics
    assert 'certman_edge_sni_total{outcome="no_sni"} 1.0' in metrics
    # Counted above, not logged per connection.
    assert not [r for r in caplog.records if r.getMessage().startswith("SSL Error")]


def test_tampered_envelope_refused_for_that_name_only(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="edge.sni")
    publish_site(redis_client, prefix, sites.tampered(sites.record("bad.test")))
    good = sites.record("good.test")
    publish_site(redis_client, prefix, good)
    edge = start_edge()
    edge.wait_ready()
    for _ in range(3):
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            edge.tls("bad.test").close()
        assert serial_of(edge.peer_cert("good.test")) == good.serial
    failures = [r for r in caplog.records if "bad.test" in r.getMessage()]
    assert len(failures) == 1, "logged once, not per handshake"
    assert "EnvelopeTampered" in failures[0].getMessage()
    assert 'certman_edge_envelope_open_failures_total{reason="EnvelopeTampered"} 1.0' in (
        edge.metrics()
    )
    # A corrected envelope is picked up at once.
    fixed = sites.record("bad.test")
    publish_site(redis_client, prefix, fixed)
    wait_for(lambda: serial_of(edge.peer_cert("bad.test")) == fixed.serial, what="fixed cert")


def test_lru_bound_and_resync(
    keys: Keys,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
) -> None:
    records = [sites.record(f"s{i}.test") for i in range(4)]
    replace_all(redis_client, prefix, records)
    edge = start_edge(cache_size=2)
    edge.wait_ready()
    for record in records:
        assert serial_of(edge.peer_cert(record.domain)) == record.serial
    metrics = edge.metrics()
    assert "certman_edge_context_cache_size 2.0" in metrics
    assert 'certman_edge_context_cache_evictions_total{reason="lru"} 2.0' in metrics
    # An operator's resync with s0 gone and s1 replaced. s0 left without a signed tombstone,
    # which only a Redis writer without the signing key does: kept, its blob in the mirror.
    new_s1 = sites.record("s1.test")
    replace_all(redis_client, prefix, [new_s1, records[2], records[3]])
    wait_for(lambda: serial_of(edge.peer_cert("s1.test")) == new_s1.serial, what="resynced s1")
    assert serial_of(edge.peer_cert("s0.test")) == records[0].serial
    remove_site(redis_client, prefix, "s0.test", signer=keys.signer)

    def s0_gone() -> bool:
        try:
            edge.peer_cert("s0.test")
        except ssl.SSLError as exc:
            return "UNRECOGNIZED_NAME" in str(exc)
        return False

    wait_for(s0_gone, what="s0 removed by its signed tombstone")


def test_warm_start_builds_contexts_in_background(
    redis_client: redis.Redis, prefix: str, sites: Sites, start_edge: Callable[..., RunningEdge]
) -> None:
    replace_all(redis_client, prefix, [sites.record(f"w{i}.test") for i in range(3)])
    edge = start_edge(warm=True)
    edge.wait_ready()
    wait_for(lambda: "certman_edge_context_cache_size 3.0" in edge.metrics(), what="warm cache")
    edge.peer_cert("w1.test")
    assert "certman_edge_context_cache_hits_total 1.0" in edge.metrics()


def test_a_malformed_index_entry_is_skipped_not_fatal(
    redis_client: redis.Redis, prefix: str, sites: Sites, start_edge: Callable[..., RunningEdge]
) -> None:
    """An entry the edge cannot read (an older format, say) leaves every other site served."""
    good = sites.record("good.test")
    publish_site(redis_client, prefix, good)
    redis_client.hset(f"{prefix}:index", "old-format.test", '{"h": "x", "n": ["old-format.test"]}')
    edge = start_edge()
    edge.wait_ready()
    assert serial_of(edge.peer_cert("good.test")) == good.serial


def test_a_record_filed_under_another_domain_is_refused(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A blob under a.test that holds b.test's record (its own envelope, a certificate valid
    for b.test) must not answer for a.test."""
    caplog.set_level(logging.ERROR, logger="edge.sni")
    a = sites.record("a.test")
    b = sites.record("b.test")
    publish_site(redis_client, prefix, a)
    publish_site(redis_client, prefix, b)
    redis_client.hset(f"{prefix}:sites", "a.test", b.to_json())
    edge = start_edge()
    edge.wait_ready()
    unchecked = edge.pki.client_context()
    unchecked.check_hostname = False  # what a client that did not check would be served
    # Not the blob a.test's statement signed: never taken into the mirror.
    assert edge.edge is not None and edge.edge.mirror.blob("a.test") is None
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        edge.tls("a.test", ctx=unchecked).close()
    # Were it in the mirror anyway (one written before the mirror checked blobs), the
    # handshake still refuses it.
    with sqlite3.connect(edge.edge.mirror.path) as db:
        db.execute(
            "INSERT OR REPLACE INTO blobs (domain, blob, hash) VALUES (?, ?, ?)",
            ("a.test", b.to_json().encode(), content_hash(b)),
        )
    for _ in range(3):
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            edge.tls("a.test", ctx=unchecked).close()
    assert serial_of(edge.peer_cert("b.test")) == b.serial
    failures = [r for r in caplog.records if "filed under a.test" in r.getMessage()]
    assert len(failures) == 1, "logged once, not per handshake"
    metrics = edge.metrics()
    assert 'certman_edge_envelope_open_failures_total{reason="RecordMisfiled"} 1.0' in metrics
    assert 'certman_edge_sni_total{outcome="envelope_failed"} 3.0' in metrics
    assert 'certman_edge_sni_total{outcome="unavailable"} 1.0' in metrics
    # Its own record back under its name (published again, so signed again): served at once.
    publish_site(redis_client, prefix, sites.signed(a))
    wait_for(lambda: serial_of(edge.peer_cert("a.test")) == a.serial, what="a.test's own cert")


def test_a_name_the_certificate_does_not_cover_is_refused(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The index files extra.c.test and x.v.test under sites whose certificates do not
    cover them: those names are refused, the names the certificates cover are served."""
    caplog.set_level(logging.ERROR, logger="edge.sni")
    c = sites.record("c.test")
    publish_site(redis_client, prefix, replace(c, names=("c.test", "extra.c.test")))
    v = sites.record("v.test")
    publish_site(redis_client, prefix, replace(v, names=("v.test", "*.v.test")))
    w = sites.record("w.test", "*.w.test")
    publish_site(redis_client, prefix, w)
    edge = start_edge()
    edge.wait_ready()
    unchecked = edge.pki.client_context()
    unchecked.check_hostname = False
    for name in ("extra.c.test", "x.v.test", "extra.c.test"):
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            edge.tls(name, ctx=unchecked).close()
    assert serial_of(edge.peer_cert("c.test")) == c.serial
    assert serial_of(edge.peer_cert("v.test")) == v.serial
    assert serial_of(edge.peer_cert("x.w.test")) == w.serial
    assert serial_of(edge.peer_cert("W.Test")) == w.serial
    assert 'certman_edge_sni_total{outcome="name_not_covered"} 3.0' in edge.metrics()
    logged = [r.getMessage() for r in caplog.records if "does not cover" in r.getMessage()]
    assert len(logged) == 2, logged  # once per site and certificate version


@pytest.mark.parametrize(
    # What Python's client can send; tests/edge/test_tls_scanners.py sends the rest raw.
    "name",
    ["known.test.", "-x.w.test", "x_y.w.test", "x-.w.test"],
)
def test_names_that_are_not_host_names_find_no_site(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    start_edge: Callable[..., RunningEdge],
    name: str,
) -> None:
    """SNI carries a host name without a trailing dot (RFC 6066 section 3); a wildcard stands
    for exactly one well-formed label. Anything else is an unknown name."""
    publish_site(redis_client, prefix, sites.record("known.test"))
    publish_site(redis_client, prefix, sites.record("w.test", "*.w.test"))
    edge = start_edge()
    edge.wait_ready()
    unchecked = edge.pki.client_context()
    unchecked.check_hostname = False
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        edge.tls(name, ctx=unchecked).close()
    assert 'certman_edge_sni_total{outcome="unknown_name"} 1.0' in edge.metrics()
