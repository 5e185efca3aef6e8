"""A QEMU guest that runs the real Linux USB stack and real udev on a disk, and says what udev saw.

The development host has no USB: its kernel has neither xHCI nor usb-storage nor SCSI. This guest
is where those real drivers run. It is the Debian kernel of the host (``linux-image-amd64``,
booted directly with ``-kernel``) and an initramfs built without root from host files, reusing
the test guest's pieces (:mod:`image.testguest`: kernel and ``modules.dep`` lookup, the cpio
writer, the cache directory):

* busybox (the shell, ``insmod``, ``poweroff``);
* the kernel modules of the USB disk path, in dependency order from ``modules.dep``:
  ``xhci_pci`` (and ``xhci_hcd``, ``usbcore``), ``usb_storage``, ``sd_mod`` (and ``scsi_mod``,
  ``t10_pi``, the CRC modules), plus the CRC implementations the crypto API would otherwise ask
  ``modprobe`` for (``crct10dif_generic``, ``crc64_rocksoft_generic``);
* udev as the host runs it: ``udevadm`` (which is ``systemd-udevd`` too, by the name it is called
  with), every rule file in ``/lib/udev/rules.d``, the helper programs the storage rules call
  (``scsi_id``, ``ata_id``, ``cdrom_id``), and every shared library ``ldd`` lists for each
  binary. Not copied: the hardware database (``hwdb.bin``, only ``*_FROM_DATABASE`` names) and
  the helpers of printers, cameras, dm and input devices. ``ID_BUS``, ``ID_SERIAL``,
  ``ID_USB_DRIVER`` come from udev's ``usb_id`` and ``path_id`` builtins, ``ID_FS_*`` from its
  ``blkid`` builtin (libblkid), exactly as on the host.

What the guest does at boot (``/etc/rc``): mounts ``/proc``, ``/sys``, ``/dev``, ``/run``;
starts ``systemd-udevd --daemon``; ``insmod``s the modules (so the disk appears while udevd
listens: real hotplug events); waits for a SCSI disk; ``udevadm trigger --action=add`` and
``udevadm settle``; then prints, between :data:`BEGIN` and :data:`END` on the serial console,
``udevadm info --export-db`` followed by one block per block device with the sysfs attributes
discovery reads (``A: size=...``), and powers off. :func:`parse_udev_database` turns that text
into :class:`UdevEntry` records (properties and attributes, plain dicts), ready for
``hardware.udev.record_from_properties`` (this package does not import ``hardware``).

The initramfs is cached under :func:`image.testguest.default_cache_dir`, keyed by a content hash
of every file in it and the recipe, so a test session builds it once.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from appliance.errors import ApplianceError, InvalidInput
from image.testguest import (
    BUSYBOX,
    CpioWriter,
    default_cache_dir,
    find_kernel,
    module_load_order,
    parse_modules_dep,
)

#: Bump when the initramfs changes for the same host files: it is part of the cache key.
PROBE_BUILDER_VERSION = 1
#: Printed before and after the udev database on the serial console.
BEGIN = "APPLIANCE-PROBE-UDEV-BEGIN"
END = "APPLIANCE-PROBE-UDEV-END"
#: Printed when the guest found no SCSI disk in time (it still prints what udev knows).
NO_DISK = "APPLIANCE-PROBE-NO-DISK"
#: The Debian packages the probe guest is built from, for error messages.
PACKAGES = "linux-image-amd64 busybox-static udev qemu-system-x86"
QEMU = "qemu-system-x86_64"

#: Modules the guest loads, with their dependencies added from modules.dep. The CRC
#: implementations are named because the crypto API finds them through modprobe, not modules.dep.
PROBE_MODULES = (
    "crct10dif_generic",
    "crc64_rocksoft_generic",
    "sd_mod",
    "usb_storage",
    "xhci_pci",
)
#: udev's binary (systemd-udevd is the same program called by that name).
UDEVADM = "/usr/bin/udevadm"
UDEV_DIR = "/lib/udev"
#: Helper programs in ``/lib/udev`` that the block and SCSI rules run.
UDEV_HELPERS = ("scsi_id", "ata_id", "cdrom_id")
#: sysfs attributes of each block device printed after the database (what discovery reads).
BLOCK_ATTRIBUTES = (
    "size",
    "ro",
    "removable",
    "partition",
    "serial",
    "wwid",
    "device/wwid",
    "device/serial",
    "device/vendor",
    "device/model",
    "device/rev",
    "device/type",
)

#: Passwd and group entries so that the rules' OWNER/GROUP names resolve (Debian's static ids).
PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
GROUP = "".join(
    f"{name}:x:{gid}:\n"
    for name, gid in (
        ("root", 0),
        ("tty", 5),
        ("disk", 6),
        ("lp", 7),
        ("kmem", 15),
        ("dialout", 20),
        ("cdrom", 24),
        ("floppy", 25),
        ("tape", 26),
        ("audio", 29),
        ("video", 44),
        ("input", 101),
        ("kvm", 102),
        ("render", 103),
        ("sgx", 104),
    )
)

RC_TEMPLATE = """\
#!/bin/sh
# The probe guest's whole boot: udevd, the USB disk drivers, udev's database on the console.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# The console is a terminal: no pager, no colours.
export SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /run
/lib/systemd/systemd-udevd --daemon
while read -r module args; do insmod "/lib/modules/$module" $args; done < /etc/modules

# Wait for the USB disk: xHCI enumerates it, usb-storage scans its SCSI bus, sd names it.
found=""
i=0
while [ $i -lt {wait_ticks} ]; do
  for dev in /sys/class/block/sd*; do
    if [ -e "$dev/size" ]; then found=$dev; break 2; fi
  done
  usleep 100000
  i=$((i + 1))
done
[ -n "$found" ] || echo "{no_disk}"
udevadm trigger --action=add
udevadm settle --timeout={settle_seconds}

echo "{begin}"
udevadm info --export-db | cat
for dev in /sys/class/block/*; do
  path=$(readlink -f "$dev")
  echo "P: ${{path#/sys}}"
  for attr in {attributes}; do
    if [ -f "$dev/$attr" ]; then
      value=$(cat "$dev/$attr" 2>/dev/null) && echo "A: $attr=$value"
    fi
  done
  echo
done
echo "{end}"
poweroff -f
"""

INITTAB = "::sysinit:/etc/rc\n"
CMDLINE = "console=ttyS0,115200 quiet loglevel=3 panic=-1 rdinit=/init"


@dataclass(frozen=True)
class ProbeRecipe:
    """What to build: the modules to load and how long the guest waits for the disk."""

    modules: tuple[str, ...] = PROBE_MODULES
    module_args: tuple[tuple[str, str], ...] = ()  # (module name, "param=value ...")
    wait_seconds: int = 30
    settle_seconds: int = 30


@dataclass(frozen=True)
class ProbeInputs:
    """The host files the guest is made of: {path in the guest: path on the host}."""

    kernel: str
    kernel_version: str
    modules: tuple[str, ...]  # absolute .ko paths, in load order
    files: dict[str, str] = field(default_factory=dict)  # binaries, libraries, rules
    symlinks: dict[str, str] = field(default_factory=dict)  # guest path -> target


@dataclass(frozen=True)
class ProbeGuest:
    """A built probe guest: boot ``kernel`` with ``initrd``."""

    kernel: str
    initrd: str


@dataclass(frozen=True)
class UdevEntry:
    """One device of udev's database: its sysfs path, udev properties and sysfs attributes."""

    devpath: str
    properties: dict[str, str]
    attributes: dict[str, str]
    links: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProbeResult:
    """What one boot of the probe guest said, and how long QEMU ran (boot to power-off)."""

    devices: dict[str, UdevEntry]  # by devpath
    console: str
    seconds: float

    def block_devices(self, bus: str | None = None) -> list[UdevEntry]:
        """The block devices udev knows (``SUBSYSTEM=block``), optionally only of ``ID_BUS``."""
        return [
            d
            for d in self.devices.values()
            if d.properties.get("SUBSYSTEM") == "block"
            and (bus is None or d.properties.get("ID_BUS") == bus)
        ]


class ProbeFailed(ApplianceError):
    """The probe guest did not print udev's database."""

    code = "probe_failed"


# --- the parser ----------------------------------------------------------------------------------


def parse_udev_database(text: str) -> dict[str, UdevEntry]:
    """udev's ``--export-db`` text (``P:``, ``N:``, ``S:``, ``E: KEY=VALUE`` blocks separated by
    blank lines) and attribute blocks (``P:`` then ``A: name=value``) -> {devpath: UdevEntry}.

    Blocks with the same ``P:`` are merged, so the attribute blocks the guest prints after the
    database join their devices. Other line types (``L:`` link priority, ``Q:``, ``V:``, ...) are
    ignored; ``N:`` without ``E: DEVNAME`` becomes ``DEVNAME=/dev/<N>``."""
    devices: dict[str, UdevEntry] = {}
    for block in re.split(r"\n\s*\n", text.replace("\r", "")):
        devpath = None
        properties: dict[str, str] = {}
        attributes: dict[str, str] = {}
        links: list[str] = []
        node = None
        for line in block.splitlines():
            kind, sep, rest = line.partition(": ")
            if not sep:
                continue
            if kind == "P":
                devpath = rest.strip()
            elif kind == "N":
                node = rest.strip()
            elif kind == "S":
                links.append("/dev/" + rest.strip())
            elif kind == "E" and "=" in rest:
                key, _, value = rest.partition("=")
                properties[key] = value
            elif kind == "A" and "=" in rest:
                key, _, value = rest.partition("=")
                attributes[key] = value
        if devpath is None:
            continue
        if node and "DEVNAME" not in properties:
            properties["DEVNAME"] = f"/dev/{node}"
        known = devices.get(devpath)
        if known is not None:
            properties = {**known.properties, **properties}
            attributes = {**known.attributes, **attributes}
            links = [*known.links, *(link for link in links if link not in known.links)]
        devices[devpath] = UdevEntry(devpath, properties, attributes, tuple(links))
    return devices


def console_section(console: str, begin: str = BEGIN, end: str = END) -> str | None:
    """The text between the ``begin`` and ``end`` marker lines, or None if either is missing."""
    text = console.replace("\r", "")
    start = text.find(begin + "\n")
    if start < 0:
        return None
    stop = text.find("\n" + end, start)
    if stop < 0:
        return None
    return text[start + len(begin) + 1 : stop + 1]


# --- host inputs ---------------------------------------------------------------------------------


def shared_libraries(binary: str, ldd_output: str) -> list[str]:
    """The absolute library paths in ``ldd``'s output for ``binary`` (the loader included; the
    vDSO and a static binary have none)."""
    found = []
    for line in ldd_output.splitlines():
        line = line.strip()
        match = re.match(r"^\S+\s+=>\s+(/\S+)\s+\(", line) or re.match(r"^(/\S+)\s+\(", line)
        if match:
            found.append(match.group(1))
        elif "=> not found" in line:
            raise InvalidInput(f"{binary} needs {line.split()[0]}, which is not installed")
    return found


def _ldd(binary: str) -> list[str]:
    done = subprocess.run(
        ["ldd", binary], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        if "not a dynamic executable" in (done.stdout + done.stderr):
            return []
        raise InvalidInput(f"ldd {binary} failed: {(done.stderr or done.stdout).strip()}")
    return shared_libraries(binary, done.stdout)


def _need(path: str, package: str) -> None:
    if not os.path.isfile(path):
        raise InvalidInput(
            f"{path} is missing: the USB probe guest needs `apt-get install -y {package}`"
        )


def probe_inputs(recipe: ProbeRecipe) -> ProbeInputs:
    """The host files of the probe guest, or InvalidInput naming the package to install."""
    kernel, version = find_kernel()
    base = f"/lib/modules/{version}"
    with open(os.path.join(base, "modules.dep")) as f:
        deps = parse_modules_dep(f.read())
    modules = tuple(os.path.join(base, p) for p in module_load_order(deps, recipe.modules))
    for path in modules:
        if path.endswith((".xz", ".zst", ".gz")):
            raise InvalidInput(f"compressed kernel module {path} is not supported by the builder")
    _need(BUSYBOX, "busybox-static")
    _need(UDEVADM, "udev")
    rules_dir = os.path.join(UDEV_DIR, "rules.d")
    rules = sorted(n for n in os.listdir(rules_dir) if n.endswith(".rules"))
    if "60-persistent-storage.rules" not in rules:
        raise InvalidInput(
            f"{rules_dir}/60-persistent-storage.rules is missing: `apt-get install -y udev`"
        )
    files: dict[str, str] = {"bin/busybox": BUSYBOX, "usr/bin/udevadm": UDEVADM}
    for name in rules:
        files[f"lib/udev/rules.d/{name}"] = os.path.join(rules_dir, name)
    binaries = [BUSYBOX, UDEVADM]
    for helper in UDEV_HELPERS:
        path = os.path.join(UDEV_DIR, helper)
        if os.access(path, os.X_OK):
            files[f"lib/udev/{helper}"] = path
            binaries.append(path)
    for binary in binaries:
        for library in _ldd(binary):
            files.setdefault(library.lstrip("/"), library)
    symlinks = {
        "bin/sh": "busybox",
        "init": "bin/busybox",
        "sbin/init": "../bin/busybox",
        "bin/udevadm": "../usr/bin/udevadm",
        "lib/systemd/systemd-udevd": "../../usr/bin/udevadm",
    }
    return ProbeInputs(kernel, version, modules, files, symlinks)


# --- the initramfs -------------------------------------------------------------------------------


def render_rc(recipe: ProbeRecipe) -> str:
    return RC_TEMPLATE.format(
        wait_ticks=recipe.wait_seconds * 10,
        settle_seconds=recipe.settle_seconds,
        attributes=" ".join(BLOCK_ATTRIBUTES),
        no_disk=NO_DISK,
        begin=BEGIN,
        end=END,
    )


def _module_lines(inputs: ProbeInputs, recipe: ProbeRecipe) -> str:
    args = {name.replace("-", "_"): value for name, value in recipe.module_args}
    lines = []
    for path in inputs.modules:
        name = os.path.basename(path)
        extra = args.get(name.split(".ko", 1)[0].replace("-", "_"), "")
        lines.append(f"{name} {extra}".rstrip() + "\n")
    return "".join(lines)


def _directories(paths: Iterable[str]) -> list[str]:
    found: set[str] = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent:
            found.add(parent)
            parent = os.path.dirname(parent)
    return sorted(found, key=lambda p: (p.count("/"), p))


def build_initramfs(inputs: ProbeInputs, recipe: ProbeRecipe) -> bytes:
    """The gzip-compressed cpio archive of the probe guest's userland."""
    cpio = CpioWriter()
    modules = {f"lib/modules/{os.path.basename(p)}": p for p in inputs.modules}
    contents = {**inputs.files, **modules}
    fixed = ("proc", "sys", "dev", "run", "tmp", "etc", "sbin", "usr/sbin")
    for directory in _directories([*contents, *inputs.symlinks, *(f"{d}/x" for d in fixed)]):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.char_device("dev/ttyS0", 4, 64)
    for name, source in sorted(contents.items()):
        with open(source, "rb") as f:
            data = f.read()
        executable = os.access(source, os.X_OK) and not name.startswith("lib/udev/rules.d/")
        cpio.file(name, data, 0o755 if executable else 0o644)
    for name, target in sorted(inputs.symlinks.items()):
        cpio.symlink(name, target)
    cpio.file("etc/modules", _module_lines(inputs, recipe).encode())
    cpio.file("etc/inittab", INITTAB.encode())
    cpio.file("etc/passwd", PASSWD.encode())
    cpio.file("etc/group", GROUP.encode())
    cpio.file("etc/rc", render_rc(recipe).encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def cache_key(inputs: ProbeInputs, recipe: ProbeRecipe) -> str:
    digest = hashlib.sha256()
    described = {
        "builder": PROBE_BUILDER_VERSION,
        "recipe": [recipe.modules, recipe.module_args, recipe.wait_seconds, recipe.settle_seconds],
        "rc": render_rc(recipe),
        "inittab": INITTAB,
        "passwd": PASSWD,
        "group": GROUP,
        "files": sorted(inputs.files),
        "symlinks": sorted(inputs.symlinks.items()),
        "modules": [os.path.basename(p) for p in inputs.modules],
    }
    digest.update(json.dumps(described, sort_keys=True).encode())
    for path in (*inputs.modules, *(inputs.files[k] for k in sorted(inputs.files))):
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:24]


def build_probe_guest(
    cache_dir: str | None = None, recipe: ProbeRecipe | None = None
) -> ProbeGuest:
    """The probe guest (the host's kernel, a cached initramfs), built if needed."""
    recipe = recipe or ProbeRecipe()
    inputs = probe_inputs(recipe)
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, f"probeguest-usb-{cache_key(inputs, recipe)}.initrd")
    if not os.path.exists(target):
        data = build_initramfs(inputs, recipe)
        with tempfile.TemporaryDirectory(prefix="probeguest-", dir=cache_dir) as work:
            partial = os.path.join(work, "initrd")
            with open(partial, "wb") as f:
                f.write(data)
            os.chmod(partial, 0o444)
            os.replace(partial, target)  # atomic: a concurrent build of the same key is harmless
    return ProbeGuest(kernel=inputs.kernel, initrd=target)


# --- booting it ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UsbDisk:
    """A raw image attached to the guest as a USB mass-storage device (QEMU ``usb-storage``)."""

    image: str
    serial: str
    read_only: bool = True  # the guest cannot write the image; the disk shows ``ro`` 1 there
    removable: bool = True  # the SCSI "removable medium" bit, set by USB sticks
    fmt: str = "raw"


def direct_boot_argv(
    kernel: str, initrd: str, cmdline: str, serial_log: str, *, accel: str, memory_mib: int
) -> list[str]:
    """The start of a probe guest's QEMU argv (this one's, and the tape guest's): the kernel
    and initramfs booted directly, one CPU, no network, no display, the console in
    ``serial_log``; QEMU exits when the guest powers off (or panics: ``-no-reboot``)."""
    return [
        QEMU,
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "q35",
        "-accel",
        accel,
        "-cpu",
        "max" if accel == "tcg" else "host",
        "-smp",
        "1",
        "-m",
        str(memory_mib),
        "-display",
        "none",
        "-nic",
        "none",
        "-no-reboot",
        "-serial",
        "file:" + serial_log,
        "-kernel",
        kernel,
        "-initrd",
        initrd,
        "-append",
        cmdline,
    ]


def probe_argv(
    guest: ProbeGuest,
    disks: Sequence[UsbDisk],
    serial_log: str,
    *,
    accel: str = "tcg",
    memory_mib: int = 256,
) -> list[str]:
    """QEMU's argv: :func:`direct_boot_argv`, each disk a ``usb-storage`` device on one
    ``qemu-xhci`` controller."""
    argv = [
        *direct_boot_argv(
            guest.kernel, guest.initrd, CMDLINE, serial_log, accel=accel, memory_mib=memory_mib
        ),
        "-device",
        "qemu-xhci,id=xhci0",
    ]
    for n, disk in enumerate(disks):
        drive = f"file={qemu_option(disk.image)},if=none,id=usbdisk{n},format={disk.fmt}"
        if disk.read_only:
            drive += ",readonly=on"
        device = f"usb-storage,bus=xhci0.0,drive=usbdisk{n},serial={qemu_option(disk.serial)}"
        if disk.removable:
            device += ",removable=on"
        argv += ["-drive", drive, "-device", device]
    return argv


def qemu_option(value: str) -> str:
    """A value inside a ``key=value,...`` option: commas are doubled (QEMU's escaping)."""
    return value.replace(",", ",,")


def probe_usb_disks(
    disks: Sequence[UsbDisk],
    *,
    guest: ProbeGuest | None = None,
    timeout: float = 120.0,
    accel: str = "tcg",
) -> ProbeResult:
    """Boot the probe guest with ``disks`` on its USB bus and return udev's view of them.

    Raises ProbeFailed (with the console's tail) when QEMU fails, the guest does not power off
    within ``timeout`` seconds, or it printed no database."""
    guest = guest or build_probe_guest()
    with tempfile.TemporaryDirectory(prefix="probeguest-") as work:
        log = os.path.join(work, "console.log")
        argv = probe_argv(guest, disks, log, accel=accel)
        process, output, console, seconds = run_to_power_off(
            argv,
            log,
            timeout,
            what="the USB probe guest",
            install="qemu-system-x86",
            failure=ProbeFailed,
        )
    section = console_section(console)
    if process.returncode != 0 or section is None:
        raise ProbeFailed(
            f"the USB probe guest printed no udev database (QEMU exit status "
            f"{process.returncode}{': ' + output.strip() if output.strip() else ''}); console:\n"
            + console[-4000:]
        )
    return ProbeResult(parse_udev_database(section), console, seconds)


def run_to_power_off(
    argv: list[str],
    log: str,
    timeout: float,
    *,
    what: str,
    install: str,
    failure: Callable[[str], Exception],
) -> tuple[subprocess.Popen[str], str, str, float]:
    """Run a probe guest's QEMU (``argv``, console in ``log``) until the guest powers off:
    (the finished process, QEMU's own output, the console, seconds). A missing QEMU is
    InvalidInput naming ``install``; a guest still up after ``timeout`` seconds is killed and
    ``failure`` (with the console's tail) raised."""
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    except FileNotFoundError as exc:
        raise InvalidInput(f"{QEMU} is not installed: `apt-get install -y {install}`") from exc
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise failure(
            f"{what} did not power off within {timeout:.0f} s; console:\n" + _tail(log)
        ) from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            if process.poll() is None:
                process.kill()
                process.wait()
    seconds = time.monotonic() - started
    with open(log, encoding="utf-8", errors="replace") as f:
        return process, output, f.read(), seconds


def _tail(path: str, size: int = 4000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-size:]
    except OSError:
        return "(no console output)"
