"""The edge's local sealed mirror: the snapshot on the edge host's disk, so that serving never
waits for Redis.

It holds exactly what Redis holds for the edges, per site: the index entry, the signed
statement, and the blob (the chain and the *sealed* envelope). Nothing in it opens without
the edge's private key, which is not in it, so the key invariant holds: no clear private key
on disk. The TLS path reads a site's blob from here (a primary-key lookup in a local file),
never from the network; an edge restarted while Redis is down loads its index from here and
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

__all__ = ["Mirror", "MirrorContents"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Blobs (~9 KiB a site) apart from the small rows a snapshot rewrites: updating an entry in a
# row that also held its blob rewrote the blob too (23 s for 100,000 sites).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sites (
    domain TEXT PRIMARY KEY,
    entry BLOB,        -- the index entry; NULL for a removed site whose tombstone is kept
    signed BLOB        -- the signed statement (or tombstone)
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

_REMOVED = b""  # a pending removal: no blob, whatever the file still holds


class MirrorContents:
    """What a mirror held when it was opened: enough to serve before Redis answers."""

    def __init__(
        self,
        version: int,
        synced_at: float | None,
        index: dict[bytes, bytes],
        trusted: dict[str, tuple[bytes, str]] | None = None,
    ) -> None:
        self.version = version
        self.synced_at = synced_at  # epoch seconds of the last sync, None if never
        self.index = index  # statements are read one at a time: Mirror.statement
        # domain -> (digest of the raw statement verified, its signer's key id)
        self.trusted = trusted or {}

    @property
    def usable(self) -> bool:
        return self.synced_at is not None


class Mirror:
    """One edge process's mirror. Its methods are called from the event loop's thread."""

    def __init__(self, path: Path | None, source: str = "") -> None:
        """``path`` None: a mirror in a temporary directory of its own, removed at close
        (nothing survives a restart). ``source`` names the Redis snapshot mirrored (its
        prefix): a mirror of another is not used."""
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
        self._write_db.executescript(_SCHEMA)
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
        index = {
            domain.encode(): bytes(entry)
            for domain, entry in db.execute("SELECT domain, entry FROM sites WHERE entry NOT NULL")
        }
        trusted = {
            domain: (bytes(digest), signer)
            for domain, digest, signer in db.execute("SELECT domain, digest, signer FROM trusted")
        }
        synced = meta.get("synced_at") if meta.get("source", "") == self.source else None
        return MirrorContents(
            int(meta.get("version", 0)), float(synced) if synced else None, index, trusted
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

    async def fetch_missing(
        self,
        index: Mapping[bytes, bytes],
        fetch: Callable[[list[str]], list[bytes | None]],
        fetched: Callable[[int], object],
    ) -> int:
        """Fetch with ``fetch`` (domains -> their blobs, None for one gone) and store the blobs
        of the sites of ``index`` with a certificate whose content hash the mirror lacks, 500
        at a time (a first fill of 100,000 never sits in memory at once); ``fetched`` is told
        each batch's count. All of it on the writer's thread, network included: a first fill
        of 100,000 blobs is half a gigabyte to parse. The caller must not change ``index``
        until this returns."""
        return await self._run(self._fetch_missing, index, fetch, fetched)

    async def replace_index(
        self, index: Mapping[bytes, bytes], signed: Mapping[bytes, bytes]
    ) -> None:
        """Make the mirror's entries and statements those of a snapshot just read (its blobs
        stored first with put_blobs), dropping sites the snapshot no longer has. The caller
        must not change ``index`` or ``signed`` until this returns."""
        await self._run(self._replace_index, index, signed)

    def put_site(
        self, domain: str, entry: bytes, signed: bytes | None, blob: bytes, content_hash: str
    ) -> None:
        sequence = self._hold(domain, blob)
        self._queue(self._put_site, domain, entry, signed, blob, content_hash, sequence)

    def remove_site(self, domain: str, tombstone: bytes | None) -> None:
        sequence = self._hold(domain, _REMOVED)
        self._queue(self._remove_site, domain, tombstone, sequence)

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

    def _put_site(
        self,
        domain: str,
        entry: bytes,
        signed: bytes | None,
        blob: bytes,
        content_hash: str,
        sequence: int,
    ) -> None:
        try:
            with self._transaction():
                self._write_db.execute(
                    "INSERT OR REPLACE INTO sites (domain, entry, signed) VALUES (?, ?, ?)",
                    (domain, entry, signed),
                )
                self._write_db.execute(
                    "INSERT OR REPLACE INTO blobs (domain, blob, hash) VALUES (?, ?, ?)",
                    (domain, blob, content_hash),
                )
        finally:
            self._release(domain, sequence)

    def _remove_site(self, domain: str, tombstone: bytes | None, sequence: int) -> None:
        db = self._write_db
        try:
            with self._transaction():
                db.execute("DELETE FROM blobs WHERE domain = ?", (domain,))
                db.execute("DELETE FROM trusted WHERE domain = ?", (domain,))
                if tombstone is None:
                    db.execute("DELETE FROM sites WHERE domain = ?", (domain,))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO sites (domain, entry, signed) VALUES (?, NULL, ?)",
                        (domain, tombstone),
                    )
        finally:
            self._release(domain, sequence)

    def _fetch_missing(
        self,
        index: Mapping[bytes, bytes],
        fetch: Callable[[list[str]], list[bytes | None]],
        fetched: Callable[[int], object],
    ) -> int:
        held = dict(self._write_db.execute("SELECT domain, hash FROM blobs").fetchall())
        wanted: list[tuple[str, str]] = []
        for raw_domain, entry in index.items():
            head = entry.split(b"\t", 2)
            if len(head) < 3 or head[1] != b"1":
                continue
            domain = raw_domain.decode("utf-8", "replace")
            digest = head[0].decode("ascii", "replace")
            if held.get(domain) != digest:
                wanted.append((domain, digest))
        count = 0
        for i in range(0, len(wanted), 500):
            if self._closing:
                break
            batch = wanted[i : i + 500]
            blobs = fetch([domain for domain, _ in batch])
            found = [
                (domain, bytes(blob), digest)
                for (domain, digest), blob in zip(batch, blobs, strict=True)
                if blob is not None
            ]
            self._put_blobs(found)
            count += len(found)
            fetched(len(found))
        return count

    def _put_blobs(self, blobs: list[tuple[str, bytes, str]]) -> None:
        with self._transaction():
            self._write_db.executemany(
                "INSERT OR REPLACE INTO blobs (domain, blob, hash) VALUES (?, ?, ?)", blobs
            )

    def _replace_index(self, index: Mapping[bytes, bytes], signed: Mapping[bytes, bytes]) -> None:
        # Only the rows that differ are written, so a re-read snapshot with few changes costs a
        # read of the small rows. One transaction; a site whose blob and statement disagree
        # after a crash between the two is refused by the digest check until the next sync,
        # never served wrong.
        wanted = {
            raw.decode("utf-8", "replace"): (index.get(raw), signed.get(raw))
            for raw in index.keys() | signed.keys()
        }
        held = {
            domain: (bytes(e) if e is not None else None, bytes(s) if s is not None else None)
            for domain, e, s in self._write_db.execute("SELECT domain, entry, signed FROM sites")
        }
        gone = [(d,) for d in held.keys() - wanted.keys()]
        changed = [(d, e, s) for d, (e, s) in wanted.items() if held.get(d) != (e, s)]
        if not gone and not changed:
            return
        with self._transaction():
            for table in ("sites", "blobs", "trusted"):
                self._write_db.executemany(f"DELETE FROM {table} WHERE domain = ?", gone)
            self._write_db.executemany(
                "INSERT OR REPLACE INTO sites (domain, entry, signed) VALUES (?, ?, ?)", changed
            )

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
