"""Discovery: recorded real drivers (umockdev), the pure converter, and real loop devices with and
without a running udevd.

What ran against what: USB disks and tape drives exist here only as recordings of the real
usb-storage, st and ch drivers (``tests/fixtures/udev``); loop devices, udevd, its events and
blkid are real.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from udev_support import (
    TAPE_LIBRARY,
    USB_AND_TAPE,
    attach_loop,
    attached_loop,
    detach_loop,
    monitor_without_udevd,
    recorded_devices,
    require_tool,
    running_udevd,
    umockdev_scan,
)

from hardware.records import BlockDevice, Changer, DeviceDiff, Inventory, TapeDrive, diff
from hardware.udev import DeviceMonitor, record_from_properties, scan

USB_SDA = "/devices/pci0000:00/0000:00:06.0/usb2/2-1/2-1:1.0/host1/target1:0:0/1:0:0:0/block/sda"
USB_SG1 = (
    "/devices/pci0000:00/0000:00:06.0/usb2/2-1/2-1:1.0/host1/target1:0:0/1:0:0:0/scsi_generic/sg1"
)
TAPE_NST0 = "/devices/pci0000:00/0000:00:05.0/virtio2/host0/target0:0:0/0:0:0:0/scsi_tape/nst0"
LIB_NST0 = "/devices/pci0000:00/0000:00:05.0/virtio2/host0/target0:0:0/0:0:0:1/scsi_tape/nst0"
LIB_SG0 = "/devices/pci0000:00/0000:00:05.0/virtio2/host0/target0:0:0/0:0:0:2/scsi_generic/sg0"
LIB_SCH0 = "/devices/pci0000:00/0000:00:05.0/virtio2/host0/target0:0:0/0:0:0:2/scsi_changer/sch0"
USB_UUID = "2f0dc047-e936-410d-b4a2-f6697f8f36d8"


# --- (a) scan() on the recordings, under umockdev ------------------------------------------------


def test_scan_finds_the_usb_disk_and_the_tape_drive():
    found = umockdev_scan(USB_AND_TAPE)
    assert list(found["block"]) == ["serial:QEMU_QEMU_HARDDISK_LABSTICK0001-0:0"]
    usb = found["block"]["serial:QEMU_QEMU_HARDDISK_LABSTICK0001-0:0"]
    assert usb["devnode"] == "/dev/sda"
    assert (usb["kind"], usb["bus"], usb["removable"], usb["read_only"]) == (
        "disk",
        "usb",
        True,
        False,
    )
    assert (usb["fs_type"], usb["fs_uuid"], usb["fs_label"]) == ("ext4", USB_UUID, "OFFSITE01")
    assert usb["size_bytes"] == 524288 * 512
    assert (usb["vendor"], usb["model"], usb["serial"]) == ("QEMU", "QEMU HARDDISK", "LABSTICK0001")
    assert f"/dev/disk/by-uuid/{USB_UUID}" in usb["links"]
    assert list(found["tapes"]) == ["serial:beaf11"]
    tape = found["tapes"]["serial:beaf11"]
    assert (tape["devnode"], tape["serial"], tape["vendor"], tape["model"]) == (
        "/dev/nst0",
        "beaf11",
        "IET",
        "VIRTUAL-TAPE",
    )
    assert tape["wwn"] == "0x60000000000000000e00000000010001"
    assert "/dev/tape/by-id/scsi-beaf11-nst" in tape["links"]
    assert found["changers"] == {}  # the USB disk's sg1 is a disk (type 0), not a changer


def test_scan_finds_the_library_drive_and_changer():
    found = umockdev_scan(TAPE_LIBRARY)
    assert found["block"] == {}
    assert list(found["tapes"]) == ["serial:HU1234ABCD"]
    assert found["tapes"]["serial:HU1234ABCD"]["devnode"] == "/dev/nst0"
    assert list(found["changers"]) == ["serial:DEC12345AB"]
    changer = found["changers"]["serial:DEC12345AB"]
    assert (changer["devnode"], changer["vendor"], changer["model"]) == (
        "/dev/sg0",
        "HP",
        "MSL-G3-Series",
    )


# --- (b) the pure converter on the recorded properties -------------------------------------------


def convert(recording: Path, sys_path: str, **changes: dict[str, str]):
    device = recorded_devices(recording)[sys_path]
    properties = {**device.properties, **changes.get("properties", {})}
    attributes = {**device.attributes, **changes.get("attributes", {})}
    return record_from_properties(properties, attributes)


def test_converter_on_the_recorded_usb_disk():
    record = convert(USB_AND_TAPE, USB_SDA)
    assert isinstance(record, BlockDevice)
    assert record.identity == "serial:QEMU_QEMU_HARDDISK_LABSTICK0001-0:0"
    assert (record.usb, record.fs_uuid, record.fs_label, record.size_bytes) == (
        True,
        USB_UUID,
        "OFFSITE01",
        268435456,
    )


def test_converter_on_the_recorded_tape_and_changer():
    tape = convert(USB_AND_TAPE, TAPE_NST0)
    assert isinstance(tape, TapeDrive)
    assert (tape.identity, tape.devnode) == ("serial:beaf11", "/dev/nst0")
    devices = recorded_devices(TAPE_LIBRARY)
    assert devices[LIB_SG0].attributes["device/type"] == "8\n"  # read through the device link
    changer = record_from_properties(devices[LIB_SG0].properties, devices[LIB_SG0].attributes)
    assert changer == Changer(
        identity="serial:DEC12345AB",
        devnode="/dev/sg0",
        vendor="HP",
        model="MSL-G3-Series",
        serial="DEC12345AB",
        links=tuple(sorted(devices[LIB_SG0].properties["DEVLINKS"].split())),
    )
    drive = devices[LIB_NST0]
    with_generic = record_from_properties(drive.properties, drive.attributes, generic="/dev/sg1")
    assert isinstance(with_generic, TapeDrive) and with_generic.generic == "/dev/sg1"


def test_converter_skips_what_discovery_does_not_report():
    assert convert(USB_AND_TAPE, USB_SG1) is None  # a disk's generic node (type 0)
    assert convert(TAPE_LIBRARY, LIB_SCH0) is None  # the ch node: mtx uses the sg node
    for rewinding in ("st0", "nst0a", "nst0l", "nst0m", "st0a"):
        assert convert(USB_AND_TAPE, TAPE_NST0, properties={"DEVNAME": f"/dev/{rewinding}"}) is None
    for name in ("ram0", "zram0", "dm-0"):
        assert convert(USB_AND_TAPE, USB_SDA, properties={"DEVNAME": f"/dev/{name}"}) is None
    free_loop = {"SUBSYSTEM": "block", "DEVNAME": "/dev/loop7", "DEVTYPE": "disk"}
    assert record_from_properties(free_loop, {"size": "0\n"}) is None
    assert record_from_properties({**free_loop, "DEVNAME": "/dev/nbd0"}, {"size": "0"}) is None


def test_identity_prefers_the_wwn_with_its_extension():
    record = convert(
        USB_AND_TAPE,
        USB_SDA,
        properties={
            "ID_WWN": "0x5000c500a1b2c3d4",
            "ID_WWN_WITH_EXTENSION": "0x5000c500a1b2c3d4ff",
        },
    )
    assert record is not None and record.identity == "wwn:0x5000c500a1b2c3d4ff"
    record = convert(USB_AND_TAPE, USB_SDA, properties={"ID_WWN": "0x5000c500a1b2c3d4"})
    assert record is not None and record.identity == "wwn:0x5000c500a1b2c3d4"


def test_without_udevd_properties_the_identity_comes_from_sysfs():
    """What libudev gives when udevd never ran: the kernel's properties only."""

    def kernel_only(recording: Path, sys_path: str):
        device = recorded_devices(recording)[sys_path]
        kernel = {
            k: v for k, v in device.properties.items() if not k.startswith(("ID_", "DEVLINKS"))
        }
        return record_from_properties(kernel, device.attributes)

    # The tape: its serial from VPD page 0x80, the same identity as with udevd.
    tape = kernel_only(USB_AND_TAPE, TAPE_NST0)
    assert isinstance(tape, TapeDrive)
    assert (tape.identity, tape.wwn, tape.vendor) == (
        "serial:beaf11",
        "0x60000000000000000e00000000010001",
        "IET",
    )
    changer = kernel_only(TAPE_LIBRARY, LIB_SG0)
    assert changer is not None and changer.identity == "serial:DEC12345AB"
    # A virtio disk's serial attribute is what udev puts in ID_SERIAL.
    virtio = record_from_properties(
        {"SUBSYSTEM": "block", "DEVNAME": "/dev/vdb", "DEVTYPE": "disk"},
        {"size": "2097152\n", "serial": "data-1\n"},
    )
    assert virtio is not None and virtio.identity == "serial:data-1"
    # A SCSI disk's naa WWID is written as udev writes ID_WWN_WITH_EXTENSION.
    scsi = record_from_properties(
        {"SUBSYSTEM": "block", "DEVNAME": "/dev/sdb", "DEVTYPE": "disk"},
        {"size": "2097152", "device/wwid": "naa.5000c500a1b2c3d4\n"},
    )
    assert scsi is not None and scsi.identity == "wwn:0x5000c500a1b2c3d4"


def test_loop_devices_and_partitions():
    loop = {"SUBSYSTEM": "block", "DEVNAME": "/dev/loop3", "DEVTYPE": "disk", "ID_FS_TYPE": "xfs"}
    attrs = {"size": "4194304\n", "ro": "1\n", "loop/backing_file": "/srv/disks/a.img\n"}
    record = record_from_properties(loop, attrs)
    assert record == BlockDevice(
        identity="loop:/srv/disks/a.img",
        devnode="/dev/loop3",
        kind="loop",
        size_bytes=4194304 * 512,
        read_only=True,
        fs_type="xfs",
        backing_file="/srv/disks/a.img",
    )
    recorded = recorded_devices(USB_AND_TAPE)[USB_SDA]
    partition = record_from_properties(
        {
            **recorded.properties,
            "DEVNAME": "/dev/sda1",
            "DEVTYPE": "partition",
            "ID_FS_UUID": "1111-2222",
            "ID_FS_TYPE": "vfat",
        },
        {"size": "1024", "partition": "1"},
        parent_properties=recorded.properties,
        parent_attributes=recorded.attributes,
    )
    assert isinstance(partition, BlockDevice)
    assert partition.kind == "partition"
    assert partition.parent == "serial:QEMU_QEMU_HARDDISK_LABSTICK0001-0:0"
    assert partition.identity == "serial:QEMU_QEMU_HARDDISK_LABSTICK0001-0:0-part1"
    assert (partition.fs_uuid, partition.size_bytes, partition.bus) == ("1111-2222", 524288, "usb")
    loop_partition = record_from_properties(
        {"SUBSYSTEM": "block", "DEVNAME": "/dev/loop3p2", "DEVTYPE": "partition"},
        {"size": "2048", "partition": "2"},
        parent_properties=loop,
        parent_attributes=attrs,
    )
    assert loop_partition is not None
    assert (loop_partition.identity, loop_partition.parent) == (
        "loop:/srv/disks/a.img-part2",
        "loop:/srv/disks/a.img",
    )


# --- the monitor's own logic, on scripted scans ---------------------------------------------------


class Changes:
    """Collects what a monitor reports; :meth:`wait` for one that matches."""

    def __init__(self) -> None:
        self.seen: queue.Queue[DeviceDiff] = queue.Queue()

    def __call__(self, change: DeviceDiff, inventory: Inventory) -> None:
        self.seen.put(change)

    def wait(self, matches: Callable[[DeviceDiff], bool], timeout: float = 5.0) -> DeviceDiff:
        deadline = time.monotonic() + timeout
        while True:
            try:
                change = self.seen.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no matching device change within {timeout} s")
            if matches(change):
                return change

    def none_about(self, identity: str, within: float) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                change = self.seen.get(timeout=0.05)
            except queue.Empty:
                continue
            assert identity not in _identities(change), change


def _identities(change: DeviceDiff) -> set[str]:
    return {
        *(d.identity for d in change.added),
        *(d.identity for d in change.removed),
        *(b.identity for _, b in change.changed),
    }


def _inventory(*identities: str, fs_uuid: str | None = None) -> Inventory:
    return Inventory(
        block={
            i: BlockDevice(identity=i, devnode="/dev/x", kind="loop", size_bytes=1, fs_uuid=fs_uuid)
            for i in identities
        }
    )


def test_monitor_reports_only_differences_and_survives_a_failing_handler(caplog):
    scans = iter([_inventory("a"), _inventory("a"), _inventory("a", "b"), _inventory("a", "b")])
    states: list[Inventory] = []

    def scanner() -> Inventory:
        nonlocal states
        state = next(scans, None)
        if state is None:
            raise RuntimeError("udev went away")  # logged, the monitor carries on
        states.append(state)
        return state

    delivered: list[DeviceDiff] = []
    calls = 0

    def on_change(change: DeviceDiff, inventory: Inventory) -> None:
        nonlocal calls
        calls += 1
        delivered.append(change)
        raise ValueError("a broken handler")

    monitor = DeviceMonitor(on_change, interval=0.02, use_udev=False, scanner=scanner)
    assert monitor.start() == _inventory("a")
    assert not monitor.listening
    deadline = time.monotonic() + 5
    while len(states) < 4 or "udev went away" not in caplog.text:
        assert time.monotonic() < deadline, (states, caplog.text)
        time.sleep(0.01)
    assert monitor.inventory == _inventory("a", "b")
    started = time.monotonic()
    monitor.stop()
    assert time.monotonic() - started < 1.0
    assert [tuple(d.identity for d in c.added) for c in delivered] == [("b",)]  # once, not twice
    assert calls == 1
    assert "a device change handler failed" in caplog.text


def test_monitor_reports_the_first_scan_when_asked_and_stops_quickly():
    changes = Changes()
    monitor = DeviceMonitor(
        changes, interval=30, use_udev=False, report_initial=True, scanner=lambda: _inventory("a")
    )
    with monitor:
        assert [d.identity for d in changes.wait(lambda c: True).added] == ["a"]
        started = time.monotonic()
    assert time.monotonic() - started < 1.0
    monitor.stop()  # a second stop is harmless


# --- (c) real loop devices with a running udevd ---------------------------------------------------


@pytest.fixture(scope="module")
def udevd() -> Iterator[int | None]:
    require_tool("losetup")
    with running_udevd() as pid:
        yield pid


@pytest.fixture
def monitor_with_udev(udevd) -> Iterator[tuple[DeviceMonitor, Changes]]:
    changes = Changes()
    monitor = DeviceMonitor(changes, interval=30.0)
    monitor.start()
    try:
        yield monitor, changes
    finally:
        monitor.stop()


@pytest.mark.root
def test_udev_events_report_attach_filesystem_and_detach(monitor_with_udev, tmp_path):
    monitor, changes = monitor_with_udev
    assert monitor.listening  # the timer is 30 s: everything below comes from udev events
    image = tmp_path / "disk.img"
    identity = f"loop:{image}"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    device = attach_loop(image)
    try:
        added = changes.wait(lambda c: identity in {d.identity for d in c.added})
        record = next(d for d in added.added if d.identity == identity)
        assert isinstance(record, BlockDevice)
        assert (record.devnode, record.kind, record.backing_file) == (device, "loop", str(image))
        assert (record.size_bytes, record.fs_uuid) == (64 << 20, None)

        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "POOLTEST", device], check=True)
        blkid = subprocess.run(
            ["blkid", "-p", "-o", "value", "-s", "UUID", device],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        changed = changes.wait(
            lambda c: any(b.identity == identity and b.fs_uuid for _, b in c.changed)
        )
        before, after = next((a, b) for a, b in changed.changed if b.identity == identity)
        assert isinstance(after, BlockDevice) and isinstance(before, BlockDevice)
        assert (before.fs_uuid, after.fs_uuid, after.fs_type, after.fs_label) == (
            None,
            blkid,
            "ext4",
            "POOLTEST",
        )
        assert f"/dev/disk/by-uuid/{blkid}" in after.links  # udev made its links

        # A duplicated event and duplicated rescans change nothing.
        udevadm = require_tool("udevadm")
        subprocess.run([udevadm, "trigger", "--action=change", device], check=True)
        subprocess.run([udevadm, "settle", "--timeout=10"], check=False)
        monitor.rescan_soon()
        monitor.rescan_soon()
        changes.none_about(identity, within=1.0)
        assert monitor.inventory.block[identity] == after
    finally:
        detach_loop(device)
    removed = changes.wait(lambda c: identity in {d.identity for d in c.removed})
    assert identity not in monitor.inventory.block
    assert removed.added == () or identity not in {d.identity for d in removed.added}


@pytest.mark.root
def test_two_scans_in_a_row_are_equal(udevd, tmp_path):
    with attached_loop(tmp_path / "disk.img") as device:
        subprocess.run([require_tool("udevadm"), "settle", "--timeout=10"], check=False)
        first, second = scan(), scan()
        assert diff(first, second).empty
        assert first.block[f"loop:{tmp_path / 'disk.img'}"].devnode == device


# --- (d) without udevd: the periodic rescan -------------------------------------------------------


@pytest.mark.root
def test_forced_periodic_rescans_see_attach_and_detach(tmp_path):
    changes = Changes()
    image = tmp_path / "disk.img"
    identity = f"loop:{image}"
    with DeviceMonitor(changes, interval=0.2, use_udev=False) as monitor:
        assert not monitor.listening
        with attached_loop(image) as device:
            added = changes.wait(lambda c: identity in {d.identity for d in c.added}, timeout=3)
            assert next(d for d in added.added if d.identity == identity).devnode == device
        changes.wait(lambda c: identity in {d.identity for d in c.removed}, timeout=3)


@pytest.mark.root
def test_without_udevd_the_monitor_polls_and_blkid_fills_the_filesystem(tmp_path):
    """In a mount namespace where /run/udev is empty: no control socket, no udev database."""
    image = tmp_path / "disk.img"
    identity = f"loop:{image}"
    with monitor_without_udevd(interval=0.2) as lines:
        assert lines.get(timeout=30) == {"listening": False}
        with attached_loop(image, size=320 << 20) as device:  # xfs needs 300 MiB
            added = _next_line(lines, lambda line: identity in _ids(line, "added"))
            record = next(d for d in added["added"] if d["identity"] == identity)
            assert (record["devnode"], record["fs_uuid"], record["links"]) == (device, None, [])
            subprocess.run(["mkfs.xfs", "-q", "-f", "-L", "NOUDEV", device], check=True)
            uuid = subprocess.run(
                ["blkid", "-p", "-o", "value", "-s", "UUID", device],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            changed = _next_line(lines, lambda line: identity in _ids(line, "changed"))
            after = next(b for _, b in changed["changed"] if b["identity"] == identity)
            assert (after["fs_uuid"], after["fs_type"], after["fs_label"]) == (
                uuid,
                "xfs",
                "NOUDEV",
            )
        _next_line(lines, lambda line: identity in _ids(line, "removed"))


def _ids(line: dict, key: str) -> set[str]:
    entries = line.get(key, [])
    if key == "changed":
        return {pair[1]["identity"] for pair in entries}
    return {entry["identity"] for entry in entries}


def _next_line(lines: queue.Queue, matches: Callable[[dict], bool], timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"the monitor without udevd reported no matching change in {timeout} s")
        if matches(line):
            return line


def test_no_monitor_thread_is_left_running():
    assert not [t for t in threading.enumerate() if t.name == "device-monitor"]
