"""The tape drive interface every tape module codes against, and the st driver's status words.

A :class:`Drive` is a sequential medium seen the way the SCSI stream commands (SSC) and the Linux
st driver show it: variable- or fixed-size blocks, filemarks between tape files, an end of data
after the last thing written, an early-warning zone before the physical end. Two implementations
keep exactly the same contract: :mod:`hardware.tape.st` (the real driver, through ioctls on the
non-rewinding ``nst`` node) and :mod:`hardware.tape.virtual` (a file-backed cartridge for tests and
the demo). ``tests/tape_conformance.py`` runs one scenario against both.

The semantics both keep (from SSC and the st driver's documentation):

* writing at a position makes it the new end of data: everything after it is gone;
* reading a filemark returns ``b""`` once and leaves the position just past it;
* reading at end of data raises :class:`EndOfData` and does not move;
* closing a drive after writing writes a filemark (st does so on close of ``nst``; the virtual
  drive emulates it), so a tape file is always terminated;
* logical block addresses (:meth:`Drive.position`, :meth:`Drive.locate`) count blocks *and*
  filemarks from the beginning of tape.

This module has no dependency beyond the standard library: the conformance scenario runs with a
bare Debian ``python3`` inside a QEMU guest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# --- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriveStatus:
    """What a drive says about itself and its medium (MTIOCGET, or the virtual drive's state)."""

    loaded: bool  # a medium is in the drive and ready
    write_protected: bool
    at_bot: bool  # beginning of tape
    at_eod: bool  # end of data (known after reading/spacing into it)
    early_warning: bool  # in the early-warning zone before the physical end
    file_number: int  # filemarks passed since BOT (-1 if unknown)
    block_number: int  # blocks since the last filemark (-1 if unknown)
    block_size: int  # 0 = variable-block mode


@dataclass(frozen=True)
class TapePosition:
    """Where the head is: file and block as st counts them, and the logical block address."""

    file_number: int
    block_number: int
    logical_block: int  # MTIOCPOS: the logical block address, usable with locate()


# --- errors -----------------------------------------------------------------------------------


class TapeError(Exception):
    """A tape operation failed; the message is a sentence a person understands and names the drive."""

    code = "tape_error"


class NoMedium(TapeError):
    """There is no cartridge in the drive (or its door is open)."""

    code = "tape_no_medium"


class WriteProtected(TapeError):
    """The cartridge is write protected."""

    code = "tape_write_protected"


class EndOfMedium(TapeError):
    """The physical end of the tape was reached: the block was NOT written."""

    code = "tape_end_of_medium"


class EndOfData(TapeError):
    """A read or space ran into blank tape: the end of the recorded data."""

    code = "tape_end_of_data"


class MediumError(TapeError):
    """A block could not be read: unreadable, or larger than the read buffer."""

    code = "tape_medium_error"


class DriveBusy(TapeError):
    """Another process holds the drive."""

    code = "tape_drive_busy"


# --- the interface ----------------------------------------------------------------------------


class Drive(Protocol):
    """One tape drive with (or without) a cartridge in it.

    Every method raises :class:`NoMedium` when the drive is empty (except :meth:`describe`,
    :meth:`status` and :meth:`close`), :class:`WriteProtected` for a write to a protected
    cartridge, and :class:`TapeError` subclasses with a sentence naming the drive otherwise.
    """

    identity: str  # "serial:<ID_SCSI_SERIAL>" for real drives, "virtual:<name>"

    def describe(self) -> str:
        """A short name for messages: the device node or the virtual drive's name."""
        ...

    def status(self) -> DriveStatus:
        """The drive's state now; never raises for an empty drive (``loaded`` is then False)."""
        ...

    def set_block_size(self, size: int) -> None:
        """Fixed blocks of ``size`` bytes, or variable blocks for 0."""
        ...

    def write_block(self, data: bytes) -> bool:
        """Write one block at the current position, which becomes the new end of data.

        Returns True when the block WAS written but the tape is now in the early-warning zone:
        the caller should close its file, write its trailer and ask for the next tape. Raises
        :class:`EndOfMedium` when it could not be written (nothing of it is on the tape).
        """
        ...

    def read_block(self, max_size: int) -> bytes:
        """Read one block; ``b""`` when a filemark was read (the position is then past it).

        Raises :class:`EndOfData` at blank tape (without moving) and :class:`MediumError` when
        the block is larger than ``max_size``.
        """
        ...

    def write_filemarks(self, count: int = 1) -> None:
        """Write ``count`` filemarks at the current position (the new end of data)."""
        ...

    def space_filemarks(self, count: int) -> None:
        """Forward past ``count`` filemarks (>0), or backward before ``-count`` of them (<0).

        Backward (MTBSF) leaves the head on the beginning-of-tape side of the last mark passed.
        Raises :class:`EndOfData` when spacing forward runs into blank tape.
        """
        ...

    def space_blocks(self, count: int) -> None:
        """Forward (>0) or backward (<0) over blocks (MTFSR/MTBSR); stops at a filemark."""
        ...

    def seek_eod(self) -> None:
        """Move to the end of recorded data, to append (MTEOM)."""
        ...

    def position(self) -> TapePosition:
        """Where the head is."""
        ...

    def locate(self, logical_block: int) -> None:
        """Move to a logical block address from :meth:`position` (MTSEEK)."""
        ...

    def rewind(self) -> None:
        """Back to the beginning of tape."""
        ...

    def unload(self) -> None:
        """Rewind and eject the cartridge (MTOFFL): the drive is then empty."""
        ...

    def erase(self) -> None:
        """Short erase: the current position becomes the end of data."""
        ...

    def close(self) -> None:
        """Release the drive; writes a filemark first if the last operation was a write."""
        ...


# --- the st driver's status words (linux/mtio.h), decoded by pure functions -------------------

# mt_gstat bits (GMT_* macros). Fixed by the kernel's ABI: never renumber.
GMT_EOF = 0x80000000  # just passed a filemark
GMT_BOT = 0x40000000  # beginning of tape
GMT_EOT = 0x20000000  # end of tape (early warning, or physical end)
GMT_SM = 0x10000000  # just passed a setmark
GMT_EOD = 0x08000000  # at end of recorded data
GMT_WR_PROT = 0x04000000  # medium is write protected
GMT_ONLINE = 0x01000000  # a medium is loaded and ready
GMT_D_6250 = 0x00800000
GMT_D_1600 = 0x00400000
GMT_D_800 = 0x00200000
GMT_DR_OPEN = 0x00040000  # door open: no tape
GMT_IM_REP_EN = 0x00010000  # immediate report mode
GMT_CLN = 0x00008000  # the drive asks for cleaning

# mt_dsreg: block size in the low 24 bits, density code in the high 8.
MT_ST_BLKSIZE_MASK = 0x00FFFFFF
MT_ST_DENSITY_SHIFT = 24
MT_ST_DENSITY_MASK = 0xFF000000

_GSTAT_NAMES = (
    (GMT_EOF, "EOF"),
    (GMT_BOT, "BOT"),
    (GMT_EOT, "EOT"),
    (GMT_SM, "SM"),
    (GMT_EOD, "EOD"),
    (GMT_WR_PROT, "WR_PROT"),
    (GMT_ONLINE, "ONLINE"),
    (GMT_D_6250, "D_6250"),
    (GMT_D_1600, "D_1600"),
    (GMT_D_800, "D_800"),
    (GMT_DR_OPEN, "DR_OPEN"),
    (GMT_IM_REP_EN, "IM_REP_EN"),
    (GMT_CLN, "CLN"),
)


def gstat_flags(gstat: int) -> list[str]:
    """The names of the GMT_* bits set in ``gstat``, as ``mt status`` prints them."""
    return [name for bit, name in _GSTAT_NAMES if gstat & bit]


def block_size_of(dsreg: int) -> int:
    """The block size st reports in ``mt_dsreg`` (0 = variable blocks)."""
    return dsreg & MT_ST_BLKSIZE_MASK


def density_of(dsreg: int) -> int:
    """The density code st reports in ``mt_dsreg`` (0 = the drive's default)."""
    return (dsreg & MT_ST_DENSITY_MASK) >> MT_ST_DENSITY_SHIFT


def decode_status(gstat: int, dsreg: int, file_number: int, block_number: int) -> DriveStatus:
    """A :class:`DriveStatus` from the fields of ``struct mtget``.

    st sets GMT_EOT both in the early-warning zone and at the physical end; for a drive that
    is positioned anywhere readable, that is the early warning the writer must act on. Without
    GMT_ONLINE (or with GMT_DR_OPEN) no medium is ready: positions are then unknown (-1).
    """
    loaded = bool(gstat & GMT_ONLINE) and not gstat & GMT_DR_OPEN
    return DriveStatus(
        loaded=loaded,
        write_protected=bool(gstat & GMT_WR_PROT),
        at_bot=loaded and bool(gstat & GMT_BOT),
        at_eod=loaded and bool(gstat & GMT_EOD),
        early_warning=loaded and bool(gstat & GMT_EOT),
        file_number=file_number if loaded else -1,
        block_number=block_number if loaded else -1,
        block_size=block_size_of(dsreg),
    )
