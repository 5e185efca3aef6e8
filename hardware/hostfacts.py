"""What the host says about its disks' use: the facts the pool rules (:mod:`hardware.eligibility`)
decide on, read from the kernel in one place.

* Mounted: every device under a mount of ``/proc/self/mountinfo`` (found by its ``major:minor``
  through ``/sys/dev/block``, or by the mount source), every member of a mounted btrfs
  (``/sys/fs/btrfs/<uuid>/devices``: a raid1 pool lists only one of its disks as the source),
  and every active swap (``/proc/swaps``).
* System disks: the whole disks under ``/``, ``/boot``, ``/usr``, ``/var`` and the appliance's
  data directory: the mount holding each path, its device(s), and their disks (a partition's
  disk is its parent in ``/sys/class/block``; a device-mapper/md device's are its ``slaves``).
* Held: devices another kernel device sits on (``/sys/class/block/X/holders``).

Devices are named by their node (``/dev/sdb``) here: these facts are a snapshot taken together
with a scan, never stored.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

#: What the appliance cannot live without: a disk holding one of these is a system disk.
SYSTEM_PATHS = ("/", "/boot", "/usr", "/var")
#: The smallest disk a pool takes by default.
MIN_POOL_DISK_BYTES = 1 << 30

SYS_BLOCK = "/sys/class/block"


@dataclass(frozen=True)
class HostFacts:
    """The host's use of its disks (see the module doc). Every mapping is keyed by device node."""

    #: Device node -> where it is in use (a mount point, or ``swap``).
    mounted: dict[str, str] = field(default_factory=dict)
    #: UUIDs of mounted filesystems known to span several devices (btrfs).
    mounted_fs_uuids: frozenset[str] = frozenset()
    #: Whole-disk device node -> the system paths it holds (``("/", "/var")``).
    system_disks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Device node -> the kernel devices built on it (``("dm-0",)``).
    held: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: Identities or filesystem UUIDs of devices already in a pool (given by the caller).
    pool_members: frozenset[str] = frozenset()
    #: Identities or filesystem UUIDs of devices registered for restores (given by the caller).
    restore_devices: frozenset[str] = frozenset()
    min_size_bytes: int = MIN_POOL_DISK_BYTES


@dataclass(frozen=True)
class MountEntry:
    """One line of ``/proc/self/mountinfo``."""

    major_minor: str
    target: str
    fs_type: str
    source: str


def host_facts(
    data_dir: str,
    pool_members: Iterable[str] = (),
    restore_devices: Iterable[str] = (),
    *,
    min_size_bytes: int = MIN_POOL_DISK_BYTES,
) -> HostFacts:
    """The facts of this host now; ``data_dir`` is the appliance's data directory (a system
    path too), ``pool_members`` and ``restore_devices`` come from the catalog."""
    entries = mount_entries()
    btrfs = btrfs_devices()
    mounted: dict[str, str] = {}
    mounted_uuids: set[str] = set()
    for entry in entries:
        for name in _names_of_mount(entry, btrfs):
            mounted.setdefault(f"/dev/{name}", entry.target)
        mounted_uuids.update(u for u, names in btrfs.items() if set(names) & _source_names(entry))
    for name in swap_devices():
        mounted.setdefault(f"/dev/{name}", "swap")
    system: dict[str, list[str]] = {}
    for path in (*SYSTEM_PATHS, data_dir):
        holding = mount_of(path, entries)
        if holding is None:
            continue
        for name in _names_of_mount(holding, btrfs):
            for disk in disks_under(name):
                held_paths = system.setdefault(f"/dev/{disk}", [])
                if path not in held_paths:
                    held_paths.append(path)
    return HostFacts(
        mounted=mounted,
        mounted_fs_uuids=frozenset(mounted_uuids),
        system_disks={k: tuple(v) for k, v in system.items()},
        held=holders(),
        pool_members=frozenset(pool_members),
        restore_devices=frozenset(restore_devices),
        min_size_bytes=min_size_bytes,
    )


def mount_entries(mountinfo: str = "/proc/self/mountinfo") -> list[MountEntry]:
    found = []
    with open(mountinfo, encoding="utf-8", errors="replace") as f:
        for line in f:
            before, sep, after = line.partition(" - ")
            head, tail = before.split(), after.split()
            if sep and len(head) >= 5 and len(tail) >= 2:
                found.append(MountEntry(head[2], _unescape(head[4]), tail[0], _unescape(tail[1])))
    return found


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def mount_of(path: str, entries: list[MountEntry]) -> MountEntry | None:
    """The mount holding ``path`` (the last mounted on the longest matching mount point)."""
    path = os.path.realpath(path)
    best: MountEntry | None = None
    for entry in entries:
        target = entry.target.rstrip("/") or "/"
        inside = path == target or path.startswith(target + "/") or target == "/"
        if inside and (best is None or len(target) >= len(best.target.rstrip("/") or "/")):
            best = entry
    return best


def btrfs_devices(root: str = "/sys/fs/btrfs") -> dict[str, tuple[str, ...]]:
    """Mounted btrfs filesystems: UUID -> the kernel names of all their devices."""
    found = {}
    try:
        uuids = os.listdir(root)
    except OSError:
        return {}
    for uuid in uuids:
        try:
            found[uuid] = tuple(sorted(os.listdir(os.path.join(root, uuid, "devices"))))
        except OSError:
            continue  # "features" and other non-filesystem entries
    return found


def _source_names(entry: MountEntry) -> set[str]:
    names = set()
    if os.path.exists(f"/sys/dev/block/{entry.major_minor}"):
        names.add(os.path.basename(os.path.realpath(f"/sys/dev/block/{entry.major_minor}")))
    if entry.source.startswith("/dev/"):
        name = os.path.basename(os.path.realpath(entry.source))
        if os.path.exists(os.path.join(SYS_BLOCK, name)):
            names.add(name)
    return names


def _names_of_mount(entry: MountEntry, btrfs: dict[str, tuple[str, ...]]) -> set[str]:
    """The kernel names of the block devices a mount sits on (all members of a btrfs)."""
    names = _source_names(entry)
    if entry.fs_type == "btrfs":
        for members in btrfs.values():
            if names & set(members):
                names.update(members)
    return names


def disks_under(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
    """The whole disks under the block device ``name``: itself, a partition's disk, and the
    disks under the devices a device-mapper or md device is built from."""
    if name in seen:
        return set()
    path = os.path.join(SYS_BLOCK, name)
    slaves = _listdir(os.path.join(path, "slaves"))
    if slaves:
        found: set[str] = set()
        for slave in slaves:
            found |= disks_under(slave, seen | {name})
        return found
    if os.path.exists(os.path.join(path, "partition")):
        return {os.path.basename(os.path.dirname(os.path.realpath(path)))}
    return {name}


def swap_devices(swaps: str = "/proc/swaps") -> list[str]:
    try:
        with open(swaps, encoding="utf-8") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    found = []
    for line in lines:
        source = line.split()[0] if line.split() else ""
        name = os.path.basename(os.path.realpath(source))
        if source.startswith("/dev/") and os.path.exists(os.path.join(SYS_BLOCK, name)):
            found.append(name)
    return found


def holders() -> dict[str, tuple[str, ...]]:
    found = {}
    for name in _listdir(SYS_BLOCK):
        held_by = _listdir(os.path.join(SYS_BLOCK, name, "holders"))
        if held_by:
            found[f"/dev/{name}"] = tuple(sorted(held_by))
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
