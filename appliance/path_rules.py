"""The rules every host path a request names is checked against.

The appliance runs as root, so a path that an operator, an admin or a protected machine sends
can only be used after it passed one of these rules; every refusal is a :class:`PathRefused`
whose ``rule`` detail names the rule broken (the page shows the message, scripts key on the rule).

Restore targets (the four kinds a restore may write to; everything else is refused):

- ``area``: a folder inside one of the *restore areas* an admin listed in the settings (by
  default only ``<data>/restores``). The target's real path (symlinks resolved) must lie inside
  an area's real path.
- ``source``: the asset's own source, in place. Only with an explicit conflict choice
  (``overwrite``, or ``keep_both`` which renames what is there); the path is the asset's
  registered source, never one sent in the request.
- ``device``: for image points, a block device or image file an admin registered as a restore
  device, that is not mounted (nor any partition of it), not the system disk and not a pool.
- a download: a stream to the client; no host path at all.

VM disk sources (rule 7 of the security model): a regular file or a block device; nothing under
the system's own folders (``/proc``, ``/sys``, ``/etc``, ...), no ``/dev`` node that is not a block
device, nothing in the appliance's data directory, not the system disk and no mounted device.

Decisions are pure functions over :class:`BlockFacts`, a snapshot of the kernel's view (mounts,
swaps, the system disk) read by :func:`read_block_facts`; tests pass facts of their own.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from appliance.errors import PathRefused

#: Folders of the operating system: never a backup source's disk, a restore area or a target.
SYSTEM_DIRS = (
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/run",
)
#: The name of the restore area every data directory has.
DEFAULT_AREA = "restores"

RestoreKind = Literal["area", "source", "device"]
Conflict = Literal["overwrite", "keep_both"]


def inside(path: str, directory: str) -> bool:
    """True if ``path`` is ``directory`` or lies below it (both already real paths)."""
    directory = directory.rstrip("/") or "/"
    return path == directory or path.startswith(directory + "/") or directory == "/"


def real(path: str) -> str:
    """The real path of ``path`` (symlinks resolved; missing tails kept as given)."""
    return os.path.realpath(path)


def default_restore_area(data_dir: str) -> str:
    return os.path.join(os.path.realpath(data_dir), DEFAULT_AREA)


@dataclass(frozen=True)
class BlockFacts:
    """What the kernel says about block devices, as device numbers (``st_rdev``)."""

    #: Devices holding a mounted filesystem or an active swap area.
    mounted: frozenset[int] = frozenset()
    #: The device of the root filesystem and the whole disk it lies on.
    system: frozenset[int] = frozenset()
    #: Whole disk of a partition (devno -> devno); a whole disk maps to nothing.
    parent: dict[int, int] = field(default_factory=dict)
    #: Devices another device is built on (loop backing files are no block devices: not here).
    slaves: dict[int, frozenset[int]] = field(default_factory=dict)

    def family(self, devno: int) -> set[int]:
        """``devno``, its whole disk, and every partition of that disk."""
        disk = self.parent.get(devno, devno)
        members = {devno, disk}
        members.update(d for d, p in self.parent.items() if p == disk)
        return members

    def in_use(self, devno: int) -> str | None:
        """Why the device may not be written or read as a disk, or None."""
        members = self.family(devno)
        if members & self.system:
            return "the system disk"
        if members & self.mounted:
            return "mounted (or a partition of it is)"
        return None


def _devno(text: str) -> int | None:
    try:
        major, minor = text.split(":")
        return os.makedev(int(major), int(minor))
    except ValueError:
        return None


def read_block_facts(pool_paths: Iterable[str] = ()) -> BlockFacts:
    """The kernel's view now: mounted devices (``/proc/self/mountinfo``, ``/proc/swaps``), the
    system disk, partitions (``/sys/class/block``); the devices under ``pool_paths`` count as
    mounted even when a pool is a plain folder on a disk."""
    mounted: set[int] = set()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and (dev := _devno(parts[2])) is not None:
                    mounted.add(dev)
    except OSError:
        pass
    try:
        with open("/proc/swaps", encoding="utf-8", errors="replace") as f:
            for line in f.readlines()[1:]:
                name = line.split()[0] if line.split() else ""
                if name.startswith("/"):
                    try:
                        st = os.stat(name)
                    except OSError:
                        continue
                    if stat.S_ISBLK(st.st_mode):
                        mounted.add(st.st_rdev)
    except OSError:
        pass
    for path in pool_paths:
        try:
            mounted.add(os.stat(path).st_dev)
        except OSError:
            continue
    parent: dict[int, int] = {}
    slaves: dict[int, frozenset[int]] = {}
    try:
        names = os.listdir("/sys/class/block")
    except OSError:
        names = []
    for name in names:
        base = os.path.join("/sys/class/block", name)
        dev = _read_devno(os.path.join(base, "dev"))
        if dev is None:
            continue
        if os.path.exists(os.path.join(base, "partition")):
            disk = _read_devno(os.path.join(os.path.dirname(os.path.realpath(base)), "dev"))
            if disk is not None:
                parent[dev] = disk
        try:
            under = os.listdir(os.path.join(base, "slaves"))
        except OSError:
            under = []
        found = {d for s in under if (d := _read_devno(f"/sys/class/block/{s}/dev")) is not None}
        if found:
            slaves[dev] = frozenset(found)
    system: set[int] = set()
    try:
        root = os.stat("/").st_dev
        system.add(root)
        system.add(parent.get(root, root))
        system.update(slaves.get(root, frozenset()))
    except OSError:
        pass
    return BlockFacts(frozenset(mounted), frozenset(system), parent, slaves)


def _read_devno(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return _devno(f.read().strip())
    except OSError:
        return None


def _refuse(message: str, rule: str, path: str) -> PathRefused:
    return PathRefused(message, rule=rule, path=path)


def _check_not_system(path: str, what: str) -> None:
    for system in SYSTEM_DIRS:
        if inside(path, system):
            raise _refuse(
                f"{what} {path} lies in the system folder {system}", "system_folder", path
            )


def _check_not_data_dir(path: str, data_dir: str, what: str, *, allow: Sequence[str] = ()) -> None:
    data = real(data_dir)
    if any(inside(path, a) for a in allow):
        return
    if inside(path, data) or inside(data, path):
        raise _refuse(
            f"{what} {path} must not contain or lie inside the appliance's data directory",
            "data_directory",
            path,
        )


# --- VM disk sources --------------------------------------------------------------------------


def check_disk_source(path: str, *, data_dir: str, facts: BlockFacts) -> str:
    """The real path of a VM disk that may be read as a backup source, else :class:`PathRefused`.

    Checked when an asset is registered and again before every backup (a file may have been
    swapped for a link since)."""
    if not os.path.isabs(path) or "\x00" in path:
        raise _refuse(f"disk {path!r} is not an absolute path", "not_absolute", path)
    resolved = real(path)
    try:
        st = os.stat(resolved)
    except OSError as exc:
        raise _refuse(
            f"disk image {path} cannot be read: {exc.strerror}", "missing", path
        ) from None
    if stat.S_ISBLK(st.st_mode):
        reason = facts.in_use(st.st_rdev)
        if reason is not None:
            raise _refuse(f"disk {path} is a block device that is {reason}", "device_in_use", path)
        if inside(resolved, "/dev"):
            return resolved
    elif not stat.S_ISREG(st.st_mode):
        raise _refuse(
            f"disk {path} is neither a disk image file nor a block device", "not_a_disk", path
        )
    _check_not_system(resolved, "disk")
    _check_not_data_dir(resolved, data_dir, "disk")
    return resolved


# --- restore areas and devices ----------------------------------------------------------------


def check_restore_area(path: str, *, data_dir: str) -> str:
    """The real path of a folder an admin lists as a restore area, else :class:`PathRefused`."""
    if not os.path.isabs(path) or "\x00" in path:
        raise _refuse(f"restore area {path!r} is not an absolute path", "not_absolute", path)
    resolved = real(path)
    if resolved == "/":
        raise _refuse("the root folder / cannot be a restore area", "root_folder", path)
    _check_not_system(resolved, "restore area")
    _check_not_data_dir(resolved, data_dir, "restore area", allow=[default_restore_area(data_dir)])
    return resolved


def check_location_dir(path: str, *, data_dir: str) -> str:
    """The real path of a folder an admin adds as a location (copies are written there as
    root): an existing folder, not ``/``, no system folder, not in the data directory."""
    if not os.path.isabs(path) or "\x00" in path:
        raise _refuse(f"location {path!r} is not an absolute path", "not_absolute", path)
    resolved = real(path)
    if resolved == "/":
        raise _refuse("the root folder / cannot be a location", "root_folder", path)
    _check_not_system(resolved, "location")
    _check_not_data_dir(resolved, data_dir, "location")
    if not os.path.isdir(resolved):
        raise _refuse(f"location {path} is not a folder", "missing", path)
    entries = set(os.listdir(resolved)) - {"lost+found"}
    if entries and "location.json" not in entries:
        raise _refuse(
            f"location {path} holds other files: give an empty folder (a fresh disk's "
            "mountpoint) or one that already is a location of this store",
            "not_empty",
            path,
        )
    return resolved


def check_restore_device(path: str, *, data_dir: str, facts: BlockFacts) -> str:
    """The real path of a block device or image file that a restore may overwrite."""
    if not os.path.isabs(path) or "\x00" in path:
        raise _refuse(f"restore device {path!r} is not an absolute path", "not_absolute", path)
    resolved = real(path)
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISBLK(st.st_mode):
        reason = facts.in_use(st.st_rdev)
        if reason is not None:
            raise _refuse(
                f"restore device {path} is {reason}: a restore would overwrite it",
                "device_in_use",
                path,
            )
        return resolved
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise _refuse(
            f"restore device {path} is neither a block device nor an image file", "not_a_disk", path
        )
    if st is None and not os.path.isdir(os.path.dirname(resolved)):
        raise _refuse(f"the folder of image file {path} does not exist", "missing", path)
    _check_not_system(resolved, "restore image file")
    _check_not_data_dir(resolved, data_dir, "restore image file")
    return resolved


# --- restore targets --------------------------------------------------------------------------


@dataclass(frozen=True)
class RestoreRules:
    """What the settings allow: areas and devices as an admin listed them."""

    data_dir: str
    areas: tuple[str, ...]
    devices: tuple[str, ...]


@dataclass(frozen=True)
class RestoreTarget:
    """A checked restore target: where to write and how to treat what is there."""

    kind: RestoreKind
    path: str
    on_conflict: Conflict
    #: Whether the target may be a block device (registered restore devices only).
    block_device: bool = False


def restore_target(
    kind: RestoreKind,
    *,
    point_kind: str,
    rules: RestoreRules,
    facts: BlockFacts,
    target: str | None = None,
    on_conflict: Conflict | None = None,
    source: str | None = None,
) -> RestoreTarget:
    """Check a requested restore target against the rules; :class:`PathRefused` otherwise.

    ``source`` is the asset's registered source (a folder for a files point, the disk's image
    path for one disk of an image point): the in-place target never comes from the request."""
    if kind == "area":
        if target is None:
            raise _refuse("a restore to a restore area needs 'target'", "target_missing", "")
        return RestoreTarget("area", _in_area(target, rules), on_conflict or "overwrite")
    if kind == "source":
        if on_conflict is None:
            raise _refuse(
                "a restore over the asset's own source needs an explicit choice: "
                "on_conflict 'overwrite' or 'keep_both'",
                "confirmation_missing",
                source or "",
            )
        if target is not None:
            raise _refuse(
                "a restore in place writes to the asset's registered source; leave 'target' out",
                "target_not_allowed",
                target,
            )
        if not source:
            raise _refuse("this asset has no source to restore to", "no_source", "")
        resolved = real(source)
        if point_kind == "files":
            # A system folder is fine here: an admin protected it, and rolling it back in place
            # is what the restore is for.
            _check_not_data_dir(resolved, rules.data_dir, "source")
            return RestoreTarget("source", resolved, on_conflict)
        checked = check_restore_device(resolved, data_dir=rules.data_dir, facts=facts)
        is_block = os.path.exists(checked) and stat.S_ISBLK(os.stat(checked).st_mode)
        if is_block and on_conflict == "keep_both":
            raise _refuse(
                "a block device cannot keep both: choose 'overwrite'", "keep_both_device", checked
            )
        return RestoreTarget("source", checked, on_conflict, block_device=is_block)
    if kind == "device":
        if point_kind != "image":
            raise _refuse("only VM points restore to a device", "device_for_files", target or "")
        if target is None:
            raise _refuse("a restore to a device needs 'target'", "target_missing", "")
        registered = {real(d) for d in rules.devices}
        resolved = real(target)
        if resolved not in registered:
            raise _refuse(
                f"{target} is not a registered restore device (an admin registers them in the "
                "settings)",
                "device_not_registered",
                target,
            )
        checked = check_restore_device(resolved, data_dir=rules.data_dir, facts=facts)
        is_block = os.path.exists(checked) and stat.S_ISBLK(os.stat(checked).st_mode)
        return RestoreTarget("device", checked, on_conflict or "overwrite", block_device=is_block)
    raise _refuse(f"unknown restore destination {kind!r}", "unknown_destination", target or "")


def check_area_path(path: str, rules: RestoreRules) -> str:
    """The real path of ``path`` if it lies inside a restore area (a folder a failover's disks
    are moved to, a failback's image file), else :class:`PathRefused`."""
    return _in_area(path, rules)


def check_image_output(path: str, rules: RestoreRules, facts: BlockFacts) -> str:
    """Where an image may be written (a failback's new image): inside a restore area, or a
    registered restore device that may be written now."""
    if real(path) in {real(d) for d in rules.devices}:
        return check_restore_device(path, data_dir=rules.data_dir, facts=facts)
    return _in_area(path, rules)


def _in_area(target: str, rules: RestoreRules) -> str:
    if not os.path.isabs(target) or "\x00" in target:
        raise _refuse(f"restore target {target!r} is not an absolute path", "not_absolute", target)
    resolved = real(target)
    for area in rules.areas:
        area_real = real(area)
        if inside(resolved, area_real) and area_real != "/":
            return resolved
    listed = ", ".join(rules.areas) or "none"
    raise _refuse(
        f"{target} is not inside a restore area (areas: {listed}); restore there, to a "
        "download, or in place over the asset's source",
        "outside_restore_areas",
        target,
    )


@dataclass(frozen=True)
class DeviceState:
    """A registered restore device as it is now."""

    path: str
    unavailable: str | None
    block_device: bool
    size: int | None


def device_state(path: str, *, data_dir: str, facts: BlockFacts) -> DeviceState:
    """Whether a registered restore device may be written now, and what it is."""
    try:
        checked = check_restore_device(path, data_dir=data_dir, facts=facts)
    except PathRefused as exc:
        return DeviceState(path, exc.message, False, None)
    try:
        st = os.stat(checked)
    except OSError:
        return DeviceState(path, None, False, None)  # an image file a restore will create
    if stat.S_ISBLK(st.st_mode):
        try:
            fd = os.open(checked, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
            finally:
                os.close(fd)
        except OSError:
            size = None
        return DeviceState(path, None, True, size)
    return DeviceState(path, None, False, st.st_size)
