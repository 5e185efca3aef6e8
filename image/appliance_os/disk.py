"""A bootable disk from a root file system tree, for UEFI and BIOS alike, with no mount at all.

Layout (GPT, so disks over 2 TiB work and firmware of both kinds finds its way)::

    sector 0          protective MBR with syslinux's ``gptmbr.bin`` boot code (BIOS)
    partition 1       ESP, FAT32, label ``APPLIANCE``, attribute LegacyBIOSBootable:
                      /EFI/BOOT/BOOTX64.EFI (systemd-boot), /loader/..., /syslinux.cfg and
                      ldlinux.sys (``syslinux --install`` on the partition file), /vmlinuz and
                      /initrd.img which both boot loaders load
    partition 2       root, ext4 (``mke2fs -d``), label ``appliance-root``: the last
                      partition, so the installer can grow it to the end of any disk

The kernel finds its root by label (the initramfs resolves ``root=LABEL=...``), so the same
image boots from a virtio disk, SATA, NVMe or a USB stick. Every file system is made in a plain
file and put at its offset: nothing is mounted, no loop device is needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from image.appliance_os.layout import ESP_LABEL

MIB = 1024 * 1024
SECTOR = 512
#: Room for two kernels and initramfs images (Debian's are ~8 + ~35 MiB).
ESP_MIB = 200
GPTMBR = Path("/usr/lib/syslinux/mbr/gptmbr.bin")
SYSTEMD_BOOT = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
#: The discoverable-partitions type of an x86-64 root file system.
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
TOOLS = {
    "mke2fs": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "syslinux": "syslinux",
    "sfdisk": "fdisk",
    "qemu-img": "qemu-utils",
}


class DiskError(RuntimeError):
    """The disk could not be assembled; the message says which step and why."""


@dataclass(frozen=True)
class Boot:
    """What both boot loaders start: the kernel command line names the root by label."""

    root_label: str
    title: str
    extra: str = ""

    def cmdline(self) -> str:
        # The last console= is /dev/console (where systemd and the banner write): the serial
        # line, so a headless box and its tests read everything there; tty1 gets the same.
        parts = [f"root=LABEL={self.root_label}", "ro", "console=tty1", "console=ttyS0,115200"]
        return " ".join(parts + ([self.extra] if self.extra else []))


def check_tools() -> None:
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if not GPTMBR.exists():
        missing.append("syslinux-common")
    if missing:
        raise DiskError(
            f"building the disk needs: apt-get install {' '.join(sorted(set(missing)))}"
        )


def kernel_files(rootfs: Path) -> tuple[Path, Path]:
    """The newest kernel and its initramfs in the tree's /boot."""
    kernels = sorted(rootfs.glob("boot/vmlinuz-*"))
    if not kernels:
        raise DiskError(f"no kernel in {rootfs}/boot: linux-image-amd64 must be installed")
    kernel = kernels[-1]
    initrd = rootfs / "boot" / kernel.name.replace("vmlinuz-", "initrd.img-")
    if not initrd.exists():
        raise DiskError(f"no initramfs {initrd.name} beside {kernel.name}")
    return kernel, initrd


def loader_files(boot: Boot) -> dict[str, str]:
    """The boot loaders' configuration files on the ESP, by path."""
    cmdline = boot.cmdline()
    return {
        "loader/loader.conf": "default appliance.conf\ntimeout 3\nconsole-mode keep\n",
        "loader/entries/appliance.conf": (
            f"title {boot.title}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {cmdline}\n"
        ),
        "syslinux.cfg": (
            "SERIAL 0 115200\nDEFAULT appliance\nPROMPT 0\nTIMEOUT 30\n"
            f"LABEL appliance\n  MENU LABEL {boot.title}\n  KERNEL /vmlinuz\n"
            f"  INITRD /initrd.img\n  APPEND {cmdline}\n"
        ),
    }


def _run(argv: list[str], what: str, **kwargs: object) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise DiskError(
            f"{what} failed ({argv[0]}): {(done.stderr or done.stdout).strip()[-2000:]}"
        )


def make_esp(rootfs: Path, boot: Boot, path: Path, label: str = ESP_LABEL) -> None:
    kernel, initrd = kernel_files(rootfs)
    efi = rootfs / SYSTEMD_BOOT
    if not efi.exists():
        raise DiskError(f"{efi} is missing: the image needs the systemd-boot-efi package")
    path.unlink(missing_ok=True)
    _run(["mkfs.vfat", "-F", "32", "-n", label, "-C", str(path), str(ESP_MIB * 1024)], "mkfs.vfat")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    image = ["-i", str(path)]
    _run(["mmd", *image, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"], "mmd", env=env)
    copies = [(efi, "::/EFI/BOOT/BOOTX64.EFI"), (kernel, "::/vmlinuz"), (initrd, "::/initrd.img")]
    with tempfile.TemporaryDirectory(prefix="esp-") as tmp:
        for name, text in loader_files(boot).items():
            local = Path(tmp) / name.replace("/", "_")
            local.write_text(text, encoding="ascii")
            copies.append((local, f"::/{name}"))
        for source, target in copies:
            _run(
                ["mcopy", *image, str(source), target], f"copying {source.name} to the ESP", env=env
            )
    # syslinux's mtools flavour installs ldlinux.sys into the FAT image file itself.
    _run(["syslinux", "--install", str(path)], "syslinux --install")


def make_root(rootfs: Path, label: str, path: Path, headroom_mib: int) -> int:
    """An ext4 image of the tree; returns its size in MiB (the tree plus ``headroom_mib``)."""
    used = subprocess.run(
        ["du", "-s", "--block-size=1M", "-x", str(rootfs)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    # ext4's own metadata (inode tables, journal) needs about a tenth on top of the files.
    size_mib = int(int(used) * 1.12) + headroom_mib
    path.unlink(missing_ok=True)
    _run(
        ["mke2fs", "-q", "-t", "ext4", "-L", label, "-d", str(rootfs), str(path), f"{size_mib}M"],
        "mke2fs",
    )
    return size_mib


def partition_script(esp_mib: int, root_mib: int) -> str:
    esp_start = MIB // SECTOR
    root_start = esp_start + esp_mib * MIB // SECTOR
    return (
        "label: gpt\n"
        f'start={esp_start}, size={esp_mib * MIB // SECTOR}, type=U, name="esp", '
        'attrs="LegacyBIOSBootable"\n'
        f'start={root_start}, size={root_mib * MIB // SECTOR}, type={ROOT_TYPE}, name="root"\n'
    )


def assemble(esp: Path, root: Path, out: Path) -> None:
    """Put the two partition images on a GPT disk at ``out`` (sparse)."""
    esp_mib = esp.stat().st_size // MIB
    root_mib = root.stat().st_size // MIB
    out.unlink(missing_ok=True)
    with open(out, "wb") as f:
        # 1 MiB before the ESP (MBR, GPT, alignment) and 1 MiB after root for the backup GPT.
        f.truncate((1 + esp_mib + root_mib + 1) * MIB)
    _run(["sfdisk", "-q", str(out)], "sfdisk", input=partition_script(esp_mib, root_mib))
    for source, offset_mib in ((esp, 1), (root, 1 + esp_mib)):
        _copy_sparse(source, out, offset_mib * MIB)
    with open(GPTMBR, "rb") as f:
        code = f.read(440)
    with open(out, "r+b") as f:
        f.write(code)


def _copy_sparse(source: Path, target: Path, offset: int) -> None:
    """Copy ``source`` into ``target`` at ``offset``, leaving its all-zero blocks as holes."""
    block = 4 * MIB
    zero = bytes(block)
    with open(source, "rb") as src, open(target, "r+b") as dst:
        position = 0
        while chunk := src.read(block):
            if chunk != zero[: len(chunk)]:
                dst.seek(offset + position)
                dst.write(chunk)
            position += len(chunk)


def to_qcow2(raw: Path, out: Path) -> None:
    out.unlink(missing_ok=True)
    _run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], "qemu-img convert"
    )


def build_disk(
    rootfs: Path,
    boot: Boot,
    out: Path,
    *,
    work: Path,
    headroom_mib: int,
    esp_label: str = ESP_LABEL,
) -> None:
    """The whole disk for ``rootfs`` at ``out``; the partition images are made in ``work``."""
    check_tools()
    esp, root = work / f"{out.name}.esp", work / f"{out.name}.root"
    try:
        make_esp(rootfs, boot, esp, esp_label)
        make_root(rootfs, boot.root_label, root, headroom_mib)
        assemble(esp, root, out)
    finally:
        esp.unlink(missing_ok=True)
        root.unlink(missing_ok=True)
