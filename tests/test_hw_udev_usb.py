"""Hands-off USB rotation through the real udev chain: udevd, a rule, the monitor, the jobs.

A real ``systemd-udevd`` (started by the test unless one runs, stopped by pid) loads a udev rule
written for this test alone: it matches the one loop device whose backing file is this test's
image, and gives it the udev identity of the USB stick recorded with the usb-storage driver
(``block/sda`` of ``tests/fixtures/udev/usb-storage-disk-and-tape-drive.umockdev``): ``ID_BUS``,
``ID_SERIAL``, ``ID_SERIAL_SHORT``, ``ID_USB_DRIVER``, ``ID_MODEL``, ``ID_VENDOR``. So udevd
itself, on the kernel's own events for the loop device (attach, mkfs, detach), writes those
properties to its database and announces them.

A :class:`hardware.udev.DeviceMonitor` listens to udevd (its timer is an hour: only udev events
rescan) and hands every diff to :func:`hardware.usb_jobs.on_devices_changed` with a real
:class:`JobRunner`. Nothing calls the handler by hand: the disk is offered when it appears,
marked out when it is pulled, and its export starts when it is plugged in again.

One step is the test's, and only one: discovery's converter deliberately gives a loop device
(sysfs ``loop/backing_file``) the identity ``loop:<file>`` and no bus, whatever udev says (a
loop has no hardware; udev rules cannot change a sysfs attribute). The monitor's scanner is
therefore :func:`hardware.udev.scan` with this one device converted again by
:func:`hardware.udev.record_from_properties` from udevd's database (``udevadm info``) and its
sysfs ``size``/``ro``/``removable``, without ``loop/backing_file`` and under the name of a USB
disk's by-id link (the converter skips a ``loopN`` node without a backing file as free), then
given its real ``/dev/loopN`` back: what discovery makes of the same properties on an ``sdX``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from engine_support import new_appliance, set_engine_env
from udev_support import running_udevd
from usb_support import (
    FIXTURE,
    LoopDisk,
    file_tree,
    mounts_below,
    recorded_device,
    unmount_below,
    until,
)

from appliance.jobs import JobRunner
from hardware.records import BlockDevice, DeviceDiff, Inventory
from hardware.udev import DeviceMonitor, record_from_properties, scan
from hardware.usb import (
    initialise_medium,
    media_mountpoint,
    medium_states,
    offer_disk,
    offered_disks,
)
from hardware.usb_jobs import EXPORT_KIND, on_devices_changed, register_usb_jobs

pytestmark = pytest.mark.root

RULES_DIR = Path("/run/udev/rules.d")
#: The recorded stick's properties the rule gives the loop device.
USB_PROPERTIES = (
    "ID_BUS",
    "ID_SERIAL",
    "ID_SERIAL_SHORT",
    "ID_USB_DRIVER",
    "ID_MODEL",
    "ID_VENDOR",
)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


def _udevadm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["udevadm", *args], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def usb_identity_rule(image: Path) -> Iterator[dict[str, str]]:
    """A udev rule giving the loop device of ``image`` (and no other device) the recorded USB
    stick's identity; removed, and udevd told, afterwards. Yields the properties it sets."""
    recorded = recorded_device(fixture=FIXTURE)
    values = {key: recorded[key] for key in USB_PROPERTIES}
    assert values["ID_BUS"] == "usb" and values["ID_USB_DRIVER"] == "usb-storage"
    for value in values.values():
        assert not set('"$%\\') & set(value), f"{value!r} needs escaping in a udev rule"
    backing = os.path.realpath(image)
    assert '"' not in backing
    made_dir = not RULES_DIR.exists()
    RULES_DIR.mkdir(parents=True, exist_ok=True)
    rule = RULES_DIR / f"99-appliance-test-usb-{uuid.uuid4().hex[:12]}.rules"
    assignments = ", ".join(f'ENV{{{key}}}="{value}"' for key, value in values.items())
    rule.write_text(
        "# tests/test_hw_udev_usb.py: a loop device as the recorded USB stick (removed after)\n"
        f'SUBSYSTEM=="block", KERNEL=="loop*", ATTR{{loop/backing_file}}=="{backing}", '
        f"{assignments}\n"
    )
    try:
        assert _udevadm("control", "--reload").returncode == 0
        yield values
    finally:
        rule.unlink()
        if made_dir:
            with contextlib.suppress(OSError):
                RULES_DIR.rmdir()
        _udevadm("control", "--reload")


def udev_properties(devnode: str) -> dict[str, str]:
    """What udevd's database holds for ``devnode`` now."""
    done = _udevadm("info", "--query=property", f"--name={devnode}")
    found = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key] = value
    return found


def sysfs_attributes(devnode: str) -> dict[str, str]:
    folder = Path("/sys/class/block") / os.path.basename(devnode)
    return {name: (folder / name).read_text() for name in ("size", "ro", "removable")}


class UsbView:
    """:func:`hardware.udev.scan`, with the loop device of ``image`` converted from udevd's
    properties as a disk (see the module doc); counts its scans."""

    def __init__(self, image: Path) -> None:
        self.backing = os.path.realpath(image)
        self.scans = 0

    def __call__(self) -> Inventory:
        inventory = scan()
        block = dict(inventory.block)
        for key, record in inventory.block.items():
            if record.backing_file != self.backing:
                continue
            properties = udev_properties(record.devnode)
            if properties.get("ID_BUS") != "usb":
                continue  # udevd has not applied the rule yet: a plain loop device until then
            # The converter also takes a node named loopN without a backing file for a free
            # loop device: it is handed the name udev gives a USB disk's by-id link instead,
            # and the record gets its real node back.
            as_disk = {
                **properties,
                "DEVNAME": f"/dev/disk/by-id/{properties['ID_BUS']}-{properties['ID_SERIAL']}",
            }
            seen = record_from_properties(as_disk, sysfs_attributes(record.devnode))
            assert isinstance(seen, BlockDevice)
            del block[key]
            block[seen.identity] = replace(seen, devnode=record.devnode)
        self.scans += 1
        return replace(inventory, block=block)


class Handler:
    """The monitor's ``on_change``: :func:`on_devices_changed`, each outcome remembered."""

    def __init__(self, app: Any, runner: JobRunner) -> None:
        self.app = app
        self.runner = runner
        self.outcomes: list[dict[str, Any]] = []
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()

    def __call__(self, change: DeviceDiff, inventory: Inventory) -> None:
        try:
            done = on_devices_changed(self.app, self.runner, change, inventory)
        except BaseException as exc:
            with self.lock:
                self.errors.append(exc)
            raise
        with self.lock:
            self.outcomes.extend(done)

    def actions(self, key: str) -> list[str]:
        """What was done about the disk ``key`` (its identity, or its medium's)."""
        with self.lock:
            return [o["action"] for o in self.outcomes if key in (o.get("device"), o.get("medium"))]


def _exports(app: Any) -> list[Any]:
    return [j for j in app.catalog.list_jobs(limit=1000) if j.kind == EXPORT_KIND]


def _settled(monitor: DeviceMonitor, view: UsbView, timeout: float = 30.0) -> None:
    """udevd's queue is empty (every event so far broadcast) and the monitor has rescanned
    since: asked for after the settle, that scan comes after every event it was sent."""
    _udevadm("settle", "--timeout=30")
    start = view.scans
    monitor.rescan_soon()
    until(lambda: view.scans > start, timeout)


def test_udevd_gives_the_loop_device_the_usb_identity_and_the_rotation_runs_by_itself(
    tmp_path: Path,
) -> None:
    register_usb_jobs()
    app, _ = new_appliance(tmp_path / "app")
    tree = file_tree(tmp_path / "tree", 6, 40_000)
    point = app.backup_files(str(tree), "docs").point.id
    disk = LoopDisk(tmp_path / "usb.img")
    view = UsbView(disk.image)
    runner = JobRunner(app)
    handler = Handler(app, runner)
    monitor = DeviceMonitor(handler, interval=3600.0, use_udev=True, scanner=view)
    with contextlib.ExitStack() as stack:
        stack.enter_context(running_udevd())
        rule = stack.enter_context(usb_identity_rule(disk.image))
        identity = f"serial:{rule['ID_SERIAL']}"

        @stack.callback
        def _cleanup() -> None:
            monitor.stop()
            runner.shutdown()
            unmount_below(tmp_path)
            disk.cleanup()
            _udevadm("settle", "--timeout=30")
            app.close()

        runner.start()
        monitor.start()
        assert monitor.listening and identity not in monitor.inventory.block

        # Plugged in blank: udevd's event makes the monitor rescan; the disk is a USB disk
        # with the recorded stick's identity, offered on the page and not touched.
        devnode = disk.plug_in()
        until(lambda: identity in monitor.inventory.block, 30)
        record = monitor.inventory.block[identity]
        assert (record.devnode, record.kind, record.bus, record.usb) == (
            devnode,
            "disk",
            "usb",
            True,
        )
        assert (record.serial, record.vendor, record.model) == (
            rule["ID_SERIAL_SHORT"],
            rule["ID_VENDOR"],
            rule["ID_MODEL"],
        )
        assert record.fs_uuid is None and record.backing_file is None
        until(lambda: [d["identity"] for d in offered_disks(app)] == [identity], 30)
        assert handler.actions(identity) == ["offer"]
        assert not mounts_below(tmp_path) and not _exports(app)

        # Initialised from the monitor's record: mkfs is a udev event too (the filesystem
        # appears on the record); the medium is no longer offered.
        medium = initialise_medium(app, record, "OFFSITE-A", "Offsite", inventory=monitor.inventory)
        until(lambda: monitor.inventory.block[identity].fs_uuid == medium.identity, 30)
        _settled(monitor, view)
        assert offered_disks(app) == []
        # A rescan that saw the new filesystem before the medium was recorded may hand the
        # disk over only now: it is not offered again.
        assert not offer_disk(app, monitor.inventory.block[identity])
        assert offered_disks(app) == []
        assert medium_states(app)[medium.identity].state == "safe_to_remove"
        assert not _exports(app)

        # Pulled: the monitor sees it go and the medium is out.
        disk.pull()
        until(lambda: medium_states(app)[medium.identity].state == "out", 30)
        assert identity not in monitor.inventory.block
        assert handler.actions(medium.identity)[-1] == "out"

        # Plugged in again: the monitor's diff starts the export by itself.
        devnode = disk.plug_in()
        until(lambda: len(_exports(app)) == 1, 30)
        job_id = _exports(app)[0].id
        done = runner.wait(job_id, 120)
        assert done.state == "succeeded", done.error
        assert done.result["safe_to_remove"] and done.result["copied"][0]["point"] == point
        log = [line.message for line in app.catalog.job_log(job_id)]
        assert "USB disk OFFSITE-A is safe to remove" in log, log
        location = app.find_location("OFFSITE-A")
        copy = {c.location_id: c for c in app.catalog.copies_of(point)}[location.id]
        assert copy.state == "present" and copy.verified_at is not None
        assert medium_states(app)[medium.identity].state == "safe_to_remove"
        assert not os.path.ismount(media_mountpoint(app.data_dir.path, medium.identity))
        assert monitor.inventory.block[identity].devnode == devnode

        # Duplicates: udev's add and change for the same disk again, and a rescan: the
        # rescans find nothing new, and the same add handed over twice starts nothing.
        for action in ("add", "change"):
            assert _udevadm("trigger", f"--action={action}", devnode).returncode == 0
        monitor.rescan_soon()
        _settled(monitor, view)
        again = on_devices_changed(
            app,
            runner,
            DeviceDiff(added=(monitor.inventory.block[identity],)),
            monitor.inventory,
        )
        assert [a["action"] for a in again] == ["nothing"]
        assert [j.id for j in _exports(app)] == [job_id]
        assert medium_states(app)[medium.identity].state == "safe_to_remove"
        assert not handler.errors, handler.errors
    assert not mounts_below(tmp_path) and not disk.attached()
