"""A real tape drive through the Linux st driver: ioctls on the non-rewinding ``nst`` node.

The drive is opened with ``O_NONBLOCK`` so that an empty drive can still be opened and asked
for its status (st then does not wait for a medium; reads and writes still block). Everything
the driver does is reached through three ioctls of ``linux/mtio.h``:

* ``MTIOCTOP`` with ``struct mtop {short mt_op; int mt_count;}`` (8 bytes with its padding):
  rewind, offline, space, write filemarks, end of data, seek, block size, short erase, load,
  and at open the driver option for SCSI-2 logical block addresses (``MT_ST_SCSI2LOGICAL``:
  without it st's MTIOCPOS/MTSEEK use device-specific addresses);
* ``MTIOCGET`` with ``struct mtget`` (five ``long`` and two ``int``: 48 bytes on x86-64), decoded
  by :func:`hardware.tape.drive.decode_status`;
* ``MTIOCPOS`` with ``struct mtpos {long mt_blkno;}``: the logical block address ``locate`` takes.

The ioctl numbers are computed the way ``<asm-generic/ioctl.h>`` does (:func:`ioc`) and checked
against the x86-64 values in the tests. What the driver answers is turned into the errors of
:mod:`hardware.tape.drive` by :func:`error_for`, a pure function of the errno, the operation and
the status bits, following the st documentation:

* writing into the early-warning zone: the write that meets it succeeds (``GMT_EOT`` is then
  set); the next write fails with ENOSPC and wrote nothing; the one after it is allowed to
  proceed (for a trailer), and so on alternately until the physical end. :meth:`StDrive.write_block`
  retries once after ENOSPC: if the retry succeeds the block is on tape and it returns True; a
  second refusal is the physical end (:class:`EndOfMedium`, the block is not on tape);
* at the end of recorded data a read returns 0 bytes (twice, then EIO) with ``GMT_EOD`` set:
  that is :class:`EndOfData`, while 0 bytes without ``GMT_EOD`` is a filemark
  (:func:`read_result`);
* ENOMEM on a read: the block is larger than the read buffer (:class:`MediumError`);
* EROFS/EACCES: write protected; ENOMEDIUM, or EIO with the door open: no medium; EBUSY: the
  drive is held by another process.

st itself writes a filemark on ``close`` (and before rewind, offline, backward space over files
and seek) when the last operation was a write; :class:`hardware.tape.virtual.VirtualDrive`
copies that behaviour.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from hardware.tape.drive import (
    GMT_DR_OPEN,
    GMT_EOD,
    GMT_EOT,
    GMT_ONLINE,
    DriveBusy,
    DriveStatus,
    EndOfData,
    EndOfMedium,
    MediumError,
    NoMedium,
    TapeError,
    TapePosition,
    WriteProtected,
    decode_status,
)

# --- ioctl numbers (asm-generic/ioctl.h) and structures (linux/mtio.h) ------------------------

_IOC_WRITE = 1
_IOC_READ = 2


def ioc(direction: int, kind: str, number: int, size: int) -> int:
    """An ioctl request number: direction (2 bits), size (14), type (8), number (8)."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | number


MTOP = struct.Struct("@hi")  # struct mtop: short mt_op; int mt_count (padded to 8 bytes)
MTGET = struct.Struct("@lllllii")  # type, resid, dsreg, gstat, erreg, fileno, blkno
MTPOS = struct.Struct("@l")  # struct mtpos: long mt_blkno

MTIOCTOP = ioc(_IOC_WRITE, "m", 1, MTOP.size)  # 0x40086d01 on x86-64
MTIOCGET = ioc(_IOC_READ, "m", 2, MTGET.size)  # 0x80306d02
MTIOCPOS = ioc(_IOC_READ, "m", 3, MTPOS.size)  # 0x80086d03

# mt_op codes (linux/mtio.h): fixed by the kernel ABI, never renumber.
MTFSF = 1  # forward space over filemarks
MTBSF = 2  # backward space over filemarks (ends before the mark)
MTFSR = 3  # forward space over records
MTBSR = 4  # backward space over records
MTWEOF = 5  # write filemarks
MTREW = 6  # rewind
MTOFFL = 7  # rewind and put the drive off line (eject)
MTEOM = 12  # to the end of recorded data
MTERASE = 13  # erase (count 0: short erase)
MTSETBLK = 20  # block size (0: variable)
MTSEEK = 22  # to a logical block address
MTSETDRVBUFFER = 24  # driver options (root only)
MTLOAD = 30  # load the medium

# MTSETDRVBUFFER arguments: set the boolean option "SCSI-2 logical block addresses", so that
# MTIOCPOS and MTSEEK use logical block numbers (blocks and filemarks from BOT) rather than the
# device-specific addresses st uses by default (the BT bit of READ POSITION / LOCATE).
MT_ST_SETBOOLEANS = 0x30000000
MT_ST_SCSI2LOGICAL = 0x800

_OP_NAMES = {
    MTFSF: "space forward over filemarks",
    MTBSF: "space backward over filemarks",
    MTFSR: "space forward over blocks",
    MTBSR: "space backward over blocks",
    MTWEOF: "write filemarks",
    MTREW: "rewind",
    MTOFFL: "unload",
    MTEOM: "space to the end of data",
    MTERASE: "erase",
    MTSETBLK: "set the block size",
    MTSEEK: "locate",
    MTLOAD: "load",
    MTSETDRVBUFFER: "set driver options",
}


def pack_mtop(op: int, count: int) -> bytes:
    """``struct mtop`` for MTIOCTOP."""
    return MTOP.pack(op, count)


def unpack_mtget(raw: bytes) -> tuple[int, int, int, int]:
    """(gstat, dsreg, file number, block number) from the bytes MTIOCGET filled in."""
    _type, _resid, dsreg, gstat, _erreg, fileno, blkno = MTGET.unpack(raw)
    # The long fields are signed in C; the status words are bit sets.
    return gstat & 0xFFFFFFFF, dsreg & 0xFFFFFFFF, fileno, blkno


# --- errno -> domain errors (pure) ------------------------------------------------------------

#: Operations as :func:`error_for` knows them: the ``mt_op`` codes, plus these two.
OP_READ = -1
OP_WRITE = -2
OP_OPEN = -3
OP_POSITION = -4  # MTIOCPOS


_OTHER_OPS = {
    OP_READ: "read",
    OP_WRITE: "write",
    OP_OPEN: "open",
    OP_POSITION: "report its position",
}


def error_for(err: int, op: int, gstat: int, drive: str) -> TapeError:
    """The domain error for ``errno`` ``err`` from operation ``op`` with status bits ``gstat``.

    ``drive`` names the drive in the message. ENOSPC on a write is *not* mapped here to the
    early-warning case: :meth:`StDrive.write_block` handles the st alternation first and only
    asks this function once the retry failed too.
    """
    what = _OP_NAMES.get(op, _OTHER_OPS.get(op, "use"))
    no_medium = bool(gstat & GMT_DR_OPEN) or not gstat & GMT_ONLINE
    if err == errno.ENOMEDIUM or (err == errno.EIO and no_medium and op != OP_OPEN):
        return NoMedium(f"There is no tape in {drive} (could not {what}).")
    if err == errno.EBUSY:
        return DriveBusy(f"{drive} is in use by another process.")
    if err in (errno.EROFS, errno.EACCES):
        return WriteProtected(f"The tape in {drive} is write protected (could not {what}).")
    if err == errno.ENOSPC and op in (OP_WRITE, MTWEOF):
        return EndOfMedium(
            f"The tape in {drive} is full (physical end of tape): the {what} was not done."
        )
    if err == errno.ENOMEM and op == OP_READ:
        return MediumError(f"{drive}: the block is larger than the read buffer.")
    if err == errno.EIO and gstat & GMT_EOD and op in (OP_READ, MTFSF, MTFSR, MTSEEK):
        return EndOfData(f"{drive} reached the end of the recorded data.")
    if err == errno.EIO and op in (MTBSF, MTBSR):
        return TapeError(f"{drive} reached the beginning of tape or a filemark (could not {what}).")
    if err == errno.EIO and op == MTFSR:
        return TapeError(f"{drive} met a filemark while spacing forward over blocks.")
    if err == errno.EIO and op == OP_READ:
        return MediumError(f"{drive} could not read the block (medium or drive error).")
    if err == errno.EIO and op in (OP_POSITION, MTSEEK, MTERASE):
        return TapeError(
            f"{drive} could not {what}: the drive refused it (it may not support the command)."
        )
    if err == errno.EINVAL:
        return TapeError(f"{drive} refused to {what}: the request is not valid for this drive.")
    if err in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
        return TapeError(f"{drive} does not exist (no such tape device).")
    return TapeError(f"{drive} could not {what}: {os.strerror(err)}.")


def read_result(data: bytes, gstat: int, drive: str) -> bytes:
    """What a ``read()`` of one block that returned ``data`` means, given the status after it.

    0 bytes is a filemark, unless st says end of data (``GMT_EOD``): then it is blank tape. One
    block was asked for, so st cannot have met the end of data after delivering one: data with
    ``GMT_EOD`` set is not a block either (QEMU's iSCSI passthrough, the guest test bed, hands
    st a full buffer of stale bytes for the blank check at the end of data).
    """
    if gstat & GMT_EOD:
        raise EndOfData(f"{drive} is at the end of the recorded data.")
    return data


# --- the drive --------------------------------------------------------------------------------


class StDrive:
    """A drive of the Linux st driver, open on its ``nst`` node (see the module docstring)."""

    def __init__(self, fd: int, devnode: str, identity: str, read_only: bool) -> None:
        self._fd = fd
        self.devnode = devnode
        self.identity = identity
        self.read_only = read_only  # opened O_RDONLY (st refused O_RDWR: protected tape)
        self._fixed: int | None = None  # the block size, once known (0: variable)

    def describe(self) -> str:
        return f"tape drive {self.devnode}"

    # --- raw access ------------------------------------------------------------------------

    def _fileno(self) -> int:
        if self._fd < 0:
            raise TapeError(f"{self.describe()} is closed.")
        return self._fd

    def _mtget(self) -> tuple[int, int, int, int]:
        raw = fcntl.ioctl(self._fileno(), MTIOCGET, bytes(MTGET.size))
        return unpack_mtget(raw)

    def _gstat(self) -> int:
        try:
            return self._mtget()[0]
        except OSError:
            return 0

    def _error(self, exc: OSError, op: int) -> TapeError:
        return error_for(exc.errno or errno.EIO, op, self._gstat(), self.describe())

    def _op(self, op: int, count: int) -> None:
        try:
            fcntl.ioctl(self._fileno(), MTIOCTOP, pack_mtop(op, count))
        except OSError as exc:
            raise self._error(exc, op) from exc

    # --- the Drive protocol ----------------------------------------------------------------

    def status(self) -> DriveStatus:
        try:
            gstat, dsreg, fileno, blkno = self._mtget()
        except OSError as exc:
            if exc.errno in (errno.ENOMEDIUM, errno.EIO):
                gstat, dsreg, fileno, blkno = GMT_DR_OPEN, 0, -1, -1
            else:
                raise self._error(exc, OP_OPEN) from exc
        return decode_status(gstat, dsreg, fileno, blkno)

    def set_block_size(self, size: int) -> None:
        self._op(MTSETBLK, size)
        self._fixed = size

    def _block_size(self) -> int:
        if self._fixed is None:
            self._fixed = self.status().block_size
        return self._fixed

    def write_block(self, data: bytes) -> bool:
        if self.read_only:
            raise WriteProtected(f"The tape in {self.describe()} is write protected.")
        if not data:
            raise TapeError(f"{self.describe()}: an empty block cannot be written.")
        fixed = self._block_size()
        if fixed and len(data) != fixed:
            raise TapeError(
                f"{self.describe()} is in fixed-block mode ({fixed} bytes): "
                f"a block of {len(data)} bytes cannot be written."
            )
        fd = self._fileno()
        try:
            written = os.write(fd, data)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise self._error(exc, OP_WRITE) from exc
            # Early warning: st refused this write, and lets the next one through (trailer).
            try:
                written = os.write(fd, data)
            except OSError as again:
                raise self._error(again, OP_WRITE) from again
            self._check_written(written, len(data))
            return True
        self._check_written(written, len(data))
        return bool(self._gstat() & GMT_EOT)

    def _check_written(self, written: int, wanted: int) -> None:
        if written != wanted:
            raise EndOfMedium(
                f"The tape in {self.describe()} is full: only {written} of {wanted} bytes "
                "of the block were accepted."
            )

    def read_block(self, max_size: int) -> bytes:
        fd = self._fileno()
        fixed = self._block_size()
        if fixed and max_size < fixed:
            raise MediumError(
                f"{self.describe()}: the block is larger than the read buffer "
                f"(fixed blocks of {fixed} bytes, buffer {max_size})."
            )
        try:
            # In fixed-block mode st fills the whole buffer with as many blocks as fit: ask
            # for exactly one.
            data = os.read(fd, fixed or max_size)
        except OSError as exc:
            raise self._error(exc, OP_READ) from exc
        return read_result(data, self._gstat(), self.describe())

    def write_filemarks(self, count: int = 1) -> None:
        if self.read_only:
            raise WriteProtected(f"The tape in {self.describe()} is write protected.")
        self._op(MTWEOF, count)

    def space_filemarks(self, count: int) -> None:
        if count > 0:
            self._op(MTFSF, count)
        elif count < 0:
            self._op(MTBSF, -count)

    def space_blocks(self, count: int) -> None:
        if count > 0:
            self._op(MTFSR, count)
        elif count < 0:
            self._op(MTBSR, -count)

    def seek_eod(self) -> None:
        self._op(MTEOM, 1)

    def position(self) -> TapePosition:
        fd = self._fileno()
        try:
            raw = fcntl.ioctl(fd, MTIOCPOS, bytes(MTPOS.size))
            _gstat, _dsreg, fileno, blkno = self._mtget()
        except OSError as exc:
            raise self._error(exc, OP_POSITION) from exc
        (logical,) = MTPOS.unpack(raw)
        return TapePosition(file_number=fileno, block_number=blkno, logical_block=logical)

    def locate(self, logical_block: int) -> None:
        self._op(MTSEEK, logical_block)

    def rewind(self) -> None:
        self._op(MTREW, 1)

    def unload(self) -> None:
        self._op(MTOFFL, 1)

    def use_logical_addresses(self) -> bool:
        """Ask st for logical block addresses in MTIOCPOS/MTSEEK; False when not allowed.

        The option is global to the drive and needs root; without it the addresses are the
        drive's own, which still round-trip between :meth:`position` and :meth:`locate`.
        """
        try:
            fcntl.ioctl(
                self._fileno(),
                MTIOCTOP,
                pack_mtop(MTSETDRVBUFFER, MT_ST_SETBOOLEANS | MT_ST_SCSI2LOGICAL),
            )
        except OSError:
            return False
        return True

    def load(self) -> None:
        """Load the medium (MTLOAD): after an unload, or when a changer put one in the drive."""
        self._op(MTLOAD, 0)

    def erase(self) -> None:
        if self.read_only:
            raise WriteProtected(f"The tape in {self.describe()} is write protected.")
        self._op(MTERASE, 0)  # 0: the short erase (an end-of-data mark here)

    def close(self) -> None:
        """Close the node; st writes a filemark first when the last operation was a write."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError as exc:
                raise error_for(exc.errno or errno.EIO, MTWEOF, 0, self.describe()) from exc


def open_st(devnode: str, identity: str) -> StDrive:
    """Open a drive on its ``nst`` node: read-write, or read-only when the tape is protected."""
    flags = os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(devnode, os.O_RDWR | flags)
        read_only = False
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES):
            raise error_for(
                exc.errno or errno.EIO, OP_OPEN, GMT_ONLINE, f"tape drive {devnode}"
            ) from exc
        try:
            fd = os.open(devnode, os.O_RDONLY | flags)
        except OSError as again:
            raise error_for(
                again.errno or errno.EIO, OP_OPEN, GMT_ONLINE, f"tape drive {devnode}"
            ) from again
        read_only = True
    drive = StDrive(fd, devnode, identity, read_only)
    drive.use_logical_addresses()
    return drive
