"""A QEMU guest in which the real Linux ``st``, ``ch`` and ``sg`` drivers drive tgt's tape library.

The development host has no SCSI at all; tape drives and changers exist only inside a guest.
Debian's ``tgt`` serves a file-backed SSC tape drive and an SMC changer over iSCSI on 127.0.0.1
(the tests start it, see ``tests/tape_support.py``); QEMU's libiscsi block driver
(``qemu-block-extra``) opens each LUN and hands it to the guest as a ``scsi-generic`` device on a
``virtio-scsi-pci`` controller, so every SCSI command of the guest's drivers reaches tgt as is.

The guest is the host's Debian kernel (booted with ``-kernel``, TCG) and a small initramfs built
without root from host files, reusing the test guest's pieces (:mod:`image.testguest`: kernel
and ``modules.dep`` lookup, the cpio writer, the cache directory): busybox and the modules of
:data:`TAPE_MODULES` with their dependencies in load order. Everything else is the host itself:
its root filesystem is shared read-only over virtio-9p (:data:`HOST_TAG`) and the guest
``chroot``\\ s into it, so the host's ``python3``, ``mt``, ``mtx``, udev and the repository's code
run unchanged against the guest's kernel. Guest-side mounts only: ``proc``, ``sysfs``,
``devtmpfs`` and ``tmpfs`` (``/run``, with ``TMPDIR=/run/tmp``) are mounted over the chroot's
directories in the guest (not over ``/tmp``, which may hold the checkout itself); nothing on the host is written but the work directory.

A run's work directory (:data:`WORK_TAG`, read-write) is mounted at :data:`GUEST_WORK` inside the
chroot. It holds the script to run (:data:`SCRIPT_NAME`) and receives whatever the script writes
there (recordings, results). What the guest does at boot (``/etc/rc``): loads the modules, mounts
the host and the work directory, starts ``systemd-udevd`` in the chroot, ``udevadm trigger`` and
``settle``, runs the script with ``/bin/sh`` in the chroot with its output between :data:`BEGIN`
and :data:`END` on the serial console, prints ``EXIT <status>`` and powers off.
:func:`guest_output` reads that back.

The initramfs is cached under :func:`image.testguest.default_cache_dir`, keyed by a content hash
of its files and the recipe, so a test session builds it once.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

from appliance.errors import ApplianceError, InvalidInput
from image.probe_guest import direct_boot_argv, qemu_option, run_to_power_off
from image.testguest import (
    BUSYBOX,
    CpioWriter,
    default_cache_dir,
    find_kernel,
    module_load_order,
    parse_modules_dep,
)

#: Bump when the initramfs changes for the same host files: it is part of the cache key.
TAPE_GUEST_BUILDER_VERSION = 2
#: Printed before and after the script's output on the serial console.
BEGIN = "APPLIANCE-TAPE-GUEST-BEGIN"
END = "APPLIANCE-TAPE-GUEST-END"
#: Printed with the script's exit status between its output and :data:`END`.
EXIT = "APPLIANCE-TAPE-GUEST-EXIT"
#: The Debian packages the guest is built from and boots with, for error messages.
PACKAGES = "linux-image-amd64 busybox-static qemu-system-x86 qemu-block-extra"

#: Modules the guest loads, with their dependencies added from modules.dep: the virtio-scsi
#: controller, the tape (st), changer (ch) and SCSI generic (sg) drivers, and virtio-9p.
TAPE_MODULES = ("virtio_pci", "virtio_scsi", "st", "ch", "sg", "9pnet_virtio", "9p")
#: virtio-9p mount tags: the host's root (read-only) and the run's work directory.
HOST_TAG = "hostroot"
WORK_TAG = "tapework"
#: Where the work directory is inside the chroot, and the script's name in it.
GUEST_WORK = "/run/tapeguest"
SCRIPT_NAME = "script.sh"

RC = """\
#!/bin/sh
# The tape guest's whole boot: drivers, the host's root as a chroot, udev, the script.
/bin/busybox --install -s
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
while read -r module; do insmod "/lib/modules/$module"; done < /etc/modules
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose {host_tag} /host
# Guest-side mounts over the (read-only) host tree: the chroot's own proc, sys, dev, run, tmp.
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mount -t tmpfs -o mode=0755 tmpfs /host/run
mkdir -p -m 1777 /host/run/tmp
mkdir -p /host/run/tapeguest
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {work_tag} /host{guest_work}
# udevadm refuses to trigger or settle in a chroot unless told that this one is the system.
export SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 SYSTEMD_IGNORE_CHROOT=1 TERM=dumb HOME=/root
# Temporary files go to /run/tmp: a tmpfs over the host's /tmp would hide a checkout there.
export TMPDIR=/run/tmp
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
chroot /host /lib/systemd/systemd-udevd --daemon
chroot /host udevadm trigger --action=add
chroot /host udevadm settle --timeout=30
echo "{begin}"
chroot /host /bin/sh {guest_work}/{script} 2>&1
echo "{exit} $?"
echo "{end}"
sync
poweroff -f
"""
INITTAB = "::sysinit:/etc/rc\n"
CMDLINE = "console=ttyS0,115200 quiet loglevel=3 panic=-1 rdinit=/init"


@dataclass(frozen=True)
class TapeGuest:
    """A built tape guest: boot ``kernel`` with ``initrd``."""

    kernel: str
    initrd: str


@dataclass(frozen=True)
class IscsiLun:
    """One LUN of an iSCSI target, attached to the guest as a ``scsi-generic`` device at
    SCSI address 0:0:0:``lun`` (so the guest sees the target's own LUN numbers)."""

    portal: str  # "127.0.0.1:PORT"
    target: str  # the target's IQN
    lun: int


@dataclass(frozen=True)
class TapeGuestResult:
    """What one boot said: the script's output and exit status, the whole console, and how
    long QEMU ran (boot to power-off)."""

    output: str
    status: int
    console: str
    seconds: float


class TapeGuestFailed(ApplianceError):
    """The tape guest did not run its script to the end."""

    code = "tape_guest_failed"


# --- the pure parts ------------------------------------------------------------------------------


def render_rc() -> str:
    return RC.format(
        host_tag=HOST_TAG,
        work_tag=WORK_TAG,
        guest_work=GUEST_WORK,
        script=SCRIPT_NAME,
        begin=BEGIN,
        end=END,
        exit=EXIT,
    )


def guest_output(console: str) -> tuple[str, int] | None:
    """(the script's output, its exit status) from the console text, or None when the guest
    did not get to the end (a marker or the status line is missing)."""
    text = console.replace("\r", "")
    start = text.find(BEGIN + "\n")
    if start < 0:
        return None
    stop = text.find("\n" + END, start)
    if stop < 0:
        return None
    body = text[start + len(BEGIN) + 1 : stop + 1]
    head, sep, status = body.rstrip("\n").rpartition(EXIT + " ")
    if not sep or not status.strip().isdigit():
        return None
    return head, int(status)


def tape_guest_argv(
    guest: TapeGuest,
    luns: Sequence[IscsiLun],
    work_dir: str,
    serial_log: str,
    *,
    accel: str = "tcg",
    memory_mib: int = 512,
) -> list[str]:
    """QEMU's argv: :func:`image.probe_guest.direct_boot_argv`; the host's root (read-only)
    and ``work_dir`` (read-write) over virtio-9p; each LUN a ``scsi-generic`` device on one
    ``virtio-scsi-pci`` controller, opened by QEMU's iSCSI driver."""
    argv = [
        *direct_boot_argv(
            guest.kernel, guest.initrd, CMDLINE, serial_log, accel=accel, memory_mib=memory_mib
        ),
        "-virtfs",
        f"local,path=/,mount_tag={HOST_TAG},security_model=none,readonly=on,multidevs=remap",
        "-virtfs",
        f"local,path={qemu_option(work_dir)},mount_tag={WORK_TAG},security_model=none,multidevs=remap",
        "-device",
        "virtio-scsi-pci,id=scsi0",
    ]
    for n, lun in enumerate(luns):
        argv += [
            "-blockdev",
            f"driver=iscsi,node-name=lun{n},transport=tcp,portal={qemu_option(lun.portal)},"
            f"target={qemu_option(lun.target)},lun={lun.lun}",
            "-device",
            f"scsi-generic,drive=lun{n},bus=scsi0.0,channel=0,scsi-id=0,lun={lun.lun}",
        ]
    return argv


# --- building it ---------------------------------------------------------------------------------


def tape_guest_modules() -> tuple[str, str, tuple[str, ...]]:
    """(kernel, its version, the .ko paths to load in order), or InvalidInput naming the
    package to install."""
    kernel, version = find_kernel()
    base = f"/lib/modules/{version}"
    with open(os.path.join(base, "modules.dep")) as f:
        deps = parse_modules_dep(f.read())
    modules = tuple(os.path.join(base, p) for p in module_load_order(deps, TAPE_MODULES))
    for path in modules:
        if path.endswith((".xz", ".zst", ".gz")):
            raise InvalidInput(f"compressed kernel module {path} is not supported by the builder")
    if not os.path.isfile(BUSYBOX):
        raise InvalidInput(
            f"{BUSYBOX} is missing: the tape guest needs `apt-get install -y busybox-static`"
        )
    return kernel, version, modules


def build_initramfs(modules: Sequence[str]) -> bytes:
    """The gzip-compressed cpio archive of the tape guest's userland."""
    cpio = CpioWriter()
    for directory in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys"):
        cpio.directory(directory)
    for directory in ("dev", "host", "tmp", "lib", "lib/modules"):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.char_device("dev/ttyS0", 4, 64)
    with open(BUSYBOX, "rb") as f:
        cpio.file("bin/busybox", f.read(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.symlink("init", "bin/busybox")
    cpio.symlink("sbin/init", "../bin/busybox")
    for path in modules:
        with open(path, "rb") as f:
            cpio.file(f"lib/modules/{os.path.basename(path)}", f.read())
    names = "".join(f"{os.path.basename(p)}\n" for p in modules)
    cpio.file("etc/modules", names.encode())
    cpio.file("etc/inittab", INITTAB.encode())
    cpio.file("etc/rc", render_rc().encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def cache_key(modules: Sequence[str]) -> str:
    digest = hashlib.sha256()
    described = {
        "builder": TAPE_GUEST_BUILDER_VERSION,
        "rc": render_rc(),
        "inittab": INITTAB,
        "modules": [os.path.basename(p) for p in modules],
    }
    digest.update(json.dumps(described, sort_keys=True).encode())
    for path in (*modules, BUSYBOX):
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:24]


def build_tape_guest(cache_dir: str | None = None) -> TapeGuest:
    """The tape guest (the host's kernel, a cached initramfs), built if needed."""
    kernel, _, modules = tape_guest_modules()
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, f"tapeguest-{cache_key(modules)}.initrd")
    if not os.path.exists(target):
        data = build_initramfs(modules)
        with tempfile.TemporaryDirectory(prefix="tapeguest-", dir=cache_dir) as work:
            partial = os.path.join(work, "initrd")
            with open(partial, "wb") as f:
                f.write(data)
            os.chmod(partial, 0o444)
            os.replace(partial, target)  # atomic: a concurrent build of the same key is harmless
    return TapeGuest(kernel=kernel, initrd=target)


# --- booting it ----------------------------------------------------------------------------------


def run_in_tape_guest(
    script: str,
    luns: Sequence[IscsiLun],
    work_dir: str,
    *,
    guest: TapeGuest | None = None,
    timeout: float = 300.0,
    accel: str = "tcg",
) -> TapeGuestResult:
    """Boot the tape guest with ``luns`` on its SCSI bus, run ``script`` (``/bin/sh`` in the
    host's root, the work directory at :data:`GUEST_WORK`) and return what it printed.

    ``work_dir`` must exist; the script is written into it and the files the script writes to
    :data:`GUEST_WORK` land there. Raises TapeGuestFailed (with the console's tail) when QEMU
    fails or the guest does not reach the end of the script within ``timeout`` seconds; the
    script's own exit status is the result's ``status``, not an error."""
    guest = guest or build_tape_guest()
    work_dir = os.path.abspath(work_dir)
    if not os.path.isdir(work_dir):
        raise InvalidInput(f"the tape guest's work directory {work_dir} does not exist")
    with open(os.path.join(work_dir, SCRIPT_NAME), "w") as f:
        f.write(script)
    with tempfile.TemporaryDirectory(prefix="tapeguest-") as scratch:
        log = os.path.join(scratch, "console.log")
        argv = tape_guest_argv(guest, luns, work_dir, log, accel=accel)
        process, output, console, seconds = run_to_power_off(
            argv,
            log,
            timeout,
            what="the tape guest",
            install=PACKAGES,
            failure=TapeGuestFailed,
        )
    found = guest_output(console)
    if process.returncode != 0 or found is None:
        hint = ""
        if "iscsi" in output.lower() and "unknown driver" in output.lower():
            hint = " (QEMU's iSCSI driver: `apt-get install -y qemu-block-extra`)"
        raise TapeGuestFailed(
            f"the tape guest did not finish its script (QEMU exit status "
            f"{process.returncode}{': ' + output.strip() if output.strip() else ''}){hint}; "
            "console:\n" + console[-4000:]
        )
    return TapeGuestResult(found[0], found[1], console, seconds)
