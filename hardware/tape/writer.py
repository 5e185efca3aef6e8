"""Writing a store's objects to a media set, tape after tape (layout: :mod:`hardware.tape.layout`).

A write *session* appends data files to the set's current tape and ends with a set catalog. Where
it appends is read from the set's newest catalog, not guessed from the tape: just after that
catalog when it was written on this tape (else after the last data file it lists there, or the
label), and the block before must be a filemark. Anything a crashed session wrote after the
catalog is overwritten. The previous catalog is kept, not overwritten: until the new one is on
tape, it is the tape's newest, so a tape never lacks a catalog (a scan takes the newest).

Spanning: when the drive reports the early-warning zone after a block, the file is ended there
(a filemark), the set catalog so far is written on this tape (the zone is meant for that), and
``next_tape(sequence)`` is asked for the next cartridge: the job loads one (a library) or waits
for one ("needs a new tape of pool P"), labels it and returns the drive holding it and its label. The object that was cut
short is written again whole on the next tape; the catalog lists only complete objects. If the
physical end comes first (:class:`EndOfMedium`: nothing of that block is on tape), the same
happens without the catalog on this tape, which the next tape's catalog covers.

Crash safety: the tapes change only after the catalog's position, and the appliance's catalog
records a set catalog only once it is on tape; a session killed midway is simply run again.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from appliance.errors import IntegrityError
from hardware.tape.drive import Drive, EndOfData, EndOfMedium
from hardware.tape.layout import (
    BLOCK_SIZE,
    KIND_LABEL,
    MAX_OBJECTS_PER_FILE,
    HeaderEntry,
    MediumEntry,
    SetCatalog,
    TapeLabel,
    TapeObject,
    block_count,
    encode_header,
    frame_kind,
    header_fits,
    split_blocks,
)
from hardware.tape.media import LabelVerdict

#: Blocks before the first data file: the label block and its filemark.
FIRST_DATA_BLOCK = 2

ObjectSource = Callable[[str], bytes]
NextTape = Callable[[int], tuple[Drive, TapeLabel]]
Progress = Callable[[int, int], None]


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


# --- labels -----------------------------------------------------------------------------------


def read_label(drive: Drive) -> tuple[LabelVerdict, TapeLabel | None]:
    """Rewind and read the first block: ``blank`` (nothing recorded), ``ours`` (a label of the
    appliance; returned), ``foreign`` (something else recorded) or ``unreadable``."""
    drive.rewind()
    try:
        block = drive.read_block(BLOCK_SIZE)
    except EndOfData:
        return "blank", None
    except Exception:  # a block larger than ours, a medium error: not ours to touch
        return "unreadable", None
    if frame_kind(block) != KIND_LABEL:
        return "foreign", None
    try:
        return "ours", TapeLabel.decode(block)
    except Exception:
        return "unreadable", None


def write_label(drive: Drive, label: TapeLabel) -> None:
    """Label the tape from its beginning: everything it held is gone (the caller decided that
    was allowed: :func:`hardware.tape.media.label_action` and ``may_overwrite``)."""
    drive.set_block_size(0)
    drive.rewind()
    drive.write_block(label.encode())
    drive.write_filemarks(1)


# --- the session ------------------------------------------------------------------------------


def append_point(catalog: SetCatalog, sequence: int) -> tuple[int, int]:
    """Where a session appends on the tape of ``sequence``: (logical block, file number) just
    after the last data file the catalog lists there (or the label), and after the catalog
    itself when it was written on that tape."""
    on_tape = [o for o in catalog.objects if o.sequence == sequence]
    block, file = FIRST_DATA_BLOCK, 1
    if on_tape:
        last = max(on_tape, key=lambda o: o.block + o.blocks)
        block, file = last.block + last.blocks + 1, last.file + 1
    if catalog.written_on == sequence:
        block, file = block + block_count(len(catalog.encode())) + 1, file + 1
    return block, file


@dataclass
class SessionResult:
    catalog: SetCatalog
    objects_written: int = 0
    bytes_written: int = 0
    #: sequence -> bytes of blocks written on that tape in this session.
    per_tape: dict[int, int] = field(default_factory=dict)
    #: Tapes the early warning (or the physical end) filled in this session.
    filled: list[int] = field(default_factory=list)
    catalogs_written: int = 0


class SetWriter:
    """One write session on a media set (see the module doc).

    ``label`` is the tape in the drive (the set's current one, already checked by the caller);
    ``catalog`` the set's newest catalog (a new set: an empty one with the tape in ``media``).
    """

    def __init__(
        self,
        drive: Drive,
        label: TapeLabel,
        catalog: SetCatalog,
        next_tape: NextTape,
        *,
        on_catalog: Callable[[SetCatalog, int], None] | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.drive = drive
        self.label = label
        self.next_tape = next_tape
        self.on_catalog = on_catalog
        self.progress = progress
        self._objects = list(catalog.objects)
        self._known = {o.name for o in catalog.objects}
        self._points = dict(catalog.points)
        self._media = list(catalog.media)
        if not any(m.sequence == label.sequence for m in self._media):
            self._media.append(MediumEntry(label.sequence, label.label_id, label.barcode))
        self.result = SessionResult(catalog)
        self._base = catalog
        drive.set_block_size(0)
        block, self._file = append_point(catalog, label.sequence)
        # The block before is a filemark (of the label, a data file or the catalog): if not, the
        # tape is not what the catalog says, and nothing is written.
        drive.locate(block - 1)
        try:
            mark = drive.read_block(BLOCK_SIZE)
        except EndOfData:
            mark = b"?"
        if mark != b"":
            raise IntegrityError(
                f"tape {label.barcode} in {drive.describe()} does not match the set catalog "
                f"of set {catalog.media_set_id} (no filemark before block {block}): scan it"
            )

    def has(self, name: str) -> bool:
        """Whether the set holds the object already (a dedup-aware copy skips it)."""
        return name in self._known

    def write_objects(
        self, names: Sequence[str], sizes: Sequence[int], source: ObjectSource
    ) -> None:
        """Write the objects (those the set lacks) in data files, spanning tapes as needed."""
        todo = [(n, s) for n, s in zip(names, sizes, strict=True) if n not in self._known]
        while todo:
            count = MAX_OBJECTS_PER_FILE
            while count > 1 and not header_fits([HeaderEntry(n, s, "") for n, s in todo[:count]]):
                count //= 2  # long names: fewer objects per file, so the header fits a block
            group = todo[:count]
            done, full = self._write_file(group, source)
            todo = todo[done:]
            if full:
                self._change_tape()

    def add_point(self, point_id: str, names: Iterable[str]) -> None:
        """Record that the point needs ``names`` (all written by now)."""
        wanted = tuple(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self._known]
        if missing:
            raise IntegrityError(f"point {point_id} needs {missing[0]}, which is not on the set")
        self._points[point_id] = wanted

    def finish(self) -> SessionResult:
        """End the session: the set catalog at the end of the current tape."""
        self._write_catalog()
        return self.result

    # --- inside -------------------------------------------------------------------------------

    def _catalog(self) -> SetCatalog:
        return replace(
            self._base,
            generation=self.result.catalog.generation + 1,
            written_at=now_iso(),
            media=tuple(sorted(self._media, key=lambda m: m.sequence)),
            objects=tuple(self._objects),
            points=dict(self._points),
            written_on=self.label.sequence,
        )

    def _write_catalog(self) -> bool:
        catalog = self._catalog()
        try:
            for block in split_blocks(catalog.encode()):
                self.drive.write_block(bytes(block))
            self.drive.write_filemarks(1)
        except EndOfMedium:
            return False  # the next tape's catalog covers this one
        self.result.catalog = catalog
        self.result.catalogs_written += 1
        if self.on_catalog is not None:
            self.on_catalog(catalog, self.label.sequence)
        return True

    def _write_file(
        self, group: Sequence[tuple[str, int]], source: ObjectSource
    ) -> tuple[int, bool]:
        """One data file; returns how many objects of ``group`` are complete on tape and
        whether the tape is full."""
        seq = self.label.sequence
        entries = [HeaderEntry(n, s, "") for n, s in group]
        try:
            if self.drive.write_block(encode_header(self._base.media_set_id, seq, entries)):
                self._end_file()
                return 0, True
        except EndOfMedium:
            return 0, True
        done = 0
        for name, size in group:
            data = source(name)
            if len(data) != size:
                raise IntegrityError(f"{name} changed size while it was written to tape")
            first = self.drive.position().logical_block
            blocks = 0
            early = False
            try:
                for block in split_blocks(data):
                    early = self.drive.write_block(bytes(block))
                    blocks += 1
                    self._count(len(block))
                    if early:
                        break
            except EndOfMedium:
                self._end_file()
                return done, True
            if blocks * BLOCK_SIZE >= size:  # every block of it is on tape
                self._objects.append(
                    TapeObject(
                        name, size, hashlib.sha256(data).hexdigest(), seq, self._file, first, blocks
                    )
                )
                self._known.add(name)
                self.result.objects_written += 1
                done += 1
            if early:
                self._end_file()
                return done, True
        self.drive.write_filemarks(1)
        self._file += 1
        return done, False

    def _end_file(self) -> None:
        with contextlib.suppress(EndOfMedium):
            self.drive.write_filemarks(1)
        self._file += 1

    def _count(self, size: int) -> None:
        seq = self.label.sequence
        self.result.bytes_written += size
        self.result.per_tape[seq] = self.result.per_tape.get(seq, 0) + size
        if self.progress is not None:
            self.progress(self.result.bytes_written, self.result.objects_written)

    def _change_tape(self) -> None:
        self._write_catalog()
        self.result.filled.append(self.label.sequence)
        self.drive, label = self.next_tape(self.label.sequence + 1)
        self.label = label
        self._media.append(MediumEntry(label.sequence, label.label_id, label.barcode))
        self.drive.set_block_size(0)
        self.drive.locate(FIRST_DATA_BLOCK)  # just after the label write_label wrote
        self._file = 1
