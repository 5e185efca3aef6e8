"""Index files in the store, and the local index cache that answers "where is chunk X?".

The store holds the authoritative index as encrypted index files (``index/<id>``), each listing
the blobs of the packs written by one backup session (or consolidated by GC). Index files can be
rebuilt from the packs alone.

The cache is a SQLite database outside the store (under the appliance's data directory), so that
lookups never need RAM proportional to the store: a store of 100 million chunks is a 10 GB file
that SQLite pages through, not a 10 GB dict. It is a pure cache: deleting it is always safe; it is
rebuilt from the index files when its list of index files differs from the store's. It also keeps
the verify coverage ledger (when each pack was last verified).
"""

from __future__ import annotations

import os
import sqlite3
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from appliance.errors import IntegrityError, UnsupportedFormat
from appliance.store import format as fmt
from appliance.store.packs import IndexEntry

_PACK_RECORD = struct.Struct(">32sBI")
_BLOB_RECORD = struct.Struct(">32sBII")
#: IDs per ``IN (...)`` query: far below SQLite's variable limit, large enough that per-query
#: overhead is noise.
_LOOKUP_BATCH = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY, type INTEGER NOT NULL, pack BLOB NOT NULL,
    offset INTEGER NOT NULL, length INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack);
CREATE TABLE IF NOT EXISTS packs (name BLOB PRIMARY KEY, kind INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS index_files (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS verified (pack BLOB PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class BlobLocations:
    """What :meth:`IndexCache.locate_many` found."""

    #: pack name -> pack kind, of every pack holding one of the blobs.
    packs: dict[bytes, int]
    #: The blob IDs the index does not know, sorted.
    missing: list[bytes]


def encode_index(entries: Iterable[IndexEntry]) -> bytes:
    by_pack: dict[bytes, list[IndexEntry]] = {}
    kinds: dict[bytes, int] = {}
    for entry in entries:
        by_pack.setdefault(entry.pack, []).append(entry)
        kinds[entry.pack] = entry.pack_kind
    out = bytearray(fmt.INDEX_MAGIC)
    for pack, items in sorted(by_pack.items()):
        out += _PACK_RECORD.pack(pack, kinds[pack], len(items))
        for e in sorted(items, key=lambda e: e.offset):
            out += _BLOB_RECORD.pack(e.blob_id, e.blob_type, e.offset, e.length)
    return bytes(out)


def decode_index(data: bytes) -> Iterator[IndexEntry]:
    if data[: len(fmt.INDEX_MAGIC) - 1] != fmt.INDEX_MAGIC[:-1]:
        raise IntegrityError("index file has no index header")
    if data[len(fmt.INDEX_MAGIC) - 1] != fmt.INDEX_MAGIC[-1]:
        raise UnsupportedFormat("index file has an unknown version")
    pos = len(fmt.INDEX_MAGIC)
    try:
        while pos < len(data):
            pack, kind, count = _PACK_RECORD.unpack_from(data, pos)
            pos += _PACK_RECORD.size
            for _ in range(count):
                blob_id, blob_type, offset, length = _BLOB_RECORD.unpack_from(data, pos)
                pos += _BLOB_RECORD.size
                yield IndexEntry(blob_id, blob_type, pack, kind, offset, length)
    except struct.error as exc:
        raise IntegrityError("index file is truncated") from exc


class IndexCache:
    """The local SQLite cache of the store's index. One connection per process and thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "pid", None) != os.getpid():
            db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
            self._local.pid = os.getpid()
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None and getattr(self._local, "pid", None) == os.getpid():
            db.close()
        self._local.db = None

    # --- lookups ------------------------------------------------------------------------------

    def lookup(self, blob_id: bytes) -> IndexEntry | None:
        # No join: the pack kinds are few and cached per process (the join cost a restore
        # about a tenth of its time).
        row = (
            self._db()
            .execute("SELECT type, pack, offset, length FROM chunks WHERE id = ?", (blob_id,))
            .fetchone()
        )
        if row is None:
            return None
        return IndexEntry(blob_id, row[0], row[1], self._pack_kind(row[1]), row[2], row[3])

    def _pack_kind(self, pack: bytes) -> int:
        kinds: dict[bytes, int] | None = getattr(self._local, "kinds", None)
        if kinds is None or getattr(self._local, "kinds_pid", None) != os.getpid():
            kinds = self._local.kinds = {}
            self._local.kinds_pid = os.getpid()
        kind = kinds.get(pack)
        if kind is None:
            row = self._db().execute("SELECT kind FROM packs WHERE name = ?", (pack,)).fetchone()
            kind = kinds[pack] = row[0] if row is not None else 0
        return kind

    def lookup_many(self, blob_ids: Iterable[bytes]) -> dict[bytes, IndexEntry]:
        """The entries of those of ``blob_ids`` the index knows (missing IDs are left out)."""
        found: dict[bytes, IndexEntry] = {}
        kinds: dict[bytes, int] = {}
        for r in self._rows_for("id, type, pack, offset, length", blob_ids):
            kind = kinds.get(r[2])
            if kind is None:
                kind = kinds[r[2]] = self._pack_kind(r[2])
            found[r[0]] = IndexEntry(r[0], r[1], r[2], kind, r[3], r[4])
        return found

    def locate_many(self, blob_ids: Iterable[bytes]) -> BlobLocations:
        """Which packs hold ``blob_ids`` and which of them the index does not know.

        For presence checks (a failover checks every chunk of a point before it boots): the same
        lookups as :meth:`lookup_many` without an entry per blob, which cost as much as the
        lookups themselves.
        """
        wanted = set(blob_ids)
        known: set[bytes] = set()
        packs: dict[bytes, int] = {}
        for blob_id, pack in self._rows_for("id, pack", wanted):
            known.add(blob_id)
            if pack not in packs:
                packs[pack] = self._pack_kind(pack)
        return BlobLocations(packs=packs, missing=sorted(wanted - known))

    def _rows_for(self, columns: str, blob_ids: Iterable[bytes]) -> Iterator[tuple[Any, ...]]:
        """``columns`` of the chunks rows of ``blob_ids``, one query per 500 IDs.

        Batched because one query per ID is several times slower; sorted because neighbouring
        keys share B-tree pages (about a third faster on 50k random IDs than in the caller's
        order). A join against a temporary table or a ``VALUES`` list of the IDs measured no
        faster than this (docs/benchmarks.md, failover phase).
        """
        ids = sorted(set(blob_ids))
        db = self._db()
        for start in range(0, len(ids), _LOOKUP_BATCH):
            batch = ids[start : start + _LOOKUP_BATCH]
            marks = ",".join("?" * len(batch))
            yield from db.execute(f"SELECT {columns} FROM chunks WHERE id IN ({marks})", batch)

    def contains(self, blob_id: bytes) -> bool:
        return (
            self._db().execute("SELECT 1 FROM chunks WHERE id = ?", (blob_id,)).fetchone()
            is not None
        )

    def index_files(self) -> set[str]:
        return {r[0] for r in self._db().execute("SELECT name FROM index_files")}

    def packs(self) -> Iterator[tuple[bytes, int]]:
        yield from self._db().execute("SELECT name, kind FROM packs ORDER BY name")

    def pack_entries(self, pack: bytes) -> list[IndexEntry]:
        rows = self._db().execute(
            "SELECT c.id, c.type, p.kind, c.offset, c.length FROM chunks c "
            "JOIN packs p ON p.name = c.pack WHERE c.pack = ? ORDER BY c.offset",
            (pack,),
        )
        return [IndexEntry(r[0], r[1], pack, r[2], r[3], r[4]) for r in rows]

    def all_entries(self) -> Iterator[IndexEntry]:
        cursor = self._db().execute(
            "SELECT c.id, c.type, c.pack, p.kind, c.offset, c.length FROM chunks c "
            "JOIN packs p ON p.name = c.pack ORDER BY c.pack, c.offset"
        )
        for r in cursor:
            yield IndexEntry(r[0], r[1], r[2], r[3], r[4], r[5])

    def counts(self) -> tuple[int, int]:
        db = self._db()
        chunks = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
        packs = db.execute("SELECT count(*) FROM packs").fetchone()[0]
        return chunks, packs

    # --- updates -----------------------------------------------------------------------------

    def add(self, index_name: str | None, entries: Iterable[IndexEntry]) -> None:
        entries = list(entries)
        # One statement per table for the whole batch: the coordinator of a backup commits
        # every chunk of it, so per-row round trips were a measurable part of its serial work.
        packs = {e.pack: e.pack_kind for e in entries}
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR IGNORE INTO packs VALUES (?, ?)", packs.items())
            db.executemany(
                "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?)",
                ((e.blob_id, e.blob_type, e.pack, e.offset, e.length) for e in entries),
            )
            if index_name is not None:
                db.execute("INSERT OR IGNORE INTO index_files VALUES (?)", (index_name,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def forget_index_file(self, name: str) -> None:
        self._db().execute("DELETE FROM index_files WHERE name = ?", (name,))

    def remove_packs(self, packs: Iterable[bytes]) -> None:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            for pack in packs:
                db.execute("DELETE FROM chunks WHERE pack = ?", (pack,))
                db.execute("DELETE FROM packs WHERE name = ?", (pack,))
                db.execute("DELETE FROM verified WHERE pack = ?", (pack,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def remove_blobs(self, locations: Iterable[tuple[bytes, bytes]]) -> None:
        """Forget blobs at (blob ID, pack) locations (damaged copies found by repair)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("DELETE FROM chunks WHERE id = ? AND pack = ?", locations)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def clear(self) -> None:
        db = self._db()
        db.executescript("DELETE FROM chunks; DELETE FROM packs; DELETE FROM index_files;")

    # --- GC marking (a temporary table on disk, so marking never needs RAM per chunk) --------

    def start_marking(self) -> None:
        db = self._db()
        db.execute("DROP TABLE IF EXISTS temp.marks")
        db.execute("CREATE TEMP TABLE marks (id BLOB PRIMARY KEY) WITHOUT ROWID")

    def mark(self, ids: Iterable[bytes]) -> None:
        db = self._db()
        db.execute("BEGIN")
        db.executemany("INSERT OR IGNORE INTO temp.marks VALUES (?)", ((i,) for i in ids))
        db.execute("COMMIT")

    def live_by_pack(self) -> dict[bytes, tuple[int, int]]:
        """pack -> (live bytes, live blobs) of the marked blobs."""
        rows = self._db().execute(
            "SELECT c.pack, sum(c.length), count(*) FROM chunks c "
            "JOIN temp.marks m ON m.id = c.id GROUP BY c.pack"
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    def live_entries(self, pack: bytes) -> list[IndexEntry]:
        rows = self._db().execute(
            "SELECT c.id, c.type, p.kind, c.offset, c.length FROM chunks c "
            "JOIN packs p ON p.name = c.pack JOIN temp.marks m ON m.id = c.id "
            "WHERE c.pack = ? ORDER BY c.offset",
            (pack,),
        )
        return [IndexEntry(r[0], r[1], pack, r[2], r[3], r[4]) for r in rows]

    def missing_marks(self, limit: int = 1000) -> list[bytes]:
        """Marked IDs that no index entry has (references to lost blobs)."""
        rows = self._db().execute(
            "SELECT m.id FROM temp.marks m LEFT JOIN chunks c ON c.id = m.id "
            "WHERE c.id IS NULL LIMIT ?",
            (limit,),
        )
        return [r[0] for r in rows]

    # --- verify coverage ----------------------------------------------------------------------

    def mark_verified(self, pack: bytes, at: float) -> None:
        self._db().execute("INSERT OR REPLACE INTO verified VALUES (?, ?)", (pack, at))

    def packs_by_verify_age(self) -> Iterator[tuple[bytes, int, float | None]]:
        """Packs never verified first, then the longest ago verified."""
        yield from self._db().execute(
            "SELECT p.name, p.kind, v.at FROM packs p LEFT JOIN verified v ON v.pack = p.name "
            "ORDER BY v.at IS NOT NULL, v.at, p.name"
        )

    def verified_since(self, since: float) -> int:
        return (
            self._db()
            .execute(
                "SELECT count(*) FROM verified v JOIN packs p ON p.name = v.pack WHERE v.at >= ?",
                (since,),
            )
            .fetchone()[0]
        )
