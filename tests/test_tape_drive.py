"""The tape drive: the conformance scenario on the virtual drive, and st.py's pure parts.

The same scenario runs against the real st driver inside a QEMU guest (tests/test_tape_guest.py).
Here the st adapter is checked on numbers: ioctl request numbers, struct layouts, status words
recorded from the driver's ABI, and the errno mapping.
"""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tape_conformance import ConformanceFailure, payload, run_scenario

from hardware.tape import st
from hardware.tape.drive import (
    GMT_BOT,
    GMT_DR_OPEN,
    GMT_EOD,
    GMT_EOF,
    GMT_EOT,
    GMT_IM_REP_EN,
    GMT_ONLINE,
    GMT_WR_PROT,
    DriveBusy,
    DriveStatus,
    EndOfData,
    EndOfMedium,
    MediumError,
    NoMedium,
    TapeError,
    TapePosition,
    WriteProtected,
    block_size_of,
    decode_status,
    density_of,
    gstat_flags,
)
from hardware.tape.virtual import HEADER_SIZE, VirtualCartridge, VirtualDrive

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def _cartridge(tmp_path: Path, name: str = "c1", **kwargs: int) -> Path:
    path = tmp_path / f"{name}.vtape"
    VirtualCartridge.create(
        path,
        capacity=kwargs.get("capacity", 2 * MIB),
        early_warning=kwargs.get("early_warning", 256 * 1024),
        barcode=name.upper() + "L6",
    )
    return path


def _loaded(path: Path, name: str = "d0") -> VirtualDrive:
    drive = VirtualDrive(name)
    drive.load(path)
    return drive


# --- the scenario on the virtual drive -------------------------------------------------------


def test_conformance_scenario_on_the_virtual_drive(tmp_path: Path) -> None:
    path = _cartridge(tmp_path)

    def reload(write_protected: bool) -> VirtualDrive:
        VirtualCartridge.set_write_protected(path, write_protected)
        return _loaded(path)

    lines: list[str] = []
    drive = run_scenario(_loaded(path), reload, say=lines.append)
    drive.close()
    assert len(lines) == 16
    assert all(": ok (" in line for line in lines)
    assert not any("not run" in line for line in lines)


def test_the_scenario_without_positions_navigates_by_spacing(tmp_path: Path) -> None:
    """What tgt lacks is named, reported as not run, and the rest still runs."""
    path = _cartridge(tmp_path)

    class NoPositions(VirtualDrive):
        def position(self) -> TapePosition:
            raise TapeError("this drive cannot report its position")

        def locate(self, logical_block: int) -> None:
            raise TapeError("this drive cannot locate")

    def reload(write_protected: bool) -> VirtualDrive:
        VirtualCartridge.set_write_protected(path, write_protected)
        drive = NoPositions("nopos")
        drive.load(path)
        return drive

    lines: list[str] = []
    without = frozenset({"position", "erase", "end-of-medium"})
    run_scenario(reload(False), reload, say=lines.append, without=without).close()
    assert len(lines) == 16
    joined = "\n".join(lines)
    assert "step  8 position and locate: ok" in joined
    assert "locate() and position() (no position)" in joined
    assert "the short erase (no erase)" in joined
    assert "writing up to the physical end (no end-of-medium)" in joined
    with pytest.raises(ValueError, match="unknown capabilities: speed"):
        run_scenario(reload(False), reload, without=frozenset({"speed"}))


def test_the_scenario_catches_a_drive_that_keeps_data_after_an_overwrite(tmp_path: Path) -> None:
    """The scenario can fail: a drive with tgt's overwrite bug does not pass it."""
    path = _cartridge(tmp_path)

    class KeepsOldData(VirtualDrive):
        def _truncate_at(self, logical: int) -> None:  # "forgets" to cut what follows
            if logical >= len(self._offsets):
                super()._truncate_at(logical)

    def reload(write_protected: bool) -> VirtualDrive:
        drive = KeepsOldData("bad")
        drive.load(path)
        return drive

    with pytest.raises(ConformanceFailure, match="overwrite"):
        run_scenario(reload(False), reload, say=lambda line: None)


def test_the_script_runs_the_scenario_and_reports_a_missing_device(tmp_path: Path) -> None:
    """The guest runs it as ``python3 -m tests.tape_conformance NODE`` with the system Python."""
    result = subprocess.run(
        ["/usr/bin/python3", "-m", "tests.tape_conformance", str(tmp_path / "nst9")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "CONFORMANCE FAILED" in result.stdout
    assert "does not exist" in result.stdout


# --- the virtual drive beyond the scenario ----------------------------------------------------


def test_cartridge_header_barcode_and_protection(tmp_path: Path) -> None:
    path = _cartridge(tmp_path, "abc")
    assert VirtualCartridge.barcode_of(path) == "ABCL6"
    assert path.stat().st_size == HEADER_SIZE
    with pytest.raises(FileExistsError):
        VirtualCartridge.create(path, capacity=MIB, early_warning=0, barcode="X")
    with pytest.raises(ValueError, match="barcode"):
        VirtualCartridge.create(tmp_path / "b", capacity=MIB, early_warning=0, barcode="")
    with pytest.raises(ValueError, match="early-warning"):
        VirtualCartridge.create(tmp_path / "c", capacity=MIB, early_warning=MIB, barcode="C")
    VirtualCartridge.set_write_protected(path, True)
    drive = _loaded(path)
    assert drive.status().write_protected
    with pytest.raises(WriteProtected, match="ABCL6"):
        drive.write_block(b"data")
    drive.close()
    VirtualCartridge.set_write_protected(path, False)
    drive = _loaded(path)
    assert not drive.status().write_protected
    drive.close()


def test_not_a_cartridge_and_missing_cartridge(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello" * 100)
    drive = VirtualDrive("d0")
    with pytest.raises(MediumError, match="not a virtual tape cartridge"):
        drive.load(junk)
    with pytest.raises(NoMedium, match="no virtual cartridge"):
        drive.load(tmp_path / "absent")
    assert drive.unloaded
    assert drive.loaded_path is None
    status = drive.status()
    assert not status.loaded
    assert status.file_number == -1
    for action in (drive.rewind, drive.seek_eod, drive.position, lambda: drive.read_block(10)):
        with pytest.raises(NoMedium, match="no cartridge in virtual drive d0"):
            action()


def test_a_cartridge_is_held_by_one_drive(tmp_path: Path) -> None:
    path = _cartridge(tmp_path)
    first = _loaded(path, "d0")
    with pytest.raises(DriveBusy, match="in use"):
        _loaded(path, "d1")
    with pytest.raises(TapeError, match="already holds"):
        first.load(path)
    first.unload()
    assert first.unloaded
    second = _loaded(path, "d1")
    assert second.loaded_path == path
    second.close()


def test_file_and_block_numbers_and_spacing_across_filemarks(tmp_path: Path) -> None:
    drive = _loaded(_cartridge(tmp_path))
    for tag in ("a", "b", "c"):
        drive.write_block(tag.encode() * 10)
    drive.write_filemarks(2)
    drive.write_block(b"d" * 10)
    status = drive.status()
    assert (status.file_number, status.block_number, status.at_eod) == (2, 1, True)
    drive.rewind()
    with pytest.raises(TapeError, match="filemark"):
        drive.space_blocks(5)  # SSC: stops past the filemark
    assert drive.position().logical_block == 4
    drive.locate(2)
    with pytest.raises(TapeError, match="beginning of tape"):
        drive.space_blocks(-3)
    assert drive.position().logical_block == 0
    drive.locate(5)
    with pytest.raises(TapeError, match="filemark"):
        drive.space_blocks(-1)  # backward: stops before the filemark
    assert drive.position().logical_block == 4
    with pytest.raises(TapeError, match="beginning of tape"):
        drive.space_filemarks(-3)
    assert drive.status().at_bot
    with pytest.raises(EndOfData):
        drive.locate(99)
    with pytest.raises(TapeError, match="1 to"):
        drive.write_block(b"")
    drive.close()


def test_backward_space_right_after_a_write_counts_the_implicit_filemark(tmp_path: Path) -> None:
    """st writes a filemark first and spaces back over one more: -1 lands before file 1's mark."""
    drive = _loaded(_cartridge(tmp_path))
    drive.write_block(b"a" * 10)
    drive.write_filemarks(1)
    drive.write_block(b"b" * 10)  # at 2; the implicit filemark goes to 3
    drive.space_filemarks(-1)
    assert drive.position().logical_block == 1
    drive.seek_eod()
    assert drive.position().logical_block == 4
    drive.close()


def test_early_warning_status_follows_the_head(tmp_path: Path) -> None:
    path = _cartridge(tmp_path, capacity=64 * 1024, early_warning=16 * 1024)
    drive = _loaded(path)
    results = []
    while True:
        try:
            results.append(drive.write_block(b"z" * 8192))
        except EndOfMedium as exc:
            assert "not written" in str(exc)
            break
    # A record is 16 bytes of header and its block: 5 end below 48 KiB (the early-warning
    # point), the 6th and 7th inside the zone, the 8th would end past 64 KiB.
    assert results == [False] * 5 + [True] * 2
    assert drive.status().early_warning
    drive.rewind()
    assert not drive.status().early_warning
    drive.close()


def test_write_after_close_reopens_at_bot_and_sees_everything(tmp_path: Path) -> None:
    path = _cartridge(tmp_path)
    drive = _loaded(path)
    drive.set_block_size(0)
    drive.write_block(b"x" * 100)
    drive.close()  # implicit filemark
    size_after_close = path.stat().st_size
    drive = _loaded(path)
    assert drive.status().at_bot
    assert drive.read_block(1000) == b"x" * 100
    assert drive.read_block(1000) == b""
    drive.close()  # reading only: no filemark
    assert path.stat().st_size == size_after_close


_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    from hardware.tape.virtual import VirtualDrive
    drive = VirtualDrive("victim")
    drive.load({path!r})
    for index in range(3):
        drive.write_block(bytes([index]) * 65536)
    drive.write_filemarks(1)
    drive.write_block(b"after the mark" * 1000)
    print("written", flush=True)
    sys.stdin.read()
    """
)


def test_kill_9_after_a_write_keeps_every_written_block(tmp_path: Path) -> None:
    """What a crash loses: nothing written (the page cache outlives the process); no filemark."""
    path = _cartridge(tmp_path)
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER.format(repo=str(REPO), path=str(path))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "written"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    drive = _loaded(path)  # the flock died with the process
    for index in range(3):
        assert drive.read_block(MIB) == bytes([index]) * 65536
    assert drive.read_block(MIB) == b""
    assert drive.read_block(MIB) == b"after the mark" * 1000
    with pytest.raises(EndOfData):
        drive.read_block(MIB)  # killed: close never wrote its filemark
    drive.close()


def test_a_torn_last_record_ends_the_data_and_is_cut_by_the_next_write(tmp_path: Path) -> None:
    path = _cartridge(tmp_path)
    drive = _loaded(path)
    drive.write_block(b"kept" * 100)
    drive.write_filemarks(1)
    drive.close()
    with open(path, "ab") as f:  # a header promising 4096 bytes, then only 10 of them
        f.write(struct.pack("<4sIQ", b"BLK1", 4096, 2) + b"0123456789")
    drive = _loaded(path)
    assert drive.read_block(1000) == b"kept" * 100
    assert drive.read_block(1000) == b""
    with pytest.raises(EndOfData):
        drive.read_block(1000)
    drive.write_block(b"new")
    drive.close()
    drive = _loaded(path)
    drive.locate(2)
    assert drive.read_block(10) == b"new"
    assert drive.read_block(10) == b""
    drive.close()


def test_locate_is_independent_of_the_number_of_records(tmp_path: Path) -> None:
    path = _cartridge(tmp_path, capacity=64 * MIB, early_warning=MIB)
    drive = _loaded(path)
    for index in range(20_000):
        drive.write_block(index.to_bytes(4, "big"))
        if index % 1000 == 999:
            drive.write_filemarks(1)
    drive.close()
    started = time.perf_counter()
    drive = _loaded(path)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    for target in range(0, 20_000, 7):
        drive.locate(target)
        drive.position()
    per_locate = (time.perf_counter() - started) / (20_000 // 7)
    drive.locate(20_019)  # 20 000 blocks and 20 marks: the last record
    assert drive.read_block(10) == b""
    drive.locate(19_999 + 19)
    assert drive.read_block(10) == (19_999).to_bytes(4, "big")
    drive.close()
    assert per_locate < 1e-4, per_locate
    assert load_s < 2.0, load_s


# --- st.py's pure parts -----------------------------------------------------------------------


def test_ioctl_numbers_and_struct_sizes_match_x86_64() -> None:
    assert st.MTOP.size == 8
    assert st.MTGET.size == 48
    assert st.MTPOS.size == 8
    assert st.MTIOCTOP == 0x40086D01
    assert st.MTIOCGET == 0x80306D02
    assert st.MTIOCPOS == 0x80086D03


def test_mtop_packing() -> None:
    assert st.pack_mtop(st.MTFSF, 3) == struct.pack("<hxxi", 1, 3)
    assert st.pack_mtop(st.MTERASE, 0) == bytes([13, 0, 0, 0, 0, 0, 0, 0])
    assert st.pack_mtop(st.MTSEEK, 70000)[4:] == (70000).to_bytes(4, "little")
    logical = st.pack_mtop(st.MTSETDRVBUFFER, st.MT_ST_SETBOOLEANS | st.MT_ST_SCSI2LOGICAL)
    assert logical == bytes.fromhex("1800000000080030")


def test_mtget_unpacking_and_status_decoding() -> None:
    # What st reports for a loaded, writable tape in variable mode at BOT (mt_type 0x72 =
    # MT_ISSCSI2), density 0x46 (LTO-4) in mt_dsreg's high byte.
    raw = struct.pack(
        "<qqqqqii", 0x72, 0, 0x46000000, GMT_BOT | GMT_ONLINE | GMT_IM_REP_EN, 0, 0, 0
    )
    gstat, dsreg, fileno, blkno = st.unpack_mtget(raw)
    assert gstat_flags(gstat) == ["BOT", "ONLINE", "IM_REP_EN"]
    assert (block_size_of(dsreg), density_of(dsreg)) == (0, 0x46)
    assert decode_status(gstat, dsreg, fileno, blkno) == DriveStatus(
        loaded=True,
        write_protected=False,
        at_bot=True,
        at_eod=False,
        early_warning=False,
        file_number=0,
        block_number=0,
        block_size=0,
    )
    # A signed long with bit 31 set (GMT_EOF) must still decode as the bit.
    raw = struct.pack("<qqqqqii", 0x72, 0, 512, GMT_EOF | GMT_ONLINE | GMT_WR_PROT, 0, 3, 0)
    status = decode_status(*st.unpack_mtget(raw))
    assert status.write_protected and status.loaded and status.block_size == 512
    assert (status.file_number, status.block_number) == (3, 0)
    status = decode_status(GMT_ONLINE | GMT_EOD | GMT_EOT, 0, 5, -1)
    assert status.at_eod and status.early_warning and status.block_number == -1


def test_an_empty_drive_decodes_as_not_loaded() -> None:
    status = decode_status(GMT_DR_OPEN | GMT_IM_REP_EN, 0, -1, -1)
    assert not status.loaded
    assert not status.at_bot and not status.at_eod
    assert (status.file_number, status.block_number) == (-1, -1)
    assert not decode_status(GMT_ONLINE | GMT_DR_OPEN, 0, 0, 0).loaded


@pytest.mark.parametrize(
    ("err", "op", "gstat", "kind", "words"),
    [
        (errno.ENOMEDIUM, st.OP_READ, 0, NoMedium, "no tape"),
        (errno.EIO, st.OP_WRITE, GMT_DR_OPEN, NoMedium, "no tape"),
        (errno.EBUSY, st.OP_OPEN, GMT_ONLINE, DriveBusy, "in use"),
        (errno.EROFS, st.OP_WRITE, GMT_ONLINE, WriteProtected, "write protected"),
        (errno.EACCES, st.MTWEOF, GMT_ONLINE, WriteProtected, "write protected"),
        (errno.ENOSPC, st.OP_WRITE, GMT_ONLINE | GMT_EOT, EndOfMedium, "full"),
        (errno.ENOMEM, st.OP_READ, GMT_ONLINE, MediumError, "larger than the read buffer"),
        (errno.EIO, st.OP_READ, GMT_ONLINE | GMT_EOD, EndOfData, "end of the recorded data"),
        (errno.EIO, st.MTFSF, GMT_ONLINE | GMT_EOD, EndOfData, "end of the recorded data"),
        (errno.EIO, st.OP_READ, GMT_ONLINE, MediumError, "could not read"),
        (errno.EIO, st.MTBSF, GMT_ONLINE | GMT_BOT, TapeError, "beginning of tape"),
        (errno.EINVAL, st.MTSETBLK, GMT_ONLINE, TapeError, "set the block size"),
        (errno.EIO, st.OP_POSITION, GMT_ONLINE, TapeError, "could not report its position"),
        (errno.EIO, st.MTSEEK, GMT_ONLINE, TapeError, "may not support the command"),
        (errno.EIO, st.MTSEEK, GMT_ONLINE | GMT_EOD, EndOfData, "end of the recorded data"),
        (errno.ENOENT, st.OP_OPEN, GMT_ONLINE, TapeError, "does not exist"),
    ],
)
def test_errno_mapping(err: int, op: int, gstat: int, kind: type, words: str) -> None:
    error = st.error_for(err, op, gstat, "tape drive /dev/nst0")
    assert type(error) is kind
    assert words in str(error)
    assert "/dev/nst0" in str(error)


def test_read_result_tells_filemark_block_and_end_of_data() -> None:
    assert st.read_result(b"", GMT_ONLINE | GMT_EOF, "tape drive /dev/nst0") == b""
    assert st.read_result(b"abc", GMT_ONLINE, "tape drive /dev/nst0") == b"abc"
    with pytest.raises(EndOfData, match="/dev/nst0 is at the end of the recorded data"):
        st.read_result(b"", GMT_ONLINE | GMT_EOD, "tape drive /dev/nst0")
    with pytest.raises(EndOfData):  # the guest test bed's stale buffer at the blank check
        st.read_result(bytes(4096), GMT_ONLINE | GMT_EOD, "tape drive /dev/nst0")


def test_open_st_on_a_missing_node_names_it(tmp_path: Path) -> None:
    with pytest.raises(TapeError, match=r"nst7 does not exist"):
        st.open_st(str(tmp_path / "nst7"), "serial:X")


def test_open_st_on_a_file_that_is_not_a_tape(tmp_path: Path) -> None:
    """The ioctls reach a regular file: ENOTTY comes back as a TapeError naming the node."""
    node = tmp_path / "nst0"
    node.write_bytes(b"")
    drive = st.open_st(str(node), "serial:X")
    with pytest.raises(TapeError, match=r"/nst0 could not rewind"):
        drive.rewind()
    drive.close()


# --- speed -------------------------------------------------------------------------------------


def _dd(path: Path, count: int, write: bool) -> float:
    argv = (
        ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={count}", "conv=fsync"]
        if write
        else ["dd", f"if={path}", "of=/dev/null", "bs=1M", f"count={count}"]
    )
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - started


def _virtual(path: Path, count: int, write: bool) -> float:
    block = bytes(MIB)
    drive = VirtualDrive("bench")
    drive.load(path)
    started = time.perf_counter()
    if write:
        for _ in range(count):
            drive.write_block(block)
        drive.write_filemarks(1)
    else:
        for _ in range(count):
            drive.read_block(MIB)
    elapsed = time.perf_counter() - started
    drive.close()
    return elapsed


@pytest.mark.slow
def test_virtual_drive_throughput_against_dd(tmp_path: Path) -> None:
    """1 MiB blocks to and from the same file system as ``dd bs=1M``: at least 0.8x (medians).

    A tape file is durable once its filemark is written (the virtual drive fsyncs there), so
    ``dd`` writes with ``conv=fsync``: both end with the data on disk. Reads come from the page
    cache for both. Runs interleave A/B to share the noise.
    """
    count = 256
    ratios: dict[str, list[float]] = {"write": [], "read": []}
    for round_ in range(5):
        cartridge = tmp_path / f"bench{round_}.vtape"
        VirtualCartridge.create(cartridge, capacity=2 * count * MIB, early_warning=0, barcode="B")
        plain = tmp_path / f"dd{round_}.bin"
        dd_write = _dd(plain, count, write=True)
        vt_write = _virtual(cartridge, count, write=True)
        dd_read = _dd(plain, count, write=False)
        vt_read = _virtual(cartridge, count, write=False)
        ratios["write"].append(dd_write / vt_write)
        ratios["read"].append(dd_read / vt_read)
        cartridge.unlink()
        plain.unlink()
    medians = {kind: sorted(values)[len(values) // 2] for kind, values in ratios.items()}
    print(f"virtual/dd throughput ratios (median of 5): {medians}; all: {ratios}")
    assert medians["write"] >= 0.8, ratios
    assert medians["read"] >= 0.8, ratios


def test_payload_is_deterministic_and_distinct() -> None:
    assert payload("x", 100) == payload("x", 100)
    assert payload("x", 100) != payload("y", 100)
    assert len(payload("x", 70000)) == 70000
