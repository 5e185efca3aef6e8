"""The disk-format plug-in (image/): qemu-img argv and parsers, QemuDisk (the NBD client is
tested in ``test_nbd_client.py``).

Pure functions are tested directly and on canned output; everything else runs against real
qemu-img and qemu-nbd on images built here from one raw source with known content and holes.
Tests that need qemu-utils fail (never skip) with the install hint when it is missing.
"""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from image_fixtures import FORMATS, MiB, Source, convert_all, make_source, require_qemu_utils

from appliance.backup import disks
from appliance.backup.disks import Extent, RawDisk
from appliance.errors import ApplianceError, InvalidInput, SourceError
from image import qemu_img
from image.disk_source import QEMU_DISK_FORMATS, QemuDisk, QemuDiskFormats, qemu_nbd_argv

#: qemu 7.2 reports no allocation for vhdx: the whole disk maps as data (still read correctly).
REPORTS_HOLES = {"raw": True, "qcow2": True, "vmdk": True, "vhdx": False, "vdi": True, "vpc": True}


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def qemu_utils() -> None:
    require_qemu_utils()


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    return make_source(tmp_path_factory.mktemp("source"))


@pytest.fixture(scope="session")
def images(qemu_utils: None, source: Source, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return convert_all(source, tmp_path_factory.mktemp("images"))


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
