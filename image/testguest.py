"""A tiny bootable VM disk built from Debian packages alone: for tests, demos and the canary boot.

The guest is the Debian kernel (``linux-image-amd64``) with a busybox initramfs. No root and no
mounts are needed to build it: every filesystem is made in a plain file and the pieces are put
together at byte offsets.

Layout of the disk (msdos label written by ``parted``, syslinux's MBR code in sector 0)::

    0 .. 1 MiB        MBR, partition table, gap
    partition 1       FAT16 "BOOT" (active): ldlinux.sys (``syslinux --install`` on the
                      partition file), syslinux.cfg, the kernel and the initramfs (``mcopy``)
    partition 2       ext4 "data" (``mke2fs -d``): the guest mounts it and appends to
                      ``boots.log`` on every boot, so a boot always writes to the disk
    the rest          unallocated; ``extra_data`` bytes of pseudo-random data are written here
                      for benchmarks (a large disk that the guest never reads)

What the guest does when it boots (busybox init, ``/etc/rc``): insmods the virtio, ext4 and
power-button modules in dependency order (from ``modules.dep`` of the kernel's
``/lib/modules/<version>``), mounts the data partition and logs the boot, configures ``eth0``
with ``udhcpc`` (QEMU's user network answers), serves ``/www`` with busybox ``httpd`` on port 80
(``/index.html`` says ``OK``), and then prints :data:`MARKER` on the serial console and the
screen. From then on every key typed on its keyboard (tty1: a VNC console or QMP ``send-key``)
is printed on the serial console as ``key: <char>`` (:data:`KEY_ECHO`). The ACPI power button (QMP ``system_powerdown``) powers it off cleanly.

Images are cached under a directory keyed by a content hash of every input (kernel, modules,
busybox, syslinux files, the recipe and this builder's version), so a test session builds each
variant once and a changed input builds a new one.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from appliance.errors import InvalidInput

#: Printed on the serial console (and the screen) once the guest's services are up.
MARKER = "APPLIANCE-TEST-GUEST-BOOTED"
#: The guest prints this and the key on the serial console for each key typed on its keyboard.
KEY_ECHO = "key: "
#: Served as the guest's health page (``http://guest/``).
HEALTH_TEXT = "OK appliance test guest"
#: Bump when the recipe's output changes for the same inputs: it is part of the cache key.
BUILDER_VERSION = 3
MIB = 1024 * 1024
#: The Debian packages the builder needs, for error messages and ``scripts/setup``.
PACKAGES = "linux-image-amd64 busybox-static syslinux syslinux-common mtools dosfstools parted"

#: Modules the guest loads (their dependencies are added and ordered from modules.dep).
DEFAULT_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "crc32c_generic",
    "ext4",
    "button",
    "evdev",
)

SYSLINUX_MBR = "/usr/lib/syslinux/mbr/mbr.bin"
BUSYBOX = "/bin/busybox"


@dataclass(frozen=True)
class GuestRecipe:
    """What to build. ``size`` and ``extra_data`` in bytes; partitions in MiB."""

    size: int = 256 * MIB
    extra_data: int = 0
    boot_mib: int = 32
    data_mib: int = 32
    modules: tuple[str, ...] = DEFAULT_MODULES
    marker: str = MARKER

    def __post_init__(self) -> None:
        end = (1 + self.boot_mib + self.data_mib) * MIB
        if self.size % MIB:
            raise InvalidInput("the test guest's size must be a whole number of MiB")
        if end + self.extra_data > self.size:
            raise InvalidInput(
                f"a {self.size // MIB} MiB test guest cannot hold its partitions "
                f"({end // MIB} MiB) and {self.extra_data // MIB} MiB of extra data"
            )

    @property
    def data_start(self) -> int:
        return (1 + self.boot_mib) * MIB

    @property
    def extra_start(self) -> int:
        """Offset of the extra data: after the partitions, on a 1 MiB boundary."""
        return self.data_start + self.data_mib * MIB


@dataclass(frozen=True)
class GuestInputs:
    """The host files the guest is made of."""

    kernel: str
    kernel_version: str
    modules: tuple[str, ...]  # absolute .ko paths, in load order
    busybox: str = BUSYBOX
    mbr: str = SYSLINUX_MBR
    tools: dict[str, str] = field(default_factory=dict)


# --- host inputs -------------------------------------------------------------------------------


def find_kernel() -> tuple[str, str]:
    """(path of the newest /boot/vmlinuz-*, its version) or InvalidInput naming the package."""
    candidates = [p for p in glob.glob("/boot/vmlinuz-*") if os.access(p, os.R_OK)]
    usable = []
    for path in candidates:
        version = os.path.basename(path)[len("vmlinuz-") :]
        if os.path.isfile(f"/lib/modules/{version}/modules.dep"):
            usable.append((_version_key(version), path, version))
    if not usable:
        raise InvalidInput(
            "no readable kernel with modules in /boot and /lib/modules; install it with "
            "`apt-get install -y linux-image-amd64`"
        )
    _, path, version = max(usable)
    return path, version


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version))


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` -> {relative .ko path: [its dependencies, nearest first]}."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        module, _, rest = line.partition(":")
        deps[module.strip()] = rest.split()
    return deps


def module_load_order(deps: dict[str, list[str]], wanted: Iterable[str]) -> list[str]:
    """Relative .ko paths of ``wanted`` (by module name) and their dependencies, each after
    everything it depends on. Unknown names raise InvalidInput."""
    by_name: dict[str, str] = {}
    for path in deps:
        name = os.path.basename(path).split(".ko", 1)[0]
        by_name[name] = path
        by_name[name.replace("-", "_")] = path
    order: list[str] = []
    seen: set[str] = set()

    def visit(path: str, stack: tuple[str, ...]) -> None:
        if path in seen:
            return
        if path in stack:
            raise InvalidInput(f"module dependency cycle at {path}")
        for dep in reversed(deps.get(path, [])):
            visit(dep, (*stack, path))
        seen.add(path)
        order.append(path)

    for name in wanted:
        found = by_name.get(name.replace("-", "_"))
        if found is None:
            raise InvalidInput(f"kernel module {name!r} is not in modules.dep")
        visit(found, ())
    return order


def host_inputs(recipe: GuestRecipe) -> GuestInputs:
    kernel, version = find_kernel()
    base = f"/lib/modules/{version}"
    with open(os.path.join(base, "modules.dep")) as f:
        deps = parse_modules_dep(f.read())
    modules = tuple(os.path.join(base, p) for p in module_load_order(deps, recipe.modules))
    for path in modules:
        if path.endswith((".xz", ".zst", ".gz")):
            raise InvalidInput(f"compressed kernel module {path} is not supported by the builder")
    tools = {name: _tool(name) for name in ("parted", "mkfs.fat", "mcopy", "syslinux", "mke2fs")}
    for path, package in ((BUSYBOX, "busybox-static"), (SYSLINUX_MBR, "syslinux-common")):
        if not os.path.isfile(path):
            raise InvalidInput(f"{path} is missing; install it with `apt-get install -y {package}`")
    if not _statically_linked(BUSYBOX):
        raise InvalidInput(
            f"{BUSYBOX} is dynamically linked; the initramfs needs `apt-get install -y busybox-static`"
        )
    return GuestInputs(kernel=kernel, kernel_version=version, modules=modules, tools=tools)


def _statically_linked(path: str) -> bool:
    """True when the ELF file has no program interpreter (PT_INTERP) to load it."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit ELF only
            return False
        phoff = int.from_bytes(header[32:40], "little")
        phentsize = int.from_bytes(header[54:56], "little")
        phnum = int.from_bytes(header[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return all(
        int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") != 3  # PT_INTERP
        for i in range(phnum)
    )


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise InvalidInput(
            f"{name} is not installed; the test guest needs `apt-get install -y {PACKAGES}`"
        )
    return found


# --- the initramfs -----------------------------------------------------------------------------


class CpioWriter:
    """A ``newc`` cpio archive (the initramfs format), built in memory, reproducibly."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = [
            self._ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,
            0,  # mtime: fixed, so the same inputs give the same bytes
            len(data),
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        ]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._out.write(header + encoded)
        self._out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._out.write(data)
        self._out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = self._out.getvalue()
        return data + b"\0" * (-len(data) % 512)


INITTAB = """\
::sysinit:/etc/rc
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
"""

UDHCPC_SCRIPT = """\
#!/bin/sh
case "$1" in
  bound|renew)
    ifconfig "$interface" "$ip" netmask "${subnet:-255.255.255.0}" up
    if [ -n "$router" ]; then
      route del default 2>/dev/null
      route add default gw "${router%% *}" dev "$interface"
    fi
    ;;
  deconfig)
    ifconfig "$interface" 0.0.0.0 up
    ;;
esac
exit 0
"""

RC_TEMPLATE = """\
#!/bin/sh
# The test guest's whole boot: modules, data disk, network, health page, marker.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
hostname testguest
while read -r module; do insmod "/lib/modules/$module" 2>/dev/null; done < /etc/modules

# The data partition: the first disk with a second partition (virtio, then SCSI/SATA).
data=""
i=0
while [ $i -lt 100 ]; do
  for dev in /dev/vda2 /dev/sda2 /dev/nvme0n1p2; do
    if [ -b "$dev" ]; then data=$dev; break 2; fi
  done
  usleep 20000
  i=$((i + 1))
done
boots=0
if [ -n "$data" ] && mount -t ext4 "$data" /data; then
  echo "boot $(date +%s) $(cat /proc/uptime)" >> /data/boots.log
  boots=$(wc -l < /data/boots.log)
  sync
else
  echo "test guest: no data partition found" > /dev/console
fi

ifconfig lo 127.0.0.1 up
if [ -e /sys/class/net/eth0 ]; then
  ifconfig eth0 up
  udhcpc -i eth0 -s /etc/udhcpc.script -q -n -t 5 -T 1 >/dev/null 2>&1 || \\
    ifconfig eth0 10.0.2.15 netmask 255.255.255.0 up
fi
echo "{health} boots=$boots" > /www/index.html
httpd -p 80 -h /www

# QMP system_powerdown presses the ACPI power button: power off cleanly.
for ev in /sys/class/input/event*; do
  if grep -q "Power Button" "$ev/device/name" 2>/dev/null; then
    (dd if="/dev/input/${{ev##*/}}" of=/dev/null bs=24 count=1 2>/dev/null; poweroff) &
  fi
done

echo "{marker} boots=$boots"
echo "{marker} boots=$boots" > /dev/tty0 2>/dev/null

# Each key typed on the screen's keyboard (a VNC console, QMP send-key) is printed on the serial
# console ("key: a", "key: space", "key: \\n", "key: 033" for Escape), and on the screen, so a
# test can prove that a keystroke reached the guest.
if [ -c /dev/tty1 ]; then
  (
    set -f
    stty -icanon min 1 time 0 2>/dev/null
    while :; do
      set -- $(dd bs=1 count=1 2>/dev/null | od -An -c -tx1)
      case $# in
        0) sleep 1; continue ;;
        1) key=space ;;
        *) key=$1 ;;
      esac
      printf 'key: %s\\n' "$key"
      printf '\\nkey: %s\\n' "$key" > /dev/tty1
    done
  ) < /dev/tty1 > /dev/ttyS0 2>/dev/null &
fi
"""

SYSLINUX_CFG = """\
DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND console=tty0 console=ttyS0,115200 quiet loglevel=3 panic=-1 rdinit=/init
"""


def build_initramfs(inputs: GuestInputs, recipe: GuestRecipe) -> bytes:
    """The gzip-compressed cpio archive of the guest's userland."""
    cpio = CpioWriter()
    for directory in (
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "dev/input",
        "data",
        "www",
        "tmp",
        "lib",
        "lib/modules",
    ):
        cpio.directory(directory)
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.char_device("dev/ttyS0", 4, 64)
    cpio.char_device("dev/tty0", 4, 0)
    with open(inputs.busybox, "rb") as f:
        cpio.file("bin/busybox", f.read(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.symlink("init", "bin/busybox")
    cpio.symlink("sbin/init", "../bin/busybox")
    names = []
    for path in inputs.modules:
        name = os.path.basename(path)
        names.append(name)
        with open(path, "rb") as f:
            cpio.file(f"lib/modules/{name}", f.read())
    cpio.file("etc/modules", "".join(f"{n}\n" for n in names).encode())
    cpio.file("etc/inittab", INITTAB.encode())
    cpio.file("etc/udhcpc.script", UDHCPC_SCRIPT.encode(), 0o755)
    rc = RC_TEMPLATE.format(marker=recipe.marker, health=HEALTH_TEXT)
    cpio.file("etc/rc", rc.encode(), 0o755)
    cpio.file("www/index.html", f"{HEALTH_TEXT} booting\n".encode())
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


# --- assembling the disk -----------------------------------------------------------------------


def _run(argv: Sequence[str], what: str) -> None:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise InvalidInput(
            f"building the test guest failed at {what}: "
            + (detail[-1] if detail else f"exit status {result.returncode}")
        )


def _build_boot_partition(inputs: GuestInputs, recipe: GuestRecipe, work: str) -> str:
    path = os.path.join(work, "boot.img")
    tools = inputs.tools
    # Hidden sectors = the partition's start, as a partition's boot sector must say.
    _run(
        [
            tools["mkfs.fat"],
            "-F",
            "16",
            "-n",
            "BOOT",
            "-i",
            "a11ce000",
            "-h",
            str(MIB // 512),
            "-C",
            path,
            str(recipe.boot_mib * 1024),
        ],
        "mkfs.fat",
    )
    _run([tools["syslinux"], "--install", path], "syslinux --install")
    initrd = os.path.join(work, "initrd.img")
    with open(initrd, "wb") as f:
        f.write(build_initramfs(inputs, recipe))
    config = os.path.join(work, "syslinux.cfg")
    with open(config, "w") as f:
        f.write(SYSLINUX_CFG)
    env_copy = [tools["mcopy"], "-i", path, "-o"]
    _run([*env_copy, inputs.kernel, "::/vmlinuz"], "mcopy of the kernel")
    _run([*env_copy, initrd, "::/initrd.img"], "mcopy of the initramfs")
    _run([*env_copy, config, "::/syslinux.cfg"], "mcopy of syslinux.cfg")
    return path


def _build_data_partition(inputs: GuestInputs, recipe: GuestRecipe, work: str) -> str:
    tree = os.path.join(work, "data")
    os.makedirs(tree)
    with open(os.path.join(tree, "README"), "w") as f:
        f.write("Data partition of the appliance's test guest; every boot appends to boots.log.\n")
    with open(os.path.join(tree, "boots.log"), "w"):
        pass
    path = os.path.join(work, "data.img")
    _run(
        [
            inputs.tools["mke2fs"],
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "data",
            "-U",
            "a11ce000-0000-4000-8000-000000000002",
            "-E",
            "hash_seed=a11ce000-0000-4000-8000-000000000003,root_owner=0:0",
            "-d",
            tree,
            path,
            f"{recipe.data_mib}M",
        ],
        "mke2fs",
    )
    return path


def _copy_into(image: str, offset: int, source: str) -> None:
    """Write ``source`` into ``image`` at ``offset``, leaving all-zero blocks as holes."""
    block = MIB
    with open(source, "rb") as src, open(image, "r+b") as dst:
        pos = 0
        while True:
            data = src.read(block)
            if not data:
                break
            if data.count(0) != len(data):
                dst.seek(offset + pos)
                dst.write(data)
            pos += len(data)


def write_extra_data(image: str, offset: int, length: int, seed: bytes = b"test-guest") -> None:
    """Fill ``[offset, offset+length)`` with deterministic, incompressible bytes."""
    import blake3  # the store's hash; its extendable output is a fast keyed random stream

    block = 4 * MIB
    hasher = blake3.blake3(seed)
    with open(image, "r+b") as f:
        f.seek(offset)
        done = 0
        while done < length:
            n = min(block, length - done)
            f.write(hasher.digest(length=n, seek=done))
            done += n


def assemble_disk(inputs: GuestInputs, recipe: GuestRecipe, target: str, work: str) -> None:
    boot = _build_boot_partition(inputs, recipe, work)
    data = _build_data_partition(inputs, recipe, work)
    with open(target, "wb") as f:
        f.truncate(recipe.size)
    boot_end = recipe.data_start
    data_end = recipe.extra_start
    _run(
        [
            inputs.tools["parted"],
            "-s",
            target,
            "mklabel",
            "msdos",
            "mkpart",
            "primary",
            "fat16",
            f"{MIB}B",
            f"{boot_end - 1}B",
            "mkpart",
            "primary",
            "ext4",
            f"{boot_end}B",
            f"{data_end - 1}B",
            "set",
            "1",
            "boot",
            "on",
        ],
        "parted",
    )
    with open(inputs.mbr, "rb") as f:
        mbr = f.read(440)
    with open(target, "r+b") as f:
        f.write(mbr)  # boot code only: the partition table after byte 440 stays parted's
    _copy_into(target, MIB, boot)
    _copy_into(target, boot_end, data)
    if recipe.extra_data:
        write_extra_data(target, recipe.extra_start, recipe.extra_data)


# --- the cache ---------------------------------------------------------------------------------


def default_cache_dir() -> str:
    configured = os.environ.get("APPLIANCE_TEST_GUEST_CACHE")
    if configured:
        return configured
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "appliance", "test-guests")


def cache_key(inputs: GuestInputs, recipe: GuestRecipe) -> str:
    digest = hashlib.sha256()
    described = {
        "builder": BUILDER_VERSION,
        "recipe": asdict(recipe),
        "rc": RC_TEMPLATE,
        "inittab": INITTAB,
        "udhcpc": UDHCPC_SCRIPT,
        "syslinux": SYSLINUX_CFG,
        "modules": [os.path.basename(p) for p in inputs.modules],
    }
    digest.update(json.dumps(described, sort_keys=True).encode())
    for path in (inputs.kernel, inputs.busybox, inputs.mbr, *inputs.modules):
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:24]


def build_test_guest(
    cache_dir: str | None = None,
    *,
    size: int = 256 * MIB,
    extra_data: int = 0,
    recipe: GuestRecipe | None = None,
) -> str:
    """Path of the cached raw disk of the test guest, built if needed. Never modify that file:
    copy it (:func:`copy_sparse`) before booting it directly."""
    recipe = recipe or GuestRecipe(size=size, extra_data=extra_data)
    inputs = host_inputs(recipe)
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    os.makedirs(cache_dir, exist_ok=True)
    name = f"testguest-{recipe.size // MIB}M"
    if recipe.extra_data:
        name += f"-{recipe.extra_data // MIB}Mdata"
    target = os.path.join(cache_dir, f"{name}-{cache_key(inputs, recipe)}.raw")
    if os.path.exists(target):
        return target
    with tempfile.TemporaryDirectory(prefix="testguest-", dir=cache_dir) as work:
        partial = os.path.join(work, "disk.raw")
        assemble_disk(inputs, recipe, partial, work)
        os.chmod(partial, 0o444)  # a cached guest is read-only: boot a copy or an overlay
        os.replace(partial, target)  # atomic: a concurrent build of the same key is harmless
    return target


def copy_sparse(source: str, target: str) -> None:
    """Copy a disk image keeping its holes (SEEK_DATA/SEEK_HOLE), writable at ``target``."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        size = os.fstat(src.fileno()).st_size
        dst.truncate(size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(src.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break  # no data after pos
            end = os.lseek(src.fileno(), start, os.SEEK_HOLE)
            src.seek(start)
            dst.seek(start)
            remaining = end - start
            while remaining:
                chunk = src.read(min(remaining, 8 * MIB))
                dst.write(chunk)
                remaining -= len(chunk)
            pos = end
    os.chmod(target, 0o644)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build-test-guest",
        description="Build (or find in the cache) the appliance's bootable busybox test guest.",
    )
    parser.add_argument("--size-mib", type=int, default=256, help="disk size (default 256)")
    parser.add_argument(
        "--extra-data-mib",
        type=int,
        default=0,
        help="pseudo-random data written to the unallocated tail (for benchmarks)",
    )
    parser.add_argument("--cache-dir", default=None, help=f"default {default_cache_dir()}")
    parser.add_argument("--output", help="also copy the image here (sparse, writable)")
    args = parser.parse_args(argv)
    try:
        path = build_test_guest(
            args.cache_dir, size=args.size_mib * MIB, extra_data=args.extra_data_mib * MIB
        )
    except InvalidInput as exc:
        print(f"build-test-guest: {exc.message}", file=sys.stderr)
        return 1
    if args.output:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.output)
        copy_sparse(path, args.output)
        path = os.path.abspath(args.output)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
