"""USB rotation with the real usb-storage driver and real udev (in a QEMU guest).

The development host has no USB. Here the appliance initialises a disk image as a USB medium
through a loop device, the image is then plugged into a QEMU guest (TCG) as a ``usb-storage``
device on ``qemu-xhci``, and the guest's real drivers (xhci_pci, usb-storage, sd_mod) and real
``systemd-udevd`` with the host's rules say what the disk is (:mod:`image.probe_guest`). Discovery's
pure converter (``hardware.udev.record_from_properties``) must make of that exactly the medium
the appliance knows; that record, on a loop device of the same image, then drives the hands-off
export to "safe to remove".

The pure parts (the parser of udev's database, the QEMU command line) are tested on the text a
real boot of the guest printed, without booting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from engine_support import new_appliance, set_engine_env
from guest_support import usb_probe_guest
from usb_support import LoopDisk, file_tree, mounts_below, probed, unmount_below, usb_record

from appliance.engine import Appliance
from appliance.jobs import JobRunner
from hardware.records import BlockDevice, DeviceDiff, Inventory
from hardware.udev import record_from_properties
from hardware.usb import initialise_medium, media_mountpoint, medium_states
from hardware.usb_jobs import on_devices_changed, register_usb_jobs
from image.probe_guest import (
    BEGIN,
    END,
    ProbeGuest,
    UsbDisk,
    console_section,
    parse_udev_database,
    probe_argv,
    probe_usb_disks,
    shared_libraries,
)

#: The serial number QEMU's usb-storage device reports; udev makes the disk's ID_SERIAL of it.
SERIAL = "LABSTICK0002"
IDENTITY = f"serial:QEMU_QEMU_HARDDISK_{SERIAL}-0:0"
#: The guest boots, probes and powers off in ~15 s under TCG here; a hung guest fails the test.
BOOT_TIMEOUT = 75.0

#: What one boot of the probe guest printed for its USB disk (an excerpt of udev's database,
#: then the attribute block the guest adds), with a device the converter does not report.
RECORDED = f"""\
Starting systemd-udevd version 252.39-1~deb12u2
{BEGIN}
P: /devices/virtual/workqueue/writeback
M: writeback
U: workqueue
E: DEVPATH=/devices/virtual/workqueue/writeback
E: SUBSYSTEM=workqueue

P: /devices/pci0000:00/0000:00:01.0/usb2/2-1/2-1:1.0/host0/target0:0:0/0:0:0:0/block/sda
M: sda
U: block
T: disk
D: b 8:0
N: sda
L: 0
S: disk/by-uuid/1727bb21-22eb-4236-b4d4-3f3979ef8c49
S: disk/by-id/usb-QEMU_QEMU_HARDDISK_LABSTICK0002-0:0
S: disk/by-label/OFFSITE-T
Q: 1
E: DEVPATH=/devices/pci0000:00/0000:00:01.0/usb2/2-1/2-1:1.0/host0/target0:0:0/0:0:0:0/block/sda
E: SUBSYSTEM=block
E: DEVNAME=/dev/sda
E: DEVTYPE=disk
E: ID_BUS=usb
E: ID_MODEL=QEMU_HARDDISK
E: ID_MODEL_ENC=QEMU\\x20HARDDISK\\x20\\x20\\x20
E: ID_SERIAL=QEMU_QEMU_HARDDISK_LABSTICK0002-0:0
E: ID_SERIAL_SHORT=LABSTICK0002
E: ID_VENDOR=QEMU
E: ID_VENDOR_ENC=QEMU\\x20\\x20\\x20\\x20
E: ID_USB_DRIVER=usb-storage
E: ID_PATH=pci-0000:00:01.0-usb-0:1:1.0-scsi-0:0:0:0
E: ID_FS_LABEL=OFFSITE-T
E: ID_FS_LABEL_ENC=OFFSITE-T
E: ID_FS_UUID=1727bb21-22eb-4236-b4d4-3f3979ef8c49
E: ID_FS_TYPE=ext4
E: DEVLINKS=/dev/disk/by-uuid/1727bb21-22eb-4236-b4d4-3f3979ef8c49 /dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_LABSTICK0002-0:0 /dev/disk/by-label/OFFSITE-T

P: /devices/pci0000:00/0000:00:01.0/usb2/2-1/2-1:1.0/host0/target0:0:0/0:0:0:0/block/sda
A: size=196608
A: ro=1
A: removable=1
A: device/vendor=QEMU\x20\x20\x20\x20
A: device/model=QEMU HARDDISK\x20\x20\x20
A: device/type=0

{END}
[    8.787453] reboot: Power down
"""


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


# --- the pure parts, on recorded output ---------------------------------------------------------


def test_the_guest_output_parses_into_the_record_discovery_makes() -> None:
    section = console_section(RECORDED)
    assert section is not None and section.startswith("P: /devices/virtual")
    assert console_section(RECORDED.replace(END, "cut short")) is None
    devices = parse_udev_database(section)
    assert len(devices) == 2
    [sda] = [d for d in devices.values() if d.properties.get("SUBSYSTEM") == "block"]
    assert sda.attributes["size"] == "196608" and sda.properties["ID_BUS"] == "usb"
    assert sda.links[0] == "/dev/disk/by-uuid/1727bb21-22eb-4236-b4d4-3f3979ef8c49"
    record = record_from_properties(sda.properties, sda.attributes)
    assert record == BlockDevice(
        identity="serial:QEMU_QEMU_HARDDISK_LABSTICK0002-0:0",
        devnode="/dev/sda",
        kind="disk",
        size_bytes=196608 * 512,
        bus="usb",
        vendor="QEMU",
        model="QEMU HARDDISK",
        serial="LABSTICK0002",
        removable=True,
        read_only=True,
        fs_type="ext4",
        fs_uuid="1727bb21-22eb-4236-b4d4-3f3979ef8c49",
        fs_label="OFFSITE-T",
        links=tuple(sorted(sda.links)),
    )
    # N: alone names the node; blocks of one device merge whatever their order.
    alone = parse_udev_database(
        "P: /devices/x/block/sdb\nA: size=8\n\nP: /devices/x/block/sdb\nN: sdb\n"
    )
    assert alone["/devices/x/block/sdb"].properties == {"DEVNAME": "/dev/sdb"}
    assert alone["/devices/x/block/sdb"].attributes == {"size": "8"}


def test_the_qemu_command_line_and_the_libraries_ldd_lists() -> None:
    guest = ProbeGuest(kernel="/boot/vmlinuz-x", initrd="/cache/probe,1.initrd")
    argv = probe_argv(
        guest,
        [
            UsbDisk("/tmp/a,b.img", "S1"),
            UsbDisk("/tmp/c.img", "S2", read_only=False, removable=False),
        ],
        "/tmp/log",
    )
    joined = " ".join(argv)
    assert "-nic none" in joined and "-no-reboot" in joined and "-accel tcg" in joined
    assert argv[argv.index("-initrd") + 1] == "/cache/probe,1.initrd"  # not an option list
    assert argv[argv.index("-serial") + 1] == "file:/tmp/log"
    assert argv.count("-device") == 3 and "qemu-xhci,id=xhci0" in argv
    assert "file=/tmp/a,,b.img,if=none,id=usbdisk0,format=raw,readonly=on" in argv
    assert "usb-storage,bus=xhci0.0,drive=usbdisk0,serial=S1,removable=on" in argv
    assert "file=/tmp/c.img,if=none,id=usbdisk1,format=raw" in argv
    assert "usb-storage,bus=xhci0.0,drive=usbdisk1,serial=S2" in argv
    ldd = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibkmod.so.2 => /lib/x86_64-linux-gnu/libkmod.so.2 (0x00007fec)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007fed)\n"
    )
    assert shared_libraries("udevadm", ldd) == [
        "/lib/x86_64-linux-gnu/libkmod.so.2",
        "/lib64/ld-linux-x86-64.so.2",
    ]


# --- for real: the usb-storage driver and udev in a QEMU guest ----------------------------------


@pytest.fixture
def stick(tmp_path: Path) -> Iterator[LoopDisk]:
    """The disk image of this test; whatever was mounted below tmp_path is unmounted and its
    loop devices detached afterwards."""
    disk = LoopDisk(tmp_path / "stick.img", 96 << 20)
    try:
        yield disk
    finally:
        unmount_below(tmp_path)
        disk.cleanup()
        assert not mounts_below(tmp_path) and not disk.attached()


@pytest.mark.root
@pytest.mark.qemu
@pytest.mark.slow
def test_the_real_usb_storage_driver_and_udev_identify_our_medium_and_its_insert_exports(
    tmp_path: Path, stick: LoopDisk
) -> None:
    guest = usb_probe_guest()  # built before anything else: a missing package fails here
    register_usb_jobs()
    app, _ = new_appliance(tmp_path / "app")
    try:
        point = app.backup_files(str(file_tree(tmp_path / "tree", 4, 30_000)), "docs").point.id

        # Initialised as a USB medium on the host, through a loop device standing in for it.
        blank = replace(usb_record(stick.plug_in()), identity=IDENTITY, serial=SERIAL)
        medium = initialise_medium(app, blank, "OFFSITE-Q", "Offsite")
        known = probed(blank)
        stick.pull()
        runner = JobRunner(app)
        assert [a["action"] for a in _changed(app, runner, removed=known)] == ["out"]

        # Plugged into the guest: real xHCI, usb-storage, sd and udev say what it is.
        started = time.monotonic()
        probe = probe_usb_disks(
            [UsbDisk(str(stick.image), SERIAL)], guest=guest, timeout=BOOT_TIMEOUT
        )
        print(f"probe guest: QEMU ran {probe.seconds:.1f} s ({time.monotonic() - started:.1f} s)")
        usb = probe.block_devices(bus="usb")
        assert len(usb) == 1, (usb, probe.console[-3000:])
        [entry] = usb
        assert entry.properties["ID_USB_DRIVER"] == "usb-storage"
        assert entry.properties["ID_SERIAL_SHORT"] == SERIAL
        seen = record_from_properties(entry.properties, entry.attributes)
        assert isinstance(seen, BlockDevice)
        assert (seen.kind, seen.bus, seen.removable, seen.identity) == (
            "disk",
            "usb",
            True,
            IDENTITY,
        )
        assert (seen.fs_type, seen.fs_uuid, seen.fs_label) == ("ext4", medium.identity, "OFFSITE-Q")
        assert seen.size_bytes == os.path.getsize(stick.image) == known.size_bytes
        assert (seen.vendor, seen.model, seen.serial) == ("QEMU", "QEMU HARDDISK", SERIAL)
        assert seen.read_only  # attached read-only: the sd driver reports the write protection
        assert f"/dev/disk/by-uuid/{medium.identity}" in seen.links
        assert f"/dev/disk/by-id/usb-QEMU_QEMU_HARDDISK_{SERIAL}-0:0" in seen.links
        # The medium as the appliance knows it, and as the guest's udev described it.
        assert (seen.identity, seen.fs_uuid, seen.fs_label, seen.bus) == (
            known.identity,
            known.fs_uuid,
            known.fs_label,
            known.bus,
        )

        # That record, on a loop device of the same image on the host (writable there), is
        # what discovery hands the udev handler when the disk is plugged in.
        inserted = replace(seen, devnode=stick.plug_in(), read_only=False)
        runner.start()
        try:
            actions = _changed(app, runner, added=inserted)
            assert [a["action"] for a in actions] == ["export"], actions
            done = runner.wait(actions[0]["jobs"][0], 120)
        finally:
            runner.shutdown()
        assert done.state == "succeeded", done.error
        assert done.result["safe_to_remove"] and done.result["copied"][0]["point"] == point
        log = [line.message for line in app.catalog.job_log(done.id)]
        assert "USB disk OFFSITE-Q is safe to remove" in log, log
        state = medium_states(app)[medium.identity]
        assert state.state == "safe_to_remove"
        copy = {c.location_id: c for c in app.catalog.copies_of(point)}[state.location_id]
        assert copy.state == "present" and copy.verified_at is not None
        assert not os.path.ismount(media_mountpoint(app.data_dir.path, medium.identity))
    finally:
        app.close()


def _changed(
    app: Appliance,
    runner: JobRunner,
    *,
    added: BlockDevice | None = None,
    removed: BlockDevice | None = None,
) -> list[dict[str, Any]]:
    """What the udev handler does when discovery reports the disk added or removed."""
    if added is not None:
        diff, inventory = DeviceDiff(added=(added,)), Inventory(block={added.identity: added})
    else:
        diff, inventory = DeviceDiff(removed=(removed,) if removed else ()), Inventory()
    return on_devices_changed(app, runner, diff, inventory)
