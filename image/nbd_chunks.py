"""What an NBD export knows about its disk: the chunk table, the cache's slots, stats and damage.

:class:`ChunkSource` is one disk of a recovery point as the export sees it: the table of chunk
IDs (all-zero chunks are :data:`~appliance.store.format.ZERO_ID`, never stored), its runs of
zero and data chunks for block status, the counters of :class:`ExportStats`, the damage found
(``errors``, each "point X damaged: ..."), and the boot profile (``read_order``: the data chunks
the guest read, each once, in first-read order, at most :data:`PROFILE_MAX_CHUNKS`).

:class:`SlotCache` is the bookkeeping of the decoded-chunk cache: a slab of fixed-size slots
(one chunk each) that the decoders write into and replies are sent from. A slot is free, pending
(a decoder is filling it), cached (holds chunk ``index``) or dead (its decode failed). Each user
of a slot holds a pin (a pending decode holds one, each reply that will send it holds one); only
unpinned cached slots are evicted, least recently used first, so a slot is never rewritten while
a reply still sends from it, and a dead slot is freed when its last pin goes.

Both are confined to the export's event loop thread (no locks): counters and lists are read from
other threads only as snapshots.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from appliance.backup.images import read_table
from appliance.errors import ApplianceError, NotFound
from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.packs import pack_object_name
from appliance.store.repository import Repository
from image.nbd_protocol import allocation_descriptors

#: Decoded chunks kept in memory per export (64 MiB at 64 KiB chunks).
CACHE_CHUNKS = 1024
#: Most chunks a boot profile records (half the cache, so warming never evicts its own work).
PROFILE_MAX_CHUNKS = CACHE_CHUNKS // 2


class UnreadableChunk(Exception):
    """A chunk of the disk cannot be read: ``offset`` is the first byte asked for in it."""

    def __init__(self, message: str, *, offset: int, index: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        self.index = index


@dataclass
class ExportStats:
    """Counters of one export (bytes as the guest sees them, and as the store holds them)."""

    connections: int = 0
    reads: int = 0
    bytes_served: int = 0
    block_status: int = 0
    chunks_from_store: int = 0
    bytes_from_store: int = 0  # sealed (compressed, encrypted) bytes read from packs
    bytes_decoded: int = 0
    cache_hits: int = 0
    errors: int = 0
    chunks_warmed: int = 0  # decoded ahead from a boot profile
    chunks_cached: int = 0  # decoded on a client's NBD_CMD_CACHE

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ChunkSource:
    """The guest-visible layout of one disk of a point, and what reading it found."""

    def __init__(
        self,
        repo: Repository,
        point_id: str,
        disk: dict[str, Any],
        *,
        cache_chunks: int = CACHE_CHUNKS,
        table: list[bytes] | None = None,
    ) -> None:
        self.repo = repo
        self.point_id = point_id
        self.name = str(disk["name"])
        self.size = int(disk["size"])
        self.chunk_size = int(disk["chunk_size"])
        self.cache_chunks = cache_chunks
        try:
            self.table = table if table is not None else read_table(repo, disk)
        except ApplianceError as exc:
            raise type(exc)(
                f"point {point_id} damaged: the chunk table of disk {self.name} cannot be read: "
                f"{exc.message}",
                point=point_id,
                disk=self.name,
            ) from exc
        chunks = (self.size + self.chunk_size - 1) // self.chunk_size
        if len(self.table) != chunks:
            raise NotFound(
                f"point {point_id} damaged: disk {self.name} has {len(self.table)} table "
                f"entries for {chunks} chunks",
                point=point_id,
            )
        self.runs = zero_runs(self.table)
        self.stats = ExportStats()
        self.errors: list[str] = []
        #: Data chunks the guest read, each once, in the order of first reading (a boot profile).
        self.read_order: list[int] = []
        self._read_seen: set[int] = set()
        self._damage_logged: set[int] = set()

    def chunk_length(self, index: int) -> int:
        """Bytes of chunk ``index`` (the last one may be short)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def chunk_span(self, offset: int, length: int) -> range:
        """The chunks that ``[offset, offset+length)`` (clipped to the disk) touches."""
        end = min(offset + length, self.size)
        if end <= offset:
            return range(0)
        return range(offset // self.chunk_size, (end - 1) // self.chunk_size + 1)

    def is_data(self, index: int) -> bool:
        return self.table[index] != fmt.ZERO_ID

    def note_read(self, offset: int, length: int) -> None:
        """Record the data chunks a guest read touches (for the boot profile)."""
        if length <= 0 or len(self.read_order) >= PROFILE_MAX_CHUNKS:
            return
        for index in self.chunk_span(offset, length):
            if index not in self._read_seen and self.table[index] != fmt.ZERO_ID:
                self._read_seen.add(index)
                self.read_order.append(index)
                if len(self.read_order) >= PROFILE_MAX_CHUNKS:
                    return

    def record_damage(self, message: str) -> None:
        """Count a failed guest read; ``message`` ("point X damaged: ...") is listed once."""
        self.stats.errors += 1
        if message not in self.errors:
            self.errors.append(message)

    def first_damage_report(self, index: int) -> bool:
        """True the first time a guest read fails on chunk ``index`` (it is logged once)."""
        if index in self._damage_logged:
            return False
        self._damage_logged.add(index)
        return True

    def allocation(self, offset: int, length: int, limit: int) -> list[tuple[int, int]]:
        """Block status descriptors ``(length, NBD state flags)`` of ``[offset, offset+length)``
        (from the zero runs, no loop per chunk)."""
        return allocation_descriptors(self.runs, self.chunk_size, self.size, offset, length, limit)


class SlotCache:
    """Slots of the decoded-chunk slab: which chunk each holds, pins, and LRU eviction."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._free = list(range(slots - 1, -1, -1))
        self._pins = [0] * slots
        self._holds = [-1] * slots  # chunk index of a pending or cached slot, else -1
        self._cached: dict[int, int] = {}  # chunk index -> slot
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unpinned slots: LRU first

    def __len__(self) -> int:
        return len(self._cached)

    def __contains__(self, index: int) -> bool:
        return index in self._cached

    def lookup(self, index: int) -> int | None:
        """The slot holding chunk ``index``, pinned for the caller, or None."""
        slot = self._cached.get(index)
        if slot is not None:
            self.pin(slot)
        return slot

    def reserve(self, index: int) -> int | None:
        """A pinned slot for chunk ``index`` to be decoded into (a free one, else the least
        recently used unpinned one), or None when every slot is in use."""
        if self._free:
            slot = self._free.pop()
        elif self._idle:
            slot, _ = self._idle.popitem(last=False)
            del self._cached[self._holds[slot]]
        else:
            return None
        self._holds[slot] = index
        self._pins[slot] = 1
        return slot

    def fill(self, slot: int) -> None:
        """The decode into ``slot`` succeeded: it now serves its chunk."""
        self._cached[self._holds[slot]] = slot

    def fail(self, slot: int) -> None:
        """The decode into ``slot`` failed: freed once its last pin goes."""
        self._holds[slot] = -1

    def pin(self, slot: int) -> None:
        if self._pins[slot] == 0:
            self._idle.pop(slot, None)
        self._pins[slot] += 1

    def unpin(self, slot: int) -> None:
        self._pins[slot] -= 1
        if self._pins[slot]:
            return
        if self._holds[slot] >= 0 and self._cached.get(self._holds[slot]) == slot:
            self._idle[slot] = None  # most recently used
        else:
            self._holds[slot] = -1
            self._free.append(slot)


def zero_runs(table: list[bytes]) -> list[tuple[int, bool]]:
    """Runs of the chunk table as ``(first chunk, all-zero?)``, in order, adjacent runs differ."""
    runs: list[tuple[int, bool]] = []
    for index, blob_id in enumerate(table):
        zero = blob_id == fmt.ZERO_ID
        if not runs or runs[-1][1] != zero:
            runs.append((index, zero))
    return runs


def missing_blobs(repo: Repository, disks: list[dict[str, Any]]) -> dict[str, Any]:
    """What of these disks is not readable from the local store, without reading any data.

    Checks that every chunk-table blob and every data blob is in the local index
    (:func:`appliance.point_packs.point_packs`), and that every pack they live in exists.
    Returns ``{"tables": [...], "blobs": n, "packs": [...], "example": hex}`` with empty values
    when everything is present.
    """
    needs = point_packs(repo, {"kind": "image", "disks": disks})
    absent = []
    for pack, kind in needs.packs.items():
        try:
            repo.backend.stat(pack_object_name(pack, kind))
        except ApplianceError:
            absent.append(pack.hex())
    return {
        "tables": [i.hex() for i in needs.missing_metadata],
        "blobs": len(needs.missing),
        "packs": absent,
        "example": needs.missing[0].hex() if needs.missing else "",
    }
