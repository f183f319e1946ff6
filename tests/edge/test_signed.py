"""Signed distribution against a real edge and real Redis: an attacker who can write Redis but
holds no certman key can delete and delay, but not steer, impersonate or answer challenges."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable
from dataclasses import replace

import pytest
import redis

from pipeline.crypto import envelope
from pipeline.crypto.signing import SignedChallenge, SigningKey, TrustedSigners
from pipeline.distribution.layout import (
    SiteRecord,
    channel,
    index_entry,
    publish_site,
    set_challenge,
)

from .conftest import Keys, RunningEdge, Sites, serial_of, wait_for

TOKEN = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
ATTACKER_KEY_AUTH = TOKEN + ".attackersOwnAccountThumbprint0000000000000"


def _challenge(edge: RunningEdge, token: str) -> tuple[int, bytes]:
    status, _, body = edge.http("any.test", f"/.well-known/acme-challenge/{token}")
    return status, body


def _refusals(edge: RunningEdge, what: str) -> float:
    total = 0.0
    for line in edge.metrics().splitlines():
        if line.startswith("certman_edge_signature_failures_total{") and f'what="{what}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_forged_challenge_answer_is_not_served(
    keys: Keys, redis_client: redis.Redis, prefix: str, start_edge: Callable[..., RunningEdge]
) -> None:
    edge = start_edge()
    edge.wait_ready()
    # Straight into Redis, as the attack was done.
    redis_client.set(f"{prefix}:challenge:{TOKEN}", ATTACKER_KEY_AUTH, ex=60)
    assert _challenge(edge, TOKEN)[0] == 404
    # Announced on the channel, unsigned and signed by a key of the attacker's own.
    event = {"type": "challenge", "token": TOKEN, "key_authorization": ATTACKER_KEY_AUTH, "ttl": 60}
    redis_client.publish(channel(prefix), json.dumps(event))
    own = SigningKey.generate().sign_challenge(
        SignedChallenge(TOKEN, ATTACKER_KEY_AUTH, int(time.time()) + 60)
    )
    redis_client.set(f"{prefix}:challenge-signed:{TOKEN}", own.to_json(), ex=60)
    redis_client.publish(
        channel(prefix), json.dumps({**event, "signed": json.loads(own.to_json())})
    )
    wait_for(lambda: _refusals(edge, "challenge") >= 3, what="three refusals counted")
    assert _challenge(edge, TOKEN)[0] == 404
    # A genuine, expired answer replayed: refused as well.
    old = keys.signer.sign_challenge(
        SignedChallenge(TOKEN, ATTACKER_KEY_AUTH, int(time.time()) - 1)
    )
    redis_client.set(f"{prefix}:challenge-signed:{TOKEN}", old.to_json(), ex=60)
    assert _challenge(edge, TOKEN)[0] == 404
    # The pipeline's own is served.
    set_challenge(redis_client, prefix, TOKEN, TOKEN + ".ours", ttl=60, signer=keys.signer)
    wait_for(lambda: _challenge(edge, TOKEN) == (200, (TOKEN + ".ours").encode()))


def test_a_rewritten_upstream_is_not_followed(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    genuine = sites.record("shop.test", upstream=upstream)
    publish_site(redis_client, prefix, genuine)
    edge = start_edge()
    edge.wait_ready()
    assert edge.https("shop.test")[0] == 200
    evil = "http://127.0.0.1:9"  # nothing listens: a 502 would show the edge followed it
    steered = replace(genuine, upstream=evil)
    assert genuine.signed is not None
    forged = replace(genuine.signed, upstream=evil, version=genuine.signed.version + 1)
    # One PUBLISH and two HSETs, as the attack was done, plus the signed hash.
    redis_client.hset(f"{prefix}:index", "shop.test", index_entry(steered))
    redis_client.hset(f"{prefix}:sites", "shop.test", replace(steered, signed=forged).to_json())
    redis_client.hset(f"{prefix}:signed", "shop.test", forged.to_json())
    version = int(redis_client.incr(f"{prefix}:version"))
    record = json.loads(replace(steered, signed=forged).to_json())
    redis_client.publish(
        channel(prefix), json.dumps({"type": "site", "version": version, "record": record})
    )
    redis_client.publish(channel(prefix), json.dumps({"type": "resync", "version": version}))
    wait_for(lambda: _refusals(edge, "site") >= 1, what="the forged event refused")
    wait_for(
        lambda: 'cause="gap"' in edge.metrics() or 'cause="reconcile"' in edge.metrics(),
        what="the forged snapshot read",
    )
    for _ in range(3):
        assert edge.https("shop.test")[0] == 200
    assert _refusals(edge, "site") >= 2  # the snapshot's forgery too, met on first use


def test_an_attackers_certificate_sealed_to_the_edge_key_is_not_served(
    keys: Keys,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    genuine = sites.record("bank.test", upstream=upstream)
    publish_site(redis_client, prefix, genuine)
    # The attacker's own CA and key, sealed with the edge's *public* key: opens fine.
    from tests.support.pki import Pki

    evil_ca = Pki("attacker CA")
    chain, key_pem, leaf = evil_ca.leaf(["bank.test"])
    sealed = envelope.seal(
        key_pem,
        keys.public,
        domain="bank.test",
        binding=envelope.spki_fingerprint(leaf.public_key()),
    )
    evil = replace(genuine, chain_pem=chain, envelope=envelope.to_text(sealed))
    # Only the blob replaced (the statement still names the genuine chain): refused.
    redis_client.hset(f"{prefix}:sites", "bank.test", evil.to_json())
    edge = start_edge()
    edge.wait_ready()
    with pytest.raises(ssl.SSLError):
        edge.tls("bank.test").close()
    # Blob and a statement signed by the attacker's own key: refused too.
    mine = SigningKey.generate()
    evil_signed = replace(evil, signed=mine.sign_site(evil.statement(int(time.time() * 1e6))))
    publish_site(redis_client, prefix, evil_signed)
    wait_for(lambda: _refusals(edge, "site") >= 1, what="the attacker's statement refused")
    with pytest.raises(ssl.SSLError):
        edge.tls("bank.test").close()
    # What the pipeline publishes next is served.
    publish_site(redis_client, prefix, sites.record("bank.test", upstream=upstream))
    wait_for(lambda: edge.https("bank.test")[0] == 200, what="the genuine site back")


def test_a_genuine_older_record_replayed_is_ignored(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    old = sites.record("shop.test", upstream="http://127.0.0.1:9")
    new = sites.record("shop.test", upstream=upstream)
    publish_site(redis_client, prefix, old)
    publish_site(redis_client, prefix, new)
    edge = start_edge()
    edge.wait_ready()
    old_serial = serial_of(edge.peer_cert("shop.test"))
    assert old_serial == new.serial
    # Replay the old record and its statement wholesale, then tell the edges to re-read.
    assert old.signed is not None
    redis_client.hset(f"{prefix}:sites", "shop.test", old.to_json())
    redis_client.hset(f"{prefix}:index", "shop.test", index_entry(old))
    redis_client.hset(f"{prefix}:signed", "shop.test", old.signed.to_json())
    version = int(redis_client.incr(f"{prefix}:version"))
    redis_client.publish(channel(prefix), json.dumps({"type": "resync", "version": version}))
    wait_for(lambda: _refusals(edge, "site") >= 1, what="the replay refused")
    assert edge.https("shop.test")[0] == 200
    assert serial_of(edge.peer_cert("shop.test")) == new.serial


def test_a_genuine_record_copied_under_another_domain_is_refused(
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    victim = sites.record("victim.test", upstream=upstream)
    attacker = sites.record("attacker.test", upstream="http://127.0.0.1:9")
    publish_site(redis_client, prefix, victim)
    publish_site(redis_client, prefix, attacker)
    assert attacker.signed is not None
    # The attacker's genuine (signed) site filed under the victim's domain, its index entry
    # naming the victim's name so that the name leads there.
    redis_client.hset(f"{prefix}:sites", "victim.test", attacker.to_json())
    entry = index_entry(attacker).rsplit("\t", 1)[0] + "\tvictim.test"
    redis_client.hset(f"{prefix}:index", "victim.test", entry)
    redis_client.hset(f"{prefix}:signed", "victim.test", attacker.signed.to_json())
    redis_client.hset(f"{prefix}:names", "victim.test", "victim.test")
    edge = start_edge()
    edge.wait_ready()
    with pytest.raises(ssl.SSLError):
        edge.tls("victim.test").close()
    assert edge.http("victim.test")[0] == 404
    assert _refusals(edge, "site") >= 1


def test_a_record_signed_by_a_retired_key_is_refused(
    keys: Keys,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    retired = keys.signer
    current = SigningKey.generate()
    # After rotation, the edges trust only the new key.
    edge = start_edge(signers=TrustedSigners.of([current.public_key()]))
    by_retired = sites.record("old.test", upstream=upstream)  # signed by keys.signer
    record = SiteRecord("new.test", ("new.test",), upstream, by_retired.chain_pem, None, None, None)
    by_current = replace(record, signed=current.sign_site(record.statement(int(time.time() * 1e6))))
    publish_site(redis_client, prefix, by_retired)
    publish_site(redis_client, prefix, by_current)
    edge.wait_ready()
    assert edge.http("new.test")[0] == 200  # no certificate: proxied on port 80
    assert edge.http("old.test")[0] == 404
    with pytest.raises(ssl.SSLError):
        edge.tls("old.test").close()
    assert 'reason="untrusted_signer"' in edge.metrics()
    assert retired.key_id not in TrustedSigners.of([current.public_key()]).key_ids


def test_a_removal_without_a_signed_tombstone_is_only_a_reread(
    keys: Keys,
    redis_client: redis.Redis,
    prefix: str,
    sites: Sites,
    upstream: str,
    start_edge: Callable[..., RunningEdge],
) -> None:
    from pipeline.distribution.layout import remove_site

    publish_site(redis_client, prefix, sites.record("shop.test", upstream=upstream))
    edge = start_edge()
    edge.wait_ready()
    assert edge.https("shop.test")[0] == 200
    version = int(redis_client.incr(f"{prefix}:version"))
    redis_client.publish(
        channel(prefix),
        json.dumps({"type": "site_removed", "version": version, "domain": "shop.test"}),
    )
    wait_for(lambda: 'certman_edge_sync_snapshots_total{cause="gap"}' in edge.metrics())
    assert edge.https("shop.test")[0] == 200
    remove_site(redis_client, prefix, "shop.test", signer=keys.signer)
    wait_for(lambda: edge.http("shop.test")[0] == 404, what="the signed removal applied")
