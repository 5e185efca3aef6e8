"""Backup and restore of VM disk images, and VM definitions, end to end through ``Appliance``.

Raw images are sparse files with known data, zero and hole regions, so every count the engine
reports (chunks read, changed, zero) can be predicted exactly at 64 KiB chunks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from engine_support import digest, new_appliance, set_engine_env

from appliance import restore_disk
from appliance.backup import images
from appliance.backup.disks import detect_format
from appliance.disk_workers import UNITS_PER_WORKER, in_order, reopen_fd, share_fd
from appliance.engine import Appliance
from appliance.errors import InvalidInput, NotFound, SourceError
from appliance.store import format as fmt
from appliance.vmspec import default_spec, load_spec, normalise, parse_libvirt_xml

KiB, MiB = 1 << 10, 1 << 20
CHUNK = fmt.DISK_CHUNK_SIZE
DISK_SIZE = 8 * MiB  # 128 chunks
CHUNKS = DISK_SIZE // CHUNK


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Appliance]:
    appliance, _recovery = new_appliance(tmp_path / "appliance")
    yield appliance
    appliance.close()


@pytest.fixture(params=["threads", "processes"])
def disk_workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Disks are read and written by worker processes from 64 MiB up, by threads below: these
    small disks run both ways (the threshold is read by the coordinator, in this process)."""
    threshold = 0 if request.param == "processes" else 1 << 62
    monkeypatch.setattr(images, "PROCESS_MIN_BYTES", threshold)
    monkeypatch.setattr(restore_disk, "PROCESS_MIN_BYTES", threshold)
    return str(request.param)


def used_processes(cpu: dict[str, float], kind: str) -> bool:
    assert cpu["coordinator_s"] >= 0 and cpu["workers_s"] > 0
    return bool(cpu["worker_processes"]) == (kind == "processes")


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_disk(path: Path) -> dict[str, int]:
    """An 8 MiB sparse raw disk; returns the expected counts of a full backup.

    Data: chunk 0 (whole), 4 KiB inside chunk 5, chunks 20-23; chunk 50 is allocated but all
    zeros; everything else is a hole.
    """
    with open(path, "wb") as f:
        f.truncate(DISK_SIZE)
    rng = os.urandom
    write_at(path, 0, rng(CHUNK))
    write_at(path, 5 * CHUNK + 8 * KiB, rng(4 * KiB))
    write_at(path, 20 * CHUNK, rng(4 * CHUNK))
    write_at(path, 50 * CHUNK, bytes(CHUNK))
    assert os.stat(path).st_blocks * 512 < 1 * MiB  # really sparse
    data_chunks = 6
    return {
        "data_chunks": data_chunks,
        "read_chunks": data_chunks + 1,  # + the allocated zero chunk
        "zero_chunks": CHUNKS - data_chunks,
    }


def assert_sparse_copy(restored: Path, source: Path, data_chunks: int) -> None:
    assert os.stat(restored).st_size == os.stat(source).st_size
    assert digest(restored) == digest(source)
    assert os.stat(restored).st_blocks * 512 <= data_chunks * CHUNK + 64 * KiB


# --- raw images --------------------------------------------------------------------------------


def test_full_backup_of_a_sparse_raw_disk(
    app: Appliance, tmp_path: Path, disk_workers: str
) -> None:
    disk = tmp_path / "disk0.img"
    expected = make_disk(disk)
    outcome = app.backup_image([str(disk)], "vm1", threads=2)
    stats = outcome.stats
    assert outcome.point.kind == "image" and outcome.point.mode == "full"
    assert stats["logical_bytes"] == DISK_SIZE
    assert stats["bytes_read"] == expected["read_chunks"] * CHUNK  # holes are never read
    assert stats["zero_chunks"] == expected["zero_chunks"]
    assert stats["changed_chunks"] == expected["data_chunks"]
    assert stats["new_bytes"] < expected["data_chunks"] * CHUNK + 16 * KiB
    (entry,) = app.manifest(outcome.point.id)["disks"]
    assert entry["name"] == "disk0" and entry["format"] == "raw" and entry["size"] == DISK_SIZE
    assert entry["allocated"] == expected["data_chunks"] * CHUNK
    assert used_processes(stats["cpu"], disk_workers)

    restored = tmp_path / "restored.img"
    result = app.restore(outcome.point.id, str(restored))
    assert used_processes(result["cpu"], disk_workers)
    assert_sparse_copy(restored, disk, expected["data_chunks"])


def test_incremental_stores_only_changed_chunks(
    app: Appliance, tmp_path: Path, disk_workers: str
) -> None:
    disk = tmp_path / "disk0.img"
    expected = make_disk(disk)
    full = app.backup_image([str(disk)], "vm1", threads=2)
    full_copy = tmp_path / "at-full.img"
    shutil.copyfile(disk, full_copy)

    # 4 KiB writes: two in chunk 0, one in chunk 21, one in a hole (chunk 100).
    writes = [
        (4 * KiB, 4 * KiB),
        (40 * KiB, 4 * KiB),
        (21 * CHUNK, 4 * KiB),
        (100 * CHUNK, 4 * KiB),
    ]
    for offset, length in writes:
        write_at(disk, offset, os.urandom(length))
    touched = {offset // CHUNK for offset, _length in writes}
    assert len(touched) == 3

    incr = app.backup_image([str(disk)], "vm1", threads=2)
    assert incr.point.mode == "incremental"
    assert incr.stats["changed_chunks"] == len(touched)
    # The image's identity changed, so every allocated extent is read again ...
    assert incr.stats["bytes_read"] == (expected["read_chunks"] + 1) * CHUNK
    # ... but only the touched chunks (and one table slice) are new.
    assert incr.stats["new_bytes"] <= len(touched) * CHUNK + CHUNKS * fmt.ID_SIZE + 4 * KiB
    manifest = app.manifest(incr.point.id)
    assert manifest["parent"] == full.point.id and manifest["base_full"] == full.point.id

    app.restore(incr.point.id, str(tmp_path / "incr.img"))
    assert_sparse_copy(tmp_path / "incr.img", disk, expected["data_chunks"] + 1)
    app.restore(full.point.id, str(tmp_path / "full.img"))
    assert digest(tmp_path / "full.img") == digest(full_copy)


def test_unchanged_image_reuses_the_table(
    app: Appliance, tmp_path: Path, disk_workers: str
) -> None:
    disk = tmp_path / "disk0.img"
    make_disk(disk)
    first = app.backup_image([str(disk)], "vm1", threads=2)
    again = app.backup_image([str(disk)], "vm1", threads=2)
    assert again.stats["bytes_read"] == 0
    assert again.stats["new_bytes"] == 0 and again.stats["changed_chunks"] == 0
    first_disk = app.manifest(first.point.id)["disks"][0]
    again_disk = app.manifest(again.point.id)["disks"][0]
    assert again_disk["tables"] == first_disk["tables"]
    app.restore(again.point.id, str(tmp_path / "again.img"))
    assert digest(tmp_path / "again.img") == digest(disk)


def test_changed_block_list_reads_only_listed_ranges(
    app: Appliance, tmp_path: Path, disk_workers: str
) -> None:
    disk = tmp_path / "disk0.img"
    expected = make_disk(disk)
    app.backup_image([str(disk)], "vm1", threads=2)
    ranges = [
        (4 * KiB, 4 * KiB),
        (40 * KiB, 4 * KiB),
        (21 * CHUNK, 4 * KiB),
        (100 * CHUNK, 8 * KiB),
    ]
    for offset, length in ranges:
        write_at(disk, offset, os.urandom(length))
    covered = {
        i
        for offset, length in ranges
        for i in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)
    }

    incr = app.backup_image([str(disk)], "vm1", changed_ranges={"disk0": ranges}, threads=2)
    assert incr.stats["bytes_read"] == len(covered) * CHUNK
    assert incr.stats["changed_chunks"] == len(covered)
    app.restore(incr.point.id, str(tmp_path / "cbt.img"))
    assert_sparse_copy(tmp_path / "cbt.img", disk, expected["data_chunks"] + 1)


def test_changed_block_list_crossing_chunks(
    app: Appliance, tmp_path: Path, disk_workers: str
) -> None:
    disk = tmp_path / "disk0.img"
    make_disk(disk)
    app.backup_image([str(disk)], "vm1", threads=2)
    # One range straddling the boundary of chunks 20 and 21; one past the end (clamped).
    ranges = [(21 * CHUNK - 2 * KiB, 4 * KiB), (DISK_SIZE - 4 * KiB, 64 * KiB)]
    write_at(disk, 21 * CHUNK - 2 * KiB, os.urandom(4 * KiB))
    incr = app.backup_image([str(disk)], "vm1", changed_ranges={"disk0": ranges}, threads=2)
    # Chunks 20 and 21 are read; the last chunk is a hole and needs no read.
    assert incr.stats["bytes_read"] == 2 * CHUNK
    assert incr.stats["changed_chunks"] == 2
    app.restore(incr.point.id, str(tmp_path / "x.img"))
    assert digest(tmp_path / "x.img") == digest(disk)


def test_two_disks_in_one_point(app: Appliance, tmp_path: Path, disk_workers: str) -> None:
    disk0, disk1 = tmp_path / "sys.img", tmp_path / "data.raw"
    expected0 = make_disk(disk0)
    with open(disk1, "wb") as f:
        f.truncate(3 * MiB + 5 * KiB)  # not a multiple of the chunk size
    write_at(disk1, 3 * MiB, os.urandom(5 * KiB))  # the short last chunk
    write_at(disk1, MiB, os.urandom(100 * KiB))
    outcome = app.backup_image([str(disk0), str(disk1)], "vm2", threads=2)
    assert outcome.stats["disks"] == 2
    assert outcome.stats["logical_bytes"] == DISK_SIZE + 3 * MiB + 5 * KiB
    manifest = app.manifest(outcome.point.id)
    assert [d["name"] for d in manifest["disks"]] == ["sys", "data"]
    assert manifest["vm"] == default_spec("vm2", ["sys", "data"])

    app.restore(outcome.point.id, str(tmp_path / "only-sys.img"), disk="sys")
    assert_sparse_copy(tmp_path / "only-sys.img", disk0, expected0["data_chunks"])
    app.restore(outcome.point.id, str(tmp_path / "only-data.img"), disk="data")
    assert digest(tmp_path / "only-data.img") == digest(disk1)
    assert os.stat(tmp_path / "only-data.img").st_size == 3 * MiB + 5 * KiB

    result = app.restore(outcome.point.id, str(tmp_path / "all"))
    assert sorted(os.listdir(tmp_path / "all")) == ["data.img", "sys.img"]
    assert sorted(result["disks"]) == sorted(
        str(tmp_path / "all" / n) for n in ("data.img", "sys.img")
    )
    assert_sparse_copy(tmp_path / "all" / "sys.img", disk0, expected0["data_chunks"])
    assert digest(tmp_path / "all" / "data.img") == digest(disk1)
    with pytest.raises(NotFound):
        app.restore(outcome.point.id, str(tmp_path / "nope.img"), disk="missing")


def test_disks_with_the_same_file_name_get_distinct_names(app: Appliance, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for sub in ("a", "b"):
        with open(tmp_path / sub / "disk.img", "wb") as f:
            f.truncate(CHUNK * 2)
        write_at(tmp_path / sub / "disk.img", 0, os.urandom(1000))
    outcome = app.backup_image(
        [str(tmp_path / "a" / "disk.img"), str(tmp_path / "b" / "disk.img")], "vm", threads=1
    )
    names = [d["name"] for d in app.manifest(outcome.point.id)["disks"]]
    assert names == ["disk", "disk-2"]


def test_backup_image_needs_a_disk(app: Appliance) -> None:
    with pytest.raises(InvalidInput):
        app.backup_image([], "vm")


# --- VM definitions ------------------------------------------------------------------------------

LIBVIRT_XML = """<domain type='kvm' id='3'>
  <name>web01</name>
  <uuid>5b1d5e0c-2f5f-4a0e-9f0a-9c3c3c1f0e11</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static'>4</vcpu>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='host-passthrough' check='none' migratable='on'/>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web01.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'>
      <mac address='52:54:00:AB:cd:12'/>
      <source network='default'/>
      <model type='e1000'/>
    </interface>
    <console type='pty'/>
  </devices>
</domain>
"""

EXPECTED_XML_SPEC = {
    "name": "web01",
    "vcpus": 4,
    "memory_mib": 4096,
    "firmware": "uefi",
    "machine": "q35",
    "disks": [{"name": "vda", "bus": "virtio", "format": "qcow2"}],
    "nics": [{"model": "e1000", "mac": "52:54:00:ab:cd:12", "network": "default"}],
}


def test_libvirt_domain_xml(tmp_path: Path) -> None:
    path = tmp_path / "web01.xml"
    path.write_text(LIBVIRT_XML)
    assert load_spec(str(path)) == EXPECTED_XML_SPEC
    assert parse_libvirt_xml(LIBVIRT_XML) == EXPECTED_XML_SPEC


@pytest.mark.parametrize(
    ("memory", "mib"),
    [
        ("<memory unit='GiB'>2</memory>", 2048),
        ("<memory unit='MiB'>1536</memory>", 1536),
        ("<memory>1048576</memory>", 1024),  # KiB is libvirt's default unit
        ("<memory unit='bytes'>1073741824</memory>", 1024),
    ],
)
def test_libvirt_memory_units(memory: str, mib: int) -> None:
    xml = f"<domain><name>m</name>{memory}<os><loader>/x/OVMF.fd</loader></os></domain>"
    spec = parse_libvirt_xml(xml)
    assert spec["memory_mib"] == mib
    assert spec["firmware"] == "uefi"  # a <loader> means UEFI too


def test_json_spec(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_text(
        json.dumps(
            {
                "name": "db01",
                "vcpus": "2",
                "memory_mib": 2048,
                "disks": [{"name": "root", "bus": "SCSI"}, {"format": "qcow2"}],
                "nics": [{"mac": "52:54:00:00:00:01", "network": "br0"}],
            }
        )
    )
    assert load_spec(str(path)) == {
        "name": "db01",
        "vcpus": 2,
        "memory_mib": 2048,
        "firmware": "bios",
        "machine": "q35",
        "disks": [
            {"name": "root", "bus": "scsi", "format": "raw"},
            {"name": "disk1", "bus": "virtio", "format": "qcow2"},
        ],
        "nics": [{"model": "virtio", "mac": "52:54:00:00:00:01", "network": "br0"}],
    }


def test_toml_spec(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    path.write_text(
        'name = "app01"\nvcpus = 8\nmemory_mib = 16384\nfirmware = "UEFI"\nmachine = "pc"\n'
        '[[disks]]\nname = "os"\nbus = "nvme"\nformat = "qcow2"\n'
        '[[nics]]\nmodel = "vmxnet3"\nmac = "00:50:56:AA:BB:CC"\n'
    )
    assert load_spec(str(path)) == {
        "name": "app01",
        "vcpus": 8,
        "memory_mib": 16384,
        "firmware": "uefi",
        "machine": "pc",
        "disks": [{"name": "os", "bus": "nvme", "format": "qcow2"}],
        "nics": [{"model": "vmxnet3", "mac": "00:50:56:aa:bb:cc", "network": None}],
    }


@pytest.mark.parametrize(
    "text",
    [
        '{"vcpus": 0}',
        '{"vcpus": "many"}',
        '{"memory_mib": 8}',
        '{"firmware": "coreboot"}',
        '{"disks": [{"bus": "floppy"}]}',
        '{"nics": [{"model": "ne2000"}]}',
        '{"nics": [{"mac": "52:54:00:00:00"}]}',
        "[1, 2, 3]",
        "{not json",
        "name = = toml",
        "<domain><name>x</name><vcpu>four</vcpu></domain>",
        "<domain><memory unit='KiB'>lots</memory></domain>",
        "<vm><name>not a domain</name></vm>",
        "<domain><name>unclosed</domain>",
        "<domain><devices><disk device='disk'><target dev='xvda' bus='xen'/></disk></devices></domain>",
    ],
)
def test_invalid_specs_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.spec"
    path.write_text(text)
    with pytest.raises(InvalidInput):
        load_spec(str(path))


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        load_spec(str(tmp_path / "nope.json"))


def test_normalise_is_idempotent() -> None:
    specs = [
        EXPECTED_XML_SPEC,
        {"nics": [{"model": "virtio"}], "disks": [{"name": "a"}]},  # a NIC without a MAC
        {"nics": [{"mac": None, "network": None}]},
    ]
    for raw in specs:
        once = normalise(raw)
        assert normalise(once) == once
    assert normalise(specs[1])["nics"] == [{"model": "virtio", "mac": None, "network": None}]


def test_normalise_defaults() -> None:
    assert normalise({}) == {
        "name": "vm",
        "vcpus": 1,
        "memory_mib": 512,
        "firmware": "bios",
        "machine": "q35",
        "disks": [],
        "nics": [],
    }


def test_vm_spec_is_stored_in_the_manifest(app: Appliance, tmp_path: Path) -> None:
    disk = tmp_path / "vda.img"
    make_disk(disk)
    spec_path = tmp_path / "web01.xml"
    spec_path.write_text(LIBVIRT_XML)
    outcome = app.backup_image([str(disk)], "web01", vm_spec=str(spec_path), threads=2)
    assert app.manifest(outcome.point.id)["vm"] == EXPECTED_XML_SPEC
    result = app.restore(outcome.point.id, str(tmp_path / "out"))
    assert result["vm"] == EXPECTED_XML_SPEC
    # A dict is validated and normalised like a file; an invalid spec records no point.
    outcome = app.backup_image([str(disk)], "web01", vm_spec={"name": "given"}, threads=2)
    assert app.manifest(outcome.point.id)["vm"] == normalise({"name": "given"})
    with pytest.raises(InvalidInput):
        app.backup_image([str(disk)], "web01", vm_spec={"vcpus": 0}, threads=2)
    (tmp_path / "bad.json").write_text('{"vcpus": -1}')
    before = len(app.catalog.list_points(asset="web01"))
    with pytest.raises(InvalidInput):
        app.backup_image([str(disk)], "web01", vm_spec=str(tmp_path / "bad.json"), threads=2)
    assert len(app.catalog.list_points(asset="web01")) == before


# --- qcow2 through the image plug-in ------------------------------------------------------------------


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def test_qcow2_backup_and_restore(app: Appliance, tmp_path: Path) -> None:
    assert shutil.which("qemu-img"), "qemu-img is needed (apt-get install qemu-utils)"
    raw = tmp_path / "guest.raw"
    expected = make_disk(raw)
    image = tmp_path / "guest.qcow2"
    converted = qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    assert converted.returncode == 0, converted.stderr
    assert detect_format(str(image)) == "qcow2"

    outcome = app.backup_image([str(image)], "qvm", threads=2)
    (entry,) = app.manifest(outcome.point.id)["disks"]
    assert entry["format"] == "qcow2"
    assert entry["size"] == DISK_SIZE  # the guest-visible size, not the file's
    assert outcome.stats["changed_chunks"] == expected["data_chunks"]
    # Unallocated clusters are holes to qemu too: far less than the whole disk is read.
    assert outcome.stats["bytes_read"] <= expected["read_chunks"] * CHUNK

    restored = tmp_path / "restored.qcow2"
    app.restore(outcome.point.id, str(restored), target_format="qcow2")
    info = json.loads(qemu_img("info", "--output=json", str(restored)).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == DISK_SIZE
    compared = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(restored))
    assert compared.returncode == 0, compared.stdout + compared.stderr
    app.restore(outcome.point.id, str(tmp_path / "restored.raw"))
    assert digest(tmp_path / "restored.raw") == digest(raw)

    # An unchanged qcow2 file is not read again.
    again = app.backup_image([str(image)], "qvm", threads=2)
    assert again.stats["bytes_read"] == 0 and again.stats["new_bytes"] == 0


# --- worker processes ---------------------------------------------------------------------------


def test_a_worker_reaches_the_disk_the_coordinator_opened(tmp_path: Path) -> None:
    """Workers open the coordinator's descriptor, never the path: a file swapped in at the
    path after the coordinator opened it is not what they read."""
    checked, planted = tmp_path / "disk.img", tmp_path / "planted"
    checked.write_bytes(b"checked" * 100)
    planted.write_bytes(b"planted" * 100)
    fd = os.open(checked, os.O_RDONLY)
    try:
        shared = share_fd(fd)
        os.rename(planted, checked)
        mine = reopen_fd(shared, os.O_RDONLY)
        try:
            assert os.pread(mine, 7, 0) == b"checked"
        finally:
            os.close(mine)
        pid, number, (dev, ino) = shared
        with pytest.raises(SourceError, match="different file"):
            reopen_fd((pid, number, (dev, ino + 1)), os.O_RDONLY)
    finally:
        os.close(fd)
    with pytest.raises(SourceError, match="cannot open"):
        reopen_fd(shared, os.O_RDONLY)  # closed since


def test_units_in_flight_are_bounded() -> None:
    """A 1 TiB disk has 262,144 units: they are handed out a few per worker, not all queued."""
    submitted: list[int] = []

    def units() -> Iterator[tuple[int]]:
        for i in range(1000):
            submitted.append(i)
            yield (i,)

    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = in_order(pool, lambda i: i * 2, units(), 2)
        assert [next(answers) for _ in range(3)] == [0, 2, 4]
        assert len(submitted) <= 3 + 2 * UNITS_PER_WORKER
        assert list(answers) == [i * 2 for i in range(3, 1000)]
