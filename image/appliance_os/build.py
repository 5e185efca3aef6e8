"""Build the appliance's disks from Debian 12 packages: the system disk and its installer.

``scripts/build-image`` runs :func:`build`:

1. the release bundle of this checkout (wheels of the project and its dependencies);
2. a root file system with ``mmdebstrap`` (kernel, systemd, :data:`install.PACKAGES`), made the
   appliance OS by :func:`customize`, which mmdebstrap runs as a hook while the tree's ``/dev``,
   ``/proc`` and ``/sys`` are mounted: the release's virtual environment must be built inside the
   tree, because a venv's paths are absolute;
3. the system disk (raw and qcow2, UEFI and BIOS: :mod:`disk`);
4. the installer disk: the same tree with the system disk inside it (zstd), booted with
   ``appliance.installer`` on the kernel command line, so the console installer runs instead of
   the service.

The package versions the tree got are listed (``packages.lock``) in the image
(``/etc/appliance/packages.lock``), beside the disks and in ``build.log``. ``--packages-lock``
installs exactly the versions of an earlier build and fails if the mirror no longer has one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypedDict

import zstandard

from image.appliance_os import disk
from image.appliance_os.bundle import build_bundle, sha256_file
from image.appliance_os.install import PACKAGES
from image.appliance_os.layout import (
    ESP_LABEL,
    INSTALLER_FLAG,
    INSTALLER_ROOT_LABEL,
    ROOT_LABEL,
)
from image.appliance_os.releases import read_bundle

SUITE = "bookworm"
#: Security updates come from the start, so the first boot is not already behind.
SOURCES = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
#: What boots: the packages the service needs come on top (install.PACKAGES).
BOOT_PACKAGES = (
    "linux-image-amd64",
    "systemd-sysv",
    "systemd-boot-efi",
    "systemd-resolved",
    "initramfs-tools",
    "dbus",
    "kmod",
    "procps",
    "less",
)
HOSTNAME = "appliance"
#: Inside the tree while the hook runs: the code install.py needs and the bundle.
STAGE_IN_TREE = "tmp/appliance-build"
BUNDLE_NAME = "bundle.tar"
#: The installer's ESP must not carry the system's label, or the installed system would mount
#: the stick's ESP as its /boot/efi while the stick is still in.
INSTALLER_ESP_LABEL = "APPLINSTALL"
#: Free space on the system disk's root as built: the installer grows root to the whole disk, and
#: so does the first boot of a disk written directly (etc/repart.d, x-systemd.growfs).
SYSTEM_HEADROOM_MIB = 256
INSTALLER_HEADROOM_MIB = 64
GROW_ROOT = "etc/repart.d/50-appliance-root.conf"
LOCK_FILE = "packages.lock"
TOOLS = {"mmdebstrap": "mmdebstrap", "chroot": "coreutils"}
#: The modules install.py imports (standard library apart from these), copied into the tree.
STAGED_CODE = (
    "image/__init__.py",
    "image/appliance_os",
    "appliance/__init__.py",
    "appliance/errors.py",
)

SYSTEM_FSTAB = (
    f"LABEL={ROOT_LABEL} / ext4 errors=remount-ro,x-systemd.growfs 0 1\n"
    # nofail: a box whose ESP is damaged still boots from its other loader and runs.
    f"LABEL={ESP_LABEL} /boot/efi vfat umask=0077,nofail 0 2\n"
)
INSTALLER_FSTAB = f"LABEL={INSTALLER_ROOT_LABEL} / ext4 errors=remount-ro 0 1\n"


class DiskFile(TypedDict):
    bytes: int
    allocated_bytes: int
    sha256: str


class BuildError(RuntimeError):
    """The build stopped; the message says at which step and why."""


@dataclass
class Build:
    """What a build made, written to ``build.json`` beside the disks."""

    version: str
    out: Path
    steps: dict[str, float] = field(default_factory=dict)
    files: dict[str, DiskFile] = field(default_factory=dict)
    packages: int = 0

    def document(self) -> dict[str, object]:
        return {
            "version": self.version,
            "built": datetime.now(UTC).isoformat(timespec="seconds"),
            "seconds": {k: round(v, 1) for k, v in self.steps.items()},
            "total_seconds": round(sum(self.steps.values()), 1),
            "files": self.files,
            "packages": self.packages,
        }


# --- decisions ---------------------------------------------------------------------------------


def parse_lock(text: str) -> dict[str, str]:
    """``name=version`` lines (``#`` comments allowed) as a mapping."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("=")
        if not sep or not name or not version or " " in line:
            raise BuildError(f"packages lock line {number}: expected name=version, got {raw!r}")
        pins[name] = version
    return pins


def render_lock(pins: dict[str, str]) -> str:
    return "".join(f"{name}={pins[name]}\n" for name in sorted(pins))


def lock_differences(wanted: dict[str, str], got: dict[str, str]) -> list[str]:
    """What differs between a lock and the installed tree, one line each (empty: the same)."""
    lines = []
    for name in sorted(set(wanted) | set(got)):
        if wanted.get(name) != got.get(name):
            lines.append(f"{name}: locked {wanted.get(name, '-')}, built {got.get(name, '-')}")
    return lines


def includes(pins: dict[str, str] | None) -> list[str]:
    """mmdebstrap's package list: the appliance's, or every locked package at its version."""
    if pins:
        return [f"{name}={version}" for name, version in sorted(pins.items())]
    return sorted(set(BOOT_PACKAGES) | set(PACKAGES))


def disk_names(version: str) -> dict[str, str]:
    return {
        "raw": f"appliance-{version}.img",
        "qcow2": f"appliance-{version}.qcow2",
        "installer": f"appliance-installer-{version}.img",
    }


# --- steps -------------------------------------------------------------------------------------


def _run(argv: Sequence[str], what: str, log: Path | None = None) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {shlex.join(argv)}\n{done.stdout}{done.stderr}\n")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-3000:]
        raise BuildError(f"{what} failed (exit {done.returncode}): {tail}")
    return done.stdout


def check_tools() -> None:
    if os.geteuid() != 0:
        raise BuildError("building the image needs root (mmdebstrap --mode=root, chroot)")
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise BuildError(f"building the image needs: apt-get install {' '.join(missing)}")
    disk.check_tools()


def stage_code(checkout: Path, stage: Path) -> None:
    for relative in STAGED_CODE:
        source, target = checkout / relative, stage / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)


def installed_packages(rootfs: Path) -> dict[str, str]:
    listing = _run(
        ["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${Package}=${Version}\n"],
        "listing the installed packages",
    )
    return parse_lock(listing)


def customize(rootfs: Path, stage: Path) -> None:
    """Make the fresh tree the appliance OS (mmdebstrap's customize hook runs this)."""
    inside = rootfs / STAGE_IN_TREE
    shutil.copytree(stage, inside)
    try:
        _run(
            [
                "chroot",
                str(rootfs),
                "env",
                f"PYTHONPATH=/{STAGE_IN_TREE}",
                "python3",
                "-m",
                "image.appliance_os.install",
                "--root",
                "/",
                "--mode",
                "image",
                "--bundle",
                f"/{STAGE_IN_TREE}/{BUNDLE_NAME}",
                "--no-apt",
                "--no-start",
            ],
            "installing the appliance into the image",
        )
    finally:
        shutil.rmtree(inside, ignore_errors=True)
    (rootfs / "etc/hostname").write_text(HOSTNAME + "\n")
    (rootfs / "etc/hosts").write_text(
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    (rootfs / "etc/fstab").write_text(SYSTEM_FSTAB)
    (rootfs / "boot/efi").mkdir(parents=True, exist_ok=True)
    # Every box gets its own identity at first boot: machine id and SSH host keys
    # (appliance-ssh-keys.service makes them).
    (rootfs / "etc/machine-id").write_text("")
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / leftover).glob("*"):
            if path.is_file() and path.name != "lock":
                path.unlink()
    lock = render_lock(installed_packages(rootfs))
    (rootfs / "etc/appliance" / LOCK_FILE).write_text(lock)


def make_tree(
    rootfs: Path, stage: Path, pins: dict[str, str] | None, sources: Sequence[str], log: Path
) -> None:
    # The hook runs this module again, from this checkout, with the tree's path as "$1".
    hook = shlex.join(
        [sys.executable, "-m", "image.appliance_os.build", "customize", "--stage", str(stage)]
    )
    checkout = shlex.quote(str(Path(__file__).resolve().parents[2]))
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        "--include=" + ",".join(includes(pins)),
        f'--customize-hook=cd {checkout} && PYTHONPATH={checkout} {hook} --rootfs "$1"',
        SUITE,
        str(rootfs),
        *sources,
    ]
    _run(argv, "mmdebstrap", log)


def compress(raw: Path, target: Path) -> str:
    """``raw`` as zstd at ``target``; returns the raw disk's SHA-256 (the installer checks it)."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    params = zstandard.ZstdCompressionParameters.from_level(9, threads=-1)
    compressor = zstandard.ZstdCompressor(compression_params=params)
    with open(raw, "rb") as src, open(target, "wb") as dst, compressor.stream_writer(dst) as writer:
        while block := src.read(8 << 20):
            digest.update(block)
            writer.write(block)
    return digest.hexdigest()


def _describe(path: Path) -> DiskFile:
    st = path.stat()
    return DiskFile(bytes=st.st_size, allocated_bytes=st.st_blocks * 512, sha256=sha256_file(path))


@contextmanager
def _step(build: Build, name: str, log: Path) -> Iterator[None]:
    started = time.monotonic()
    print(f"build-image: {name} ...", flush=True)
    yield
    build.steps[name] = time.monotonic() - started
    line = f"build-image: {name}: {build.steps[name]:.1f} s"
    print(line, flush=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(line + "\n")


# --- the work ----------------------------------------------------------------------------------


def build(
    checkout: Path,
    out: Path,
    *,
    version: str | None = None,
    python: Path | None = None,
    wheelhouse: Path | None = None,
    packages_lock: Path | None = None,
    sources: Sequence[str] = SOURCES,
    installer: bool = True,
    work: Path | None = None,
) -> Build:
    """Build the disks of ``checkout`` into ``out`` (see the module); returns what was made."""
    check_tools()
    checkout, out = checkout.resolve(), out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pins = parse_lock(packages_lock.read_text()) if packages_lock else None
    log = out / "build.log"
    log.write_text(f"build-image started {datetime.now(UTC).isoformat(timespec='seconds')}\n")
    with tempfile.TemporaryDirectory(prefix="appliance-image-", dir=work) as temporary:
        tmp = Path(temporary)
        stage, rootfs = tmp / "stage", tmp / "rootfs"
        stage.mkdir()
        result = Build(version="", out=out)
        with _step(result, "bundle", log):
            build_bundle(
                checkout,
                stage / BUNDLE_NAME,
                version=version,
                python=python or Path(sys.executable),
                wheelhouse=wheelhouse,
            )
            result.version = read_bundle(stage / BUNDLE_NAME).version
            stage_code(checkout, stage)
        names = disk_names(result.version)
        with _step(result, "root file system", log):
            make_tree(rootfs, stage, pins, sources, log)
            got = parse_lock((rootfs / "etc/appliance" / LOCK_FILE).read_text())
            if pins is not None and (diff := lock_differences(pins, got)):
                raise BuildError("the image differs from the packages lock:\n" + "\n".join(diff))
            shutil.copy2(rootfs / "etc/appliance" / LOCK_FILE, out / LOCK_FILE)
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"packages ({len(got)}):\n{render_lock(got)}")
            result.packages = len(got)
        raw = out / names["raw"]
        with _step(result, "system disk", log):
            title = f"Backup appliance {result.version}"
            boot = disk.Boot(ROOT_LABEL, title)
            disk.build_disk(rootfs, boot, raw, work=tmp, headroom_mib=SYSTEM_HEADROOM_MIB)
        with _step(result, "qcow2", log):
            disk.to_qcow2(raw, out / names["qcow2"])
        if installer:
            with _step(result, "installer disk", log):
                build_installer(rootfs, raw, result.version, out / names["installer"], tmp)
        for kind, name in names.items():
            if kind != "installer" or installer:
                result.files[name] = _describe(out / name)
    (out / "SHA256SUMS").write_text(
        "".join(f"{info['sha256']}  {name}\n" for name, info in sorted(result.files.items()))
    )
    (out / "build.json").write_text(json.dumps(result.document(), indent=2) + "\n")
    return result


def build_installer(rootfs: Path, raw: Path, version: str, target: Path, work: Path) -> None:
    """The tree turned installer: the system disk inside, its own labels, the installer flag."""
    media = rootfs / "opt/appliance-installer"
    digest = compress(raw, media / "system.img.zst")
    info = {"size": raw.stat().st_size, "sha256": digest, "version": version}
    (media / "system.json").write_text(json.dumps(info, indent=2) + "\n")
    (rootfs / "etc/fstab").write_text(INSTALLER_FSTAB)
    # The stick keeps its size: growing root is for the installed system only.
    grow = rootfs / GROW_ROOT
    grow_conf = grow.read_bytes()
    grow.unlink()
    try:
        boot = disk.Boot(
            INSTALLER_ROOT_LABEL, f"Install the backup appliance {version}", INSTALLER_FLAG
        )
        disk.build_disk(
            rootfs,
            boot,
            target,
            work=work,
            headroom_mib=INSTALLER_HEADROOM_MIB,
            esp_label=INSTALLER_ESP_LABEL,
        )
    finally:
        shutil.rmtree(media, ignore_errors=True)
        (rootfs / "etc/fstab").write_text(SYSTEM_FSTAB)
        grow.write_bytes(grow_conf)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/build-image",
        description="Build the appliance's system disk (raw, qcow2) and its installer disk.",
    )
    sub = parser.add_subparsers(dest="action")
    hook = sub.add_parser("customize", help=argparse.SUPPRESS)
    hook.add_argument("--rootfs", type=Path, required=True)
    hook.add_argument("--stage", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("build/image"), help="output folder")
    parser.add_argument("--version", help="the release version (default: from pyproject + git)")
    parser.add_argument("--packages-lock", type=Path, help="install exactly these versions")
    parser.add_argument("--wheelhouse", type=Path, help="reuse dependency wheels kept here")
    parser.add_argument("--work", type=Path, help="where the tree is made (default: /tmp)")
    parser.add_argument("--no-installer", action="store_true", help="the system disk only")
    parser.add_argument(
        "--mirror", action="append", help="a sources line (repeatable; default: deb.debian.org)"
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "customize":
            customize(args.rootfs, args.stage)
            return 0
        result = build(
            Path(__file__).resolve().parents[2],
            args.out,
            version=args.version,
            wheelhouse=args.wheelhouse,
            packages_lock=args.packages_lock,
            sources=args.mirror or SOURCES,
            installer=not args.no_installer,
            work=args.work,
        )
    except (BuildError, disk.DiskError) as exc:
        print(f"build-image: {exc}", file=sys.stderr)
        return 1
    for name, info in result.files.items():
        print(f"{result.out / name}: {info['bytes']} bytes ({info['allocated_bytes']} allocated)")
    print(f"build-image: done in {sum(result.steps.values()):.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
