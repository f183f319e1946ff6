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
``P:version``      integer, incremented by every change to the three hashes above
``P:challenge:T``  string key authorization of HTTP-01 token T, with a TTL
``P:events``       pub/sub channel, one JSON object per message:

    {"type": "site", "version": N, "record": {SiteRecord fields}}     added or replaced
    {"type": "site_removed", "version": N, "domain": D}
    {"type": "resync", "version": N}                                  re-read everything
    {"type": "challenge", "token": T, "key_authorization": K, "ttl": S}
    {"type": "challenge_removed", "token": T}

Site writes are Lua scripts rather than client-side MULTI/EXEC: just as atomic (no reader sees
the hashes half-updated, and the event is published in the same step), but the script can read
the old record to drop names that left the certificate and can put the new version number in the
event, which lets an edge discard events its snapshot already contains.

This module must stay importable by the edge: no Celery, no SQLAlchemy.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import redis

__all__ = [
    "EDGE_HEADER",
    "SiteRecord",
    "channel",
    "challenge_key",
    "content_hash",
    "index_entry",
    "parse_index_entry",
    "publish_site",
    "remove_challenge",
    "remove_site",
    "replace_all",
    "set_challenge",
]


@dataclass(frozen=True)
class SiteRecord:
    domain: str
    names: tuple[str, ...]
    upstream: str | None
    chain_pem: str | None
    envelope: str | None
    not_after: datetime | None
    serial: str | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["names"] = list(self.names)
        data["not_after"] = self.not_after.isoformat() if self.not_after else None
        return data

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


def _keys(prefix: str) -> list[str]:
    return [f"{prefix}:sites", f"{prefix}:index", f"{prefix}:names", f"{prefix}:version"]


# KEYS: sites, index, names, version. ARGV: domain, record JSON, channel, index entry, names...
_PUBLISH_SITE = """
local domain, blob, chan, entry = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local keep = {}
for i = 5, #ARGV do keep[ARGV[i]] = true end
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
for i = 5, #ARGV do redis.call('HSET', KEYS[3], ARGV[i], domain) end
redis.call('PUBLISH', chan,
  '{"type":"site","version":' .. version .. ',"record":' .. blob .. '}')
return version
"""

_REMOVE_SITE = """
local domain, chan = ARGV[1], ARGV[2]
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
local version = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', chan, '{"type":"site_removed","version":' .. version ..
  ',"domain":' .. cjson.encode(domain) .. '}')
return version
"""

# KEYS: sites, index, names, version, then the three staging hashes.
_SWAP_ALL = """
for i = 1, 3 do
  if redis.call('EXISTS', KEYS[4 + i]) == 1 then
    redis.call('RENAME', KEYS[4 + i], KEYS[i])
  else
    redis.call('DEL', KEYS[i])
  end
end
local version = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[1], '{"type":"resync","version":' .. version .. '}')
return version
"""


def publish_site(r: redis.Redis[Any], prefix: str, record: SiteRecord) -> None:
    """Add or replace a site atomically, and tell the edges (the event carries the record)."""
    names = list(dict.fromkeys((record.domain, *record.names)))
    args = [record.domain, record.to_json(), channel(prefix), index_entry(record), *names]
    r.register_script(_PUBLISH_SITE)(keys=_keys(prefix), args=args)


def remove_site(r: redis.Redis[Any], prefix: str, domain: str) -> None:
    r.register_script(_REMOVE_SITE)(keys=_keys(prefix), args=[domain, channel(prefix)])


def set_challenge(
    r: redis.Redis[Any], prefix: str, token: str, key_authorization: str, ttl: int
) -> None:
    """Store first, then announce: an edge that misses the event still finds it with a GET."""
    r.set(challenge_key(prefix, token), key_authorization, ex=ttl)
    event = {
        "type": "challenge",
        "token": token,
        "key_authorization": key_authorization,
        "ttl": ttl,
    }
    r.publish(channel(prefix), json.dumps(event, separators=(",", ":")))


def remove_challenge(r: redis.Redis[Any], prefix: str, token: str) -> None:
    r.delete(challenge_key(prefix, token))
    r.publish(channel(prefix), json.dumps({"type": "challenge_removed", "token": token}))


def replace_all(r: redis.Redis[Any], prefix: str, records: Iterable[SiteRecord], *,
                batch: int = 1000) -> None:  # fmt: skip
    """Rebuild the three hashes from ``records`` (the database) and swap them in at once.

    Staging hashes are filled in batches so 100,000 sites never sit in one request, then renamed
    over the live ones in one script, so edges never see a half-built snapshot.
    """
    stage = [f"{prefix}:stage:{uuid.uuid4().hex}:{part}" for part in ("sites", "index", "names")]
    try:
        pipe = r.pipeline(transaction=False)
        pending = 0
        for record in records:
            pipe.hset(stage[0], record.domain, record.to_json())
            pipe.hset(stage[1], record.domain, index_entry(record))
            for name in dict.fromkeys((record.domain, *record.names)):
                pipe.hset(stage[2], name, record.domain)
            pending += 1
            if pending >= batch:
                pipe.execute()
                pending = 0
        pipe.execute()
        r.register_script(_SWAP_ALL)(keys=[*_keys(prefix), *stage], args=[channel(prefix)])
    finally:
        r.delete(*stage)
