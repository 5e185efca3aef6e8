"""Discovery: udev devices become frozen records, and a monitor reports what changed.

This is the only module that imports pyudev (an import-linter contract keeps it so), and it does
so lazily, inside the functions that talk to udev. Everything it hands out is a plain record of
:mod:`hardware.records`.

Three layers:

* :func:`record_from_properties` is pure: a device's udev properties and a few sysfs attributes
  (plain dicts of strings) in, a :class:`BlockDevice`, :class:`TapeDrive`, :class:`Changer` or
  ``None`` out. It holds every identity rule and is tested on property dumps recorded from real
  drivers (``tests/fixtures/udev``).
* :func:`scan` enumerates udev (``block``, ``scsi_tape``, ``scsi_generic``) into an
  :class:`Inventory`.
* :class:`DeviceMonitor` is a thread that rescans on every udev event and on a timer, and calls
  back with the :func:`~hardware.records.diff` when a rescan differs from the last one. An event
  only triggers a rescan, so a duplicated or lost event is harmless: the next rescan sees the truth.

Identity (what stays the same across plugs, ports and reboots):

* a disk: ``wwn:<ID_WWN_WITH_EXTENSION or ID_WWN>``, else ``serial:<ID_SERIAL>``;
* a tape drive or changer: ``serial:<ID_SCSI_SERIAL>`` (the serial on the drive's label, what
  ``mtx`` and the tape software show), else ``wwn:...``, else ``serial:<ID_SERIAL>``;
* a loop device: ``loop:<backing file>``; a partition: ``<its disk's identity>-part<N>``;
* last resorts, not stable across ports: ``path:<ID_PATH>``, then ``node:<kernel name>``.

Without udevd, libudev still enumerates sysfs but a device carries only the kernel's properties
(no ``ID_SERIAL``, no ``ID_FS_*``). Then the identity comes from sysfs (``wwid`` written as udev
writes it, ``naa.X`` -> ``0xX``; the virtio/NVMe ``serial``; SCSI VPD page 0x80 for tapes), so a
tape, a SCSI disk with a WWN, a virtio disk and every loop device keep the same identity with and
without udevd; and the filesystem fields come from ``blkid -p`` (read from the disk). While udevd
runs, a device it has not finished processing is left for the next rescan, so a half-known device
never shows up under a provisional identity.

Skipped: ``ram``/``zram``/``dm-`` devices, loop and nbd devices with nothing attached, the
rewinding tape nodes (``st0``) and the mode variants (``nst0a``/``l``/``m``): a tape is used
through its non-rewinding node ``nstN``.
"""

from __future__ import annotations

import logging
import os
import re
import select
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from hardware.records import (
    BlockDevice,
    BlockKind,
    Changer,
    Device,
    DeviceDiff,
    Inventory,
    TapeDrive,
    diff,
)

log = logging.getLogger(__name__)

#: The udev subsystems discovery enumerates and listens to.
SUBSYSTEMS = ("block", "scsi_tape", "scsi_generic")
#: udevd's control socket: present while udevd runs.
UDEV_CONTROL = "/run/udev/control"
#: SCSI peripheral device type of a medium changer (SPC ``type`` attribute).
SCSI_TYPE_CHANGER = "8"
#: Longest a ``blkid -p`` probe of one device may take.
BLKID_TIMEOUT = 10.0

_SKIPPED_BLOCK = re.compile(r"^(ram|zram|dm-)")
_NON_REWINDING_TAPE = re.compile(r"^nst\d+$")
#: The sysfs attributes the converter reads (``device/...`` goes through the parent's link).
_BLOCK_ATTRIBUTES = (
    "size",
    "ro",
    "removable",
    "partition",
    "loop/backing_file",
    "serial",
    "wwid",
    "device/wwid",
    "device/serial",
    "device/vendor",
    "device/model",
)
_SCSI_ATTRIBUTES = (
    "device/type",
    "device/vpd_pg80",
    "device/wwid",
    "device/vendor",
    "device/model",
)

Properties = Mapping[str, str]


# --- the pure converter --------------------------------------------------------------------------


def record_from_properties(
    properties: Properties,
    attributes: Properties,
    *,
    parent_properties: Properties | None = None,
    parent_attributes: Properties | None = None,
    generic: str | None = None,
) -> Device | None:
    """The record of one udev device, or None for a device discovery does not report.

    ``properties`` are udev's (``SUBSYSTEM``, ``DEVNAME``, ``DEVTYPE``, ``ID_*``); ``attributes``
    are sysfs attribute values as text (``size``, ``ro``, ``loop/backing_file``, ``device/type``:
    the names in ``_BLOCK_ATTRIBUTES`` and ``_SCSI_ATTRIBUTES``; binary ones decoded as latin-1).
    For a partition, ``parent_*`` describe its disk (its identity is the partition's parent); for
    a tape, ``generic`` is the SCSI generic node of the same device, if known.
    """
    subsystem = properties.get("SUBSYSTEM")
    devnode = properties.get("DEVNAME")
    if not devnode:
        return None
    if subsystem == "block":
        return _block_record(properties, attributes, parent_properties, parent_attributes)
    if subsystem == "scsi_tape" and _NON_REWINDING_TAPE.match(os.path.basename(devnode)):
        return TapeDrive(
            identity=_scsi_identity(properties, attributes),
            devnode=devnode,
            vendor=_vendor(properties, attributes),
            model=_model(properties, attributes),
            serial=_scsi_serial(properties, attributes),
            wwn=_wwn(properties, attributes, "device/wwid"),
            generic=generic,
            links=_links(properties),
        )
    if subsystem == "scsi_generic" and _text(attributes, "device/type") == SCSI_TYPE_CHANGER:
        return Changer(
            identity=_scsi_identity(properties, attributes),
            devnode=devnode,
            vendor=_vendor(properties, attributes),
            model=_model(properties, attributes),
            serial=_scsi_serial(properties, attributes),
            links=_links(properties),
        )
    return None


def _block_record(
    properties: Properties,
    attributes: Properties,
    parent_properties: Properties | None,
    parent_attributes: Properties | None,
) -> BlockDevice | None:
    devnode = properties["DEVNAME"]
    name = os.path.basename(devnode)
    if _SKIPPED_BLOCK.match(name):
        return None
    size = _int(attributes, "size") * 512
    backing_file = _text(attributes, "loop/backing_file")
    whole = properties.get("DEVTYPE") != "partition"
    if whole and name.startswith("loop") and backing_file is None:
        return None  # a free loop device
    if whole and name.startswith("nbd") and size == 0:
        return None  # nothing connected
    kind: BlockKind
    parent = None
    if not whole:
        if parent_properties is None:
            return None
        disk = _block_record(parent_properties, parent_attributes or {}, None, None)
        if disk is None:
            return None
        kind, parent = "partition", disk.identity
        identity = f"{disk.identity}-part{_int(attributes, 'partition')}"
        backing_file = None
    elif backing_file is not None:
        kind, identity = "loop", f"loop:{backing_file}"
    else:
        kind, identity = "disk", _disk_identity(properties, attributes, name)
    real = kind != "loop" and not (parent or "").startswith("loop:")  # a loop has no hardware
    return BlockDevice(
        identity=identity,
        devnode=devnode,
        kind=kind,
        size_bytes=size,
        bus=properties.get("ID_BUS") if real else None,
        vendor=_vendor(properties, attributes) if real else None,
        model=_model(properties, attributes) if real else None,
        serial=_disk_serial(properties, attributes) if real else None,
        wwn=_wwn(properties, attributes, "wwid", "device/wwid") if real else None,
        removable=_text(attributes, "removable") == "1",
        read_only=_text(attributes, "ro") == "1",
        fs_type=properties.get("ID_FS_TYPE") or None,
        fs_uuid=properties.get("ID_FS_UUID") or None,
        fs_label=_decoded(properties, "ID_FS_LABEL"),
        parent=parent,
        backing_file=backing_file,
        links=_links(properties),
    )


def _first(*choices: tuple[str, str | None]) -> str:
    return next(f"{prefix}:{value}" for prefix, value in choices if value)


def _disk_identity(properties: Properties, attributes: Properties, name: str) -> str:
    return _first(
        ("wwn", _wwn(properties, attributes, "wwid", "device/wwid")),
        ("serial", properties.get("ID_SERIAL")),
        ("serial", _text(attributes, "serial") or _text(attributes, "device/serial")),
        ("path", properties.get("ID_PATH")),
        ("node", name),
    )


def _scsi_identity(properties: Properties, attributes: Properties) -> str:
    return _first(
        ("serial", _scsi_serial(properties, attributes)),
        ("wwn", _wwn(properties, attributes, "device/wwid")),
        ("serial", properties.get("ID_SERIAL")),
        ("node", os.path.basename(properties.get("DEVNAME", ""))),
    )


def _scsi_serial(properties: Properties, attributes: Properties) -> str | None:
    return properties.get("ID_SCSI_SERIAL") or _vpd_serial(attributes.get("device/vpd_pg80"))


def _vpd_serial(page: str | None) -> str | None:
    """The unit serial number in a SCSI VPD page 0x80 (4 header bytes, then the serial)."""
    if not page or len(page) < 4 or ord(page[1]) != 0x80:
        return None
    return page[4 : 4 + ord(page[3])].strip(" \x00") or None


def _disk_serial(properties: Properties, attributes: Properties) -> str | None:
    return (
        properties.get("ID_SCSI_SERIAL")
        or properties.get("ID_SERIAL_SHORT")
        or _text(attributes, "serial")
        or _text(attributes, "device/serial")
    )


def _wwn(properties: Properties, attributes: Properties, *wwid_attributes: str) -> str | None:
    found = properties.get("ID_WWN_WITH_EXTENSION") or properties.get("ID_WWN")
    if found:
        return found
    for name in wwid_attributes:
        wwid = _text(attributes, name)
        if wwid and wwid.startswith("naa."):
            return "0x" + wwid[4:]  # what udev's ID_WWN_WITH_EXTENSION says
        if wwid and wwid.startswith("eui."):
            return wwid  # what udev's ID_WWN says for NVMe
    return None


def _vendor(properties: Properties, attributes: Properties) -> str | None:
    return _decoded(properties, "ID_VENDOR") or _text(attributes, "device/vendor")


def _model(properties: Properties, attributes: Properties) -> str | None:
    return _decoded(properties, "ID_MODEL") or _text(attributes, "device/model")


def _decoded(properties: Properties, key: str) -> str | None:
    """udev's ``KEY_ENC`` (the true value, ``\\xNN`` escaped) decoded, else ``KEY``."""
    encoded = properties.get(f"{key}_ENC")
    if encoded is None:
        return properties.get(key) or None
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m[1], 16)]), encoded.encode())
    return raw.decode("utf-8", "replace").strip() or None


def _links(properties: Properties) -> tuple[str, ...]:
    return tuple(sorted(properties.get("DEVLINKS", "").split()))


def _text(attributes: Properties, key: str) -> str | None:
    value = attributes.get(key)
    return (value.strip() or None) if value is not None else None


def _int(attributes: Properties, key: str) -> int:
    try:
        return int(_text(attributes, key) or 0)
    except ValueError:
        return 0


# --- scanning udev ------------------------------------------------------------------------------


def udevd_running() -> bool:
    """Whether udevd runs: then devices carry udev's properties and events arrive.

    udevd leaves its control socket behind when it exits, so the file alone proves nothing: the
    kernel's socket table (``/proc/net/unix``) must show someone listening on it.
    """
    if not os.path.exists(UDEV_CONTROL):
        return False
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            next(f, None)  # the header
            for line in f:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; Flags 00010000: listening.
                if len(fields) >= 8 and fields[7] == UDEV_CONTROL and int(fields[3], 16) & 0x10000:
                    return True
    except (OSError, ValueError):
        return True  # cannot tell: trust the socket file
    return False


def scan(context: Any = None) -> Inventory:
    """Every disk, partition, loop device, tape drive and changer udev knows now.

    ``context`` is a ``pyudev.Context`` (one is made if None). Two devices claiming one identity
    (the same file behind two loop devices) are told apart by ``@<kernel name>`` on the second.
    """
    import pyudev

    context = context or pyudev.Context()
    waiting_for_udev = udevd_running()
    devices = []
    for subsystem in SUBSYSTEMS:
        for device in context.list_devices(subsystem=subsystem):
            if device.device_node is None:
                continue
            if waiting_for_udev and not device.is_initialized and not _recorded(device):
                continue  # udevd has not finished with it: the next rescan sees it whole
            devices.append(device)
    devices.sort(key=lambda d: d.sys_path)
    generics = {
        d.parent.sys_path: d.device_node
        for d in devices
        if d.subsystem == "scsi_generic" and d.parent is not None
    }
    found: dict[str, Device] = {}
    for device in devices:
        record = _record_of(device, generics)
        if record is None:
            continue
        if record.identity in found:
            record = replace(record, identity=f"{record.identity}@{device.sys_name}")
        found[record.identity] = record
    return Inventory(
        block={k: v for k, v in found.items() if isinstance(v, BlockDevice)},
        tapes={k: v for k, v in found.items() if isinstance(v, TapeDrive)},
        changers={k: v for k, v in found.items() if isinstance(v, Changer)},
    )


def _recorded(device: Any) -> bool:
    # umockdev's recordings put udev's properties in the uevent file: never "initialized", yet
    # complete. A real device that udev has not processed yet carries no ID_* property at all.
    return any(key.startswith("ID_") for key in device.properties)


def _record_of(device: Any, generics: Mapping[str, str]) -> Device | None:
    properties = dict(device.properties)
    properties.setdefault("DEVNAME", device.device_node)
    names = _BLOCK_ATTRIBUTES if device.subsystem == "block" else _SCSI_ATTRIBUTES
    attributes = _attributes_of(device, names)
    parent_properties = parent_attributes = None
    if device.subsystem == "block":
        if device.device_type == "partition" and device.parent is not None:
            parent_properties = dict(device.parent.properties)
            parent_properties.setdefault("DEVNAME", device.parent.device_node or "")
            parent_attributes = _attributes_of(device.parent, _BLOCK_ATTRIBUTES)
        if not device.is_initialized and "ID_FS_TYPE" not in properties:
            name = device.sys_name
            attached = not name.startswith("loop") or attributes.get("loop/backing_file")
            if attached and _int(attributes, "size") > 0:
                properties.update(probe_filesystem(device.device_node))
    generic = generics.get(device.parent.sys_path) if device.parent is not None else None
    return record_from_properties(
        properties,
        attributes,
        parent_properties=parent_properties,
        parent_attributes=parent_attributes,
        generic=generic if device.subsystem == "scsi_tape" else None,
    )


def _attributes_of(device: Any, names: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            value = device.attributes.get(name)
        except (OSError, UnicodeError):
            value = None
        if isinstance(value, bytes):
            found[name] = value.decode("latin-1")
    return found


def probe_filesystem(devnode: str) -> dict[str, str]:
    """The ``ID_FS_*`` properties of the filesystem on ``devnode``, read from the disk by
    ``blkid -p`` (what udev would have said); empty when there is none or blkid cannot read it."""
    try:
        done = subprocess.run(
            ["blkid", "-p", "-o", "udev", devnode],
            capture_output=True,
            text=True,
            timeout=BLKID_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith("ID_FS_"):
            found[key] = value
    return found


# --- the monitor --------------------------------------------------------------------------------

OnChange = Callable[[DeviceDiff, Inventory], None]


class DeviceMonitor:
    """A thread that rescans on udev events and every ``interval`` seconds, and calls
    ``on_change(diff, inventory)`` (in its own thread) whenever a rescan differs from the last.

    ``use_udev``: None listens to udev events when udevd runs (and starts listening if udevd
    appears later); False never listens (periodic rescans only, the path taken without udevd);
    True always listens. :meth:`start` makes the first scan (the baseline, reported as all
    added only with ``report_initial``); :meth:`stop` returns within a second unless
    ``on_change`` itself is busy. An exception in ``on_change`` or in a scan is logged and the
    monitor carries on.
    """

    def __init__(
        self,
        on_change: OnChange,
        *,
        interval: float = 30.0,
        use_udev: bool | None = None,
        report_initial: bool = False,
        scanner: Callable[[], Inventory] | None = None,
    ) -> None:
        self._on_change = on_change
        self._interval = interval
        self._use_udev = use_udev
        self._report_initial = report_initial
        self._context: Any = None
        self._scanner = scanner or (lambda: scan(self._udev_context()))
        self._inventory = Inventory()
        self._monitor: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = -1, -1

    @property
    def inventory(self) -> Inventory:
        """The result of the latest scan."""
        return self._inventory

    @property
    def listening(self) -> bool:
        """Whether udev events trigger rescans (else only the timer does)."""
        return self._monitor is not None

    def start(self) -> Inventory:
        """Scan once (the baseline), start the thread and return the baseline."""
        if self._thread is not None:
            raise RuntimeError("the device monitor is already running")
        first = self._scanner()
        self._inventory = first
        if self._report_initial:
            self._deliver(diff(Inventory(), first), first)
        if self._use_udev or (self._use_udev is None and udevd_running()):
            self._listen()
        self._stopping.clear()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="device-monitor", daemon=True)
        self._thread.start()
        return first

    def stop(self, timeout: float = 1.0) -> None:
        """Stop the thread and close the udev socket; nothing to do when not running."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        os.write(self._wake_w, b"x")
        thread.join(timeout)
        if thread.is_alive():
            log.warning("the device monitor did not stop within %.1f s", timeout)
            return  # leave its descriptors open: the thread may still use them
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._monitor = None

    def rescan_soon(self) -> None:
        """Ask the thread for a rescan now (after the caller changed a disk, say)."""
        if self._thread is not None:
            os.write(self._wake_w, b"r")

    def __enter__(self) -> DeviceMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _udev_context(self) -> Any:
        import pyudev

        if self._context is None:
            self._context = pyudev.Context()
        return self._context

    def _listen(self) -> None:
        import pyudev

        monitor = pyudev.Monitor.from_netlink(self._udev_context())
        for subsystem in SUBSYSTEMS:
            monitor.filter_by(subsystem)
        monitor.start()
        self._monitor = monitor

    def _run(self) -> None:
        next_periodic = time.monotonic() + self._interval
        while not self._stopping.is_set():
            waiting = [self._wake_r] + ([self._monitor] if self._monitor is not None else [])
            timeout = max(0.0, next_periodic - time.monotonic())
            try:
                readable, _, _ = select.select(waiting, [], [], timeout)
            except (OSError, ValueError):
                log.exception("waiting for udev events failed; rescanning on the timer only")
                self._monitor, readable = None, []
            if self._stopping.is_set():
                break
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
            if self._monitor is not None and self._monitor in readable:
                self._drain()
            if not readable:
                next_periodic = time.monotonic() + self._interval
                if self._monitor is None and self._use_udev is None and udevd_running():
                    try:
                        self._listen()
                    except Exception:
                        log.exception("listening to udev events failed")
            self._rescan()

    def _drain(self) -> None:
        # Only the fact that something happened matters: the rescan reads the truth.
        try:
            while self._monitor.poll(timeout=0) is not None:
                pass
        except Exception:
            log.exception("reading udev events failed; rescanning on the timer only")
            self._monitor = None

    def _rescan(self) -> None:
        try:
            new = self._scanner()
        except Exception:
            log.exception("scanning devices failed; the next rescan tries again")
            return
        change = diff(self._inventory, new)
        self._inventory = new
        if not change.empty:
            self._deliver(change, new)

    def _deliver(self, change: DeviceDiff, inventory: Inventory) -> None:
        try:
            self._on_change(change, inventory)
        except Exception:
            log.exception("a device change handler failed")
