"""The edge's local sealed mirror: the snapshot on the edge host's disk, so that serving never
waits for Redis.

It holds what this edge accepted of what Redis holds, per site: the signed statement with its
version (or the signed tombstone that removed the site, with its version), the index entry
built from that statement, and the blob (the chain and the *sealed* envelope) the statement
signed, row and blob written in one transaction. A statement is taken in only if a trusted key
signed it, it is filed under its own domain and it is newer than the one held; a site missing
from a snapshot is kept. So what a Redis writer without the signing key can do (put back an
older genuine statement, file one site's statement under another, delete a site, replay a
removed site's last record) never reaches this file, and an edge restarted from it, with Redis
down or forged, serves what it served before. Nothing in it opens without the edge's private
key, which is not in it, so the key invariant holds: no clear private key on disk.

The TLS path reads a site's blob from here (a primary-key lookup in a local file), never from
the network; an edge restarted while Redis is down loads its index from here and
serves at once; a reconnect fetches only the blobs whose content hash changed.

It also remembers which statements this edge has verified (their digest and signer), so a
restarted edge does not verify them again: the file is the edge's own, on the same disk as its
private key and trusted signers, and a statement is trusted again only while its signer still
is.

SQLite, in WAL mode: in the standard library (nothing to install or keep in step on edge
hosts), one file, crash-safe transactions, and readers never blocked by the writer. One file
per edge process (``mirror-<i>.sqlite3``): no process ever waits on another's lock. LMDB was
the other candidate; it needs a map size fixed in advance and a binding to install, for
lookups SQLite already answers in tens of microseconds.

Two connections to the file. The event loop's reads a blob for a handshake. Every write goes
to a thread of its own, in order: writing or comparing 100,000 rows takes seconds, which on the
event loop would stall every handshake; SQLite releases the GIL while it works. A site changed
by an event is served from memory until its write is committed, so a handshake never sees the
index ahead of the blobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from edge.verifier import raw_digest
from pipeline.crypto.signing import BadSignature, SignedSite, TrustedSigners, content_digest

__all__ = ["Mirror", "MirrorContents"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Blobs (~9 KiB a site) apart from the small rows a snapshot rewrites: updating an entry in a
# row that also held its blob rewrote the blob too (23 s for 100,000 sites).
# ``sites`` holds only statements this edge accepted (signed by a trusted key, filed under their
# own domain, newer than the one before), with their version: what "no roll-back" is measured
# against after a restart. Its entry is built from the statement, never taken from Redis.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sites (
    domain TEXT PRIMARY KEY,
    entry BLOB,        -- the index entry; NULL for a removed site whose tombstone is kept
    signed BLOB,       -- the signed statement (or tombstone)
    version INTEGER NOT NULL DEFAULT 0,  -- the statement's: the highest accepted
    removed INTEGER NOT NULL DEFAULT 0   -- 1: a signed tombstone
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blobs (
    domain TEXT PRIMARY KEY,
    blob BLOB NOT NULL,  -- SiteRecord JSON: chain and sealed envelope
    hash TEXT NOT NULL   -- content hash of the blob, to fetch only what changed
);
CREATE TABLE IF NOT EXISTS trusted (
    domain TEXT PRIMARY KEY,
    digest BLOB NOT NULL,  -- of the raw statement whose signature this edge verified
    signer TEXT NOT NULL   -- the key id that signed it
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""
# PRAGMA user_version of the schema above. 0: before versions were kept, when the mirror held
# whatever Redis held (see _migrate_from_0).
_SCHEMA_VERSION = 1

_REMOVED = b""  # a pending removal: no blob, whatever the file still holds

# distribution.content_hash of a record without a certificate.
_NO_CERTIFICATE = hashlib.sha256(b"\x00").hexdigest()[:16]

# Where a snapshot's statement may be known good already: domain -> digest of the raw statement.
Known = Callable[[str], bytes | None]


def entry_of(statement: SignedSite) -> bytes:
    """The index entry (:func:`pipeline.distribution.index_entry`) of an accepted statement:
    what a restarted edge routes by, so it is built from what was signed."""
    cert = statement.digest is not None
    return "\t".join(
        (
            statement.digest[:16] if statement.digest else _NO_CERTIFICATE,
            "1" if cert else "0",
            str(statement.not_after) if cert and statement.not_after is not None else "",
            statement.upstream or "",
            " ".join(statement.names),
        )
    ).encode()


class MirrorContents:
    """What a mirror held when it was opened: enough to serve before Redis answers."""

    def __init__(
        self,
        version: int,
        synced_at: float | None,
        index: dict[bytes, bytes],
        trusted: dict[str, tuple[bytes, str]] | None = None,
        tombstones: dict[str, int] | None = None,
    ) -> None:
        self.version = version
        self.synced_at = synced_at  # epoch seconds of the last sync, None if never
        self.index = index  # statements are read one at a time: Mirror.statement
        # domain -> (digest of the raw statement verified, its signer's key id)
        self.trusted = trusted or {}
        # domain -> version of the signed tombstone that removed it
        self.tombstones = tombstones or {}

    @property
    def usable(self) -> bool:
        return self.synced_at is not None


class Mirror:
    """One edge process's mirror. Its methods are called from the event loop's thread."""

    def __init__(
        self, path: Path | None, source: str = "", signers: TrustedSigners | None = None
    ) -> None:
        """``path`` None: a mirror in a temporary directory of its own, removed at close
        (nothing survives a restart). ``source`` names the Redis snapshot mirrored (its
        prefix): a mirror of another is not used. ``signers``: whose statements a snapshot
        may bring in (none without)."""
        self._scratch: Path | None = None
        if path is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="certman-edge-mirror-"))
            path = self._scratch / "mirror.sqlite3"
        self.path = path
        self.persistent = self._scratch is None
        self.source = source
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
        # database file's permissions.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.chmod(path, 0o600)
        self._write_db = self._connect()
        self._write_db.execute("PRAGMA journal_mode=WAL")
        # A commit reaches the WAL without an fsync; a power cut may lose the last changes,
        # which the next sync fetches again. Never a torn database.
        self._write_db.execute("PRAGMA synchronous=NORMAL")
        self._signers = signers or TrustedSigners.of([])
        self._migrate()
        self._read_db = self._connect()
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="certman-mirror")
        # domain -> (sequence, blob or _REMOVED) of writes not yet committed.
        self._pending: dict[str, tuple[int, bytes]] = {}
        self._pending_lock = threading.Lock()
        self._sequence = 0
        self._closing = False
        self.write_failures = 0

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(
            str(self.path),
            isolation_level=None,  # explicit transactions below
            check_same_thread=False,  # the writer's connection is opened here, used there
            timeout=30.0,
        )

    def close(self) -> None:
        self._closing = True  # a fill in progress stops at its next batch
        self._writer.shutdown(wait=True)
        for db in (self._read_db, self._write_db):
            with contextlib.suppress(sqlite3.Error):
                db.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    # ---- reading (the event loop's connection) -----------------------------------------------

    def load(self) -> MirrorContents:
        db = self._read_db
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        # One pass over the rows: at 100,000 sites each pass is a quarter of a second of an
        # edge's start.
        index: dict[bytes, bytes] = {}
        tombstones: dict[str, int] = {}
        for domain, entry, version in db.execute("SELECT domain, entry, version FROM sites"):
            if entry is None:
                tombstones[domain] = int(version)
            else:
                index[domain.encode()] = bytes(entry)
        trusted = {
            domain: (bytes(digest), signer)
            for domain, digest, signer in db.execute("SELECT domain, digest, signer FROM trusted")
        }
        synced = meta.get("synced_at") if meta.get("source", "") == self.source else None
        return MirrorContents(
            int(meta.get("version", 0)),
            float(synced) if synced else None,
            index,
            trusted,
            tombstones,
        )

    def statement(self, domain: str) -> bytes | None:
        """The signed statement (or tombstone) held for ``domain``, as last written."""
        row = self._read_db.execute(
            "SELECT signed FROM sites WHERE domain = ?", (domain,)
        ).fetchone()
        return bytes(row[0]) if row is not None and row[0] is not None else None

    def blob(self, domain: str) -> bytes | None:
        pending = self._pending.get(domain)
        if pending is not None:
            return pending[1] or None
        row = self._read_db.execute("SELECT blob FROM blobs WHERE domain = ?", (domain,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def sites(self) -> int:
        (count,) = self._read_db.execute("SELECT count(*) FROM sites").fetchone()
        return int(count)

    def bytes_on_disk(self) -> int:
        files = (self.path, Path(f"{self.path}-wal"))
        return sum(p.stat().st_size for p in files if p.exists())

    # ---- writing (the writer's thread) -------------------------------------------------------
    # The bulk operations are awaited by the sync loop; a change from an event is queued and
    # served from memory until it is committed.

    async def store_snapshot(
        self,
        signed: Mapping[bytes, bytes],
        fetch: Callable[[list[str]], list[bytes | None]],
        fetched: Callable[[int], object],
        known: Known = lambda domain: None,
        verified: Callable[[list[tuple[str, bytes]]], object] = lambda rows: None,
    ) -> int:
        """Take in what a snapshot just read (``signed``: its statements) that this edge
        accepts: a statement of a trusted signer, filed under its own domain, newer than the
        one held (a tombstone too), with its blob fetched with ``fetch`` (domains -> blobs,
        None for one gone) when the mirror lacks it and written only if it is the blob signed,
        row and blob in one transaction, 500 at a time (a first fill of 100,000 never sits in
        memory at once); ``fetched`` is told each batch's count, and the count is returned.
        Everything else is left as it was, including a site the snapshot no longer has: a
        Redis writer without the signing key can delete, replay or misfile, and none of that
        reaches the disk the edge restarts from. ``known`` (called on the writer's thread)
        gives statements verified already, and ``verified`` (called there too) is told of
        those verified here (domain, digest), so that the verifier's thread, which goes
        through the same snapshot meanwhile, need not verify them again. The caller must not
        change ``signed`` until this returns; all of it runs on the writer's thread, network
        included."""
        return await self._run(self._store_snapshot, signed, fetch, fetched, known, verified)

    def put_site(self, statement: SignedSite, raw: bytes, blob: bytes) -> None:
        """A site whose statement (``raw``, parsed: ``statement``) the edge accepted, with
        its blob; a version not above the one held is not written."""
        sequence = self._hold(statement.domain, blob)
        self._queue(self._put_site, statement, raw, blob, sequence)

    def remove_site(self, tombstone: SignedSite, raw: bytes) -> None:
        """A signed removal the edge accepted: the tombstone is kept with its version."""
        sequence = self._hold(tombstone.domain, _REMOVED)
        self._queue(self._remove_site, tombstone, raw, sequence)

    def trust(self, rows: Iterable[tuple[str, bytes, str]]) -> None:
        """Remember verified statements: (domain, digest of the raw statement, signer)."""
        self._queue(self._trust, list(rows))

    def synced(self, version: int) -> None:
        """The mirror now matches Redis at ``version`` (after every write queued before)."""
        self._queue(self._synced, version, time.time())

    async def flush(self) -> None:
        """Wait for every write queued so far."""
        await self._run(lambda: None)

    # ---- the writer's thread -----------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.wrap_future(self._writer.submit(fn, *args))

    def _queue(self, fn: Callable[..., None], *args: object) -> None:
        self._writer.submit(fn, *args).add_done_callback(self._report)

    def _report(self, future: Future[None]) -> None:
        exc = future.exception()
        if exc is not None:
            # A mirror behind is caught up by the next snapshot; the edge serves on.
            self.write_failures += 1
            log.error("local mirror write failed: %s", exc)

    def _hold(self, domain: str, blob: bytes) -> int:
        with self._pending_lock:
            self._sequence += 1
            self._pending[domain] = (self._sequence, blob)
            return self._sequence

    def _release(self, domain: str, sequence: int) -> None:
        with self._pending_lock:
            held = self._pending.get(domain)
            if held is not None and held[0] == sequence:
                del self._pending[domain]

    def _floor(self, domain: str) -> tuple[int, bytes | None] | None:
        row = self._write_db.execute(
            "SELECT version, signed FROM sites WHERE domain = ?", (domain,)
        ).fetchone()
        return None if row is None else (int(row[0]), bytes(row[1]) if row[1] else None)

    def _write_site(self, statement: SignedSite, raw: bytes) -> None:
        """Inside a transaction: ``statement`` (accepted) as the domain's row."""
        entry = None if statement.removed else entry_of(statement)
        self._write_db.execute(
            "INSERT OR REPLACE INTO sites (domain, entry, signed, version, removed) "
            "VALUES (?, ?, ?, ?, ?)",
            (statement.domain, entry, raw, statement.version, int(statement.removed)),
        )
        if statement.removed or statement.digest is None:
            self._write_db.execute("DELETE FROM blobs WHERE domain = ?", (statement.domain,))

    def _put_site(self, statement: SignedSite, raw: bytes, blob: bytes, sequence: int) -> None:
        try:
            with self._transaction():
                floor = self._floor(statement.domain)
                if floor is not None and floor[0] >= statement.version:
                    return  # a newer one is held (an event behind a snapshot)
                self._write_site(statement, raw)
                if statement.digest is not None:
                    self._write_db.execute(
                        "INSERT OR REPLACE INTO blobs (domain, blob, hash) VALUES (?, ?, ?)",
                        (statement.domain, blob, statement.digest[:16]),
                    )
        finally:
            self._release(statement.domain, sequence)

    def _remove_site(self, tombstone: SignedSite, raw: bytes, sequence: int) -> None:
        try:
            with self._transaction():
                floor = self._floor(tombstone.domain)
                if floor is not None and floor[0] >= tombstone.version:
                    return
                self._write_site(tombstone, raw)
                self._write_db.execute("DELETE FROM trusted WHERE domain = ?", (tombstone.domain,))
        finally:
            self._release(tombstone.domain, sequence)

    def _admit(
        self, domain: str, raw: bytes, floor: int | None, known: Known
    ) -> tuple[SignedSite, bytes | None] | None:
        """(statement, its digest if verified here) if ``raw`` may replace what is held for
        ``domain`` (held at version ``floor``), else None. The statement's refusal is the
        index's to report, at first use; here it is only not written."""
        try:
            statement = SignedSite.from_json(raw)
        except BadSignature:
            return None
        if statement.domain != domain or (floor is not None and statement.version <= floor):
            return None
        digest = raw_digest(raw)
        if known(domain) == digest:
            return statement, None
        try:
            self._signers.verify_site(statement)
        except BadSignature:
            return None
        return statement, digest

    def _trusted_digests(self) -> dict[str, bytes]:
        current = self._signers.key_ids
        return {
            domain: bytes(digest)
            for domain, digest, signer in self._write_db.execute(
                "SELECT domain, digest, signer FROM trusted"
            )
            if signer in current
        }

    def _store_snapshot(
        self,
        signed: Mapping[bytes, bytes],
        fetch: Callable[[list[str]], list[bytes | None]],
        fetched: Callable[[int], object],
        known: Known,
        verified: Callable[[list[tuple[str, bytes]]], object],
    ) -> int:
        # Only statements that differ from the held ones are looked at, so a re-read snapshot
        # with few changes costs a read of the small rows.
        held = {
            domain: (bytes(raw) if raw is not None else None, int(version))
            for domain, raw, version in self._write_db.execute(
                "SELECT domain, signed, version FROM sites"
            )
        }
        hashes = dict(self._write_db.execute("SELECT domain, hash FROM blobs").fetchall())
        remembered = self._trusted_digests()

        def known_here(domain: str) -> bytes | None:
            return known(domain) or remembered.get(domain)

        admitted: list[tuple[SignedSite, bytes, bytes | None]] = []
        for raw_domain, raw in signed.items():
            domain = raw_domain.decode("utf-8", "replace")
            before = held.get(domain)
            if before is not None and before[0] == raw:
                continue
            verdict = self._admit(domain, bytes(raw), before[1] if before else None, known_here)
            if verdict is not None:
                admitted.append((verdict[0], bytes(raw), verdict[1]))
                if verdict[1] is not None:
                    verified([(domain, verdict[1])])
        # Rows without a blob to fetch first, in one transaction; then the rest with their
        # blobs, a batch at a time.
        bare: list[tuple[SignedSite, bytes, bytes | None]] = []
        with_blob: list[tuple[SignedSite, bytes, bytes | None]] = []
        for admission in admitted:
            signed_digest = admission[0].digest
            needs_blob = (
                signed_digest is not None and hashes.get(admission[0].domain) != signed_digest[:16]
            )
            (with_blob if needs_blob else bare).append(admission)
        if bare:
            with self._transaction():
                for statement, raw, checked in bare:
                    self._admitted(statement, raw, checked)
        count = 0
        for i in range(0, len(with_blob), 500):
            if self._closing:
                break
            batch = with_blob[i : i + 500]
            blobs = fetch([statement.domain for statement, _, _ in batch])
            found = 0
            with self._transaction():
                for (statement, raw, checked), blob in zip(batch, blobs, strict=True):
                    if blob is None or not _blob_matches(statement, bytes(blob)):
                        continue  # not the blob signed: the statement waits for one that is
                    self._admitted(statement, raw, checked)
                    self._write_db.execute(
                        "INSERT OR REPLACE INTO blobs (domain, blob, hash) VALUES (?, ?, ?)",
                        (statement.domain, bytes(blob), statement.digest and statement.digest[:16]),
                    )
                    found += 1
            count += found
            fetched(found)
        return count

    def _admitted(self, statement: SignedSite, raw: bytes, digest: bytes | None) -> None:
        """Inside a transaction: write an admitted statement's row, and remember its signature
        if it was verified here."""
        self._write_site(statement, raw)
        if statement.removed:
            self._write_db.execute("DELETE FROM trusted WHERE domain = ?", (statement.domain,))
        elif digest is not None:
            self._write_db.execute(
                "INSERT OR REPLACE INTO trusted (domain, digest, signer) VALUES (?, ?, ?)",
                (statement.domain, digest, statement.signer),
            )

    def _migrate(self) -> None:
        db = self._write_db
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version >= _SCHEMA_VERSION:
            return
        columns = {row[1] for row in db.execute("PRAGMA table_info(sites)")}
        db.executescript(_SCHEMA)  # commits by itself: outside the transaction
        with self._transaction():
            if columns and "version" not in columns:
                self._migrate_from_0()
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _migrate_from_0(self) -> None:
        """A mirror written before versions were kept held whatever Redis held: keep only the
        rows whose statement verifies and is filed under its own domain, their blob only if it
        is the one signed, and their entry rebuilt from the statement. The next snapshot
        brings back anything dropped (or, if it is not genuine, does not)."""
        db = self._write_db
        db.execute("ALTER TABLE sites ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
        db.execute("ALTER TABLE sites ADD COLUMN removed INTEGER NOT NULL DEFAULT 0")
        rows = db.execute("SELECT domain, signed FROM sites").fetchall()
        # What this edge remembered verifying is not verified again (100,000 signatures are
        # some 20 s of a start).
        remembered = self._trusted_digests()
        for domain, raw in rows:
            verdict = self._admit(domain, bytes(raw), None, remembered.get) if raw else None
            if verdict is None:
                for table in ("sites", "blobs", "trusted"):
                    db.execute(f"DELETE FROM {table} WHERE domain = ?", (domain,))
                continue
            statement = verdict[0]
            blob = db.execute("SELECT blob FROM blobs WHERE domain = ?", (domain,)).fetchone()
            if statement.digest is not None and (
                blob is None or not _blob_matches(statement, bytes(blob[0]))
            ):
                for table in ("sites", "blobs", "trusted"):
                    db.execute(f"DELETE FROM {table} WHERE domain = ?", (domain,))
                continue
            self._write_site(statement, bytes(raw))

    def _trust(self, rows: list[tuple[str, bytes, str]]) -> None:
        with self._transaction():
            self._write_db.executemany(
                "INSERT OR REPLACE INTO trusted (domain, digest, signer) VALUES (?, ?, ?)", rows
            )

    def _synced(self, version: int, at: float) -> None:
        self._write_db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("version", str(version)), ("synced_at", repr(at)), ("source", self.source)],
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._write_db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._write_db.execute("ROLLBACK")
            raise
        self._write_db.execute("COMMIT")


def _blob_matches(statement: SignedSite, blob: bytes) -> bool:
    """Whether ``blob`` (SiteRecord JSON) carries the chain and envelope ``statement`` signed."""
    try:
        record = json.loads(blob)
        return (
            isinstance(record, dict)
            and record.get("domain") == statement.domain
            and statement.digest is not None
            and content_digest(record.get("chain_pem"), record.get("envelope")) == statement.digest
        )
    except (ValueError, TypeError):
        return False
