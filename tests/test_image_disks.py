"""The disk-format plug-in (image/): qemu-img argv and parsers, the NBD client, QemuDisk.

Pure functions are tested directly and on canned output; everything else runs against real
qemu-img and qemu-nbd on images built here from one raw source with known content and holes.
Tests that need qemu-utils fail (never skip) with the install hint when it is missing.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.backup import disks
from appliance.backup.disks import Extent, RawDisk
from appliance.errors import ApplianceError, InvalidInput, SourceError
from image import nbd_client as nbd
from image import qemu_img
from image.disk_source import QEMU_DISK_FORMATS, QemuDisk, QemuDiskFormats, qemu_nbd_argv
from image.nbd_client import NbdClient, NbdError

MiB = 1 << 20
FORMATS = ("raw", "qcow2", "vmdk", "vhdx", "vdi", "vpc")
#: qemu 7.2 reports no allocation for vhdx: the whole disk maps as data (still read correctly).
REPORTS_HOLES = {"raw": True, "qcow2": True, "vmdk": True, "vhdx": False, "vdi": True, "vpc": True}


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def qemu_utils() -> None:
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install it with `{qemu_img.INSTALL_HINT}`")


@dataclass(frozen=True)
class Source:
    path: Path
    content: bytes
    holes: tuple[tuple[int, int], ...]  # never written: sparse in the raw file

    @property
    def size(self) -> int:
        return len(self.content)


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    """20 MiB raw disk: random data (some unaligned), explicit zeros, and 2 MiB-aligned holes."""
    rng = random.Random(20240601)
    size = 20 * MiB
    content = bytearray(size)
    writes = [
        (0, MiB),
        (6 * MiB + 12345, 300_000),
        (16 * MiB, 64 * 1024),
        (size - 100 * 1024, 100 * 1024),
    ]
    path = tmp_path_factory.mktemp("source") / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in writes:
            data = rng.randbytes(length)
            content[offset : offset + length] = data
            f.seek(offset)
            f.write(data)
        f.seek(MiB)
        f.write(bytes(MiB))  # written zeros: data in the raw file, a hole after conversion
    return Source(path, bytes(content), holes=((2 * MiB, 6 * MiB), (8 * MiB, 16 * MiB)))


@pytest.fixture(scope="session")
def images(qemu_utils: None, source: Source, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The source converted by plain qemu-img (independently of write_disk) into every format."""
    out = tmp_path_factory.mktemp("images")
    made = {"raw": source.path}
    for fmt in FORMATS[1:]:
        target = out / f"disk.{fmt}"
        options = ["-o", "force_size=on"] if fmt == "vpc" else []
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                fmt,
                *options,
                str(source.path),
                str(target),
            ],
            check=True,
        )
        made[fmt] = target
    return made


Opener = Callable[[str], disks.DiskImage]


@pytest.fixture
def open_image(images: dict) -> Iterator[Opener]:
    opened: list[disks.DiskImage] = []

    def opener(fmt: str) -> disks.DiskImage:
        disk = disks.open_disk(str(images[fmt]))
        opened.append(disk)
        return disk

    yield opener
    for disk in opened:
        disk.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_extents_cover(extents: list[Extent], size: int) -> None:
    pos = 0
    for i, extent in enumerate(extents):
        assert extent.offset == pos and extent.length > 0
        if i:
            assert extent.zero != extents[i - 1].zero, "adjacent extents of one kind are merged"
        pos += extent.length
    assert pos == size


# --- qemu-img: argv builders (pure) ------------------------------------------------------------


def test_argv_builders() -> None:
    assert qemu_img.info_argv("/d/x.img") == ["qemu-img", "info", "--output=json", "/d/x.img"]
    assert qemu_img.info_argv("/d/x", "qcow2") == [
        "qemu-img", "info", "--output=json", "-f", "qcow2", "/d/x",
    ]  # fmt: skip
    assert qemu_img.map_argv("/d/x", "vmdk") == [
        "qemu-img", "map", "--output=json", "-f", "vmdk", "/d/x",
    ]  # fmt: skip
    assert qemu_img.check_argv("/d/x", "vdi") == [
        "qemu-img", "check", "--output=json", "-f", "vdi", "/d/x",
    ]  # fmt: skip
    assert qemu_img.convert_argv("/r.raw", "/t.qcow2", "qcow2") == [
        "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-S", "4096", "/r.raw", "/t.qcow2",
    ]  # fmt: skip
    assert qemu_img.convert_argv("/r.raw", "/t.vhd", "vpc")[-4:] == [
        "-o", "force_size=on", "/r.raw", "/t.vhd",
    ]  # fmt: skip
    assert qemu_img.convert_argv("/r.raw", "/dev/loop7", "raw", in_place=True) == [
        "qemu-img", "convert", "-f", "raw", "-O", "raw", "-S", "4096", "-n", "/r.raw",
        "/dev/loop7",
    ]  # fmt: skip


def test_argv_builders_refuse_options_in_disguise() -> None:
    for bad in ("qed", "luks", "qcow2 -o x", "-O", ""):
        with pytest.raises(InvalidInput, match="unsupported disk format"):
            qemu_img.map_argv("/d/x", bad)
    for path in ("-f", "json:{}", "nbd:unix:/x", "relative.img"):
        with pytest.raises(ValueError, match="absolute"):
            qemu_img.info_argv(path)
    with pytest.raises(ValueError):
        qemu_nbd_argv("disk.qcow2", "qcow2", "/tmp/s.sock", shared=2)


def test_qemu_nbd_argv() -> None:
    assert qemu_nbd_argv("/i/d.vmdk", "vmdk", "/t/nbd.sock", shared=2) == [
        "qemu-nbd", "--read-only", "--format=vmdk", "--shared=2", "--socket=/t/nbd.sock",
        "--export-name=disk", "/i/d.vmdk",
    ]  # fmt: skip


# --- qemu-img: parsers on canned output --------------------------------------------------------

INFO_QCOW2 = """{
    "virtual-size": 67108864, "filename": "src.qcow2", "cluster-size": 65536,
    "format": "qcow2", "actual-size": 4657152,
    "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zlib",
        "lazy-refcounts": false, "refcount-bits": 16, "corrupt": false, "extended-l2": false}},
    "full-backing-filename": "/images/base.qcow2", "backing-filename": "base.qcow2",
    "dirty-flag": false
}"""

INFO_VMDK_FLAT = """{
    "virtual-size": 1073741824, "filename": "d.vmdk", "format": "vmdk", "actual-size": 4096,
    "format-specific": {"type": "vmdk", "data": {"cid": 1, "parent-cid": 4294967295,
        "create-type": "monolithicFlat", "extents": []}}, "dirty-flag": false
}"""

MAP_QCOW2 = """[{ "start": 0, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
{ "start": 1048576, "length": 4194304, "depth": 0, "present": false, "zero": true, "data": false},
{ "start": 5242880, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "offset": 1376256},
{ "start": 5308416, "length": 65536, "depth": 0, "present": true, "zero": false, "data": false},
{ "start": 5373952, "length": 61734912, "depth": 0, "present": false, "zero": false, "data": false}]
"""


def test_parse_info_canned() -> None:
    info = qemu_img.parse_info(INFO_QCOW2)
    assert info == qemu_img.ImageInfo(
        format="qcow2",
        virtual_size=64 * MiB,
        actual_size=4657152,
        cluster_size=65536,
        backing_filename="/images/base.qcow2",
        encrypted=False,
        corrupt=False,
        single_file=True,
    )
    flat = qemu_img.parse_info(INFO_VMDK_FLAT)
    assert (flat.format, flat.single_file, flat.cluster_size) == ("vmdk", False, None)
    corrupt = json.loads(INFO_QCOW2)
    corrupt["format-specific"]["data"]["corrupt"] = True
    corrupt["format-specific"]["data"]["data-file"] = "/images/data.raw"
    info = qemu_img.parse_info(json.dumps(corrupt))
    assert info.corrupt and not info.single_file


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"format": "qcow2"}'])
def test_parse_info_rejects_garbage(text: str) -> None:
    with pytest.raises(SourceError):
        qemu_img.parse_info(text)


def test_parse_map_canned_and_streamed_in_any_chunking() -> None:
    entries = qemu_img.parse_map(MAP_QCOW2)
    assert [(e.start, e.length, e.depth, e.reads_as_zero, e.offset) for e in entries] == [
        (0, MiB, 0, False, 327680),
        (MiB, 4 * MiB, 0, True, None),
        (5 * MiB, 65536, 1, False, 1376256),
        (5308416, 65536, 0, False, None),  # neither zero nor data: unknown, so read it
        (5373952, 61734912, 0, True, None),  # in no layer of the chain: reads as zeros
    ]
    for width in (1, 7, 64, 4096):
        chunks = [MAP_QCOW2[i : i + width] for i in range(0, len(MAP_QCOW2), width)]
        assert list(qemu_img.iter_map_entries(chunks)) == entries
    assert qemu_img.parse_map("[]") == []


@pytest.mark.parametrize(
    "text", ["", "{}", '[{"start": 0}]', MAP_QCOW2[:200], MAP_QCOW2 + "[]", '[{"start": 0,']
)
def test_parse_map_rejects_garbage(text: str) -> None:
    with pytest.raises(SourceError):
        qemu_img.parse_map(text)


def entry(start: int, length: int, zero: bool, **kw: object) -> qemu_img.MapEntry:
    fields: dict = dict(depth=0, present=not zero, zero=zero, data=not zero, offset=None)
    fields.update(kw)
    return qemu_img.MapEntry(start=start, length=length, **fields)


def test_extents_from_map_merges_fills_gaps_and_cuts_at_size() -> None:
    entries = [
        entry(0, 10, False),
        entry(10, 5, False, depth=1),
        entry(15, 5, True),
        entry(20, 5, True, present=True),
        entry(30, 10, True),  # gap 25..30 before it is data (the safe reading)
        entry(40, 100, False),
    ]
    assert list(qemu_img.extents_from_map(entries, 60)) == [
        Extent(0, 15, False),
        Extent(15, 10, True),
        Extent(25, 5, False),
        Extent(30, 10, True),
        Extent(40, 20, False),
    ]
    # A map that stops short is completed with data; an empty map is all data.
    assert list(qemu_img.extents_from_map([entry(0, 10, True)], 25)) == [
        Extent(0, 10, True),
        Extent(10, 15, False),
    ]
    assert list(qemu_img.extents_from_map([], 8)) == [Extent(0, 8, False)]
    assert list(qemu_img.extents_from_map([], 0)) == []
    with pytest.raises(SourceError, match="out of order"):
        list(qemu_img.extents_from_map([entry(0, 10, False), entry(5, 10, True)], 20))


def test_entry_past_end() -> None:
    cluster = 65536
    inside = entry(0, cluster, False, offset=0)
    assert not qemu_img.entry_past_end(inside, file_size=cluster, cluster_size=cluster)
    # Less than a cluster past the end: a writer may legally leave its last cluster short.
    assert not qemu_img.entry_past_end(inside, file_size=cluster - 100, cluster_size=cluster)
    beyond = entry(0, 3 * cluster, False, offset=cluster)
    assert qemu_img.entry_past_end(beyond, file_size=2 * cluster, cluster_size=cluster)
    backing = entry(0, 3 * cluster, False, offset=cluster, depth=1)
    assert not qemu_img.entry_past_end(backing, file_size=2 * cluster, cluster_size=cluster)


def test_parse_check() -> None:
    ok = '{"check-errors": 0, "filename": "a", "format": "qcow2"}'
    assert qemu_img.parse_check(ok, 0).ok
    leaks = '{"check-errors": 0, "leaks": 3, "format": "qcow2"}'
    assert qemu_img.parse_check(leaks, 3).ok
    corrupt = qemu_img.parse_check('{"corruptions": 56, "check-errors": 0}', 2)
    assert not corrupt.ok and corrupt.corruptions == 56
    assert not qemu_img.parse_check("", 1).ok
    assert not qemu_img.parse_check('{"check-errors": 0}', 2).ok
    unsupported = qemu_img.parse_check("", 63)
    assert unsupported.ok and not unsupported.supported


def test_qemu_message_strips_prefixes() -> None:
    stderr = "qemu-img: Could not open 'x': Image is not in qcow2 format\n\n"
    assert qemu_img.qemu_message(stderr, "f") == "Could not open 'x': Image is not in qcow2 format"
    assert qemu_img.qemu_message("", "fallback") == "fallback"


# --- missing tools and bad formats -------------------------------------------------------------


def test_missing_qemu_img_names_the_install_step(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(4096))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert disks.detect_format(str(raw)) == "raw"  # by its bytes: no qemu-img needed
    for call in (
        lambda: disks.open_disk(str(raw), "qcow2"),
        lambda: disks.write_disk(str(raw), str(tmp_path / "o.qcow2"), "qcow2"),
    ):
        with pytest.raises(InvalidInput, match="apt-get install qemu-utils"):
            call()


def test_unsupported_formats_are_refused(tmp_path: Path) -> None:
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(4096))
    with pytest.raises(InvalidInput, match="unsupported disk format 'qed'"):
        disks.open_disk(str(raw), "qed")
    with pytest.raises(InvalidInput, match="unsupported"):
        disks.write_disk(str(raw), str(tmp_path / "o"), "qcow2,o=x")


@pytest.mark.qemu
def test_detect_refuses_formats_outside_the_allow_list(qemu_utils: None, tmp_path: Path) -> None:
    qed = tmp_path / "d.qed"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qed", str(qed), "1M"], check=True)
    assert disks.detect_format(str(qed)) == "qed"  # named by its magic, refused when opened
    with pytest.raises(InvalidInput, match="unsupported disk format 'qed'"):
        disks.open_disk(str(qed))


# --- reading images through the entry point ----------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_and_open(fmt: str, images: dict, source: Source, open_image: Opener) -> None:
    assert disks.detect_format(str(images[fmt])) == fmt
    assert isinstance(QEMU_DISK_FORMATS, QemuDiskFormats)  # what the entry point names
    disk = open_image(fmt)
    assert disk.format == fmt
    assert disk.size == source.size
    assert isinstance(disk, RawDisk if fmt == "raw" else QemuDisk)


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", FORMATS)
def test_pread_is_byte_exact(fmt: str, source: Source, open_image: Opener) -> None:
    disk = open_image(fmt)
    size, content = source.size, source.content
    rng = random.Random(fmt)
    cases = [
        (0, 0),
        (0, 1),
        (0, size),
        (size - 1, 10),
        (size - 5000, MiB),  # crosses the end: the bytes up to it
        (size, 10),
        (size + 4096, 10),
        (6 * MiB + 12345 - 1, 300_002),
        (MiB - 7, 2 * MiB + 13),
    ]
    cases += [(rng.randrange(size), rng.randrange(1, 3 * MiB)) for _ in range(150)]
    cases += [(rng.randrange(size), rng.randrange(1, 5000)) for _ in range(150)]
    for offset, length in cases:
        assert disk.pread(offset, length) == content[offset : offset + length], (offset, length)


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", FORMATS)
def test_extents_cover_the_disk_and_zero_extents_read_as_zeros(
    fmt: str, source: Source, open_image: Opener
) -> None:
    disk = open_image(fmt)
    extents = list(disk.extents())
    assert_extents_cover(extents, source.size)
    for extent in extents:
        if extent.zero:  # the promise readers rely on to skip them
            assert source.content[extent.offset : extent.offset + extent.length] == bytes(
                extent.length
            )
    if REPORTS_HOLES[fmt]:
        for start, end in source.holes:
            assert any(e.zero and e.offset <= start and end <= e.offset + e.length for e in extents)
    else:
        assert extents == [Extent(0, source.size, False)]


@pytest.mark.qemu
def test_concurrent_reads_share_a_pool_of_connections(images: dict, source: Source) -> None:
    with QemuDisk(str(images["qcow2"]), "qcow2", connections=2) as disk:
        failures: list[BaseException] = []

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                for _ in range(200):
                    offset, length = rng.randrange(source.size), rng.randrange(1, 256 * 1024)
                    if disk.pread(offset, length) != source.content[offset : offset + length]:
                        raise AssertionError(f"mismatch at {offset}+{length}")
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures


@pytest.mark.qemu
def test_close_stops_only_its_qemu_nbd_and_cleans_up(images: dict) -> None:
    disk = QemuDisk(str(images["vmdk"]), "vmdk")
    other = QemuDisk(str(images["vmdk"]), "vmdk")
    workdir = Path(disk._socket).parent
    assert pid_alive(disk.pid) and workdir.is_dir()
    disk.close()
    assert not pid_alive(disk.pid)
    assert not workdir.exists()
    disk.close()  # idempotent
    with pytest.raises(SourceError, match="closed"):
        disk.pread(0, 1)
    assert pid_alive(other.pid) and other.pread(0, 1) is not None
    # A disk dropped without close is cleaned up by its finalizer.
    pid = other.pid
    del other
    gc.collect()
    assert not pid_alive(pid)


# --- damaged images ----------------------------------------------------------------------------


@pytest.fixture
def qcow2_copy(images: dict, tmp_path: Path) -> Path:
    copy = tmp_path / "copy.qcow2"
    shutil.copyfile(images["qcow2"], copy)
    return copy


@pytest.mark.qemu
def test_qcow2_with_a_broken_header_is_a_source_error(qcow2_copy: Path) -> None:
    with open(qcow2_copy, "r+b") as f:
        f.seek(20)  # cluster_bits
        f.write(struct.pack(">I", 48))
    with pytest.raises(SourceError, match="Unsupported cluster size"):
        disks.open_disk(str(qcow2_copy))


@pytest.mark.qemu
@pytest.mark.parametrize("keep", [200, 1_000_000])
def test_truncated_qcow2_is_a_source_error(qcow2_copy: Path, keep: int) -> None:
    os.truncate(qcow2_copy, keep)
    with pytest.raises(SourceError, match="is corrupt: qemu-img check found"):
        disks.open_disk(str(qcow2_copy), "qcow2")


@pytest.mark.qemu
def test_not_a_qcow2_is_a_source_error(source: Source) -> None:
    with pytest.raises(SourceError, match="Image is not in qcow2 format"):
        disks.open_disk(str(source.path), "qcow2")
    with pytest.raises(SourceError, match="No such file"):
        disks.detect_format("/nonexistent/disk.qcow2")


@pytest.mark.qemu
def test_truncated_vdi_fails_in_the_allocation_map(images: dict, tmp_path: Path) -> None:
    # qemu-img check passes a truncated vdi and qemu reads the lost blocks as zeros: the map's
    # host offsets are what give it away.
    copy = tmp_path / "copy.vdi"
    shutil.copyfile(images["vdi"], copy)
    os.truncate(copy, copy.stat().st_size // 2)
    with closing(disks.open_disk(str(copy))) as disk, pytest.raises(SourceError, match="truncated"):
        list(disk.extents())


@pytest.mark.qemu
def test_a_truncated_vmdk_is_a_source_error(images: dict, tmp_path: Path) -> None:
    copy = tmp_path / "copy.vmdk"
    shutil.copyfile(images["vmdk"], copy)
    os.truncate(copy, copy.stat().st_size // 2)
    with pytest.raises(SourceError, match="points after EOF"):
        disks.open_disk(str(copy))


@pytest.mark.qemu
def test_stopping_the_map_early_stops_qemu_img(images: dict) -> None:
    with closing(disks.open_disk(str(images["qcow2"]))) as disk:
        extents = disk.extents()
        assert next(extents).offset == 0
        assert isinstance(extents, Generator)
        extents.close()  # kills and reaps the qemu-img map it started


# --- qemu-img output parsed from the real tool -------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", FORMATS)
def test_parsers_on_real_output(fmt: str, images: dict, source: Source) -> None:
    path = str(images[fmt])
    info_text = subprocess.run(
        ["qemu-img", "info", "--output=json", path], check=True, capture_output=True, text=True
    ).stdout
    info = qemu_img.parse_info(info_text)
    assert (info.format, info.virtual_size, info.encrypted) == (fmt, source.size, False)
    map_text = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", fmt, path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    entries = qemu_img.parse_map(map_text)
    assert sum(e.length for e in entries) == source.size
    assert_extents_cover(list(qemu_img.extents_from_map(entries, source.size)), source.size)


# --- writing images ----------------------------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.parametrize("fmt", FORMATS)
def test_write_disk_round_trip(fmt: str, qemu_utils: None, source: Source, tmp_path: Path) -> None:
    target = tmp_path / f"restored.{fmt}"
    disks.write_disk(str(source.path), str(target), fmt)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no staging left behind
    assert disks.detect_format(str(target)) == fmt
    with closing(disks.open_disk(str(target))) as disk:
        assert disk.size == source.size
        assert disk.pread(0, disk.size) == source.content
    # Zeros stay holes: the file holds about the written data, not the 20 MiB disk.
    assert target.stat().st_blocks * 512 < 8 * MiB


@pytest.mark.qemu
def test_write_disk_replaces_an_existing_target(source: Source, tmp_path: Path) -> None:
    target = tmp_path / "restored.qcow2"
    target.write_bytes(b"old contents")
    disks.write_disk(str(source.path), str(target), "qcow2")
    with closing(disks.open_disk(str(target))) as disk:
        assert disk.pread(0, disk.size) == source.content


@pytest.mark.qemu
def test_write_disk_errors(source: Source, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no raw image"):
        disks.write_disk(str(tmp_path / "missing.raw"), str(tmp_path / "t.qcow2"), "qcow2")
    with pytest.raises(InvalidInput, match="no directory"):
        disks.write_disk(str(source.path), str(tmp_path / "missing" / "t.qcow2"), "qcow2")
    with pytest.raises(InvalidInput, match="neither a file nor a block device"):
        disks.write_disk(str(source.path), str(tmp_path), "qcow2")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        if os.geteuid() != 0:  # root writes anyway
            with pytest.raises(ApplianceError):
                disks.write_disk(str(source.path), str(readonly / "t.qcow2"), "qcow2")
    finally:
        readonly.chmod(0o755)


@pytest.mark.qemu
@pytest.mark.root
def test_write_raw_in_place_onto_a_block_device(source: Source, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    backing = tmp_path / "device.img"
    backing.write_bytes(b"\xff" * source.size)  # stale contents that the holes must overwrite
    device = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        with pytest.raises(InvalidInput, match="only raw"):
            disks.write_disk(str(source.path), device, "qcow2")
        disks.write_disk(str(source.path), device, "raw")
        with open(device, "rb") as f:
            assert f.read(source.size) == source.content
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


# --- the NBD client against qemu-nbd -----------------------------------------------------------


@pytest.fixture
def nbd_server(images: dict, tmp_path: Path) -> Iterator[str]:
    """A qemu-nbd of our own for the qcow2 image, serving up to 4 clients."""
    sock = str(tmp_path / "nbd.sock")
    argv = qemu_nbd_argv(str(images["qcow2"]), "qcow2", sock, shared=4)
    proc = subprocess.Popen([*argv[:-1], "--persistent", argv[-1]])
    try:
        # The socket file appears at bind(), before qemu-nbd listens: wait for a connection.
        for _ in range(2000):
            assert proc.poll() is None, "qemu-nbd exited"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(sock)
                    break
                except (ConnectionRefusedError, FileNotFoundError):
                    threading.Event().wait(0.005)
        yield sock
    finally:
        proc.terminate()
        proc.wait()


@pytest.mark.qemu
def test_nbd_client_simple_replies(nbd_server: str, source: Source) -> None:
    with NbdClient.connect_unix(nbd_server, "disk") as client:
        assert client.size == source.size
        assert client.info.read_only and client.info.can_multi_conn
        assert not client.allocation
        assert client.pread(3, 70000) == source.content[3:70003]
        assert client.pread(0, client.size) == source.content
        with pytest.raises(NbdError):
            client.block_status(0, 4096)
    assert client.closed


@pytest.mark.qemu
def test_nbd_client_block_status_matches_qemu_img_map(
    nbd_server: str, source: Source, images: dict
) -> None:
    with NbdClient.connect_unix(nbd_server, "disk", allocation=True) as client:
        assert client.allocation
        # Reads now arrive as structured replies, holes as OFFSET_HOLE chunks.
        for offset, length in [(0, source.size), (MiB - 5, 6 * MiB), (source.size - 3, 100)]:
            assert client.pread(offset, length) == source.content[offset : offset + length]
        statuses = list(client.allocation_map())
        as_extents = [Extent(s.offset, s.length, s.zero) for s in statuses]
        with closing(disks.open_disk(str(images["qcow2"]))) as disk:
            assert as_extents == list(disk.extents())
        assert all(s.hole == s.zero for s in statuses)
        inner = client.block_status(2 * MiB + 100, 1000)
        assert inner == [nbd.BlockStatus(2 * MiB + 100, 1000, nbd.STATE_HOLE | nbd.STATE_ZERO)]


@pytest.mark.qemu
def test_nbd_unknown_export_is_refused(nbd_server: str) -> None:
    with pytest.raises(NbdError, match="no such export") as raised:
        NbdClient.connect_unix(nbd_server, "nope")
    assert raised.value.errno == errno.ENOENT


# --- the NBD client against a scripted server (protocol corners) -------------------------------


class ScriptedServer:
    """The server side of a socketpair, driven step by step by a test in a thread."""

    def __init__(self, script: Callable[[ScriptedServer], None]) -> None:
        self.sock, self.client_sock = socket.socketpair()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(script,))
        self.thread.start()

    def _run(self, script: Callable[[ScriptedServer], None]) -> None:
        try:
            script(self)
        except BaseException as exc:
            self.error = exc
        finally:
            self.sock.close()

    def recv(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            more = self.sock.recv(n - len(data))
            if not more:
                raise EOFError
            data += more
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def greet(self, flags: int) -> int:
        self.send(struct.pack(">QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, flags))
        (client_flags,) = struct.unpack(">I", self.recv(4))
        return client_flags

    def option(self) -> tuple[int, bytes]:
        magic, option, length = struct.unpack(">QII", self.recv(16))
        assert magic == nbd.IHAVEOPT
        return option, self.recv(length)

    def reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QIII", nbd.OPTION_REPLY_MAGIC, option, kind, len(data)) + data)

    def request(self) -> tuple[int, int, int, int, int]:
        magic, flags, kind, cookie, offset, length = struct.unpack(">IHHQQI", self.recv(28))
        assert magic == nbd.REQUEST_MAGIC
        return flags, kind, cookie, offset, length

    def finish(self) -> None:
        self.thread.join(5)
        if self.error is not None:
            raise self.error


def go_ack(server: ScriptedServer, size: int, minimum: int = 1) -> None:
    option, data = server.option()
    assert option == nbd.OPT_GO
    assert data == nbd.encode_go("", (nbd.INFO_EXPORT, nbd.INFO_BLOCK_SIZE))
    server.reply(option, nbd.REP_INFO, struct.pack(">HQH", nbd.INFO_EXPORT, size, 0x1 | 0x2))
    server.reply(
        option, nbd.REP_INFO, struct.pack(">HIII", nbd.INFO_BLOCK_SIZE, minimum, 4096, MiB)
    )
    server.reply(option, nbd.REP_ACK)


def disconnect(server: ScriptedServer) -> None:
    assert server.request()[1] == nbd.CMD_DISC


def test_nbd_honours_the_minimum_block_size_and_error_replies() -> None:
    disk = bytes(range(256)) * 64  # 16 KiB
    seen: list[tuple[int, int]] = []

    def script(server: ScriptedServer) -> None:
        assert server.greet(nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES) == 3
        go_ack(server, len(disk), minimum=512)
        _, _, cookie, offset, length = server.request()
        seen.append((offset, length))
        server.send(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, cookie))
        server.send(disk[offset : offset + length])
        _, _, cookie, offset, length = server.request()
        server.send(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, errno.EIO, cookie))
        disconnect(server)

    server = ScriptedServer(script)
    client = NbdClient(server.client_sock)
    assert (client.info.min_block, client.info.max_block) == (512, MiB)
    assert client.pread(1000, 100) == disk[1000:1100]
    assert seen == [(512, 1024)]  # widened to the 512-byte grid, trimmed on the way back
    with pytest.raises(NbdError) as raised:
        client.pread(0, 10)
    assert raised.value.errno == errno.EIO
    assert not client.closed  # an error reply leaves the connection usable
    client.close()
    server.finish()


def test_nbd_splits_reads_at_the_maximum_block_size() -> None:
    disk = os.urandom(3 * MiB - 100)
    seen: list[tuple[int, int]] = []

    def script(server: ScriptedServer) -> None:
        server.greet(nbd.FLAG_FIXED_NEWSTYLE)
        go_ack(server, len(disk))  # maximum 1 MiB
        for _ in range(3):
            _, _, cookie, offset, length = server.request()
            seen.append((offset, length))
            server.send(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, cookie))
            server.send(disk[offset : offset + length])
        disconnect(server)

    server = ScriptedServer(script)
    with NbdClient(server.client_sock) as client:
        assert client.pread(0, 5 * MiB) == disk
    assert seen == [(0, MiB), (MiB, MiB), (2 * MiB, MiB - 100)]
    server.finish()


def test_nbd_falls_back_to_export_name_on_old_servers() -> None:
    def script(server: ScriptedServer) -> None:
        assert server.greet(nbd.FLAG_FIXED_NEWSTYLE) == nbd.FLAG_C_FIXED_NEWSTYLE
        option, _ = server.option()
        server.reply(option, nbd.REP_ERR_UNSUP)
        option, name = server.option()
        assert (option, name) == (nbd.OPT_EXPORT_NAME, b"")
        server.send(struct.pack(">QH", 4096, 1) + bytes(124))
        disconnect(server)

    server = ScriptedServer(script)
    client = NbdClient(server.client_sock)
    assert client.size == 4096 and client.info.min_block == nbd.DEFAULT_MIN_BLOCK
    client.close()
    server.finish()


def test_nbd_gives_up_haggling_with_a_soft_disconnect() -> None:
    def script(server: ScriptedServer) -> None:
        server.greet(nbd.FLAG_FIXED_NEWSTYLE)
        option, _ = server.option()
        assert option == nbd.OPT_STRUCTURED_REPLY
        server.reply(option, nbd.REP_ERR_UNSUP)
        assert server.option() == (nbd.OPT_ABORT, b"")

    server = ScriptedServer(script)
    with pytest.raises(NbdError, match="cannot report allocation") as raised:
        NbdClient(server.client_sock, allocation=True)
    assert raised.value.errno == errno.EOPNOTSUPP
    server.finish()


def test_nbd_protocol_violation_drops_the_connection() -> None:
    def script(server: ScriptedServer) -> None:
        server.greet(nbd.FLAG_FIXED_NEWSTYLE)
        go_ack(server, 4096)
        _, _, cookie, _, _ = server.request()
        server.send(struct.pack(">IIQ", nbd.SIMPLE_REPLY_MAGIC, 0, cookie + 1))

    server = ScriptedServer(script)
    client = NbdClient(server.client_sock)
    with pytest.raises(NbdError, match="cookie") as raised:
        client.pread(0, 512)
    assert raised.value.errno == errno.EPROTO
    assert client.closed
    with pytest.raises(ConnectionError):
        client.pread(0, 512)
    server.finish()


def test_nbd_structured_read_reassembles_data_and_holes() -> None:
    disk = bytes(1024) + os.urandom(1024)

    def chunk(flags: int, kind: int, cookie: int, payload: bytes) -> bytes:
        header = struct.pack(
            ">IHHQI", nbd.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)
        )
        return header + payload

    def script(server: ScriptedServer) -> None:
        server.greet(nbd.FLAG_FIXED_NEWSTYLE)
        option, _ = server.option()
        assert option == nbd.OPT_STRUCTURED_REPLY
        server.reply(option, nbd.REP_ACK)
        option, data = server.option()
        assert data == nbd.encode_meta_context("", (nbd.BASE_ALLOCATION,))
        server.reply(option, nbd.REP_META_CONTEXT, struct.pack(">I", 7) + b"base:allocation")
        server.reply(option, nbd.REP_ACK)
        go_ack(server, len(disk))
        _, kind, cookie, offset, length = server.request()
        assert (kind, offset, length) == (nbd.CMD_READ, 0, 2048)
        server.send(
            chunk(0, nbd.REPLY_TYPE_OFFSET_DATA, cookie, struct.pack(">Q", 1024) + disk[1024:])
        )
        server.send(chunk(0, nbd.REPLY_TYPE_OFFSET_HOLE, cookie, struct.pack(">QI", 0, 1024)))
        server.send(chunk(nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_NONE, cookie, b""))
        _, kind, cookie, offset, length = server.request()
        assert kind == nbd.CMD_BLOCK_STATUS
        payload = struct.pack(">III", 7, 1024, 3) + struct.pack(">II", 1024, 0)
        server.send(chunk(nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_BLOCK_STATUS, cookie, payload))
        _, _, cookie, _, _ = server.request()
        message = b"broken sector"
        payload = struct.pack(">IH", errno.EIO, len(message)) + message
        server.send(chunk(nbd.REPLY_FLAG_DONE, nbd.REPLY_TYPE_ERROR_BIT | 1, cookie, payload))
        disconnect(server)

    server = ScriptedServer(script)
    client = NbdClient(server.client_sock, allocation=True)
    assert client.pread(0, 2048) == disk
    assert client.block_status(0, 2048) == [
        nbd.BlockStatus(0, 1024, 3),
        nbd.BlockStatus(1024, 1024, 0),
    ]
    with pytest.raises(NbdError, match="broken sector"):
        client.pread(0, 10)
    client.close()
    server.finish()


def test_nbd_pure_helpers() -> None:
    assert nbd.aligned_span(1000, 100, 512, 1 << 20) == (512, 1536)
    assert nbd.aligned_span(0, 512, 512, 1 << 20) == (0, 512)
    assert nbd.aligned_span(1000, 100, 1, 1 << 20) == (1000, 1100)
    assert nbd.aligned_span(1000, 100, 512, 1050) == (512, 1050)  # an unaligned export end
    assert nbd.encode_request(nbd.CMD_READ, 5, 4096, 512) == struct.pack(
        ">IHHQQI", 0x25609513, 0, 0, 5, 4096, 512
    )
    assert nbd.encode_go("disk", (3,)) == b"\x00\x00\x00\x04disk\x00\x01\x00\x03"
    with pytest.raises(NbdError):
        nbd.decode_block_status(struct.pack(">III", 1, 0, 0))
    assert nbd.option_error_message(nbd.REP_ERR_UNKNOWN, b"") == "no such export"
