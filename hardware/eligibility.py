"""Which disks may join a pool: pure rules over an :class:`Inventory` and the :class:`HostFacts`.

Every block device gets a :class:`Candidate` with its refusals in words (shown on the page as
they are; empty means the device may join a pool) and warnings that do not refuse it but that
the user should read before its contents are erased.

The rules, in the words the page shows:

* a device in use: "mounted at /srv", "its filesystem is mounted (btrfs <uuid>)", "in use by
  dm-0", "already a pool member", "registered as a restore device";
* "is the system disk (holds /, /var)", and for its partitions "is on the system disk (...)";
* a whole disk whose partition is in use: "holds sdb1, which is mounted at /mnt" (pooling the
  disk would erase that partition);
* a partition whose disk or sibling partition is in use: "shares its disk with sdb1, which is
  mounted at /mnt" -- a pool must not share a disk's failures and its I/O with something else,
  so a partition only qualifies on a disk that is otherwise free;
* "is read-only"; "is too small (512 MiB; a pool disk needs at least 1 GiB)";
* a tape drive or a changer is never a candidate (:func:`refusals` says why; they are not listed
  by :func:`pool_candidates`).
"""

from __future__ import annotations

from dataclasses import dataclass

from hardware.hostfacts import HostFacts
from hardware.records import BlockDevice, Device, Inventory, TapeDrive


@dataclass(frozen=True)
class Candidate:
    """A block device and why it may not join a pool (nothing: it may)."""

    device: BlockDevice
    refusals: tuple[str, ...] = ()
    #: What joining would destroy or risk; shown, but the device stays eligible.
    warnings: tuple[str, ...] = ()

    @property
    def eligible(self) -> bool:
        return not self.refusals


def pool_candidates(inventory: Inventory, facts: HostFacts) -> list[Candidate]:
    """Every block device of ``inventory`` with its refusals and warnings, by device node."""
    return [
        Candidate(device, refusals(device, inventory, facts), warnings(device, inventory))
        for device in sorted(inventory.block.values(), key=lambda d: _natural(d.devnode))
    ]


def refusals(device: Device, inventory: Inventory, facts: HostFacts) -> tuple[str, ...]:
    """Why ``device`` may not join a pool, in words; empty when it may."""
    if isinstance(device, TapeDrive):
        return ("is a tape drive, not a disk",)
    if not isinstance(device, BlockDevice):
        return ("is a tape changer, not a disk",)
    found = list(uses(device, facts))
    disk = inventory.block.get(device.parent) if device.parent else None
    system = facts.system_disks.get(device.devnode)
    if system is not None:
        found.append(f"is the system disk (holds {', '.join(system)})")
    elif disk is not None and disk.devnode in facts.system_disks:
        found.append(f"is on the system disk (holds {', '.join(facts.system_disks[disk.devnode])})")
    if device.kind != "partition":
        for part in partitions_of(device, inventory):
            found += [f"holds {_name(part)}, which is {use}" for use in uses(part, facts)]
    elif disk is not None:
        for other in (disk, *partitions_of(disk, inventory)):
            if other.identity != device.identity:
                found += [
                    f"shares its disk with {_name(other)}, which is {use}"
                    for use in uses(other, facts)
                ]
    if device.read_only:
        found.append("is read-only")
    if device.size_bytes < facts.min_size_bytes:
        found.append(
            f"is too small ({_size(device.size_bytes)}; a pool disk needs at least"
            f" {_size(facts.min_size_bytes)})"
        )
    return tuple(dict.fromkeys(found))  # in order, each once


def uses(device: BlockDevice, facts: HostFacts) -> list[str]:
    """What uses ``device`` itself now, in words ("mounted at /srv", "already a pool member")."""
    found = []
    if device.devnode in facts.mounted:
        where = facts.mounted[device.devnode]
        found.append("used as swap" if where == "swap" else f"mounted at {where}")
    if device.fs_uuid and device.fs_uuid in facts.mounted_fs_uuids:
        found.append(
            f"its filesystem is mounted ({device.fs_type or 'filesystem'} {device.fs_uuid})"
        )
    if device.devnode in facts.held:
        found.append(f"in use by {', '.join(facts.held[device.devnode])}")
    keys = {device.identity, device.fs_uuid} - {None}
    if keys & facts.pool_members:
        found.append("already a pool member")
    if keys & facts.restore_devices:
        found.append("registered as a restore device")
    return found


def warnings(device: BlockDevice, inventory: Inventory) -> tuple[str, ...]:
    """What making a pool on ``device`` would erase or risk (does not refuse it)."""
    found = []
    if device.fs_type:
        label = f" labelled {device.fs_label!r}" if device.fs_label else ""
        found.append(f"holds a {device.fs_type} filesystem{label}: a pool erases it")
    parts = partitions_of(device, inventory) if device.kind != "partition" else []
    if parts:
        names = ", ".join(_name(p) for p in parts)
        found.append(f"holds partitions ({names}): a pool on the whole disk erases them")
    if device.usb:
        found.append("is a USB disk: a pool's disks stay in the box (USB disks are rotation media)")
    elif device.removable:
        found.append("is removable: a pool's disks stay in the box")
    return tuple(found)


def partitions_of(disk: BlockDevice, inventory: Inventory) -> list[BlockDevice]:
    return sorted(
        (d for d in inventory.block.values() if d.parent == disk.identity),
        key=lambda d: _natural(d.devnode),
    )


def _name(device: BlockDevice) -> str:
    return device.devnode.removeprefix("/dev/")


def _natural(devnode: str) -> tuple[str, int, str]:
    # sdb2 before sdb10, loop2 before loop10
    stem = devnode.rstrip("0123456789")
    digits = devnode[len(stem) :]
    return (stem, int(digits) if digits else -1, devnode)


def _size(size: int) -> str:
    value, unit = float(size), "bytes"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
