"""What the appliance knows about its hardware: plain frozen records, keyed by a stable identity.

The udev adapter (:mod:`hardware.udev`, the only module that imports pyudev) turns udev devices
into these records; everything else (pool rules, USB rotation, tape, the page) sees only them.
A device is known by what stays the same when it is unplugged and plugged in again, or moved to
another port: its WWN or serial number (a loop device: its backing file). ``devnode``
(``/dev/sdb``) is where it is *now*, for running a command on it, never a key.

A filesystem is known by its UUID (``fs_uuid``): a USB medium the appliance formatted is the same
medium on any port and under any device name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BlockKind = Literal["disk", "partition", "loop"]


@dataclass(frozen=True)
class BlockDevice:
    """A block device: a whole disk, a partition of one, or a loop device."""

    #: ``wwn:<WWN>``, ``serial:<ID_SERIAL>`` or ``loop:<backing file>`` (see the module doc).
    identity: str
    #: The device node now (``/dev/sdb``); changes across plugs and reboots.
    devnode: str
    kind: BlockKind
    size_bytes: int
    #: ``usb``, ``ata``, ``scsi``, ``nvme``, ``virtio`` ... (udev's ``ID_BUS``), None if unknown.
    bus: str | None = None
    vendor: str | None = None
    model: str | None = None
    serial: str | None = None
    wwn: str | None = None
    #: The kernel's ``removable`` flag (USB sticks; external USB hard disks often say 0: key on
    #: ``bus`` instead).
    removable: bool = False
    read_only: bool = False
    fs_type: str | None = None
    fs_uuid: str | None = None
    fs_label: str | None = None
    #: For a partition: the identity of its disk.
    parent: str | None = None
    #: For a loop device: the file behind it.
    backing_file: str | None = None
    #: Stable links udev made (``/dev/disk/by-id/...``, ``/dev/disk/by-uuid/...``).
    links: tuple[str, ...] = ()

    @property
    def usb(self) -> bool:
        return self.bus == "usb"


@dataclass(frozen=True)
class TapeDrive:
    """A tape drive (Linux ``st``), used through its non-rewinding node."""

    #: ``serial:<ID_SCSI_SERIAL or ID_SERIAL>`` or ``wwn:<WWN>``.
    identity: str
    #: The non-rewinding node (``/dev/nst0``).
    devnode: str
    vendor: str | None = None
    model: str | None = None
    serial: str | None = None
    wwn: str | None = None
    #: The SCSI generic node of the same device (``/dev/sg0``), if udev named it.
    generic: str | None = None
    links: tuple[str, ...] = ()


@dataclass(frozen=True)
class Changer:
    """A tape library's medium changer (a SCSI generic node whose device has type 8)."""

    identity: str
    #: The SCSI generic node (``/dev/sg1``) that ``mtx -f`` talks to.
    devnode: str
    vendor: str | None = None
    model: str | None = None
    serial: str | None = None
    links: tuple[str, ...] = ()


Device = BlockDevice | TapeDrive | Changer


@dataclass(frozen=True)
class Inventory:
    """Every device seen in one scan, by identity."""

    block: dict[str, BlockDevice] = field(default_factory=dict)
    tapes: dict[str, TapeDrive] = field(default_factory=dict)
    changers: dict[str, Changer] = field(default_factory=dict)

    def devices(self) -> dict[str, Device]:
        found: dict[str, Device] = {}
        found.update(self.block)
        found.update(self.tapes)
        found.update(self.changers)
        return found

    def by_fs_uuid(self, fs_uuid: str) -> BlockDevice | None:
        """The device holding the filesystem ``fs_uuid`` (a partition before its disk)."""
        matches = [d for d in self.block.values() if d.fs_uuid == fs_uuid]
        matches.sort(key=lambda d: d.kind != "partition")
        return matches[0] if matches else None


@dataclass(frozen=True)
class DeviceDiff:
    """What changed between two scans. Applying the same scan twice gives an empty diff, so a
    udev event delivered twice changes nothing."""

    added: tuple[Device, ...] = ()
    removed: tuple[Device, ...] = ()
    #: (before, after) pairs of devices whose record changed (a new filesystem, a new size).
    changed: tuple[tuple[Device, Device], ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed)


def diff(old: Inventory, new: Inventory) -> DeviceDiff:
    """The devices added, removed and changed from ``old`` to ``new`` (sorted by identity)."""
    before, after = old.devices(), new.devices()
    return DeviceDiff(
        added=tuple(after[k] for k in sorted(after.keys() - before.keys())),
        removed=tuple(before[k] for k in sorted(before.keys() - after.keys())),
        changed=tuple(
            (before[k], after[k])
            for k in sorted(before.keys() & after.keys())
            if before[k] != after[k]
        ),
    )
