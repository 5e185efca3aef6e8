"""The disks the installer may write to (parsed from ``lsblk``, the installer's own disk left out),
and what it does to the system disk after the image is written (grow the root, record the pool).

Decisions are pure functions over recorded tool output (``candidate_disks`` over ``lsblk -J``,
``root_source`` over ``/proc/self/mountinfo``, ``partition_path``, ``stable_name``) so they are tested
on canned text; the adapters below them only run the tools and read ``/dev``.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from appliance.errors import Conflict

#: The columns ``candidate_disks`` reads; ``-d`` lists whole disks only, ``-b`` sizes in bytes.
LSBLK_ARGV = ["lsblk", "-J", "-b", "-d", "-o", "NAME,PATH,SIZE,MODEL,SERIAL,TYPE,RM,TRAN,RO"]
#: Memory-backed devices look like disks to lsblk (``TYPE=disk``) but vanish at power-off.
_VOLATILE_PREFIXES = ("zram", "ram")
BY_ID = Path("/dev/disk/by-id")
#: Written on the new root; the first-run page reads it (relative to the root).
FIRST_POOL_FILE = "etc/appliance/first-pool.json"
#: The image's root file system: the last partition, so it can grow to the disk's end.
ROOT_PARTITION = 2


@dataclass(frozen=True)
class Disk:
    name: str  # kernel name: vdb, nvme0n1, loop3
    path: str  # /dev/vdb
    size: int  # bytes
    model: str | None
    serial: str | None
    transport: str | None  # sata, nvme, usb, ... (None for virtio and loop)
    removable: bool

    @property
    def line(self) -> str:
        """One human line: ``vdb  8.0 GiB  QEMU HARDDISK  serial ABC123``."""
        parts = [self.name, human_size(self.size), self.model or "unknown model"]
        parts.append(f"serial {self.serial}" if self.serial else "no serial")
        tags = [t for t in (self.transport, "removable" if self.removable else None) if t]
        if tags:
            parts.append(" ".join(tags))
        return "  ".join(parts)


def human_size(size: int) -> str:
    """Binary units with one decimal, as disk tools print them (``476.9 GiB``)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _flag(value: Any) -> bool:
    # lsblk before 2.37 printed "0"/"1" strings; later versions print JSON booleans.
    return value is True or value in ("1", 1, "true")


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def candidate_disks(
    lsblk_doc: dict[str, Any], boot_disk: str | None, min_bytes: int, allow_loop: bool = False
) -> list[Disk]:
    """The disks the system may be installed on, in lsblk's (kernel) order.

    Left out: the disk the installer booted from (``boot_disk`` as name or path), read-only
    devices, CD/DVD (``rom``), memory disks (ram, zram), loop devices unless ``allow_loop`` (tests),
    and disks smaller than ``min_bytes`` (the raw system image).
    """
    boot_name = os.path.basename(boot_disk) if boot_disk else None
    disks = []
    for dev in lsblk_doc.get("blockdevices", []):
        name = str(dev.get("name") or "")
        kind = dev.get("type")
        if not name or name == boot_name or _flag(dev.get("ro")):
            continue
        if kind != "disk" and not (allow_loop and kind == "loop"):
            continue
        if name.startswith(_VOLATILE_PREFIXES):
            continue
        size = int(dev.get("size") or 0)
        if size <= 0 or size < min_bytes:
            continue
        disks.append(
            Disk(
                name=name,
                path=str(dev.get("path") or f"/dev/{name}"),
                size=size,
                model=_text(dev.get("model")),
                serial=_text(dev.get("serial")),
                transport=_text(dev.get("tran")),
                removable=_flag(dev.get("rm")),
            )
        )
    return disks


def partition_path(disk_path: str, number: int) -> str:
    """``/dev/vdb`` -> ``/dev/vdb2``; a name ending in a digit takes a ``p``: ``nvme0n1p2``, ``loop0p2``."""
    return f"{disk_path}p{number}" if disk_path[-1:].isdigit() else f"{disk_path}{number}"


def root_source(mountinfo: str) -> str | None:
    """The device mounted on ``/`` (the last mount there wins, as the kernel stacks them)."""
    source = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) < 5 or fields[4] != "/" or " - " not in line:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) >= 2:
            source = after[1]
    return source


def stable_name(by_id_links: list[str], dev_path: str) -> str:
    """The ``/dev/disk/by-id`` name that survives reordering of ``/dev/sdX``, else ``dev_path``.

    Links named after model and serial (``ata-``, ``nvme-``, ``usb-``, ``scsi-``) are what a person
    recognises; ``wwn-`` and ``nvme-eui.`` are the same disk in hex, so they come last.
    """
    whole = sorted(n for n in by_id_links if "-part" not in n)
    if not whole:
        return dev_path
    readable = [n for n in whole if not n.startswith(("wwn-", "nvme-eui.", "nvme-nvme."))]
    return str(BY_ID / (readable or whole)[0])


# --- adapters -----------------------------------------------------------------------------------


def read_lsblk() -> dict[str, Any]:
    done = subprocess.run(LSBLK_ARGV, capture_output=True, text=True)
    if done.returncode != 0:
        raise Conflict(f"lsblk failed: {done.stderr.strip()}")
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def _parent_disk(device: str) -> str:
    """Walk ``PKNAME`` up (partition -> disk, dm -> partition -> disk) to the whole disk."""
    name = os.path.basename(os.path.realpath(device))
    for _ in range(8):
        out = subprocess.run(
            ["lsblk", "-n", "-d", "-o", "PKNAME", f"/dev/{name}"],
            capture_output=True,
            text=True,
        )
        parent = out.stdout.strip()
        if out.returncode != 0 or not parent:
            return name
        name = parent
    return name


def boot_disk(installer_label: str | None = None) -> str | None:
    """Kernel name of the disk holding ``/`` (the installer's stick), or None when unknown.

    A root that is not a block device (overlay, tmpfs of a live system) falls back to the disk
    carrying the installer's file system label.
    """
    try:
        source = root_source(Path("/proc/self/mountinfo").read_text())
    except OSError:
        source = None
    if source and source.startswith("/dev/") and os.path.exists(source):
        return _parent_disk(source)
    if installer_label:
        by_label = Path("/dev/disk/by-label") / installer_label
        if by_label.exists():
            return _parent_disk(str(by_label))
    return None


def by_id_links(dev_path: str) -> list[str]:
    """Names in ``/dev/disk/by-id`` pointing at ``dev_path`` (none without udev)."""
    target = os.path.realpath(dev_path)
    try:
        entries = list(BY_ID.iterdir())
    except OSError:
        return []
    return [e.name for e in entries if os.path.realpath(e) == target]


# --- after the write: the partition table, the root file system, the pool choice -----------------
def run_tool(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a system tool; its stderr becomes the error a person reads."""
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise Conflict(f"{' '.join(argv)} failed: {(done.stderr or done.stdout).strip()}")
    return done


def reread_partitions(disk_path: str, part: str) -> None:
    """Make the kernel see the new table: BLKRRPART, else partx (loop devices without partscan)."""
    subprocess.run(["udevadm", "settle"], capture_output=True)
    if subprocess.run(["blockdev", "--rereadpt", disk_path], capture_output=True).returncode:
        run_tool(["partx", "-u", disk_path])  # -u also adds partitions the kernel lacks
    for _ in range(100):
        if os.path.exists(part):
            return
        subprocess.run(["udevadm", "settle"], capture_output=True)
        time.sleep(0.1)
    raise Conflict(f"{part} did not appear after the partition table was re-read")


def first_pool_doc(pool: tuple[Disk, ...], links: Callable[[str], list[str]]) -> dict[str, object]:
    return {
        "disks": [stable_name(links(d.path), d.path) for d in pool],
        "serials": [d.serial for d in pool],
    }


def shadow_with_root_hash(shadow: str, hashed: str, today: int) -> str:
    """``/etc/shadow`` with root's password hash (and its last change, in days) replaced."""
    lines = shadow.splitlines(keepends=True)
    for i, line in enumerate(lines):
        fields = line.rstrip("\n").split(":")
        if fields[0] == "root" and len(fields) >= 3:
            fields[1], fields[2] = hashed, str(today)
            lines[i] = ":".join(fields) + "\n"
            return "".join(lines)
    raise Conflict("the system image's /etc/shadow has no root entry")


def set_root_password(root: Path, password: str) -> None:
    """Give root of the installed tree at ``root`` this password (SHA-512 crypt)."""
    hashed = run_tool(["openssl", "passwd", "-6", "-stdin"], stdin=password + "\n").stdout.strip()
    shadow = root / "etc/shadow"
    st = shadow.stat()
    text = shadow_with_root_hash(shadow.read_text(), hashed, int(time.time() // 86400))
    tmp = shadow.with_name("shadow.appliance-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.chmod(tmp, st.st_mode & 0o7777)
    os.replace(tmp, shadow)


def grow_and_record(
    disk: Disk, pool: tuple[Disk, ...], out: TextIO, root_password: str | None = None
) -> None:
    """Move the backup GPT to the disk's end, grow the root to fill it, record the pool choice
    and set the console password."""
    out.write("Growing the system partition to the whole disk...\n")
    out.flush()
    # Closing the written disk makes udev probe it; let that finish before the table changes.
    subprocess.run(["udevadm", "settle"], capture_output=True)
    run_tool(["sfdisk", "--relocate", "gpt-bak-std", disk.path])
    run_tool(["sfdisk", "--no-reread", "-N", str(ROOT_PARTITION), disk.path], stdin=", +\n")
    part = partition_path(disk.path, ROOT_PARTITION)
    reread_partitions(disk.path, part)
    fsck = subprocess.run(["e2fsck", "-fy", part], capture_output=True, text=True)
    if fsck.returncode >= 4:  # 1 and 2 mean "errors corrected"
        raise Conflict(f"e2fsck {part} failed ({fsck.returncode}): {fsck.stdout.strip()}")
    run_tool(["resize2fs", part])
    with tempfile.TemporaryDirectory(prefix="appliance-root-") as mnt:
        run_tool(["mount", "-t", "ext4", part, mnt])
        try:
            target = Path(mnt) / FIRST_POOL_FILE
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_text(json.dumps(first_pool_doc(pool, by_id_links), indent=2) + "\n")
            os.replace(tmp, target)
            if root_password:
                set_root_password(Path(mnt), root_password)
        finally:
            run_tool(["umount", mnt])
