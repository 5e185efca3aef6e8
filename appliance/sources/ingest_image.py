"""Image upload sessions: block devices (or raw image files) sent by the backup client.

The client cuts each disk into the store's fixed-size disk chunks (``disk_chunk_size``) and names
each chunk with the store's keyed hash, as :mod:`appliance.backup.images` does on the appliance;
an all-zero chunk is named by ``ZERO_ID`` and never sent. It fetches the chunk table of the same
disk in the asset's previous point (:func:`base_table`) and sends only chunks that differ from the
base at the same place and were not sent earlier in the session. Its records batches are the
disks' chunk tables, one raw 32-byte ID per chunk, disk after disk in the declared order.

At ``finish`` every ID is checked before anything is written: the table must have exactly one ID
per chunk of the declared sizes, and each ID must be ``ZERO_ID``, the base's ID at the same place,
or a chunk this session uploaded (and the store holds). So a host can neither name a chunk it did
not send (no probing or borrowing of other assets' data) nor make a table that does not match its
disks. The point is an ordinary image point (tables, a default VM definition), made by the same
engine step as every other image point.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import zstandard

from appliance.backup.images import DiskStats
from appliance.errors import Conflict, InvalidInput, ObjectMissing
from appliance.store import format as fmt
from appliance.store.packs import IndexEntry
from appliance.vmspec import default_spec
from appliance.workers import CpuMeter

if TYPE_CHECKING:
    from appliance.engine import Appliance, BackupOutcome
    from appliance.sources.ingest import IngestSession

#: At most this many disks in one image session (one machine's disks).
MAX_DISKS = 16
#: The largest disk a client may declare (1 PiB).
MAX_DISK_BYTES = 1 << 50
DISK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class BaseGone(Conflict):
    """The point the session compared against was deleted during the upload."""


def check_disks(disks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The declared disks, cleaned: 1 to 16, each a plain unique name and a size in bytes."""
    if not 1 <= len(disks) <= MAX_DISKS:
        raise InvalidInput(f"an image session declares 1 to {MAX_DISKS} disks")
    clean: list[dict[str, Any]] = []
    for disk in disks:
        name = disk.get("name") if isinstance(disk, dict) else None
        size = disk.get("size") if isinstance(disk, dict) else None
        if not isinstance(name, str) or not DISK_NAME.match(name):
            raise InvalidInput(
                "a disk's name is 1 to 64 letters, digits, '.', '_' or '-' "
                f"(not starting with a dot or dash): {str(name)[:80]!r}"
            )
        if any(d["name"] == name for d in clean):
            raise InvalidInput(f"disk {name} is declared twice")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_DISK_BYTES:
            raise InvalidInput(f"disk {name} needs a size of 1 byte to 1 PiB")
        clean.append({"name": name, "size": size})
    return clean


def chunk_count(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


def _base_disk(
    app: Appliance, base_point: str | None, name: str, size: int
) -> dict[str, Any] | None:
    """The base point's disk of that name, if its table lines up with this disk's chunks."""
    if base_point is None:
        return None
    try:
        manifest = app.repo.get_manifest(base_point)
    except ObjectMissing:
        raise BaseGone(
            f"point {base_point}, which this upload compared against, was deleted during it: "
            "run the backup again"
        ) from None
    for disk in manifest.get("disks", []):
        if (
            disk.get("name") == name
            and disk.get("size") == size
            and disk.get("chunk_size") == app.repo.config.disk_chunk_size
        ):
            return dict(disk)
    return None


def base_table(app: Appliance, session: IngestSession, name: str) -> Iterator[bytes]:
    """The chunk table (raw IDs, slice by slice) of disk ``name`` in the session's base point;
    nothing when there is no base or its disk of that name has another size."""
    disk = next((d for d in session.disks if d["name"] == name), None)
    if disk is None:
        raise InvalidInput(f"this session declared no disk {name[:80]!r}")
    entry = _base_disk(app, session.base_point, name, disk["size"])
    for hex_id in entry["tables"] if entry else ():
        yield app.repo.read_blob(bytes.fromhex(hex_id))


def _base_ids(app: Appliance, entry: dict[str, Any] | None) -> bytes | None:
    if entry is None:
        return None
    return b"".join(app.repo.read_blob(bytes.fromhex(h)) for h in entry["tables"])


class _Tables:
    """The uploaded tables as one stream of IDs, read batch file by batch file."""

    def __init__(self, paths: list[str]) -> None:
        self._paths = iter(paths)
        self._buffer = bytearray()
        self._decompressor = zstandard.ZstdDecompressor()

    def take(self, count: int) -> bytes:
        want = count * fmt.ID_SIZE
        while len(self._buffer) < want:
            path = next(self._paths, None)
            if path is None:
                raise InvalidInput("the chunk tables are shorter than the declared disks")
            self._buffer += self._read(path)
        out = bytes(self._buffer[:want])
        del self._buffer[:want]
        return out

    def _read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            try:
                with self._decompressor.stream_reader(f) as reader:
                    data = reader.read()
            except zstandard.ZstdError as exc:
                raise InvalidInput(f"a chunk table batch does not decompress: {exc}") from None
        return data

    def check_end(self) -> None:
        if self._buffer or any(self._read(p) for p in self._paths):
            raise InvalidInput("the chunk tables are longer than the declared disks")


def finish_image(
    app: Appliance,
    session: IngestSession,
    batch_paths: list[str],
    *,
    stats: dict[str, Any],
    warnings: list[dict[str, str]],
) -> BackupOutcome:
    """Check the uploaded tables and make the image point (see the module docstring)."""
    chunk_size = app.repo.config.disk_chunk_size
    tables = _Tables(batch_paths)
    uploaded = session.known
    reported = stats.get("bytes_read")
    credited = {"new": False}

    def reader(declared: dict[str, Any]) -> Any:
        def read(
            name: str, base: dict[str, Any] | None, ranges: Any
        ) -> tuple[dict[str, Any], DiskStats, list[IndexEntry]]:
            size = declared["size"]
            chunks = chunk_count(size, chunk_size)
            table = tables.take(chunks)
            previous_entry = _base_disk(app, session.base_point, name, size)
            previous = _base_ids(app, previous_entry)
            # What the engine compares against may be newer than the session's base (another
            # point made meanwhile): "changed" is counted against it, as for other image points.
            compared = previous
            if base is None or base.get("size") != size:
                compared = None
            elif previous_entry is None or base.get("tables") != previous_entry.get("tables"):
                compared = _base_ids(app, base)
            disk_stats = DiskStats(size=size)
            checked: set[bytes] = set()
            for i in range(chunks):
                pos = i * fmt.ID_SIZE
                chunk_id = table[pos : pos + fmt.ID_SIZE]
                if chunk_id == fmt.ZERO_ID:
                    disk_stats.zero_chunks += 1
                    continue
                if compared is None or compared[pos : pos + fmt.ID_SIZE] != chunk_id:
                    disk_stats.changed_chunks += 1
                if previous is not None and previous[pos : pos + fmt.ID_SIZE] == chunk_id:
                    continue  # the base point, present under this lock, holds it
                if chunk_id in checked:
                    continue
                if chunk_id not in uploaded:
                    raise InvalidInput(
                        f"disk {name}, chunk {i}: {chunk_id.hex()[:16]} was neither uploaded "
                        "nor at this place in the base point"
                    )
                if not app.repo.index.contains(chunk_id):
                    raise InvalidInput(
                        f"disk {name}, chunk {i}: the store does not hold {chunk_id.hex()[:16]}"
                    )
                checked.add(chunk_id)
            writer = app.repo.writer()
            slice_bytes = fmt.TABLE_SLICE_ENTRIES * fmt.ID_SIZE
            entry = {
                "name": name,
                "source": f"{session.source}#{name}",
                "format": "raw",
                "size": size,
                "chunk_size": chunk_size,
                "identity": None,
                "tables": [
                    writer.put(fmt.BLOB_TABLE, table[i : i + slice_bytes]).hex()
                    for i in range(0, len(table), slice_bytes)
                ],
                "allocated": (chunks - disk_stats.zero_chunks) * chunk_size,
            }
            disk_stats.new_bytes = writer.new_bytes
            if not credited["new"]:
                # The chunks came through the session, not per disk: the first disk carries
                # them, and the bytes the client says it read (the appliance read nothing).
                credited["new"] = True
                disk_stats.new_bytes += session.new_bytes
                if isinstance(reported, int) and 0 <= reported <= MAX_DISK_BYTES * MAX_DISKS:
                    disk_stats.bytes_read = reported
            return entry, disk_stats, writer.flush()

        return read

    names = [d["name"] for d in session.disks]
    return app._image_point(
        session.asset,
        mode=session.mode,
        spec=default_spec(session.asset, names),
        source=session.source,
        readers=[(d["name"], reader(d)) for d in session.disks],
        changed_ranges=None,
        cpu=CpuMeter(),
        warnings=warnings,
        before_record=tables.check_end,
    )
