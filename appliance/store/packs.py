"""Pack files: many envelopes appended into one object.

One file per chunk costs about 40 % of backup speed and makes cloud and tape copies millions of
objects (Glacier charges per object and per request); packs of ~16 MiB keep both sane. Data blobs
(file and disk chunks) and metadata blobs (manifest trees, disk chunk tables) go to separate packs,
so that data packs alone can move to archive storage classes while listing a point stays instant.

A pack is self-describing: a fixed header and, per blob, ``type | id | length`` before its
envelope, so the index can be rebuilt from the packs alone by a sequential scan. The pack's name is
the BLAKE3 hash of its bytes (unkeyed: it is a hash of ciphertext), so whole-pack integrity can be
checked without the key.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import blake3

from appliance.errors import IntegrityError, UnsupportedFormat
from appliance.store import format as fmt
from appliance.store.backend import Backend

_ENTRY = struct.Struct(">B32sI")
assert _ENTRY.size == fmt.PACK_ENTRY_HEADER_SIZE


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """Where one blob lives: ``offset`` and ``length`` delimit its envelope within the pack."""

    blob_id: bytes
    blob_type: int
    pack: bytes
    pack_kind: int
    offset: int
    length: int

    def __reduce__(self) -> tuple[type[IndexEntry], tuple[bytes, int, bytes, int, int, int]]:
        # Workers send every entry they write to the coordinator: the default pickling of a
        # frozen slots dataclass calls fields() per entry there, three times as slow.
        return (
            IndexEntry,
            (self.blob_id, self.blob_type, self.pack, self.pack_kind, self.offset, self.length),
        )


def pack_object_name(pack: bytes, kind: int) -> str:
    prefix = "data" if kind == fmt.PACK_KIND_DATA else "meta"
    name = pack.hex()
    return f"{prefix}/{name[:2]}/{name}"


def pack_header(kind: int) -> bytes:
    return fmt.PACK_MAGIC + bytes((kind,)) + bytes(fmt.PACK_HEADER_SIZE - len(fmt.PACK_MAGIC) - 1)


class PackWriter:
    """Appends sealed blobs into packs of one kind and puts each full pack into the backend.

    ``flush`` must be called at the end; it returns the index entries of every pack written since
    the previous flush. Not thread-safe: give each worker its own writer.
    """

    def __init__(
        self, backend: Backend, kind: int, target_size: int = fmt.PACK_TARGET_SIZE
    ) -> None:
        self._backend = backend
        self._kind = kind
        self._target = target_size
        self._buffer = bytearray()
        self._pending: list[tuple[bytes, int, int, int]] = []
        self._done: list[IndexEntry] = []
        self.bytes_written = 0
        self.packs_written = 0

    def add(self, blob_type: int, blob_id: bytes, envelope: bytes) -> None:
        if not self._buffer:
            self._buffer += pack_header(self._kind)
        self._buffer += _ENTRY.pack(blob_type, blob_id, len(envelope))
        self._pending.append((blob_id, blob_type, len(self._buffer), len(envelope)))
        self._buffer += envelope
        if len(self._buffer) >= self._target:
            self._write_pack()

    def _write_pack(self) -> None:
        if not self._pending:
            return
        data = self._buffer
        name = blake3.blake3(data).digest()
        self._backend.put(pack_object_name(name, self._kind), data)
        self._done.extend(
            IndexEntry(bid, btype, name, self._kind, off, length)
            for bid, btype, off, length in self._pending
        )
        self.bytes_written += len(data)
        self.packs_written += 1
        self._buffer = bytearray()
        self._pending = []

    def flush(self) -> list[IndexEntry]:
        self._write_pack()
        return self.take_completed()

    def take_completed(self) -> list[IndexEntry]:
        """Entries of the packs already written; the pack being filled stays open."""
        done, self._done = self._done, []
        return done

    def discard(self) -> None:
        """Drop the unwritten pack (on cancel or error); written packs become garbage for GC."""
        self._buffer = bytearray()
        self._pending = []


def parse_pack(name: bytes, data: bytes) -> Iterator[IndexEntry]:
    """Yield the entries of a pack; raise IntegrityError at the first damaged structure."""
    if len(data) < fmt.PACK_HEADER_SIZE or data[: len(fmt.PACK_MAGIC) - 1] != fmt.PACK_MAGIC[:-1]:
        raise IntegrityError(f"pack {name.hex()[:16]} has no pack header", pack=name.hex())
    if data[len(fmt.PACK_MAGIC) - 1] != fmt.PACK_MAGIC[-1]:
        raise UnsupportedFormat(f"pack {name.hex()[:16]} has an unknown pack version")
    kind = data[len(fmt.PACK_MAGIC)]
    if kind not in (fmt.PACK_KIND_DATA, fmt.PACK_KIND_META):
        raise IntegrityError(f"pack {name.hex()[:16]} has unknown kind {kind}", pack=name.hex())
    pos = fmt.PACK_HEADER_SIZE
    while pos < len(data):
        if pos + _ENTRY.size > len(data):
            raise IntegrityError(f"pack {name.hex()[:16]} is truncated", pack=name.hex())
        blob_type, blob_id, length = _ENTRY.unpack_from(data, pos)
        pos += _ENTRY.size
        if pos + length > len(data):
            raise IntegrityError(f"pack {name.hex()[:16]} is truncated", pack=name.hex())
        yield IndexEntry(blob_id, blob_type, name, kind, pos, length)
        pos += length


def pack_name_matches(name: bytes, data: bytes) -> bool:
    return blake3.blake3(data).digest() == name
