"""One conformance scenario for tape drives: the virtual drive and the real Linux st driver.

:func:`run_scenario` drives a :class:`hardware.tape.drive.Drive` through everything the tape
code relies on and raises :class:`ConformanceFailure` at the first disagreement. It runs

* in CI against :class:`hardware.tape.virtual.VirtualDrive` (``tests/test_tape_drive.py``);
* against the real st driver inside a QEMU guest with tgt's virtual tape library, as a script
  that needs only the standard library and ``hardware/tape/*.py`` (Debian's ``python3`` in the
  guest, no virtual environment)::

      python3 -m tests.tape_conformance /dev/nst0 [--protected /dev/nst1] [--fill-block 65536]
          [--load-command 'mtx -f /dev/sg1 unload 1 0; mtx -f /dev/sg1 load 1 0']
          [--without CAPABILITY ...]

  It prints one line per step and ``CONFORMANCE OK`` at the end, and exits 1 at the first
  failure (2 for bad arguments). ``--protected`` names a second drive holding a write-protected
  tape; without it the write-protection step says it did not run. ``--load-command`` puts the
  tape back after the unload step (through the changer); without it the script sends MTLOAD.
  ``--without CAPABILITY`` (repeatable; see :data:`CAPABILITIES`) tells it what the drive
  cannot do at all: those checks print "not run" (on the step's line) and navigation uses
  rewind and spacing instead of locate. Against tgt all five are needed: it implements neither
  READ POSITION, LOCATE, ERASE nor a physical end, spaces back over files one record short and
  reports spacing into end of data without BLANK CHECK (docs/hardware.md, "Tape").

The cartridge must be small (a few MiB): the last step writes until the early warning and the
physical end of the tape. Everything on it is overwritten.

The scenario checks only what the Drive contract promises, which is what both the SSC standard
and st guarantee: logical block addresses (st's file/block counters only where st keeps them:
not after a locate, a backward space or at end of data), a filemark read as ``b""`` once, end of
data raising ``EndOfData`` without moving, and st's filemark written implicitly when the tape
moves back or the drive is closed right after a write.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable

from hardware.tape.drive import (
    Drive,
    EndOfData,
    EndOfMedium,
    MediumError,
    NoMedium,
    TapeError,
    WriteProtected,
)

#: The read buffer for every block of the scenario but the fill. Larger than twice any block:
#: QEMU's iSCSI passthrough (the guest test bed) delivers only ``buffer - block`` bytes of a block
#: read into a larger buffer (the rest reads as zeros: 70000 bytes into 128 KiB came back with
#: zeros from byte 61072 on, the same read into 1 MiB was right), so a buffer at least twice the
#: block keeps that bug of the test bed out of the st driver's results.
BIG = 1 << 20

#: ``reload(write_protected)``: the drive closed or unloaded, put the SAME cartridge back (or,
#: for ``True``, a write-protected one) and return a ready drive. Raise ``NotImplementedError``
#: when a write-protected cartridge cannot be had.
Reload = Callable[[bool], Drive]


class ConformanceFailure(AssertionError):
    """The drive did something the Drive contract does not allow."""


def payload(tag: str, size: int) -> bytes:
    """``size`` deterministic bytes that differ for each tag."""
    seed = hashlib.sha256(tag.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def check(condition: object, message: str) -> None:
    if not condition:
        raise ConformanceFailure(message)


def expect_error(kind: type[BaseException], action: Callable[[], object], what: str) -> None:
    """``action`` must raise ``kind`` (or a subclass); anything else is a failure."""
    try:
        result = action()
    except kind:
        return
    except Exception as exc:
        raise ConformanceFailure(
            f"{what}: expected {kind.__name__}, got {type(exc).__name__}: {exc}"
        ) from exc
    if isinstance(result, bytes):
        shown = f"a block of {len(result)} bytes" if result else "a filemark"
        if result and not any(result):
            shown += " (all zeros)"
    else:
        shown = repr(result)[:200]
    raise ConformanceFailure(f"{what}: expected {kind.__name__}, got {shown}")


def logical(drive: Drive) -> int:
    return drive.position().logical_block


def at(drive: Drive, expected: int, what: str) -> None:
    found = logical(drive)
    check(found == expected, f"{what}: at logical block {found}, expected {expected}")


def read_expect(drive: Drive, expected: bytes, what: str, max_size: int = BIG) -> None:
    data = drive.read_block(max_size)
    if data != expected:
        shown = f"{len(data)} bytes" if data else "a filemark"
        raise ConformanceFailure(f"{what}: read {shown}, expected {len(expected)} bytes")


def read_filemark(drive: Drive, what: str) -> None:
    data = drive.read_block(BIG)
    check(data == b"", f"{what}: read a block of {len(data)} bytes where a filemark should be")


#: What a drive may lack, each named by ``--without`` (the virtual drive lacks nothing). A step
#: or check that needs a capability the caller says is missing prints that it did not run;
#: navigation falls back to rewind and spacing.
CAPABILITIES = {
    "position": "READ POSITION and LOCATE (position(), locate())",
    "erase": "the short ERASE",
    "end-of-medium": "the physical end of the tape (the early warning is checked regardless)",
    "backward-file-spacing": "SPACE backward over filemarks (tgt counts the mark ahead of the head)",
    "eod-spacing": "SPACE into the end of data reported as blank tape (tgt reports no sense)",
}


def run_scenario(
    drive: Drive,
    reload: Reload,
    *,
    say: Callable[[str], None] = print,
    fill_block: int = 65536,
    max_fill_blocks: int = 4096,
    without: frozenset[str] = frozenset(),
) -> Drive:
    """Run every step on ``drive``; returns the drive in use at the end (still open).

    ``without`` names capabilities of :data:`CAPABILITIES` the drive does not have (tgt's
    emulated drive, for one): what needs them is reported as not run, never silently passed.
    """
    unknown = set(without) - set(CAPABILITIES)
    if unknown:
        raise ValueError(f"unknown capabilities: {', '.join(sorted(unknown))}")
    return _Scenario(drive, reload, say, fill_block, max_fill_blocks, without).run()


# Layout written by step 2 (logical block addresses count blocks and filemarks):
#   0 A0(1000) 1 A1(70000) 2 A2(5) 3 FM | 4 B0(4096) 5 B1(4096) 6 FM | 7 C0(333) 8 FM(implicit)
# then 9..12 F0..F3 (512 each) 13 FM (step 7), 14 G0 15 FM (step 9).
A = [payload("A0", 1000), payload("A1", 70000), payload("A2", 5)]
B = [payload("B0", 4096), payload("B1", 4096)]
C0 = payload("C0", 333)
F = [payload(f"F{index}", 512) for index in range(4)]
G0 = payload("G0", 2000)
H0 = payload("H0", 777)
K0 = payload("K0", 1234)


class _Scenario:
    def __init__(
        self,
        drive: Drive,
        reload: Reload,
        say: Callable[[str], None],
        fill_block: int,
        max_fill_blocks: int,
        without: frozenset[str],
    ) -> None:
        self.drive = drive
        self.reload = reload
        self.say = say
        self.fill_block = fill_block
        self.max_fill_blocks = max_fill_blocks
        self.without = without
        self.not_run: list[str] = []

    def run(self) -> Drive:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("beginning of tape", self.step_bot),
            ("variable blocks and filemarks", self.step_write_files),
            ("filemark written before rewind after a write", self.step_implicit_filemark),
            ("reading files, filemarks and end of data", self.step_read_files),
            ("spacing over filemarks", self.step_space_files),
            ("spacing over blocks", self.step_space_blocks),
            ("fixed blocks", self.step_fixed_blocks),
            ("position and locate", self.step_locate),
            ("end of data, then append", self.step_append),
            ("overwrite in the middle truncates what follows", self.step_overwrite),
            ("read buffer smaller than the block", self.step_small_buffer),
            ("short erase", self.step_erase),
            ("filemark written on close after a write", self.step_close_filemark),
            ("unload and load again", self.step_unload),
            ("write protection", self.step_write_protect),
            ("early warning and end of medium", self.step_end_of_medium),
        ]
        for number, (name, step) in enumerate(steps, start=1):
            started = time.monotonic()
            self.not_run = []
            try:
                step()
            except ConformanceFailure as exc:
                raise ConformanceFailure(f"step {number} ({name}): {exc}") from exc
            except TapeError as exc:
                raise ConformanceFailure(
                    f"step {number} ({name}): unexpected {type(exc).__name__}: {exc}"
                ) from exc
            elapsed = time.monotonic() - started
            note = f"; not run: {'; '.join(self.not_run)}" if self.not_run else ""
            self.say(f"step {number:2d} {name}: ok ({elapsed:.2f} s{note})")
        return self.drive

    # --- helpers that respect what the drive lacks ----------------------------------------

    def can(self, capability: str, what: str) -> bool:
        if capability in self.without:
            self.not_run.append(f"{what} (no {capability})")
            return False
        return True

    def at(self, logical: int, file: int | None, block: int | None, what: str) -> None:
        """Check the position: the logical address, else st's own file/block counters."""
        if "position" not in self.without:
            at(self.drive, logical, what)
            if file is None or block is None:
                return
        elif file is None or block is None:
            self.can("position", f"position {what}")
            return
        status = self.drive.status()
        found = (status.file_number, status.block_number)
        check(found == (file, block), f"{what}: at file/block {found}, expected {(file, block)}")

    def goto(self, logical: int, file: int, block: int) -> None:
        """locate(), or (without it) rewind and space over files and blocks to the same place."""
        if "position" in self.without:
            self.drive.rewind()
            self.drive.space_filemarks(file)
            self.drive.space_blocks(block)
        else:
            self.drive.locate(logical)

    # --- the steps ------------------------------------------------------------------------

    def step_bot(self) -> None:
        drive = self.drive
        drive.set_block_size(0)
        drive.rewind()
        status = drive.status()
        check(status.loaded, "the drive says no tape is loaded")
        check(status.at_bot, "after rewind the drive is not at the beginning of tape")
        check(status.block_size == 0, f"variable blocks asked, block size {status.block_size}")
        self.at(0, 0, 0, "after rewind")

    def step_write_files(self) -> None:
        drive = self.drive
        for index, block in enumerate(A):
            self.at(index, 0, index, f"before A{index}")
            check(drive.write_block(block) is False, "early warning on an empty tape")
        drive.write_filemarks(1)
        self.at(4, 1, 0, "after the first filemark")
        for block in B:
            check(drive.write_block(block) is False, "early warning on an empty tape")
        drive.write_filemarks(1)
        check(drive.write_block(C0) is False, "early warning on an empty tape")
        self.at(8, 2, 1, "after writing C0")

    def step_implicit_filemark(self) -> None:
        self.drive.rewind()  # the last operation was a write: a filemark goes to 8 first
        self.at(0, 0, 0, "after rewind")
        check(self.drive.status().at_bot, "after rewind the drive is not at BOT")

    def step_read_files(self) -> None:
        drive = self.drive
        for index, block in enumerate(A):
            read_expect(drive, block, f"A{index}")
        read_filemark(drive, "end of file 0")
        self.at(4, 1, 0, "after the first filemark")
        for index, block in enumerate(B):
            read_expect(drive, block, f"B{index}")
        read_filemark(drive, "end of file 1")
        read_expect(drive, C0, "C0")
        read_filemark(drive, "the filemark written by rewind after C0")
        self.at(9, 3, 0, "after the implicit filemark")
        expect_error(EndOfData, lambda: drive.read_block(BIG), "reading at end of data")
        self.at(9, None, None, "after reading at end of data (must not move)")
        expect_error(EndOfData, lambda: drive.read_block(BIG), "reading at end of data again")
        self.at(9, None, None, "after reading at end of data twice")
        check(drive.status().at_eod, "status does not say end of data after reading into it")

    def step_space_files(self) -> None:
        drive = self.drive
        drive.rewind()
        drive.space_filemarks(2)
        self.at(7, 2, 0, "after spacing forward over 2 filemarks")
        read_expect(drive, C0, "C0 after spacing")
        if self.can("backward-file-spacing", "spacing back over filemarks"):
            drive.space_filemarks(-1)  # back over the mark at 6: before it
            self.at(6, None, None, "after spacing back over 1 filemark")
            read_filemark(drive, "the mark spaced back over")
            read_expect(drive, C0, "C0 after spacing back and forward")
            drive.space_filemarks(-2)  # back over 6 and 3: before the mark at 3
            self.at(3, None, None, "after spacing back over 2 filemarks")
            read_filemark(drive, "the first filemark")
            read_expect(drive, B[0], "B0 after spacing back")
        else:
            self.goto(5, 1, 1)
        drive.space_filemarks(1)
        self.at(7, 2, 0, "after spacing forward to file 2")
        if self.can("eod-spacing", "spacing past the last filemark"):
            expect_error(EndOfData, lambda: drive.space_filemarks(5), "spacing past the last mark")

    def step_space_blocks(self) -> None:
        drive = self.drive
        drive.rewind()
        drive.space_blocks(2)
        self.at(2, 0, 2, "after spacing forward over 2 blocks")
        read_expect(drive, A[2], "A2 after spacing blocks")
        drive.space_blocks(-2)
        self.at(1, 0, 1, "after spacing back over 2 blocks")
        read_expect(drive, A[1], "A1 after spacing back")

    def step_fixed_blocks(self) -> None:
        drive = self.drive
        drive.seek_eod()
        self.at(9, None, None, "at end of data")
        drive.set_block_size(512)
        check(drive.status().block_size == 512, "the block size is not 512 after setting it")
        expect_error(TapeError, lambda: drive.write_block(b"x" * 100), "a short fixed block")
        for block in F:
            drive.write_block(block)
        drive.write_filemarks(1)  # F at 9..12, a filemark at 13, end of data at 14
        self.goto(9, 3, 0)
        for index, block in enumerate(F):
            read_expect(drive, block, f"F{index} in fixed mode", max_size=512)
        read_filemark(drive, "the filemark after the fixed blocks")
        drive.set_block_size(0)
        self.goto(10, 3, 1)
        read_expect(drive, F[1], "a fixed block read in variable mode")

    def step_locate(self) -> None:
        drive = self.drive
        if not self.can("position", "locate() and position()"):
            return
        drive.locate(1)
        read_expect(drive, A[1], "A1 after locate")
        drive.locate(4)
        read_expect(drive, B[0], "B0 after locate")
        drive.locate(6)
        read_filemark(drive, "the filemark located at 6")
        at(drive, 7, "after reading the located filemark")
        drive.locate(12)
        read_expect(drive, F[3], "F3 after locate")
        drive.locate(0)
        at(drive, 0, "after locating 0")

    def step_append(self) -> None:
        drive = self.drive
        drive.rewind()
        drive.seek_eod()
        self.at(14, None, None, "at end of data")
        drive.write_block(G0)
        drive.write_filemarks(1)  # G0 at 14, a filemark at 15, end of data at 16
        drive.rewind()
        drive.space_filemarks(4)
        self.at(14, 4, 0, "at the appended file")
        read_expect(drive, G0, "the appended block")
        read_filemark(drive, "the appended filemark")
        expect_error(EndOfData, lambda: drive.read_block(BIG), "reading after the appended file")

    def step_overwrite(self) -> None:
        drive = self.drive
        self.goto(4, 1, 0)
        drive.write_block(H0)
        drive.write_filemarks(1)  # H0 at 4, a filemark at 5, end of data at 6: the rest is gone
        drive.rewind()
        drive.space_filemarks(1)
        read_expect(drive, H0, "the block written over file 1")
        read_filemark(drive, "the filemark after it")
        expect_error(EndOfData, lambda: drive.read_block(BIG), "reading what was overwritten")
        drive.rewind()
        drive.seek_eod()
        self.at(6, None, None, "end of data after the overwrite")

    def step_small_buffer(self) -> None:
        drive = self.drive
        self.goto(1, 0, 1)
        expect_error(MediumError, lambda: drive.read_block(1000), "70000-byte block, 1000 buffer")
        self.goto(1, 0, 1)
        read_expect(drive, A[1], "the same block with a large buffer")

    def step_erase(self) -> None:
        drive = self.drive
        if not self.can("erase", "the short erase"):
            return
        self.goto(2, 0, 2)
        drive.erase()  # end of data at 2: A2 and everything after it gone
        expect_error(EndOfData, lambda: drive.read_block(BIG), "reading after the erase point")
        drive.rewind()
        read_expect(drive, A[0], "A0 after the erase")
        read_expect(drive, A[1], "A1 after the erase")
        expect_error(EndOfData, lambda: drive.read_block(BIG), "reading the erased A2")
        drive.rewind()
        drive.seek_eod()
        self.at(2, None, None, "end of data after the erase")

    def step_close_filemark(self) -> None:
        drive = self.drive
        drive.rewind()
        drive.write_block(K0)  # at BOT: the whole tape is now K0; close writes a filemark at 1
        drive.close()
        drive = self.drive = self.reload(False)
        drive.set_block_size(0)
        drive.rewind()
        read_expect(drive, K0, "the block written before close")
        read_filemark(drive, "the filemark written by close")
        expect_error(EndOfData, lambda: drive.read_block(BIG), "reading after that filemark")

    def step_unload(self) -> None:
        drive = self.drive
        drive.unload()
        check(not drive.status().loaded, "the drive still says a tape is loaded after unload")
        expect_error(NoMedium, lambda: drive.read_block(BIG), "reading from an empty drive")
        expect_error(NoMedium, lambda: drive.write_block(b"x" * 10), "writing to an empty drive")
        drive.close()
        drive = self.drive = self.reload(False)
        drive.set_block_size(0)
        check(drive.status().loaded, "the tape is not loaded after loading it again")
        drive.rewind()
        read_expect(drive, K0, "K0 after unload and load")

    def step_write_protect(self) -> None:
        self.drive.close()
        try:
            protected = self.reload(True)
        except NotImplementedError as exc:
            self.not_run.append(f"every check ({exc})")
            self.drive = self.reload(False)
            return
        try:
            check(protected.status().write_protected, "the protected tape is not shown so")
            protected.rewind()
            expect_error(WriteProtected, lambda: protected.write_block(b"x" * 10), "writing")
            expect_error(WriteProtected, lambda: protected.write_filemarks(1), "a filemark")
            if self.can("erase", "erasing a protected tape"):
                expect_error(WriteProtected, protected.erase, "erasing")
            protected.rewind()
            with contextlib.suppress(EndOfData):  # reading a protected tape works (or is blank)
                protected.read_block(BIG)
        finally:
            protected.close()
        self.drive = self.reload(False)
        self.drive.set_block_size(0)

    def step_end_of_medium(self) -> None:
        """Fill the tape: the early warning, a trailer after it, then the physical end.

        Without the end-of-medium capability (tgt reports the early warning but never an end)
        it stops three blocks into the early-warning zone.
        """
        drive = self.drive
        drive.rewind()
        physical_end = self.can("end-of-medium", "writing up to the physical end")
        written = 0
        warned_at = -1
        while True:
            check(written < self.max_fill_blocks, f"no end of medium after {written} blocks")
            try:
                warned = drive.write_block(payload(f"fill{written}", self.fill_block))
            except EndOfMedium:
                check(physical_end, "EndOfMedium from a drive said to have no end of medium")
                break
            written += 1
            if warned and warned_at < 0:
                warned_at = written
                check(drive.status().early_warning, "status does not show the early warning")
            check(warned or warned_at < 0, f"block {written}: out of the early-warning zone")
            if not physical_end and warned_at > 0 and written >= warned_at + 3:
                break
        check(warned_at > 0, "the physical end came without an early warning")
        check(written > warned_at, "no block could be written after the early warning")
        drive.write_filemarks(1)  # a writer closes its last file at the end of medium
        drive.rewind()
        for index in range(written):
            expected = payload(f"fill{index}", self.fill_block)
            read_expect(drive, expected, f"fill block {index}", self.fill_block)
        read_filemark(drive, "the filemark after the last fill block")
        expect_error(EndOfData, lambda: drive.read_block(self.fill_block), "after the fill")


# --- the script: the real st driver --------------------------------------------------------


def _st_reload(devnode: str, protected_node: str | None, load_command: str | None) -> Reload:
    from hardware.tape.st import open_st

    def reload(write_protected: bool) -> Drive:
        if write_protected and protected_node is None:
            raise NotImplementedError("no --protected NODE (a drive with a protected tape)")
        node = protected_node if write_protected and protected_node else devnode
        drive = open_st(node, f"serial:conformance-{os.path.basename(node)}")
        if not drive.status().loaded:
            if load_command and node == devnode:
                drive.close()  # st reads the medium's state again at the next open
                subprocess.run(load_command, shell=True, check=True, timeout=300)
                drive = open_st(node, f"serial:conformance-{os.path.basename(node)}")
            else:
                drive.load()
        deadline = time.monotonic() + 60
        while not drive.status().loaded:
            if time.monotonic() > deadline:
                raise ConformanceFailure(f"{node} did not become ready within 60 s")
            time.sleep(0.5)
        return drive

    return reload


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("devnode", help="the non-rewinding node of the drive, e.g. /dev/nst0")
    parser.add_argument("--protected", help="a drive node holding a write-protected tape")
    parser.add_argument("--fill-block", type=int, default=65536, help="block size of the fill")
    parser.add_argument(
        "--load-command",
        help="a shell command that puts the tape back after an unload (e.g. through a changer: "
        "'mtx -f /dev/sg1 unload 1 0; mtx -f /dev/sg1 load 1 0'); default: MTLOAD",
    )
    parser.add_argument(
        "--without",
        action="append",
        default=[],
        choices=sorted(CAPABILITIES),
        help="a capability the drive lacks (repeatable): what needs it is reported as not run",
    )
    args = parser.parse_args(argv)
    reload = _st_reload(args.devnode, args.protected, args.load_command)
    without = frozenset(args.without)
    started = time.monotonic()
    try:
        drive = reload(False)
        drive = run_scenario(drive, reload, fill_block=args.fill_block, without=without)
        drive.close()
    except (ConformanceFailure, TapeError) as exc:
        print(f"CONFORMANCE FAILED: {exc}", flush=True)
        return 1
    lacking = f"; the drive lacks: {', '.join(sorted(without))}" if without else ""
    print(f"CONFORMANCE OK ({time.monotonic() - started:.1f} s{lacking})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
