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
from collections.abc import Iterator
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
        line = json.dumps(record, separators=(",", ":")).encode() + b"\n"
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


def iter_tree(repo: Repository, manifest: dict[str, Any]) -> Iterator[Record]:
    """Stream the records of a files point in canonical order."""
    envelope = repo.envelope
    for hex_id in manifest.get("tree", []):
        data = repo.read_blob(bytes.fromhex(hex_id), envelope)
        for line in data.splitlines():
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise IntegrityError(f"tree blob {hex_id[:16]} holds an invalid record") from exc
