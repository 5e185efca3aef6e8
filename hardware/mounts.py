"""Filesystems on the appliance's disks: make one, mount it by UUID, flush and unmount it.

Thin adapters over ``mkfs.*``, ``blkid``, ``mount`` and ``umount``; every failure is a
:class:`~appliance.errors.ApplianceError` whose message says what the command said. Pools and
USB media both use these. A filesystem is always mounted by its UUID (``/dev/disk/by-uuid`` may
lag behind udev or be absent without udevd, so the device is found with ``blkid``), never by a
``/dev/sdX`` name remembered from before.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from appliance.errors import ApplianceError, InvalidInput, NotFound

FsType = Literal["ext4", "xfs", "btrfs"]
FS_TYPES: tuple[FsType, ...] = ("ext4", "xfs", "btrfs")
#: btrfs profiles for data and metadata of a pool of several disks.
RAID_PROFILES = ("single", "raid1", "raid10")
#: Longest a filesystem command may take (mkfs of a large disk trims it first: minutes).
COMMAND_TIMEOUT = 900.0


class CommandFailed(ApplianceError):
    """A system command this module ran failed; the message carries what it printed."""


def _run(argv: Sequence[str], what: str, timeout: float = COMMAND_TIMEOUT) -> str:
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise CommandFailed(f"{what}: {argv[0]} is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(f"{what}: {argv[0]} did not finish in {timeout:.0f} s") from exc
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise CommandFailed(f"{what}: {said[-1] if said else f'exit status {done.returncode}'}")
    return done.stdout


def make_filesystem(
    devnodes: Sequence[str], fs_type: str, label: str, profile: str = "single"
) -> str:
    """Make a filesystem of ``fs_type`` labelled ``label`` on ``devnodes`` (several only for
    btrfs, with ``profile`` for data and metadata) and return its UUID. Destroys what was there:
    callers check the disks with the pool rules first."""
    if fs_type not in FS_TYPES:
        raise InvalidInput(f"filesystem {fs_type!r} is not one of {', '.join(FS_TYPES)}")
    if not devnodes:
        raise InvalidInput("a filesystem needs at least one disk")
    if len(devnodes) > 1 and fs_type != "btrfs":
        raise InvalidInput(f"{fs_type} lives on one disk; several disks make a btrfs pool")
    if profile not in RAID_PROFILES:
        raise InvalidInput(f"profile {profile!r} is not one of {', '.join(RAID_PROFILES)}")
    if profile == "raid1" and len(devnodes) < 2:
        raise InvalidInput("raid1 needs at least two disks")
    if profile == "raid10" and len(devnodes) < 4:
        raise InvalidInput("raid10 needs at least four disks")
    if fs_type == "ext4":
        argv = ["mkfs.ext4", "-q", "-F", "-L", label[:16], devnodes[0]]
    elif fs_type == "xfs":
        argv = ["mkfs.xfs", "-q", "-f", "-L", label[:12], devnodes[0]]
    else:
        meta = "dup" if profile == "single" and len(devnodes) == 1 else profile
        argv = ["mkfs.btrfs", "-q", "-f", "-L", label[:255], "-d", profile, "-m", meta]
        argv += list(devnodes)
    _run(argv, f"making {fs_type} on {', '.join(devnodes)}")
    uuid = filesystem_uuid(devnodes[0])
    if uuid is None:
        raise CommandFailed(f"{devnodes[0]} shows no filesystem after mkfs.{fs_type}")
    return uuid


def filesystem_uuid(devnode: str) -> str | None:
    """The UUID of the filesystem on ``devnode`` (read from the disk, not udev's cache)."""
    try:
        out = _run(["blkid", "-p", "-o", "value", "-s", "UUID", devnode], f"reading {devnode}")
    except CommandFailed:
        return None  # blkid exits 2 when it finds no filesystem
    return out.strip() or None


def devnodes_of(fs_uuid: str) -> list[str]:
    """The device nodes holding the filesystem ``fs_uuid`` now (several for a btrfs pool),
    probed afresh. blkid's cache is not asked: after a disk is pulled it still names the node
    that went away, and a disk plugged in again may come back on another node while the old
    one holds another disk."""
    try:
        out = _run(
            ["blkid", "-c", "/dev/null", "-o", "device", "-t", f"UUID={fs_uuid}"],
            "finding a filesystem",
        )
    except CommandFailed:
        return []
    found = (line.strip() for line in out.splitlines() if line.strip())
    return sorted(d for d in found if filesystem_uuid(d) == fs_uuid)


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    fs_type: str
    options: str


def mounts() -> list[Mount]:
    """The filesystems mounted now (``/proc/self/mounts``)."""
    found = []
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4:
                source, target = (_unescape(p) for p in parts[:2])
                found.append(Mount(source, target, parts[2], parts[3]))
    return found


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounted_at(target: str) -> Mount | None:
    target = os.path.realpath(target)
    found = [m for m in mounts() if m.target == target]
    return found[-1] if found else None


def mount_filesystem(
    fs_uuid: str, target: str, *, degraded: bool = False, read_only: bool = False
) -> str:
    """Mount the filesystem ``fs_uuid`` at ``target`` (made if missing) unless it is already
    mounted there; return the device it was mounted from. ``degraded`` lets a btrfs pool with
    a missing disk mount (it keeps serving from its mirrors)."""
    os.makedirs(target, mode=0o700, exist_ok=True)
    current = mounted_at(target)
    if current is not None:
        if fs_uuid in uuids_of_mount(current):
            return current.source
        raise InvalidInput(f"{target} already has another filesystem mounted ({current.source})")
    devices = devnodes_of(fs_uuid)
    if not devices:
        raise NotFound(f"no disk with filesystem {fs_uuid} is attached", fs_uuid=fs_uuid)
    options = ["noatime"]
    if degraded:
        options.append("degraded")
    if read_only:
        options.append("ro")
    if len(devices) > 1:  # btrfs: name every member, udev may not have registered them
        options += [f"device={d}" for d in devices]
    # The device just probed, not UUID=: mount would resolve that through blkid's cache.
    _run(
        ["mount", "-o", ",".join(options), devices[0], target],
        f"mounting filesystem {fs_uuid} ({devices[0]}) at {target}",
    )
    return devices[0]


def uuids_of_mount(mount: Mount) -> set[str]:
    """The filesystem UUID(s) a mount's source carries (for checking what is mounted where)."""
    uuid = filesystem_uuid(mount.source) if mount.source.startswith("/dev/") else None
    return {uuid} if uuid else set()


def unmount(target: str, *, lazy: bool = False) -> None:
    """Flush and unmount ``target`` (nothing to do when nothing is mounted there). A lazy
    unmount is for a disk already gone: the kernel detaches it once nothing uses it."""
    if mounted_at(target) is None:
        return
    if not lazy:
        os.sync()
    _run(["umount", *(["-l"] if lazy else []), target], f"unmounting {target}")


def flush(target: str) -> None:
    """Write everything cached for the filesystem at ``target`` to its disk (``syncfs``)."""
    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
        os.sync()
    finally:
        os.close(fd)
