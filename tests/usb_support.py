"""USB disks for tests: real loop devices whose udev identity comes from a recording.

No USB exists on the test host, so a "USB disk" is a loop device of an image file (real block
device, real ext4, real mount and unmount) described by the :class:`BlockDevice` the discovery
layer makes of a real USB stick: the properties of ``block/sda`` in the umockdev recording
``tests/fixtures/udev/usb-storage-disk-and-tape-drive.umockdev`` (made with the usb-storage
driver in a QEMU guest), with the loop device's own node, size and filesystem.

Pulling the disk is what the kernel does when a mounted USB disk goes away and the appliance
lazily unmounts it: ``umount -l`` and ``losetup -d``. Every helper detaches only the loop devices
of its own image and unmounts only mounts below the test's own folder.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import textwrap
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from hardware.records import BlockDevice
from hardware.udev import record_from_properties

FIXTURE = (
    Path(__file__).resolve().parent
    / "fixtures"
    / "udev"
    / "usb-storage-disk-and-tape-drive.umockdev"
)


def recorded_device(name: str = "sda", fixture: Path = FIXTURE) -> dict[str, str]:
    """udev's properties (``E:``) and sysfs attributes (``A:``, prefixed ``attr:``) of the
    recorded device whose node is ``name`` (``N:``)."""
    for block in fixture.read_text().split("\n\n"):
        lines = block.strip().splitlines()
        if f"N: {name}" not in lines:
            continue
        found: dict[str, str] = {}
        for line in lines:
            key, _, value = line[3:].partition("=")
            if line.startswith("E: "):
                found[key] = value
            elif line.startswith("A: "):
                found[f"attr:{key}"] = value.replace("\\n", "").strip()
        return found
    raise LookupError(f"no device {name} in {fixture}")


def usb_record(
    devnode: str,
    *,
    serial_suffix: str | None = None,
    fs_uuid: str | None = None,
    fs_label: str | None = None,
    fs_type: str | None = None,
) -> BlockDevice:
    """The recorded USB stick's record, on the real device ``devnode`` (its size and the
    filesystem it holds now), made by discovery's own converter from the recorded udev
    properties. ``serial_suffix`` makes another stick of the same model."""
    p = recorded_device()
    size = int(
        subprocess.run(
            ["blockdev", "--getsize64", devnode], capture_output=True, text=True, check=True
        ).stdout
    )
    suffix = serial_suffix or ""
    properties = {k: v for k, v in p.items() if not k.startswith(("attr:", "ID_FS_"))}
    # Converted as the recorded disk (a loop node would be taken for a loop device), then put
    # on the real device that stands in for it.
    properties.update(
        ID_SERIAL=p["ID_SERIAL"] + suffix,
        ID_SERIAL_SHORT=p["ID_SERIAL_SHORT"] + suffix,
        DEVLINKS=f"/dev/disk/by-id/usb-{p['ID_SERIAL']}{suffix}",
    )
    for key, value in (("ID_FS_UUID", fs_uuid), ("ID_FS_LABEL", fs_label), ("ID_FS_TYPE", fs_type)):
        if value is not None:
            properties[key] = value
    attributes = {k[len("attr:") :]: v for k, v in p.items() if k.startswith("attr:")}
    attributes.update(size=str(size // 512), ro="0")
    record = record_from_properties(properties, attributes)
    assert isinstance(record, BlockDevice), record
    return replace(record, devnode=devnode)


def probed(record: BlockDevice) -> BlockDevice:
    """The record with the filesystem its device holds now (what a rescan reports)."""

    def value(tag: str) -> str | None:
        done = subprocess.run(
            ["blkid", "-p", "-o", "value", "-s", tag, record.devnode],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip() or None

    return replace(record, fs_uuid=value("UUID"), fs_label=value("LABEL"), fs_type=value("TYPE"))


class LoopDisk:
    """An image file plugged in (a loop device) and pulled (detached), as often as wanted."""

    def __init__(self, image: Path, size: int = 96 << 20) -> None:
        self.image = image
        with open(image, "wb") as f:
            f.truncate(size)
        self.devnode: str | None = None

    def plug_in(self) -> str:
        assert self.devnode is None, "already plugged in"
        self.devnode = subprocess.run(
            ["losetup", "--find", "--show", str(self.image)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return self.devnode

    def pull(self, mountpoint: str | Path | None = None) -> None:
        """What pulling the disk does: the mount goes away (lazily: whoever has files open keeps
        them until they close them) and so does the device."""
        assert self.devnode is not None, "not plugged in"
        if mountpoint is not None:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", self.devnode], check=True, capture_output=True)
        self.devnode = None

    def attached(self) -> list[str]:
        """The loop devices of this image (a detached one lingers until its last user closes)."""
        out = subprocess.run(
            ["losetup", "-j", str(self.image)], capture_output=True, text=True, check=False
        ).stdout
        return [line.split(":")[0] for line in out.splitlines() if line.strip()]

    def wait_released(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.attached():
            assert time.monotonic() < deadline, f"{self.image} is still in use: {self.attached()}"
            time.sleep(0.05)

    def digest(self) -> str:
        h = hashlib.sha256()
        with open(self.image, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def cleanup(self) -> None:
        for device in self.attached():
            subprocess.run(["losetup", "-d", device], check=False, capture_output=True)
        self.devnode = None


def mounts_below(folder: Path) -> list[str]:
    root = os.path.realpath(folder)
    targets = []
    with open("/proc/self/mounts") as f:
        for line in f:
            target = line.split()[1].replace("\\040", " ")
            if target == root or target.startswith(root + os.sep):
                targets.append(target)
    return targets


def unmount_below(folder: Path) -> None:
    """Lazily unmount whatever the test mounted below ``folder`` (deepest first)."""
    for target in sorted(mounts_below(folder), key=len, reverse=True):
        subprocess.run(["umount", "-l", target], check=False, capture_output=True)


def data_files(store: Path) -> list[str]:
    """The data packs a store on a disk holds (temporary files of unfinished writes aside)."""
    found = []
    for dirpath, _dirs, files in os.walk(store / "data"):
        found += [os.path.join(dirpath, f) for f in files if ".tmp-" not in f]
    return found


def until(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def file_tree(path: Path, files: int, size: int) -> Path:
    path.mkdir()
    for i in range(files):
        (path / f"f{i}.bin").write_bytes(os.urandom(size))
    return path


#: A process that runs one ``usb_export`` of OFFSITE-A with a slow disk (argv: data dir,
#: passphrase) and prints the job's ID: the test kills it mid-copy.
SLOW_EXPORT_CHILD = textwrap.dedent(
    """
    import sys, time
    from appliance.engine import Appliance
    from appliance.jobs import JobRunner
    from hardware import usb_backend
    from hardware.usb_jobs import register_usb_jobs, submit_export

    original = usb_backend.RemovableDiskBackend.put

    def slow_put(self, name, data, options=None):
        if name.startswith("data/"):
            time.sleep(0.15)  # a slow USB stick: the kill lands mid-copy
        original(self, name, data, options)

    usb_backend.RemovableDiskBackend.put = slow_put
    app = Appliance.open(sys.argv[1], passphrase=sys.argv[2])
    register_usb_jobs()
    runner = JobRunner(app)
    runner.start()
    job = submit_export(app, runner, "OFFSITE-A")
    print(job.id, flush=True)
    runner.wait(job.id, 600)
    """
)
