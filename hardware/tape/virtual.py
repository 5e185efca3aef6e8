"""A file-backed virtual tape drive and its cartridges, with the semantics of a real one.

The virtual drive keeps the contract of :class:`hardware.tape.drive.Drive` exactly as the Linux
st driver shows a real drive (``tests/tape_conformance.py`` runs the same scenario against both):
variable or fixed blocks, filemarks, an end of data after the last record written (writing
anywhere truncates what follows), reading a filemark returns ``b""`` once, reading at the end of
data raises :class:`EndOfData` without moving, an early-warning zone and a physical end set by
the cartridge's capacity, write protection, and st's implicit filemark: when the last operation
was a write, ``close``, ``rewind``, ``unload``, ``locate`` and a backward ``space_filemarks``
write a filemark first (for the backward space st then counts one more mark, so ``-1`` still
lands before the mark that ended the *previous* file).

The cartridge file format (version 1; never renumber or reuse the tags)::

    offset 0     header, 4096 bytes:
                 b"APVTAPE1"  magic (8 bytes)
                 u32 format version (1), u32 flags (bit 0: write protected)
                 u64 capacity, u64 early-warning zone (bytes before the physical end)
                 u16 barcode length, the barcode in UTF-8 (at most 64 bytes), zero padding
    offset 4096  records, one after the other, from the beginning of tape:
                 b"BLK1" or b"FMK1" (4 bytes), u32 payload length (0 for a filemark),
                 u64 the record's logical block address, then the payload
    end of file  the end of recorded data

All integers are little-endian. A record's logical block address is its ordinal, so an address
is the index of the record (st's logical block numbers count blocks and filemarks alike).
Capacity is measured in file bytes of the record area (headers included, as inter-block gaps
take tape on a real cartridge): a record that would end past ``capacity`` is not written
(:class:`EndOfMedium`); one that ends within the last ``early_warning`` bytes is written and
reported (``write_block`` returns True). Filemarks are always written, even past the end: a
writer must be able to close its last file at the end of medium, as real cartridges leave room
for that.

The drive keeps an index of every record's offset in memory (built by reading the record
headers when the cartridge is loaded), so ``locate`` is O(1) and file/block numbers are found by
bisecting the list of filemark positions.

Durability: every record is written with one ``os.writev`` before ``write_block`` returns, so a
block written and then the process killed (even ``kill -9``) is on the cartridge: the data is in
the kernel's page cache, which outlives the process. ``write_filemarks``, ``unload`` and
``close`` also ``fsync`` the file, so after a *power loss* at most the records after the last
filemark are lost. Blocks are not ``fsync``-ed one by one: that would cost the throughput a
tape drive needs, and a tape file without its filemark is incomplete to any reader anyway. A
record torn by a crash in the middle of its write (its header or payload runs past the end of
the file, or its header does not carry the next address) ends the recorded data when the
cartridge is next loaded; the next write cuts it off.

A cartridge is held by one drive at a time: loading takes an exclusive ``flock`` on the file
(another holder gets :class:`DriveBusy`), released by ``unload`` and ``close``, and by the
kernel when the process dies.
"""

from __future__ import annotations

import fcntl
import os
import struct
from bisect import bisect_left
from pathlib import Path

from hardware.tape.drive import (
    DriveBusy,
    DriveStatus,
    EndOfData,
    EndOfMedium,
    MediumError,
    NoMedium,
    TapeError,
    TapePosition,
    WriteProtected,
)

MAGIC = b"APVTAPE1"
FORMAT_VERSION = 1
HEADER_SIZE = 4096
FLAG_WRITE_PROTECTED = 0x1
_HEADER = struct.Struct("<8sIIQQH")
_RECORD = struct.Struct("<4sIQ")
TAG_BLOCK = b"BLK1"
TAG_FILEMARK = b"FMK1"
MAX_BARCODE_BYTES = 64
MAX_BLOCK_SIZE = 16 * 1024 * 1024  # the largest block the virtual drive accepts (st: ~16 MiB)
_FLAGS_OFFSET = 12  # where the u32 flags lie inside the header


class VirtualCartridge:
    """Functions on cartridge files: create one, toggle its write-protect tab, read its barcode."""

    @staticmethod
    def create(
        path: str | os.PathLike[str], *, capacity: int, early_warning: int, barcode: str
    ) -> None:
        """Write a blank cartridge of ``capacity`` bytes; refuses to overwrite an existing file."""
        if capacity <= _RECORD.size:
            raise ValueError(f"a cartridge needs a capacity of more than {_RECORD.size} bytes")
        if not 0 <= early_warning < capacity:
            raise ValueError("the early-warning zone must be at least 0 and less than the capacity")
        encoded = barcode.encode("utf-8")
        if not encoded or len(encoded) > MAX_BARCODE_BYTES:
            raise ValueError(f"a barcode has 1 to {MAX_BARCODE_BYTES} bytes, not {len(encoded)}")
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, capacity, early_warning, len(encoded))
        header = (header + encoded).ljust(HEADER_SIZE, b"\0")
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, header)
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def set_write_protected(path: str | os.PathLike[str], protected: bool) -> None:
        """Slide the write-protect tab; a drive sees it when the cartridge is next loaded."""
        header = _read_header(os.fspath(path))
        flags = (
            header.flags | FLAG_WRITE_PROTECTED
            if protected
            else header.flags & ~FLAG_WRITE_PROTECTED
        )
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, struct.pack("<I", flags), _FLAGS_OFFSET)
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def barcode_of(path: str | os.PathLike[str]) -> str:
        """The barcode printed on the cartridge."""
        return _read_header(os.fspath(path)).barcode


class _Header:
    __slots__ = ("barcode", "capacity", "early_warning", "flags")

    def __init__(self, flags: int, capacity: int, early_warning: int, barcode: str) -> None:
        self.flags = flags
        self.capacity = capacity
        self.early_warning = early_warning
        self.barcode = barcode


def _parse_header(path: str, raw: bytes) -> _Header:
    if len(raw) < _HEADER.size or raw[:8] != MAGIC:
        raise MediumError(f"{path} is not a virtual tape cartridge (no cartridge header).")
    _magic, version, flags, capacity, early_warning, length = _HEADER.unpack_from(raw)
    if version != FORMAT_VERSION:
        raise MediumError(
            f"{path} is a virtual cartridge of format {version}, not {FORMAT_VERSION}."
        )
    barcode = raw[_HEADER.size : _HEADER.size + length].decode("utf-8", errors="replace")
    return _Header(flags, capacity, early_warning, barcode)


def _read_header(path: str) -> _Header:
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise NoMedium(f"There is no virtual cartridge at {path}.") from None
    return _parse_header(path, raw)


class VirtualDrive:
    """A tape drive whose cartridges are files (see the module docstring for the format)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.identity = f"virtual:{name}"
        self._fd = -1
        self._path: Path | None = None
        self._header: _Header | None = None
        self._offsets: list[int] = []  # file offset of every record, in tape order
        self._marks: list[int] = []  # logical addresses of the filemarks, ascending
        self._end = HEADER_SIZE  # file offset of the end of data
        self._file_size = HEADER_SIZE  # what the file holds (more after a torn record)
        self._pos = 0  # logical address of the head
        self._block_size = 0
        self._wrote_last = False  # the last operation was write_block: st's implicit filemark
        self._dirty = False  # written since the last fsync

    # --- loading -------------------------------------------------------------------------

    @property
    def unloaded(self) -> bool:
        return self._fd < 0

    @property
    def loaded_path(self) -> Path | None:
        return self._path

    def load(self, path: str | os.PathLike[str]) -> None:
        """Insert the cartridge at ``path``: read its header and index its records."""
        if self._fd >= 0:
            raise TapeError(
                f"Virtual drive {self.name} already holds {self._path}; unload it first."
            )
        spath = os.fspath(path)
        header = _read_header(spath)
        protected = bool(header.flags & FLAG_WRITE_PROTECTED)
        mode = os.O_RDONLY if protected else os.O_RDWR
        fd = os.open(spath, mode | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DriveBusy(
                f"The cartridge {header.barcode} ({spath}) is in use by another drive or process."
            ) from None
        try:
            self._offsets, self._marks, self._end, self._file_size = _scan_records(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._path = Path(spath)
        self._header = header
        self._pos = 0
        self._wrote_last = False
        self._dirty = False

    def _release(self) -> None:
        if self._fd >= 0:
            try:
                if self._dirty:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)  # also drops the flock
        self._fd = -1
        self._path = None
        self._header = None
        self._offsets = []
        self._marks = []
        self._pos = 0
        self._wrote_last = False
        self._dirty = False

    # --- the Drive protocol --------------------------------------------------------------

    def describe(self) -> str:
        return f"virtual drive {self.name}"

    def status(self) -> DriveStatus:
        if self._fd < 0 or self._header is None:
            return DriveStatus(
                loaded=False,
                write_protected=False,
                at_bot=False,
                at_eod=False,
                early_warning=False,
                file_number=-1,
                block_number=-1,
                block_size=self._block_size,
            )
        file_number, block_number = self._file_and_block()
        return DriveStatus(
            loaded=True,
            write_protected=bool(self._header.flags & FLAG_WRITE_PROTECTED),
            at_bot=self._pos == 0,
            at_eod=self._pos == len(self._offsets),
            early_warning=self._offset_of(self._pos) - HEADER_SIZE
            > self._header.capacity - self._header.early_warning,
            file_number=file_number,
            block_number=block_number,
            block_size=self._block_size,
        )

    def set_block_size(self, size: int) -> None:
        if not 0 <= size <= MAX_BLOCK_SIZE:
            raise TapeError(
                f"{self.describe()} takes block sizes from 0 (variable) to {MAX_BLOCK_SIZE}, not {size}."
            )
        self._block_size = size

    def write_block(self, data: bytes) -> bool:
        header = self._writable()
        size = len(data)
        if size == 0 or size > MAX_BLOCK_SIZE:
            raise TapeError(
                f"{self.describe()} writes blocks of 1 to {MAX_BLOCK_SIZE} bytes, not {size}."
            )
        if self._block_size and size != self._block_size:
            raise TapeError(
                f"{self.describe()} is in fixed-block mode ({self._block_size} bytes): "
                f"a block of {size} bytes cannot be written."
            )
        end = self._append(TAG_BLOCK, data, header)
        self._wrote_last = True
        return end - HEADER_SIZE > header.capacity - header.early_warning

    def read_block(self, max_size: int) -> bytes:
        self._loaded()
        self._wrote_last = False
        if self._pos >= len(self._offsets):
            raise EndOfData(f"{self.describe()} is at the end of the recorded data.")
        offset = self._offsets[self._pos]
        tag, length = self._record(offset)
        if tag == TAG_FILEMARK:
            self._pos += 1
            return b""
        if self._block_size and length != self._block_size:
            self._pos += 1
            raise MediumError(
                f"{self.describe()} read a block of {length} bytes in fixed-block mode "
                f"({self._block_size} bytes)."
            )
        if length > max_size:
            self._pos += 1  # the drive has passed the block, as st does
            raise MediumError(
                f"{self.describe()}: the block is larger than the read buffer "
                f"({length} bytes, buffer {max_size})."
            )
        data = os.pread(self._fd, length, offset + _RECORD.size)
        if len(data) != length:
            raise MediumError(f"{self.describe()}: the block at {self._pos} is cut short.")
        self._pos += 1
        return data

    def write_filemarks(self, count: int = 1) -> None:
        header = self._writable()
        if count < 0:
            raise TapeError(f"Cannot write {count} filemarks on {self.describe()}.")
        for _ in range(count):
            self._append(TAG_FILEMARK, b"", header)
        self._wrote_last = False
        self._sync()

    def space_filemarks(self, count: int) -> None:
        self._loaded()
        if count < 0 and self._wrote_last:
            self._implicit_filemark()
            count -= 1
        self._wrote_last = False
        if count > 0:
            first = bisect_left(self._marks, self._pos)
            last = first + count - 1
            if last >= len(self._marks):
                self._pos = len(self._offsets)
                raise EndOfData(
                    f"{self.describe()} reached the end of data before passing {count} filemark(s)."
                )
            self._pos = self._marks[last] + 1
        elif count < 0:
            before = bisect_left(self._marks, self._pos) - 1  # the nearest mark behind the head
            target = before + count + 1
            if target < 0:
                self._pos = 0
                raise TapeError(
                    f"{self.describe()} reached the beginning of tape before "
                    f"passing {-count} filemark(s)."
                )
            self._pos = self._marks[target]  # on the beginning-of-tape side of the mark

    def space_blocks(self, count: int) -> None:
        self._loaded()
        self._wrote_last = False
        if count > 0:
            mark = bisect_left(self._marks, self._pos)
            stop = self._marks[mark] if mark < len(self._marks) else len(self._offsets)
            if self._pos + count <= stop:
                self._pos += count
                return
            if stop == len(self._offsets):
                self._pos = stop
                raise EndOfData(f"{self.describe()} reached the end of data while spacing blocks.")
            self._pos = stop + 1  # SSC: forward over blocks stops past the filemark
            raise TapeError(f"{self.describe()} met a filemark while spacing forward over blocks.")
        if count < 0:
            mark = bisect_left(self._marks, self._pos) - 1
            stop = self._marks[mark] + 1 if mark >= 0 else 0
            if self._pos + count >= stop:
                self._pos += count
                return
            if stop == 0:
                self._pos = 0
                raise TapeError(
                    f"{self.describe()} reached the beginning of tape while spacing blocks."
                )
            self._pos = stop - 1  # SSC: backward over blocks stops before the filemark
            raise TapeError(f"{self.describe()} met a filemark while spacing backward over blocks.")

    def seek_eod(self) -> None:
        self._loaded()
        self._wrote_last = False
        self._pos = len(self._offsets)

    def position(self) -> TapePosition:
        self._loaded()
        file_number, block_number = self._file_and_block()
        return TapePosition(
            file_number=file_number, block_number=block_number, logical_block=self._pos
        )

    def locate(self, logical_block: int) -> None:
        self._loaded()
        if self._wrote_last:
            self._implicit_filemark()
        if logical_block < 0:
            raise TapeError(f"{self.describe()} cannot locate block {logical_block}.")
        if logical_block > len(self._offsets):
            self._pos = len(self._offsets)
            raise EndOfData(
                f"{self.describe()}: block {logical_block} lies beyond the end of data "
                f"({len(self._offsets)})."
            )
        self._pos = logical_block

    def rewind(self) -> None:
        self._loaded()
        if self._wrote_last:
            self._implicit_filemark()
        self._pos = 0

    def unload(self) -> None:
        self._loaded()
        if self._wrote_last:
            self._implicit_filemark()
        self._release()

    def erase(self) -> None:
        self._writable()
        self._wrote_last = False
        self._truncate_at(self._pos)
        self._sync()

    def close(self) -> None:
        if self._fd >= 0 and self._wrote_last:
            self._implicit_filemark()
        self._release()

    # --- internals -----------------------------------------------------------------------

    def _loaded(self) -> _Header:
        if self._fd < 0 or self._header is None:
            raise NoMedium(f"There is no cartridge in {self.describe()}.")
        return self._header

    def _writable(self) -> _Header:
        header = self._loaded()
        if header.flags & FLAG_WRITE_PROTECTED:
            raise WriteProtected(
                f"The cartridge {header.barcode} in {self.describe()} is write protected."
            )
        return header

    def _offset_of(self, logical: int) -> int:
        return self._offsets[logical] if logical < len(self._offsets) else self._end

    def _record(self, offset: int) -> tuple[bytes, int]:
        raw = os.pread(self._fd, _RECORD.size, offset)
        tag, length, _address = _RECORD.unpack(raw)
        return tag, length

    def _file_and_block(self) -> tuple[int, int]:
        marks_behind = bisect_left(self._marks, self._pos)
        file_start = self._marks[marks_behind - 1] + 1 if marks_behind else 0
        return marks_behind, self._pos - file_start

    def _truncate_at(self, logical: int) -> None:
        """Make ``logical`` the end of data: everything from there on is gone."""
        offset = self._offset_of(logical)
        if logical < len(self._offsets):
            del self._offsets[logical:]
            del self._marks[bisect_left(self._marks, logical) :]
        if self._file_size != offset:
            os.ftruncate(self._fd, offset)
            self._file_size = offset
            self._dirty = True
        self._end = offset

    def _append(self, tag: bytes, payload: bytes, header: _Header) -> int:
        """Write one record at the head (the new end of data); returns the file offset after it."""
        self._truncate_at(self._pos)
        start = self._end
        end = start + _RECORD.size + len(payload)
        if tag == TAG_BLOCK and end - HEADER_SIZE > header.capacity:
            raise EndOfMedium(
                f"The cartridge {header.barcode} in {self.describe()} is full "
                "(physical end of tape): the block was not written."
            )
        record = _RECORD.pack(tag, len(payload), self._pos)
        written = (
            os.pwritev(self._fd, [record, payload], start)
            if payload
            else os.pwrite(self._fd, record, start)
        )
        if written != end - start:
            os.ftruncate(self._fd, start)
            raise TapeError(f"{self.describe()} could not write the whole record (disk full?).")
        if tag == TAG_FILEMARK:
            self._marks.append(self._pos)
        self._offsets.append(start)
        self._pos += 1
        self._end = self._file_size = end
        self._dirty = True
        return end

    def _implicit_filemark(self) -> None:
        """st writes a filemark when the tape moves or closes right after a write."""
        header = self._writable()
        self._wrote_last = False
        self._append(TAG_FILEMARK, b"", header)
        self._sync()

    def _sync(self) -> None:
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False


def _scan_records(fd: int) -> tuple[list[int], list[int], int, int]:
    """Index the records of an open cartridge: (offsets, filemarks, end of data, file size).

    Reading stops at the first record that is torn or does not carry the next address: what
    follows it was never acknowledged to a writer (see the module docstring).
    """
    size = os.fstat(fd).st_size
    offsets: list[int] = []
    marks: list[int] = []
    offset = HEADER_SIZE
    while offset + _RECORD.size <= size:
        raw = os.pread(fd, _RECORD.size, offset)
        tag, length, address = _RECORD.unpack(raw)
        if tag not in (TAG_BLOCK, TAG_FILEMARK) or address != len(offsets):
            break
        if (tag == TAG_FILEMARK and length) or length > MAX_BLOCK_SIZE:
            break
        end = offset + _RECORD.size + length
        if end > size:
            break
        if tag == TAG_FILEMARK:
            marks.append(len(offsets))
        offsets.append(offset)
        offset = end
    return offsets, marks, offset, size


__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "VirtualCartridge",
    "VirtualDrive",
]
