"""Reading objects back from a media set, and finding a tape's newest set catalog.

:func:`read_objects` reads exactly the objects asked for, in position order
(:func:`hardware.tape.layout.plan_reads`): each tape once, forward, with a locate only where the
next object does not start where the last one ended. ``tape_for(sequence)`` gets the cartridge
into a drive (the job loads it from a library, or waits: "needs tape B") and returns the drive;
every object is checked against the size and SHA-256 the catalog recorded before it is handed on.

:func:`scan_tape` walks a tape file by file (reading only each file's first block, and spacing
over the rest) to its end of data: its label, its data files, and its newest set catalog -- what
``tape scan`` needs on a fresh appliance.

:class:`CountingDrive` wraps a drive to count what a read costs: locates (and rewinds), blocks
and filemarks read. The restore tests and the benchmark report these numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from appliance.errors import IntegrityError
from hardware.tape.drive import Drive, DriveStatus, EndOfData, TapePosition
from hardware.tape.layout import (
    BLOCK_SIZE,
    KIND_CATALOG,
    KIND_HEADER,
    SetCatalog,
    TapeLabel,
    TapeObject,
    frame_kind,
    plan_reads,
)
from hardware.tape.writer import read_label

TapeFor = Callable[[int], Drive]
Sink = Callable[[TapeObject, bytes], None]


class CountingDrive:
    """A :class:`Drive` that counts the positioning and reading done through it."""

    def __init__(self, inner: Drive) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.locates = 0
        self.rewinds = 0
        self.spaces = 0
        self.blocks_read = 0
        self.bytes_read = 0

    @property
    def positions(self) -> int:
        """Positions touched: every locate, rewind and space."""
        return self.locates + self.rewinds + self.spaces

    def describe(self) -> str:
        return self.inner.describe()

    def status(self) -> DriveStatus:
        return self.inner.status()

    def set_block_size(self, size: int) -> None:
        self.inner.set_block_size(size)

    def write_block(self, data: bytes) -> bool:
        return self.inner.write_block(data)

    def read_block(self, max_size: int) -> bytes:
        data = self.inner.read_block(max_size)
        self.blocks_read += 1
        self.bytes_read += len(data)
        return data

    def write_filemarks(self, count: int = 1) -> None:
        self.inner.write_filemarks(count)

    def space_filemarks(self, count: int) -> None:
        self.spaces += 1
        self.inner.space_filemarks(count)

    def space_blocks(self, count: int) -> None:
        self.spaces += 1
        self.inner.space_blocks(count)

    def seek_eod(self) -> None:
        self.spaces += 1
        self.inner.seek_eod()

    def position(self) -> TapePosition:
        return self.inner.position()

    def locate(self, logical_block: int) -> None:
        self.locates += 1
        self.inner.locate(logical_block)

    def rewind(self) -> None:
        self.rewinds += 1
        self.inner.rewind()

    def unload(self) -> None:
        self.inner.unload()

    def erase(self) -> None:
        self.inner.erase()

    def close(self) -> None:
        self.inner.close()


@dataclass
class ReadResult:
    objects: int = 0
    bytes: int = 0
    tapes: list[int] = field(default_factory=list)
    locates: int = 0


def read_object(drive: Drive, obj: TapeObject, *, at: int | None = None) -> bytes:
    """One object's bytes, checked; locates first unless the head is at its block (``at``)."""
    if at != obj.block:
        drive.locate(obj.block)
    parts = []
    for _ in range(obj.blocks):
        block = drive.read_block(BLOCK_SIZE)
        if not block:
            raise IntegrityError(f"{obj.name} on tape is cut short by a filemark")
        parts.append(block)
    data = b"".join(parts)
    if len(data) != obj.size or hashlib.sha256(data).hexdigest() != obj.sha256:
        raise IntegrityError(
            f"{obj.name} read from tape (sequence {obj.sequence}, block {obj.block}) does not "
            "match the set catalog: the tape is damaged or not the one the catalog describes"
        )
    return data


def read_objects(
    catalog: SetCatalog, names: Sequence[str], tape_for: TapeFor, sink: Sink
) -> ReadResult:
    """Read ``names`` from the set (see the module doc), handing each to ``sink``."""
    result = ReadResult()
    drive: Drive | None = None
    sequence = -1
    at: int | None = None
    for obj in plan_reads(catalog, names):
        if obj.sequence != sequence:
            drive = tape_for(obj.sequence)
            sequence = obj.sequence
            result.tapes.append(sequence)
            at = None
        assert drive is not None
        if at != obj.block:
            result.locates += 1
        data = read_object(drive, obj, at=at)
        at = obj.block + obj.blocks
        result.objects += 1
        result.bytes += len(data)
        sink(obj, data)
    return result


def check_label(drive: Drive, catalog: SetCatalog, sequence: int) -> TapeLabel:
    """The label of the tape in ``drive``, which must be the set's tape of ``sequence``."""
    verdict, label = read_label(drive)
    expected = next((m for m in catalog.media if m.sequence == sequence), None)
    if label is None or expected is None or label.label_id != expected.label_id:
        barcode = expected.barcode if expected else "?"
        raise IntegrityError(
            f"the tape in {drive.describe()} is not tape {barcode} (sequence {sequence}) of media "
            f"set {catalog.media_set_id}: its label is {verdict}"
            + (f" (tape {label.barcode} of set {label.media_set_id})" if label else "")
        )
    return label


@dataclass
class TapeScan:
    label: TapeLabel | None
    verdict: str
    data_files: int = 0
    catalog: SetCatalog | None = None
    catalog_block: int | None = None


def _read_file(drive: Drive, first: bytes) -> bytes:
    parts = [first]
    while True:
        try:
            block = drive.read_block(BLOCK_SIZE)
        except EndOfData:
            break
        if not block:
            break
        parts.append(block)
    return b"".join(parts)


def scan_tape(drive: Drive) -> TapeScan:
    """Walk the tape in ``drive`` (see the module doc). The newest readable catalog wins; a
    damaged one is passed over (an older one, or the next tape's, covers the set)."""
    verdict, label = read_label(drive)
    scan = TapeScan(label, verdict)
    if label is None:
        return scan
    try:
        drive.space_filemarks(1)  # past the label's filemark (read_label read its block)
    except EndOfData:
        return scan
    while True:
        start = drive.position().logical_block
        try:
            first = drive.read_block(BLOCK_SIZE)
        except EndOfData:
            break
        if not first:
            continue  # an empty file
        kind = frame_kind(first)
        if kind == KIND_CATALOG:
            try:
                catalog = SetCatalog.decode(_read_file(drive, first))
            except IntegrityError:
                continue
            if scan.catalog is None or catalog.generation >= scan.catalog.generation:
                scan.catalog, scan.catalog_block = catalog, start
            continue
        if kind == KIND_HEADER:
            scan.data_files += 1
        try:
            drive.space_filemarks(1)
        except EndOfData:
            break  # a file a crash left without its filemark
    return scan
