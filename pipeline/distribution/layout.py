"""The Redis layout the pipeline writes and every edge reads.

Keys (``P`` is the configured prefix, ``certman`` by default):

``P:sites``        hash  domain -> ``SiteRecord.to_json()`` (chain + sealed envelope, no clear key)
``P:index``        hash  domain -> "content hash<TAB>1|0 has certificate<TAB>not_after epoch
                   seconds or empty<TAB>upstream or empty<TAB>names space-separated"
                   (see index_entry); an edge reads only this at start (~100 bytes a site) and
                   fetches a site's blob on its first handshake; the content hash changes
                   whenever the chain or envelope does, so a reconcile knows which cached TLS
                   contexts are stale without reading any blob
``P:names``        hash  name -> domain, for every name a certificate covers (primary included)
``P:signed``       hash  domain -> :class:`~pipeline.crypto.signing.SignedSite` JSON: what the
                   pipeline signed for the domain (names, upstream, SHA-256 of chain and envelope,
                   not_after, serial, version), or a signed tombstone once it was removed
                   (kept 30 days through resyncs). The index and blobs are what an edge reads
                   fast; this is what it believes. Old edges never read it.
``P:version``      integer, incremented by every change to the hashes above
``P:challenge:T``  string key authorization of HTTP-01 token T, with a TTL
``P:challenge-signed:T``  :class:`~pipeline.crypto.signing.SignedChallenge` JSON for it, same TTL
``P:events``       pub/sub channel, one JSON object per message:

    {"type": "site", "version": N, "record": {SiteRecord fields, "signed": {SignedSite}}}
    {"type": "site_removed", "version": N, "domain": D, "tombstone": {SignedSite} | null}
    {"type": "resync", "version": N}                                  re-read everything
    {"type": "challenge", "token": T, "key_authorization": K, "ttl": S, "signed": {...}}
    {"type": "challenge_removed", "token": T}

Signatures (:mod:`pipeline.crypto.signing`) are made by the pipeline's signing key when one is given
to these functions; the edges trust only what verifies. Each site's signed version only grows:
the publishing script refuses to replace a signed statement with one of a lower version.

Site writes are Lua scripts rather than client-side MULTI/EXEC: just as atomic (no reader sees
the hashes half-updated, and the event is published in the same step), but the script can read
the old record to drop names that left the certificate and can put the new version number in the
event, which lets an edge discard events its snapshot already contains.

This module must stay importable by the edge: no Celery, no SQLAlchemy.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import redis

from pipeline.crypto.signing import (
    BadSignature,
    SignedChallenge,
    SignedSite,
    SigningKey,
    TrustedSigners,
    content_digest,
    next_version,
)

__all__ = [
    "EDGE_HEADER",
    "SiteRecord",
    "channel",
    "challenge_key",
    "content_hash",
    "index_entry",
    "parse_index_entry",
    "own_version",
    "publish_site",
    "publish_sites",
    "remove_challenge",
    "remove_site",
    "replace_all",
    "set_challenge",
    "signed_challenge_key",
    "signed_statement",
]

# A removed site's tombstone outlives it this long (through resyncs): long enough for any edge
# that knew the site to have heard of its removal.
TOMBSTONE_DAYS = 30


@dataclass(frozen=True)
class SiteRecord:
    domain: str
    names: tuple[str, ...]
    upstream: str | None
    chain_pem: str | None
    envelope: str | None
    not_after: datetime | None
    serial: str | None
    # What the pipeline signed for this record (None: unsigned, refused by the edges).
    signed: SignedSite | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["names"] = list(self.names)
        data["not_after"] = self.not_after.isoformat() if self.not_after else None
        data["signed"] = self.signed.to_dict() if self.signed else None
        return data

    def statement(self, version: int) -> SignedSite:
        """The unsigned statement of this record at ``version``."""
        return SignedSite(
            domain=self.domain,
            version=version,
            names=tuple(dict.fromkeys((self.domain, *self.names))),
            upstream=self.upstream,
            digest=content_digest(self.chain_pem, self.envelope),
            not_after=int(self.not_after.timestamp()) if self.not_after else None,
            serial=self.serial,
        )

    def matches(self, signed: SignedSite) -> bool:
        """Whether ``signed`` (verified elsewhere) says exactly what this record carries."""
        return not signed.removed and self.statement(signed.version) == SignedSite(
            **{**signed.to_dict(), "names": signed.names, "signer": "", "signature": ""}
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SiteRecord:
        not_after = data.get("not_after")
        parsed = datetime.fromisoformat(not_after) if not_after else None
        if parsed is not None and parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return cls(
            domain=data["domain"],
            names=tuple(data.get("names") or (data["domain"],)),
            upstream=data.get("upstream"),
            chain_pem=data.get("chain_pem"),
            envelope=data.get("envelope"),
            not_after=parsed,
            serial=data.get("serial"),
            signed=SignedSite.from_dict(data["signed"]) if data.get("signed") else None,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SiteRecord:
        return cls.from_dict(json.loads(text))


# On every answer an edge gives to a challenge fetch: the self-check tells "DNS reaches an
# edge, which lacks the token" (our fault) from "DNS reaches somebody else" (the dealer's).
EDGE_HEADER = "X-Certman-Edge"


def content_hash(record: SiteRecord) -> str:
    material = f"{record.chain_pem or ''}\x00{record.envelope or ''}".encode()
    return hashlib.sha256(material).hexdigest()[:16]


def index_entry(record: SiteRecord) -> str:
    """The small per-site summary an edge loads at start instead of the blob.

    Tab-separated rather than JSON: an edge parses every entry at start, and at 100,000 sites
    ``str.split`` against ``json.loads`` is the difference between a start under a second and
    one over it. No field can hold a tab (names are LDH, upstreams are validated URLs).
    """
    return "\t".join(
        (
            content_hash(record),
            "1" if record.chain_pem and record.envelope else "0",
            str(int(record.not_after.timestamp())) if record.not_after else "",
            record.upstream or "",
            " ".join(record.names),
        )
    )


IndexFields = tuple[str, bool, float | None, str | None, tuple[str, ...]]


def parse_index_entry(raw: str | bytes) -> IndexFields:
    """(content hash, has certificate, not_after, upstream, names) from :func:`index_entry`."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    digest, cert, not_after, upstream, names = text.split("\t")
    return (
        digest, cert == "1", float(not_after) if not_after else None, upstream or None,
        tuple(names.split()),
    )  # fmt: skip


def channel(prefix: str) -> str:
    return f"{prefix}:events"


def challenge_key(prefix: str, token: str) -> str:
    return f"{prefix}:challenge:{token}"


def signed_challenge_key(prefix: str, token: str) -> str:
    return f"{prefix}:challenge-signed:{token}"


def _keys(prefix: str) -> list[str]:
    return [
        f"{prefix}:sites", f"{prefix}:index", f"{prefix}:names", f"{prefix}:version",
        f"{prefix}:signed",
    ]  # fmt: skip


# Refuses (returns -1) to replace a signed statement with one of a version not above it,
# unless the statement stored is still the one the publisher read and chose its version
# against (a compare-and-set): a version the pipeline did not sign, however high, is then
# simply overwritten, so junk in Redis cannot block a domain's updates.
_CHECK_VERSION = """
local function signed_version(raw)
  if not raw then return nil end
  local ok, st = pcall(cjson.decode, raw)
  if ok and type(st) == 'table' and type(st['version']) == 'number' then return st['version'] end
  return nil
end
local function refused(raw, version, expected)
  if expected ~= '\0' and (raw or '') == expected then return false end
  local current = signed_version(raw)
  return current ~= nil and current >= tonumber(version)
end
"""

# KEYS: sites, index, names, version, signed. ARGV: domain, record JSON, channel, index entry,
# signed statement JSON or '', its version, the statement read before signing ('\0': none
# read), names...
_PUBLISH_SITE = (
    _CHECK_VERSION
    + """
local domain, blob, chan, entry, signed = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if signed ~= '' and refused(redis.call('HGET', KEYS[5], domain), ARGV[6], ARGV[7]) then
  return -1
end
local keep = {}
for i = 8, #ARGV do keep[ARGV[i]] = true end
local old = redis.call('HGET', KEYS[1], domain)
if old then
  local ok, rec = pcall(cjson.decode, old)
  if ok and type(rec) == 'table' and type(rec['names']) == 'table' then
    for _, name in ipairs(rec['names']) do
      if not keep[name] and redis.call('HGET', KEYS[3], name) == domain then
        redis.call('HDEL', KEYS[3], name)
      end
    end
  end
end
local version = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], domain, blob)
redis.call('HSET', KEYS[2], domain, entry)
if signed ~= '' then redis.call('HSET', KEYS[5], domain, signed)
else redis.call('HDEL', KEYS[5], domain) end
for i = 8, #ARGV do redis.call('HSET', KEYS[3], ARGV[i], domain) end
redis.call('PUBLISH', chan,
  '{"type":"site","version":' .. version .. ',"record":' .. blob .. '}')
return version
"""
)

# ARGV: domain, channel, tombstone JSON or '', its version, the statement read before signing.
_REMOVE_SITE = (
    _CHECK_VERSION
    + """
local domain, chan, tombstone = ARGV[1], ARGV[2], ARGV[3]
if tombstone ~= '' and refused(redis.call('HGET', KEYS[5], domain), ARGV[4], ARGV[5]) then
  return -1
end
local old = redis.call('HGET', KEYS[1], domain)
if old then
  local ok, rec = pcall(cjson.decode, old)
  if ok and type(rec) == 'table' and type(rec['names']) == 'table' then
    for _, name in ipairs(rec['names']) do
      if redis.call('HGET', KEYS[3], name) == domain then redis.call('HDEL', KEYS[3], name) end
    end
  end
end
if redis.call('HGET', KEYS[3], domain) == domain then redis.call('HDEL', KEYS[3], domain) end
redis.call('HDEL', KEYS[1], domain)
redis.call('HDEL', KEYS[2], domain)
if tombstone ~= '' then redis.call('HSET', KEYS[5], domain, tombstone)
else redis.call('HDEL', KEYS[5], domain) end
local version = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', chan, '{"type":"site_removed","version":' .. version ..
  ',"domain":' .. cjson.encode(domain) .. ',"tombstone":' ..
  (tombstone ~= '' and tombstone or 'null') .. '}')
return version
"""
)

# KEYS: sites, index, names, version, signed, then the staging hashes of sites, index, names,
# signed.
_SWAP_ALL = """
local live = {1, 2, 3, 5}
for i = 1, 4 do
  if redis.call('EXISTS', KEYS[5 + i]) == 1 then
    redis.call('RENAME', KEYS[5 + i], KEYS[live[i]])
  else
    redis.call('DEL', KEYS[live[i]])
  end
end
local version = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[1], '{"type":"resync","version":' .. version .. '}')
return version
"""


def signed_statement(r: redis.Redis[Any], prefix: str, domain: str) -> SignedSite | None:
    """The statement Redis holds for ``domain`` (unverified), or None."""
    raw = r.hget(f"{prefix}:signed", domain)
    if raw is None:
        return None
    try:
        return SignedSite.from_json(raw)
    except BadSignature:
        return None


_NOT_READ = "\0"  # the scripts' "no statement was read": compare versions only


def own_version(raw: bytes | str | None, signer: SigningKey) -> int | None:
    """The version of a stored statement if ``signer`` made it; None for anything else (absent,
    malformed, another key's, or a writer's junk), which a new version need not exceed."""
    if raw is None:
        return None
    try:
        statement = SignedSite.from_json(raw)
        TrustedSigners.of([signer.public_key()]).verify_site(statement)
    except BadSignature:
        return None
    return statement.version


def _read_version(
    r: redis.Redis[Any], prefix: str, domain: str, signer: SigningKey
) -> tuple[int, str]:
    """(the version to sign ``domain``'s next statement at, the raw statement it was chosen
    against, for the script's compare-and-set)."""
    raw = r.hget(f"{prefix}:signed", domain)
    expected = "" if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)
    return next_version(own_version(raw, signer)), expected


_ATTEMPTS = 5  # a concurrent publisher of the same domain took our version: sign again


def _publish_args(record: SiteRecord, prefix: str, expected: str) -> list[str]:
    statement = record.signed.to_json() if record.signed else ""
    version = str(record.signed.version) if record.signed else "0"
    names = list(dict.fromkeys((record.domain, *record.names)))
    return [record.domain, record.to_json(), channel(prefix), index_entry(record), statement,
            version, expected, *names]  # fmt: skip


def publish_site(
    r: redis.Redis[Any], prefix: str, record: SiteRecord, signer: SigningKey | None = None
) -> None:
    """Add or replace a site atomically, and tell the edges (the event carries the record).

    With ``signer`` the record is signed here, at a version above the one the pipeline last
    signed for the domain; without, ``record.signed`` is published as it is (tools and tests),
    unless Redis holds a statement of a version as high.
    """
    script = r.register_script(_PUBLISH_SITE)
    for _ in range(_ATTEMPTS):
        expected = _NOT_READ
        if signer is not None:
            version, expected = _read_version(r, prefix, record.domain, signer)
            record = replace(record, signed=signer.sign_site(record.statement(version)))
        if script(keys=_keys(prefix), args=_publish_args(record, prefix, expected)) != -1:
            return
        if signer is None:
            return
    raise RuntimeError(f"could not publish {record.domain}: its signed version kept moving")


def publish_sites(
    r: redis.Redis[Any], prefix: str, records: Iterable[SiteRecord], signer: SigningKey
) -> None:
    """Publish several records, signed, in two round trips (bulk onboarding's batches): one
    HMGET of their statements, one pipeline of the publishing script. A record another
    publisher overtook meanwhile is published again on its own."""
    batch = list(records)
    if not batch:
        return
    stored = r.hmget(f"{prefix}:signed", [record.domain for record in batch])
    pipe = r.pipeline(transaction=False)
    script = r.register_script(_PUBLISH_SITE)
    signed = []
    for record, raw in zip(batch, stored, strict=True):
        record = replace(
            record,
            signed=signer.sign_site(record.statement(next_version(own_version(raw, signer)))),
        )
        expected = "" if raw is None else raw.decode() if isinstance(raw, bytes) else str(raw)
        script(keys=_keys(prefix), args=_publish_args(record, prefix, expected), client=pipe)
        signed.append(record)
    for record, result in zip(signed, pipe.execute(), strict=True):
        if result == -1:
            publish_site(r, prefix, replace(record, signed=None), signer=signer)


def remove_site(
    r: redis.Redis[Any], prefix: str, domain: str, signer: SigningKey | None = None
) -> None:
    """Remove a site; with ``signer``, leave a signed tombstone so edges may believe it."""
    script = r.register_script(_REMOVE_SITE)
    for _ in range(_ATTEMPTS):
        tombstone, version, expected = "", "0", _NOT_READ
        if signer is not None:
            chosen, expected = _read_version(r, prefix, domain, signer)
            signed = signer.sign_site(SignedSite(domain, chosen, removed=True))
            tombstone, version = signed.to_json(), str(signed.version)
        args = [domain, channel(prefix), tombstone, version, expected]
        if script(keys=_keys(prefix), args=args) != -1:
            return
    raise RuntimeError(f"could not remove {domain}: its signed version kept moving")


def set_challenge(
    r: redis.Redis[Any],
    prefix: str,
    token: str,
    key_authorization: str,
    ttl: int,
    signer: SigningKey | None = None,
) -> None:
    """Store first, then announce: an edge that misses the event still finds it with a GET.

    One round trip: the announcement is the transaction's last command, so Redis has stored
    the token by the time any edge hears of it."""
    event: dict[str, Any] = {
        "type": "challenge",
        "token": token,
        "key_authorization": key_authorization,
        "ttl": ttl,
    }
    pipe = r.pipeline(transaction=True)
    pipe.set(challenge_key(prefix, token), key_authorization, ex=ttl)
    if signer is not None:
        statement = SignedChallenge(token, key_authorization, int(time.time()) + ttl)
        signed = signer.sign_challenge(statement)
        pipe.set(signed_challenge_key(prefix, token), signed.to_json(), ex=ttl)
        event["signed"] = json.loads(signed.to_json())
    pipe.publish(channel(prefix), json.dumps(event, separators=(",", ":")))
    pipe.execute()


def remove_challenge(r: redis.Redis[Any], prefix: str, token: str) -> None:
    # Removed, then announced, in one round trip (as set_challenge).
    pipe = r.pipeline(transaction=True)
    pipe.delete(challenge_key(prefix, token), signed_challenge_key(prefix, token))
    pipe.publish(channel(prefix), json.dumps({"type": "challenge_removed", "token": token}))
    pipe.execute()


def replace_all(
    r: redis.Redis[Any],
    prefix: str,
    records: Iterable[SiteRecord],
    *,
    batch: int = 1000,
    signer: SigningKey | None = None,
) -> None:
    """Rebuild the hashes from ``records`` (the database) and swap them in at once.

    Staging hashes are filled in batches so 100,000 sites never sit in one request, then renamed
    over the live ones in one script, so edges never see a half-built snapshot. With
    ``signer`` every record is signed again (that is how a new signing key takes over), at a
    version above the one Redis held; tombstones younger than :data:`TOMBSTONE_DAYS` of sites
    not in ``records`` are kept, so an edge that missed a removal can still believe it.
    """
    current = _signed_versions(r, prefix, signer)
    parts = ("sites", "index", "names", "signed")
    stage = [f"{prefix}:stage:{uuid.uuid4().hex}:{part}" for part in parts]
    seen: set[str] = set()
    try:
        pipe = r.pipeline(transaction=False)
        pending = 0
        for record in records:
            if signer is not None:
                known = current.get(record.domain)
                version = next_version(known[0] if known else None)
                record = replace(record, signed=signer.sign_site(record.statement(version)))
            seen.add(record.domain)
            pipe.hset(stage[0], record.domain, record.to_json())
            pipe.hset(stage[1], record.domain, index_entry(record))
            for name in dict.fromkeys((record.domain, *record.names)):
                pipe.hset(stage[2], name, record.domain)
            if record.signed is not None:
                pipe.hset(stage[3], record.domain, record.signed.to_json())
            pending += 1
            if pending >= batch:
                pipe.execute()
                pending = 0
        # Tombstones of sites not in ``records``, younger than TOMBSTONE_DAYS by their own
        # version (whoever signed them: the edges judge that).
        now = next_version(None)
        oldest = now - TOMBSTONE_DAYS * 86_400_000_000
        for domain, (_, tombstone) in current.items():
            if domain not in seen and tombstone is not None and oldest < tombstone[0] <= now:
                pipe.hset(stage[3], domain, tombstone[1])
        pipe.execute()
        r.register_script(_SWAP_ALL)(keys=[*_keys(prefix), *stage], args=[channel(prefix)])
    finally:
        r.delete(*stage)


_Stored = tuple[int | None, tuple[int, bytes] | None]


def _signed_versions(
    r: redis.Redis[Any], prefix: str, signer: SigningKey | None
) -> dict[str, _Stored]:
    """domain -> (the version the pipeline signed last, if ``signer`` made the statement; the
    tombstone's own version and raw JSON if it is one, to keep)."""
    trusted = TrustedSigners.of([signer.public_key()]) if signer is not None else None
    found: dict[str, _Stored] = {}
    for domain, raw in r.hscan_iter(f"{prefix}:signed", count=1000):
        try:
            statement = SignedSite.from_json(raw)
        except BadSignature:
            continue
        version: int | None = statement.version
        if trusted is not None:
            try:
                trusted.verify_site(statement)
            except BadSignature:
                version = None
        key = domain.decode() if isinstance(domain, bytes) else str(domain)
        found[key] = (version, (statement.version, raw) if statement.removed else None)
    return found
