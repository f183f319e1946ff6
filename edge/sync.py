"""Keeping an edge's index in step with Redis.

Order matters: subscribe to the change channel, wait for the subscription to be confirmed, and
only then read the snapshot (version + index in one MULTI), so no change can fall between them.
Events carry the version they produced: one at or below the applied version is already in the
snapshot and is skipped; one that skips a number means an event was lost, and the snapshot is
read again. A periodic reconcile compares the version counter for the case where the last
events were lost. On a lost connection the edge keeps serving what it has and retries with
backoff.

Every snapshot and accepted change also goes to the edge's local mirror (:mod:`edge.mirror`),
blobs included, fetching only those whose content hash changed. An edge whose mirror has been
synced once starts from it, ready at once whether or not Redis answers, and catches up when
Redis does; one that never had a mirror is ready after its first snapshot is mirrored.

Whatever is in Redis is input, not instructions: an event that does not parse, or names a bad
token, is counted, logged (at most once a minute) and answered by re-reading the snapshot,
never by stopping the sync. Any other failure of the loop is logged and retried with backoff
too: a sync that died silently would leave the edge serving an ever older snapshot while its
health check said all was well.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio

from edge.challenges import ChallengeStore, valid_token
from edge.metrics import EdgeMetrics
from edge.mirror import Mirror
from edge.ratelog import RateLimitedLog
from edge.state import SiteIndex, Snapshot, StatementUnavailable
from edge.verifier import BATCH, Verifier, raw_digest
from pipeline.crypto.signing import SignedChallenge, SignedSite
from pipeline.distribution.layout import SiteRecord, channel
from pipeline.redis_connect import RedisTarget, async_client, sync_client

__all__ = ["Syncer"]

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
# A challenge is answered for minutes; an event claiming longer is capped to this.
_MAX_CHALLENGE_TTL = 24 * 3600.0
_KEY_AUTHORIZATION = re.compile(r"[A-Za-z0-9_.-]{1,512}")


class MalformedEvent(ValueError):
    """A change event the edge cannot apply."""


class Syncer:
    def __init__(
        self,
        redis_url: str,
        prefix: str,
        index: SiteIndex,
        challenges: ChallengeStore,
        metrics: EdgeMetrics,
        *,
        mirror: Mirror | None = None,
        reconcile_interval: float = 5.0,
        max_backoff: float = 5.0,
        target: RedisTarget | None = None,
        verifier: Verifier | None = None,
        fetch_statement: Callable[[str], bytes | None] | None = None,
    ) -> None:
        self._target = target or RedisTarget(redis_url)
        self.mirror = mirror if mirror is not None else Mirror(None)
        self.synced_at: float | None = None  # epoch seconds the edge last matched Redis
        # Whether every blob the index names has been in the mirror at least once; until then
        # a handshake may fetch its blob from Redis (see Edge._blob).
        self.mirror_complete = False
        self.mirror_filled = asyncio.Event()  # set with mirror_complete
        self._verifier = verifier
        # A site's statement during the first fill, before all are read (raises
        # StatementUnavailable when Redis does not answer at once).
        self._fetch_statement = fetch_statement or _no_statement
        self._verifying: asyncio.Task[None] | None = None
        self._prefix = prefix
        self._index = index
        self._challenges = challenges
        self._metrics = metrics
        self._reconcile_interval = reconcile_interval
        self._max_backoff = max_backoff
        self.version = 0
        self.connected = False
        self.ready = asyncio.Event()  # set after the first snapshot, never cleared
        self._in_sync_at = time.monotonic()
        self._resnapshot = False
        self._malformed_log = RateLimitedLog(log, logging.WARNING, 60.0)
        self._failure_log = RateLimitedLog(log, logging.ERROR, 60.0)
        self._unreachable_log = RateLimitedLog(log, logging.WARNING, 60.0)
        metrics.sync_connected.set_function(lambda: 1.0 if self.connected else 0.0)
        metrics.sync_lag.set_function(self.lag)
        metrics.sync_version.set_function(lambda: float(self.version))
        metrics.mirror_synced.set_function(lambda: self.synced_at or 0.0)

    def start_from_mirror(self) -> bool:
        """Serve what the local mirror holds, before Redis has said anything; True if it held
        a synced snapshot (the edge is then ready)."""
        contents = self.mirror.load()
        self._index.trust_remembered(contents.trusted)
        # What this edge accepted before, whatever Redis says when it answers.
        prepared = SiteIndex.prepare(contents.index, {})
        self._index.remember(
            prepared.unparsed, contents.tombstones, self.mirror.statement, prepared.names
        )
        if not contents.usable:
            return False
        # Statements are read from the mirror on first use; what it did not remember as
        # verified is verified then, or ahead once Redis answers and a snapshot is read.
        self._index.install(prepared._replace(lookup=self.mirror.statement))
        self.version = contents.version
        self.synced_at = contents.synced_at
        self._in_sync_at = time.monotonic() - (time.time() - (contents.synced_at or time.time()))
        self.mirror_complete = True
        self.mirror_filled.set()
        log.info("serving %d sites from the local mirror (version %d) until Redis answers",
                 len(contents.index), self.version)  # fmt: skip
        self.ready.set()
        return True

    def lag(self) -> float:
        """Seconds since the edge last knew it held the current version (0 when in sync)."""
        return 0.0 if self.connected else time.monotonic() - self._in_sync_at

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if self._verifying is not None:
                self._verifying.cancel()

    async def _run(self) -> None:
        backoff = 0.05
        self.start_from_mirror()
        while True:
            client = async_client(self._target, socket_connect_timeout=2, socket_timeout=5)
            pubsub = client.pubsub()
            # Snapshots and blobs are read with a blocking client on other threads.
            reader = sync_client(self._target, socket_connect_timeout=2, socket_timeout=5)
            try:
                await self._subscribe(pubsub)
                await self._snapshot(reader, "start" if not self.ready.is_set() else "reconnect")
                self.connected = True
                backoff = 0.05
                await self._follow(client, reader, pubsub)
            except _CONNECTION_ERRORS as exc:
                where = self._target.describe()
                if self.connected:
                    log.warning("lost Redis at %s (%s); serving what we have, reconnecting",
                                where, exc)  # fmt: skip
                else:
                    # Said at once (an edge that cannot reach Redis at start must not be silent
                    # at the unit's log level), then once a minute while it lasts.
                    self._unreachable_log.log(
                        "cannot reach Redis at %s (%s); serving what the mirror has, retrying",
                        where,
                        exc,
                    )
                self._metrics.sync_connection_errors.inc()
                self._metrics.sync_failures.inc()
            except Exception:
                # A bug or a reply nobody foresaw: keep serving, say so, and start over.
                self._metrics.sync_failures.inc()
                self._failure_log.exception("sync failed; serving what we have, restarting it")
                backoff = max(backoff, 1.0)
            finally:
                if self.connected:
                    self._in_sync_at = time.monotonic()
                self.connected = False
                await _close(pubsub, client)
                with contextlib.suppress(Exception):
                    reader.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _subscribe(self, pubsub: redis.asyncio.client.PubSub) -> None:
        await pubsub.subscribe(channel(self._prefix))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            message = await pubsub.get_message(timeout=1.0)
            if message is not None and message["type"] == "subscribe":
                return
        raise redis.TimeoutError("no subscription confirmation")

    async def _snapshot(self, reader: redis.Redis[Any], cause: str) -> None:
        # Read, parsed and prepared on a thread: at 100,000 sites the replies alone are tens
        # of megabytes, a third of a second the event loop would not answer handshakes.
        first_fill = not self.mirror_complete
        if first_fill:
            # A mirror never filled: serve from the index at once, as an edge without a mirror
            # always did; handshakes fetch their statement and blob from Redis until the fill
            # completes. The statements (five times the index) are read after.
            version_raw, raw_index, prepared = await asyncio.to_thread(self._read_index, reader)
            self._load(prepared._replace(lookup=self._fetch_statement), [], version_raw, cause)
            raw_signed, statements, pending = await asyncio.to_thread(
                self._read_statements, reader, prepared
            )
            self._index.add_statements(statements)
            self._verify_ahead(pending)
            if self._verifying is not None:
                # Into the mirror once verified: the mirror takes in only what verifies, and
                # would otherwise verify the same statements a second time.
                await self._verifying
        else:
            version_raw, raw_index, raw_signed, prepared, pending = await asyncio.to_thread(
                self._read_snapshot, reader
            )
        # Otherwise into the mirror first (what of it this edge accepts, blobs included), so
        # the index never names content the mirror lacks.
        key = f"{self._prefix}:sites"
        fetched = await self.mirror.store_snapshot(
            raw_signed,
            lambda domains: reader.hmget(key, domains),
            self._metrics.mirror_fetched.inc,
            self._index.known_digest,
            self._verified_by_mirror,
        )
        if not first_fill:
            self._load(prepared, pending, version_raw, cause)
        self.mirror_complete = True
        self.mirror_filled.set()
        self._mark_synced()
        log.info("snapshot: %d sites at version %d (%s), %d blobs fetched into the mirror",
                 len(raw_index), self.version, cause, fetched)  # fmt: skip

    def _verified_by_mirror(self, rows: list[tuple[str, bytes]]) -> None:
        """Statements the mirror's writer verified (on its thread): known good here too."""
        self._index.trust(rows)
        if self._verifier is not None:
            self._verifier.verified.inc(len(rows))

    def _read_index(
        self, reader: redis.Redis[Any]
    ) -> tuple[bytes | None, dict[bytes, bytes], Snapshot]:
        """(version, index, prepared without statements), read in one MULTI. On a thread."""
        with reader.pipeline(transaction=True) as pipe:
            pipe.get(f"{self._prefix}:version")
            pipe.hgetall(f"{self._prefix}:index")
            version_raw, raw_index = pipe.execute()
        return version_raw, raw_index, SiteIndex.prepare(raw_index, {})

    def _read_statements(
        self, reader: redis.Redis[Any], prepared: Snapshot
    ) -> tuple[dict[bytes, bytes], dict[str, bytes], list[tuple[str, bytes]]]:
        """(the raw statements, by domain, to verify ahead) read after their index. On a
        thread. A statement changed between the two reads is newer than its index entry: the
        statement is what is believed, and the change's event follows."""
        raw_signed: dict[bytes, bytes] = reader.hgetall(f"{self._prefix}:signed")
        statements = {k.decode("utf-8", "replace"): v for k, v in raw_signed.items()}
        with_statements = prepared._replace(signed=statements)
        return raw_signed, statements, with_statements.pending()

    def _read_snapshot(
        self, reader: redis.Redis[Any]
    ) -> tuple[
        bytes | None, dict[bytes, bytes], dict[bytes, bytes], Snapshot, list[tuple[str, bytes]]
    ]:
        """(version, index, statements, prepared, statements to verify ahead), read in one
        MULTI. On a thread of its own."""
        with reader.pipeline(transaction=True) as pipe:
            pipe.get(f"{self._prefix}:version")
            pipe.hgetall(f"{self._prefix}:index")
            pipe.hgetall(f"{self._prefix}:signed")
            version_raw, raw_index, raw_signed = pipe.execute()
        prepared = SiteIndex.prepare(raw_index, raw_signed)
        return version_raw, raw_index, raw_signed, prepared, prepared.pending()

    def _load(
        self,
        prepared: Snapshot,
        pending: list[tuple[str, bytes]],
        version_raw: bytes | None,
        cause: str,
    ) -> None:
        self._index.install(prepared)
        if self._index.malformed:
            log.error("snapshot: skipped %d malformed index entries (certman snapshot resync "
                      "rewrites them)", self._index.malformed)  # fmt: skip
        self._challenges.clear()
        self.version = int(version_raw or 0)
        self._in_sync_at = time.monotonic()
        self._metrics.sync_resnapshots.labels(cause).inc()
        # Subscribed, and the snapshot loaded: in sync, even while blobs are being fetched.
        self.connected = True
        self.ready.set()
        self._verify_ahead(pending)

    def _verify_ahead(self, pending: list[tuple[str, bytes]]) -> None:
        """Verify, on the verifier's thread, every statement of the snapshot just loaded that
        is not known good yet (a newer snapshot starts over)."""
        if self._verifier is None:
            return
        if self._verifying is not None:
            self._verifying.cancel()
        self._verifying = asyncio.create_task(self._verify_pending(self._verifier, pending))

    async def _verify_pending(self, verifier: Verifier, pending: list[tuple[str, bytes]]) -> None:
        verifier.pending.set(len(pending))
        try:
            for i in range(0, len(pending), BATCH):
                good = await verifier.verify(pending[i : i + BATCH], self._index.known_digest)
                self._index.trust((domain, digest) for domain, digest, _ in good)
                self.mirror.trust(good)
                verifier.pending.set(max(0, len(pending) - i - BATCH))
        except Exception:
            # Nothing is lost: an unverified statement is verified at its first use.
            self._failure_log.exception("verifying ahead failed; statements wait for first use")

    def _mark_synced(self) -> None:
        self._in_sync_at = time.monotonic()
        self.synced_at = time.time()
        self.mirror.synced(self.version)

    async def _follow(
        self,
        client: redis.asyncio.Redis[Any],
        reader: redis.Redis[Any],
        pubsub: redis.asyncio.client.PubSub,
    ) -> None:
        next_reconcile = time.monotonic() + self._reconcile_interval
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message["type"] == "message":
                try:
                    self._apply(message["data"])
                except (ValueError, KeyError, TypeError, AttributeError) as exc:  # BadSignature too
                    # An event lost is one the snapshot still has: read it again.
                    self._metrics.sync_malformed_events.inc()
                    self._malformed_log.log(
                        "malformed change event (%s); re-reading the snapshot", exc
                    )
                    self._resnapshot = True
            if self._resnapshot:
                self._resnapshot = False
                await self._snapshot(reader, "gap")
            if time.monotonic() >= next_reconcile:
                next_reconcile = time.monotonic() + self._reconcile_interval
                current = int(await client.get(f"{self._prefix}:version") or 0)
                # A version below ours means the store was flushed: just as stale.
                if current != self.version:
                    await self._snapshot(reader, "reconcile")

    def _apply(self, data: bytes | str) -> None:
        """Apply one event; raises MalformedEvent (or ValueError, KeyError, TypeError from the
        parsing) for one that cannot be applied, having changed nothing."""
        event = json.loads(data)
        if not isinstance(event, dict):
            raise MalformedEvent("not a JSON object")
        kind = event["type"]
        if kind not in ("challenge", "challenge_removed", "resync", "site", "site_removed"):
            raise MalformedEvent(f"unknown type {str(kind)[:40]!r}")
        if kind == "challenge":
            self._apply_challenge(event)
        elif kind == "challenge_removed":
            self._challenges.discard(_token(event))
        elif kind == "resync":
            self._resnapshot = True
        else:
            self._apply_site_event(kind, event)
        self._metrics.sync_events.labels(kind).inc()

    def _apply_challenge(self, event: dict[str, Any]) -> None:
        token, ttl = _token(event), float(event["ttl"])
        if not ttl > 0:  # also refuses NaN
            raise MalformedEvent("a challenge's ttl must be positive")
        signed = event.get("signed")
        if signed is None:
            # Unsigned: nothing to put in memory. A GET on a fetch finds nothing trusted either.
            self._challenges.refused("unsigned")
            return
        if not isinstance(signed, dict):
            raise MalformedEvent("a challenge's signed statement must be an object")
        challenge = SignedChallenge.from_dict(signed)
        if challenge.token != token or challenge.key_authorization != event["key_authorization"]:
            raise MalformedEvent("the challenge event differs from what was signed")
        self._challenges.put_signed(challenge, min(ttl, _MAX_CHALLENGE_TTL))

    def _apply_site_event(self, kind: str, event: dict[str, Any]) -> None:
        version = event.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise MalformedEvent("a site event's version must be an integer")
        if version <= self.version:
            return  # already in the snapshot
        if version != self.version + 1:
            log.info("missed events %d..%d; re-reading the snapshot", self.version + 1, version - 1)
            self._resnapshot = True
            return
        if kind == "site":
            record = SiteRecord.from_dict(event["record"])
            if record.signed is None:
                self._index.refuse_unsigned(record.domain)
            elif self._index.accept(record.signed, record) is not None:
                raw = record.signed.to_json().encode()
                self.mirror.put_site(record.signed, raw, record.to_json().encode())
                # Verified just now: a restart, or the next snapshot, need not verify it again.
                verified = (record.domain, raw_digest(raw), record.signed.signer)
                self._index.trust([verified[:2]])
                self.mirror.trust([verified])
        else:
            domain, tombstone = event["domain"], event.get("tombstone")
            if not isinstance(domain, str):
                raise MalformedEvent("a removal must name a domain")
            statement = SignedSite.from_dict(tombstone) if isinstance(tombstone, dict) else None
            if statement is None or not statement.removed or statement.domain != domain:
                # Not a removal anyone signed: worth no more than a re-read of the snapshot.
                self._index.refuse_unsigned(domain, "a removal without a signed tombstone")
                self._resnapshot = True
            else:
                self._index.accept(statement)
                if self._index.removed_version(domain) == statement.version:
                    self.mirror.remove_site(statement, statement.to_json().encode())
        self.version = version
        self._mark_synced()


def _no_statement(domain: str) -> bytes | None:
    raise StatementUnavailable(domain)


def _token(event: dict[str, Any]) -> str:
    token = event["token"]
    if not isinstance(token, str) or not valid_token(token):
        raise MalformedEvent("a challenge token must be base64url")
    return token


async def _close(pubsub: redis.asyncio.client.PubSub, client: redis.asyncio.Redis[Any]) -> None:
    # Closing a dead connection may fail any way it likes; there is nothing left to do about it.
    with contextlib.suppress(Exception):
        await aclose(pubsub)
    with contextlib.suppress(Exception):
        await aclose(client)


async def aclose(obj: object) -> None:
    """``aclose()`` of a redis.asyncio object; the installed types-redis stubs predate it."""
    await obj.aclose()  # type: ignore[attr-defined]
