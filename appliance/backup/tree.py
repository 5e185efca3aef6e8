"""File-tree manifests: records in canonical order, cut into deduplicated tree blobs.

A file tree is a stream of JSON records, one per line, in *canonical order*: depth-first pre-order
with the entries of each directory sorted by name, which is exactly the lexicographic order of the
path's component tuples. Backups walk the source in that order and merge-join it with the previous
point's stream, so neither side is ever held in memory whole.

The stream is cut into tree blobs at content-defined boundaries (a record whose path hashes to a
boundary value ends a blob), so an unchanged region of the tree produces the same blobs and is
stored once however many points share it.

Paths are relative, ``/``-separated, and carry undecodable bytes as surrogate escapes (the JSON
encoder writes them as ``\\udcXX``), so any Linux name round-trips.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from appliance.errors import IntegrityError
from appliance.store import format as fmt
from appliance.store.repository import BlobWriter, Repository

#: A record ends a tree blob when crc32(path) & MASK == 0 (about one record in 256) ...
BOUNDARY_MASK = 0xFF
#: ... or when the blob reaches this size.
MAX_TREE_BLOB = 4 * 1024 * 1024
MIN_RECORDS = 16

Record = dict[str, Any]
#: How far a tree walk reads ahead: stored bytes of tree blobs held at once.
TREE_READ_AHEAD = 16 * 1024 * 1024


#: ``json.dumps(record, separators=(",", ":"))`` without building an encoder per record.
_encode = json.JSONEncoder(separators=(",", ":")).encode
#: ``json.loads`` of a record line, without guessing its encoding each time (it is UTF-8).
_decode = json.JSONDecoder().decode


def path_key(path: str) -> tuple[str, ...]:
    """Sort key of the canonical order."""
    return tuple(path.split("/")) if path else ()


class TreeWriter:
    """Collects records in canonical order and stores them as tree blobs."""

    def __init__(self, writer: BlobWriter) -> None:
        self._writer = writer
        self._lines: list[bytes] = []
        self._size = 0
        self.blob_ids: list[str] = []
        self.records = 0

    def add(self, record: Record) -> None:
        line = _encode(record).encode() + b"\n"
        self._lines.append(line)
        self._size += len(line)
        self.records += 1
        boundary = zlib.crc32(record["path"].encode("utf-8", "surrogateescape")) & BOUNDARY_MASK
        if (boundary == 0 and len(self._lines) >= MIN_RECORDS) or self._size >= MAX_TREE_BLOB:
            self._cut()

    def _cut(self) -> None:
        if self._lines:
            blob_id = self._writer.put(fmt.BLOB_TREE, b"".join(self._lines))
            self.blob_ids.append(blob_id.hex())
            self._lines = []
            self._size = 0

    def finish(self) -> list[str]:
        self._cut()
        return self.blob_ids


class PreviousCursor:
    """Merge-join cursor over the previous point's records (canonical order): ``find`` the
    record of each path in turn; every record passed without a match (and, at ``finish``, every
    one left) is handed to ``passed``."""

    def __init__(self, records: Iterator[Record], passed: Callable[[Record], None]) -> None:
        self._records = records
        self._current: Record | None = next(records, None)
        self._passed = passed  # told of each record passed without a match

    def find(self, path: str) -> Record | None:
        key = path_key(path)
        while self._current is not None and path_key(self._current["path"]) < key:
            self._passed(self._current)
            self._current = next(self._records, None)
        if self._current is not None and self._current["path"] == path:
            found, self._current = self._current, next(self._records, None)
            return found
        return None

    def finish(self) -> None:
        while self._current is not None:
            self._passed(self._current)
            self._current = next(self._records, None)


def iter_tree(repo: Repository, manifest: dict[str, Any]) -> Iterator[Record]:
    """Stream the records of a files point in canonical order.

    Tree blobs are read ahead in runs (:data:`TREE_READ_AHEAD` stored bytes at most), each run
    with :meth:`Repository.read_blobs`: neighbouring blobs of a pack share one read, so walking
    a tree held in a bucket costs a few requests, not one per blob."""
    envelope = repo.envelope
    ids = [bytes.fromhex(h) for h in manifest.get("tree", [])]
    for run in _read_ahead_runs(repo, ids):
        blobs = repo.read_blobs(run, envelope) if len(run) > 1 else {}
        for blob_id in run:
            data = blobs.get(blob_id)
            if data is None:
                data = repo.read_blob(blob_id, envelope)
            for line in data.splitlines():
                try:
                    yield _decode(line.decode())
                except ValueError as exc:
                    raise IntegrityError(
                        f"tree blob {blob_id.hex()[:16]} holds an invalid record"
                    ) from exc


def _read_ahead_runs(repo: Repository, ids: list[bytes]) -> Iterator[list[bytes]]:
    """``ids`` in order, cut into runs of at most :data:`TREE_READ_AHEAD` stored bytes (a blob
    the index does not know is a run of its own: reading it alone raises the clear error)."""
    entries = repo.index.lookup_many(set(ids))
    run: list[bytes] = []
    size = 0
    for blob_id in ids:
        entry = entries.get(blob_id)
        if entry is None:
            if run:
                yield run
            yield [blob_id]
            run, size = [], 0
            continue
        if run and size + entry.length > TREE_READ_AHEAD:
            yield run
            run, size = [], 0
        run.append(blob_id)
        size += entry.length
    if run:
        yield run
