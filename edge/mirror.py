"""The edge's local sealed mirror: the snapshot on the edge host's disk, so that serving never
waits for Redis.

It holds exactly what Redis holds for the edges, per site: the index entry, the signed
statement, and the blob (the chain and the *sealed* envelope). Nothing in it opens without
the edge's private key, which is not in it, so the key invariant holds: no clear private key
on disk. The TLS path reads a site's blob from here (a primary-key lookup in a local file),
never from the network; an edge restarted while Redis is down loads its index from here and
serves at once; a reconnect fetches only the blobs whose content hash changed.

SQLite, in WAL mode: in the standard library (nothing to install or keep in step on edge
hosts), one file, crash-safe transactions, and readers never blocked by the writer. One file
per edge process (``mirror-<i>.sqlite3``): no process ever waits on another's lock on the
event loop. LMDB was the other candidate; it needs a map size fixed in advance and a binding
to install, for lookups SQLite already answers in tens of microseconds.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

__all__ = ["Mirror", "MirrorContents"]

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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


class MirrorContents:
    """What a mirror held when it was opened: enough to serve before Redis answers."""

    def __init__(
        self,
        version: int,
        synced_at: float | None,
        index: dict[bytes, bytes],
        signed: dict[bytes, bytes],
    ) -> None:
        self.version = version
        self.synced_at = synced_at  # epoch seconds of the last sync, None if never
        self.index = index
        self.signed = signed

    @property
    def usable(self) -> bool:
        return self.synced_at is not None


class Mirror:
    """One edge process's mirror. Used only from the event loop's thread."""

    def __init__(self, path: Path | None, source: str = "") -> None:
        """``path`` None: an in-memory mirror (nothing survives a restart). ``source`` names
        the Redis snapshot mirrored (its prefix): a mirror of another is not used."""
        self.path = path
        self.source = source
        if path is not None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Created 0600 before SQLite opens it: SQLite gives its -wal and -shm files the
            # database file's permissions.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            os.chmod(path, 0o600)
        self._db = sqlite3.connect(
            str(path) if path is not None else ":memory:",
            isolation_level=None,  # explicit transactions below
            check_same_thread=False,  # the edge's tests stop it from another thread
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        # A commit reaches the WAL without an fsync; a power cut may lose the last changes,
        # which the next sync fetches again. Never a torn database.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # ---- reading ---------------------------------------------------------------------------

    def load(self) -> MirrorContents:
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        index: dict[bytes, bytes] = {}
        signed: dict[bytes, bytes] = {}
        for domain, entry, statement in self._db.execute("SELECT domain, entry, signed FROM sites"):
            key = domain.encode()
            if entry is not None:
                index[key] = bytes(entry)
            if statement is not None:
                signed[key] = bytes(statement)
        synced = meta.get("synced_at") if meta.get("source", "") == self.source else None
        return MirrorContents(
            int(meta.get("version", 0)), float(synced) if synced else None, index, signed
        )

    def blob(self, domain: str) -> bytes | None:
        row = self._db.execute("SELECT blob FROM blobs WHERE domain = ?", (domain,)).fetchone()
        return bytes(row[0]) if row is not None else None

    def hashes(self) -> dict[str, str]:
        """domain -> content hash of the blob held (sites with a blob only)."""
        return dict(self._db.execute("SELECT domain, hash FROM blobs").fetchall())

    def sites(self) -> int:
        (count,) = self._db.execute("SELECT count(*) FROM sites").fetchone()
        return int(count)

    def bytes_on_disk(self) -> int:
        if self.path is None:
            return 0
        files = (self.path, Path(f"{self.path}-wal"))
        return sum(p.stat().st_size for p in files if p.exists())

    # ---- writing -----------------------------------------------------------------------------

    def put_site(
        self, domain: str, entry: bytes, signed: bytes | None, blob: bytes, content_hash: str
    ) -> None:
        with self.transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO sites (domain, entry, signed) VALUES (?, ?, ?)",
                (domain, entry, signed),
            )
            self._db.execute(
                "INSERT OR REPLACE INTO blobs (domain, blob, hash) VALUES (?, ?, ?)",
                (domain, blob, content_hash),
            )

    def remove_site(self, domain: str, tombstone: bytes | None) -> None:
        with self.transaction():
            self._db.execute("DELETE FROM blobs WHERE domain = ?", (domain,))
            if tombstone is None:
                self._db.execute("DELETE FROM sites WHERE domain = ?", (domain,))
            else:
                self._db.execute(
                    "INSERT OR REPLACE INTO sites (domain, entry, signed) VALUES (?, NULL, ?)",
                    (domain, tombstone),
                )

    def put_blobs(self, blobs: Iterable[tuple[str, bytes, str]]) -> None:
        """Store fetched blobs (domain, blob, content hash), one transaction per call."""
        with self.transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO blobs (domain, blob, hash) VALUES (?, ?, ?)", blobs
            )

    def replace_index(self, index: Mapping[bytes, bytes], signed: Mapping[bytes, bytes]) -> None:
        """Make the mirror's entries and statements those of a snapshot just read (its blobs
        stored first with put_blobs), dropping sites the snapshot no longer has. Only the rows
        that differ are written, so a re-read snapshot with few changes costs a read of the
        small rows (under half a second at 100,000 sites). One transaction; a site whose blob
        and statement disagree after a crash between the two is refused by the digest check
        until the next sync, never served wrong."""
        wanted = {
            raw.decode("utf-8", "replace"): (index.get(raw), signed.get(raw))
            for raw in index.keys() | signed.keys()
        }
        held = {
            domain: (bytes(e) if e is not None else None, bytes(s) if s is not None else None)
            for domain, e, s in self._db.execute("SELECT domain, entry, signed FROM sites")
        }
        gone = [(d,) for d in held.keys() - wanted.keys()]
        changed = [(d, e, s) for d, (e, s) in wanted.items() if held.get(d) != (e, s)]
        if not gone and not changed:
            return
        with self.transaction():
            self._db.executemany("DELETE FROM sites WHERE domain = ?", gone)
            self._db.executemany("DELETE FROM blobs WHERE domain = ?", gone)
            self._db.executemany(
                "INSERT OR REPLACE INTO sites (domain, entry, signed) VALUES (?, ?, ?)", changed
            )

    def synced(self, version: int) -> None:
        """The mirror now matches Redis at ``version``."""
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [("version", str(version)), ("synced_at", repr(time.time())), ("source", self.source)],
        )

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
