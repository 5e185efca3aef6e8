"""Make a Debian 12 system the appliance OS: packages, system files, the release, the units.

One function, :func:`install`, serves both places the appliance OS is made:

* ``mode="image"``: the image build runs it inside the image's root file system (``--root``),
  offline: packages were given to mmdebstrap, units are enabled with ``systemctl --root``, and
  nothing is started. The installer's units and the DHCP network file come along.
* ``mode="box"``: ``scripts/install`` runs it on a running Debian box: missing packages are
  installed with apt, and the units are (re)started. The box keeps its own network settings.

The system files live under ``files/`` at their target paths. Installing is idempotent: a file
whose content and mode are already right is not touched, and :class:`InstallReport` lists what
did change (an empty report means the system was already installed). Files the page or the
operator edit afterwards (:data:`WRITE_ONCE`) are written only when absent. The paths install
created are recorded in :data:`MANIFEST`, so :func:`uninstall` removes exactly those and never
a file the box had before.

Standard library only: this runs before the appliance's virtual environment exists.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Literal

from image.appliance_os.layout import Layout

Mode = Literal["image", "box"]

FILES = Path(__file__).resolve().parent / "files"

#: The Debian packages the service uses at run time (tools it runs, firmware for failover VMs,
#: the console page's noVNC), not those only its tests or the image build need.
PACKAGES = (
    "python3",
    "python3-venv",
    "qemu-system-x86",
    "qemu-utils",
    "ovmf",
    "e2fsprogs",
    "btrfs-progs",
    "xfsprogs",
    "dosfstools",
    "fdisk",
    "parted",
    "smartmontools",
    "mt-st",
    "mtx",
    "zstd",
    "nftables",
    "openssh-server",
    "unattended-upgrades",
    "systemd-timesyncd",
    "udev",
    "iproute2",
    "ca-certificates",
    "novnc",
)

#: Units enabled everywhere, in start order.
UNITS = ("appliance-firewall.service", "appliance.service", "appliance-banner.service")
#: Units enabled only in the image: the console installer (it runs only when the kernel command
#: line says ``appliance.installer``), and networkd for the DHCP network file.
IMAGE_UNITS = (
    "appliance-installer@tty1.service",
    "appliance-installer@ttyS0.service",
    "systemd-networkd.service",
    "appliance-ssh-keys.service",
)
#: Files only the image gets: on an existing box the network file would take over its network,
#: and the installer's units have no business there.
IMAGE_ONLY = (
    "etc/systemd/network/10-appliance.network",
    "usr/local/lib/systemd/system/appliance-installer@.service",
    "usr/local/lib/systemd/system/appliance-ssh-keys.service",
    "etc/repart.d/50-appliance-root.conf",
    "etc/systemd/system/getty@.service.d/appliance-installer.conf",
    "etc/systemd/system/serial-getty@.service.d/appliance-installer.conf",
)
#: Written only when absent: the operator's settings, and the files the page rewrites (network,
#: the security-updates switch).
WRITE_ONCE = (
    "etc/appliance/appliance.env",
    "etc/apt/apt.conf.d/20auto-upgrades",
    "etc/systemd/network/10-appliance.network",
)
#: Modes other than 0644. Decided by path, not by the source file's mode: a wheel or a copy may
#: lose the executable bit, and the kernel hooks must run.
MODES = {"etc/appliance/appliance.env": 0o640}
EXECUTABLE_DIRS = ("etc/kernel/postinst.d", "etc/initramfs/post-update.d")
#: Directories with the modes they must have.
DIRECTORIES = {
    "var/lib/appliance": 0o700,
    "etc/appliance": 0o755,
    # Folders the page writes files into (api/system_config.py); they exist before the service
    # starts, should its unit ever list them in ReadWritePaths=.
    "etc/systemd/network": 0o755,
    "etc/systemd/timesyncd.conf.d": 0o755,
}
#: What install created, one path (relative to the root) per line.
MANIFEST = "etc/appliance/installed-files"
#: The ``appliance`` command in root's PATH, following the running release (the console's
#: recovery-key command, support work).
COMMAND_LINK = "usr/local/sbin/appliance"
#: Kept by uninstall unless purging: the data and the operator's settings.
KEPT = ("var/lib/appliance", "etc/appliance")
FIREWALL_TABLE = ("inet", "appliance")


class InstallError(Exception):
    """A step of the installation failed; the message says which and why."""


@dataclass
class InstallReport:
    """What an install changed; all empty when the system was installed already."""

    packages: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    release: str | None = None
    enabled: list[str] = field(default_factory=list)
    started: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.packages or self.changed or self.release or self.enabled)


# --- decisions ------------------------------------------------------------------------------


def system_files(mode: Mode) -> list[PurePosixPath]:
    """The files under ``files/`` that ``mode`` installs, as paths relative to the root."""
    found = []
    for path in sorted(FILES.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            relative = PurePosixPath(path.relative_to(FILES).as_posix())
            if mode == "image" or str(relative) not in IMAGE_ONLY:
                found.append(relative)
    return found


def file_mode(relative: PurePosixPath) -> int:
    if str(relative) in MODES:
        return MODES[str(relative)]
    return 0o755 if str(relative.parent) in EXECUTABLE_DIRS else 0o644


def units(mode: Mode) -> tuple[str, ...]:
    return UNITS + IMAGE_UNITS if mode == "image" else UNITS


def marker(mode: Mode, version: str, previous: dict[str, object] | None) -> dict[str, object]:
    """``system.json``: the first install's time stays, so a rerun leaves the file as it is."""
    installed_at = (previous or {}).get("installed_at") or datetime.now(UTC).isoformat(
        timespec="seconds"
    )
    return {"installed_by": mode, "installed_at": installed_at, "version": version}


def systemctl(root: Path, *args: str) -> list[str]:
    """``systemctl`` on the live system when ``root`` is ``/``, else offline on ``root``."""
    if root == Path("/"):
        return ["systemctl", *args]
    return ["systemctl", f"--root={root}", *args]


# --- adapters -------------------------------------------------------------------------------


def _run(argv: Sequence[str], what: str, *, env: dict[str, str] | None = None) -> str:
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, check=False, env=env, timeout=1800
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"{what}: {exc}") from exc
    if result.returncode != 0:
        detail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-20:])
        raise InstallError(f"{what} failed (exit {result.returncode}): {detail}")
    return result.stdout


def missing_packages(packages: Sequence[str]) -> list[str]:
    missing = []
    for package in packages:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f=${db:Status-Status}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.stdout.strip() != "installed":
            missing.append(package)
    return missing


def apt_install(packages: Sequence[str]) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], "apt-get update", env=env)
    _run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
        "apt-get install " + " ".join(packages),
        env=env,
    )


def _write_atomically(target: Path, content: bytes, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def put_file(root: Path, relative: PurePosixPath) -> bool:
    """Install one system file; True when it changed anything."""
    source = FILES / relative
    target = root / relative
    wanted = file_mode(relative)
    if target.exists() and str(relative) in WRITE_ONCE:
        return False
    content = source.read_bytes()
    if target.is_file() and not target.is_symlink():
        same = target.read_bytes() == content
        if same and (target.stat().st_mode & 0o7777) == wanted:
            return False
        if same:
            os.chmod(target, wanted)
            return True
    _write_atomically(target, content, wanted)
    return True


def put_directory(path: Path, mode: int) -> bool:
    if path.is_dir() and (path.stat().st_mode & 0o7777) == mode:
        return False
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    return True


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def _put_text(path: Path, text: str, mode: int) -> bool:
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    _write_atomically(path, text.encode(), mode)
    return True


def relocate_release(layout: Layout, version: str) -> list[str]:
    """Make a release installed under a ``--root`` name its paths as the installed system sees
    them: a virtual environment's scripts (shebangs, ``activate``) and ``pyvenv.cfg`` carry the
    absolute path it was made at, ``<root>/opt/...``, which does not exist once the root is the
    image's ``/``. Returns the files rewritten (none for the root ``/``, or a second time)."""
    if layout.root == Path("/"):
        return []
    venv = layout.venv(version)
    built_at = str(venv).encode()
    seen_as = ("/" + str(venv.relative_to(layout.root))).encode()
    rewritten = []
    for path in sorted([*(venv / "bin").iterdir(), venv / "pyvenv.cfg"]):
        if path.is_symlink() or not path.is_file():
            continue
        content = path.read_bytes()
        if built_at in content:
            _write_atomically(
                path, content.replace(built_at, seen_as), path.stat().st_mode & 0o7777
            )
            rewritten.append(str(path.relative_to(layout.root)))
    return rewritten


def _put_command_link(layout: Layout) -> bool:
    link = layout.root / COMMAND_LINK
    target = "/" + str((layout.current / "venv" / "bin" / "appliance").relative_to(layout.root))
    if link.is_symlink() and os.readlink(link) == target:
        return False
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    return True


def is_enabled(root: Path, unit: str) -> bool:
    result = subprocess.run(
        systemctl(root, "is-enabled", unit), capture_output=True, text=True, check=False
    )
    return result.stdout.strip() == "enabled"


# --- the work -------------------------------------------------------------------------------


def install(
    layout: Layout, *, bundle: Path, mode: Mode, apt: bool, enable: bool, start: bool
) -> InstallReport:
    """Make ``layout.root`` the appliance OS with the release in ``bundle`` (see the module)."""
    # Imported here: it is the only part that needs the project's other packages (its errors),
    # and uninstall must work without them.
    from image.appliance_os import releases

    root = layout.root
    report = InstallReport()
    if mode == "box" and apt:
        report.packages = missing_packages(PACKAGES)
        if report.packages:
            apt_install(report.packages)
    for directory, wanted in DIRECTORIES.items():
        if put_directory(root / directory, wanted):
            report.changed.append(directory)
    files = system_files(mode)
    created = [str(path) for path in files if not (root / path).exists()]
    for path in files:
        if put_file(root, path):
            report.changed.append(str(path))

    version = releases.read_bundle(bundle).version
    if not (releases.is_complete(layout, version) and layout.current_version() == version):
        releases.install_release(layout, bundle)
        relocate_release(layout, version)
        releases.switch_to(layout, version)
        report.release = version
    if _put_command_link(layout):
        report.changed.append(COMMAND_LINK)
        created.append(COMMAND_LINK)
    if _put_text(
        layout.system_file,
        json.dumps(marker(mode, version, _read_json(layout.system_file)), indent=2) + "\n",
        0o644,
    ):
        report.changed.append(str(layout.system_file.relative_to(root)))
    if created:
        _record_created(root, created)

    if enable:
        for unit in units(mode):
            if not is_enabled(root, unit):
                _run(systemctl(root, "enable", unit), f"enabling {unit}")
                report.enabled.append(unit)
    if start:
        _run(systemctl(root, "daemon-reload"), "systemctl daemon-reload")
        _run(["udevadm", "control", "--reload"], "reloading the udev rules")
        # Tape drives and changers already present get their group and mode now, not at the
        # next boot (block devices are left alone: a change event re-probes every disk).
        _run(
            [
                "udevadm",
                "trigger",
                "--action=change",
                "--subsystem-match=scsi_tape",
                "--subsystem-match=scsi_generic",
                "--subsystem-match=scsi_changer",
            ],
            "applying the udev rules to tape devices",
        )
        _run(systemctl(root, "restart", "systemd-modules-load.service"), "loading modules")
        if any(path.startswith("etc/systemd/journald.conf.d/") for path in report.changed):
            _run(systemctl(root, "restart", "systemd-journald.service"), "restarting journald")
        if "etc/ssh/sshd_config.d/appliance.conf" in report.changed:
            # Reload, not restart: an SSH session running this install must survive it.
            _run(systemctl(root, "try-reload-or-restart", "ssh.service"), "reloading sshd")
        # Nothing changed: the units are only started if they are not running, so a rerun
        # does not interrupt the backups that run.
        verb = "start" if report.empty else "restart"
        for unit in UNITS:
            _run(systemctl(root, verb, unit), f"starting {unit}")
            report.started.append(unit)
    return report


def _record_created(root: Path, created: list[str]) -> None:
    manifest = root / MANIFEST
    known = manifest.read_text().splitlines() if manifest.exists() else []
    lines = sorted(set(known) | set(created))
    _write_atomically(manifest, ("\n".join(lines) + "\n").encode(), 0o644)


def installed_files(root: Path) -> list[str]:
    manifest = root / MANIFEST
    return manifest.read_text().splitlines() if manifest.exists() else []


def _remove_empty_parents(path: Path, root: Path) -> None:
    parent = path.parent
    while parent != root and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def uninstall(layout: Layout, *, purge: bool, live: bool | None = None) -> list[str]:
    """Undo :func:`install`: stop and disable the units, remove the files it created, the
    firewall table and ``/opt/appliance``. The data directory and ``/etc/appliance`` stay
    unless ``purge``; ``system.json`` goes either way (this is no longer the appliance OS).
    ``live`` (default: the root is ``/``) also stops units and deletes the firewall table.
    Returns the paths removed."""
    root = layout.root
    live = root == Path("/") if live is None else live
    removed: list[str] = []
    # The image's own units too, but not networkd: the box's network is not ours to undo.
    all_units = UNITS + tuple(u for u in IMAGE_UNITS if u.startswith("appliance"))
    if live:
        for unit in reversed(all_units):
            subprocess.run(systemctl(root, "stop", unit), capture_output=True, check=False)
    for unit in all_units:
        if is_enabled(root, unit):
            _run(systemctl(root, "disable", unit), f"disabling {unit}")
    if live:
        family, table = FIREWALL_TABLE
        subprocess.run(["nft", "delete", "table", family, table], capture_output=True, check=False)
    for relative in installed_files(root):
        path = root / relative
        kept = any(relative == k or relative.startswith(k + "/") for k in KEPT)
        if (kept and not purge) or not (path.is_file() or path.is_symlink()):
            continue
        path.unlink()
        removed.append(relative)
        _remove_empty_parents(path, root)
    layout.system_file.unlink(missing_ok=True)
    if layout.opt.exists():
        shutil.rmtree(layout.opt)
        removed.append(str(layout.opt.relative_to(root)))
    if purge:
        for relative in KEPT:
            if (root / relative).exists():
                shutil.rmtree(root / relative)
                removed.append(relative)
    if live:
        subprocess.run(systemctl(root, "daemon-reload"), capture_output=True, check=False)
        subprocess.run(["udevadm", "control", "--reload"], capture_output=True, check=False)
    return removed


# --- command line ---------------------------------------------------------------------------


def _lines(report: InstallReport) -> Iterator[str]:
    if report.empty:
        yield "already installed: nothing changed"
    if report.packages:
        yield "packages installed: " + " ".join(report.packages)
    for path in report.changed:
        yield f"changed: /{path}"
    if report.release:
        yield f"release {report.release} installed and made current"
    if report.enabled:
        yield "enabled: " + " ".join(report.enabled)
    if report.started:
        yield "started: " + " ".join(report.started)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m image.appliance_os.install",
        description="Make this Debian 12 system (or the root file system --root) the appliance OS.",
    )
    parser.add_argument("action", nargs="?", choices=("install", "uninstall"), default="install")
    parser.add_argument("--root", type=Path, default=Path("/"))
    parser.add_argument("--bundle", type=Path, help="the release bundle (.tar or folder)")
    parser.add_argument("--mode", choices=("box", "image"), default="box")
    parser.add_argument("--no-apt", action="store_true", help="do not install Debian packages")
    parser.add_argument("--no-start", action="store_true", help="do not (re)start the units")
    parser.add_argument("--purge", action="store_true", help="uninstall: remove data and settings")
    parser.add_argument("--yes", action="store_true", help="uninstall --purge: really")
    args = parser.parse_args(argv)
    layout = Layout(args.root)
    try:
        if args.action == "uninstall":
            if args.purge and not args.yes:
                parser.error("--purge deletes every backup in the data directory: add --yes")
            for path in uninstall(layout, purge=args.purge):
                print(f"removed: /{path}")
            if not args.purge:
                print(f"kept: /{KEPT[0]} and /{KEPT[1]} (uninstall --purge --yes removes them)")
            return 0
        if args.bundle is None:
            parser.error("--bundle is required")
        live = args.root == Path("/") and args.mode == "box"
        report = install(
            layout,
            bundle=args.bundle,
            mode=args.mode,
            apt=not args.no_apt,
            enable=True,
            start=live and not args.no_start,
        )
    except Exception as exc:  # releases' errors too (InvalidInput): the message says it all
        print(f"install: {exc}", file=sys.stderr)
        return 1
    for line in _lines(report):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
