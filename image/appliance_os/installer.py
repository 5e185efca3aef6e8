"""The console installer: choose a disk, write the appliance system onto it, grow it, reboot.

It runs on the installer image (``appliance.installer`` on the kernel command line), one instance
per console (tty1 and ttyS0). Invariants:

* Nothing is written before the user typed ``ERASE`` for exactly the disk shown, and never before
  the compressed image has been checked in full (size and sha256 from ``system.json``): a damaged
  or hostile image leaves the target untouched.
* The written disk is read back (bypassing the page cache) and hashed; a mismatch is an error,
  not a warning.
* Pool disks are only *named* in ``/etc/appliance/first-pool.json`` on the new root; the first-run
  page preselects them and formats them when the admin confirms. The installer formats nothing
  but the system disk.
* With two consoles, the first one where someone types takes the lock; the other says so and
  waits. A console nobody looks at (a serial port without a cable) therefore never blocks one
  that somebody uses.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import select
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import zstandard

from appliance.errors import Conflict, InvalidInput
from image.appliance_os import layout
from image.appliance_os.installer_dialog import Aborted, LineSource, ask
from image.appliance_os.installer_disks import (
    Disk,
    boot_disk,
    candidate_disks,
    grow_and_record,
    human_size,
    read_lsblk,
)

IMAGE = Path("/opt/appliance-installer/system.img.zst")
IMAGE_INFO = Path("/opt/appliance-installer/system.json")
LOCK = Path("/run/appliance-installer.lock")
CHUNK = 4 << 20
SECTOR = 512
#: Old RAID/ZFS labels and backup GPT headers live at a disk's end: cleared before the table moves.
TAIL = 1 << 20


class OtherConsole(Exception):
    """The installation was started on another console."""


@dataclass(frozen=True)
class ImageInfo:
    size: int
    sha256: str
    version: str


@dataclass(frozen=True)
class Progress:
    phase: Literal["check", "write", "verify"]
    done: int
    total: int
    seconds: float

    @property
    def percent(self) -> int:
        return 100 if self.total == 0 else self.done * 100 // self.total

    @property
    def mib_per_s(self) -> float:
        return self.done / (1 << 20) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class WriteReport:
    write_seconds: float = 0.0
    verify_seconds: float = 0.0
    size: int = 0

    @property
    def write_mib_per_s(self) -> float:
        return self.size / (1 << 20) / self.write_seconds if self.write_seconds else 0.0


# --- two consoles, one installation -------------------------------------------------------------


class ConsoleLock:
    """``flock`` on a file in /run: the holder runs the installation, writing its console's name."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def claim(self) -> bool:
        # A few tries: another console may hold a shared probe lock for a few microseconds.
        for _ in range(10):
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                time.sleep(0.02)
                continue
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, self.name.encode(), 0)
            return True
        return False

    def held_by_other(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def holder(self) -> str:
        return os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "another console"

    def wait_for_release(self) -> None:
        # Taken and dropped at once: this console may have nobody in front of it, so it must not
        # keep the lock from the console that restarts after a failure.
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class TtyInput:
    """Lines from a console; the first line typed claims the lock, or raises ``OtherConsole``."""

    def __init__(self, fd: int, lock: ConsoleLock, poll_s: float = 1.0) -> None:
        self.fd = fd
        self.lock = lock
        self.poll_s = poll_s
        self.claimed = False

    def readline(self) -> str:
        while not self.claimed:
            ready, _, _ = select.select([self.fd], [], [], self.poll_s)
            if ready:
                break
            if self.lock.held_by_other():
                raise OtherConsole(self.lock.holder())
        # A terminal in canonical mode hands over one line per read.
        line = os.read(self.fd, 4096).decode(errors="replace")
        if not self.claimed:
            if not self.lock.claim():
                raise OtherConsole(self.lock.holder())
            self.claimed = True
        return line


# --- the image ----------------------------------------------------------------------------------


def parse_image_info(doc: object) -> ImageInfo:
    if not isinstance(doc, dict):
        raise InvalidInput("system.json is not an object")
    size, digest = doc.get("size"), doc.get("sha256")
    if not isinstance(size, int) or size <= 0 or size % SECTOR:
        raise InvalidInput(f"system.json: size must be a positive multiple of {SECTOR}: {size!r}")
    if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
        raise InvalidInput(f"system.json: sha256 must be 64 lowercase hex digits: {digest!r}")
    return ImageInfo(size, digest, str(doc.get("version") or "unknown"))


def _fill(reader: zstandard.ZstdDecompressionReader, view: memoryview) -> int:
    got = 0
    while got < len(view):
        n = reader.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _chunks(image_zst: Path, size: int, bufs: list[mmap.mmap]) -> Iterator[tuple[mmap.mmap, int]]:
    """Decompress into ``bufs`` in turn, yielding each filled buffer and its length.

    A buffer is refilled only after the caller took the next one, so one chunk can be written
    while the next decompresses. A stream longer than ``size`` is refused.
    """
    with open(image_zst, "rb") as fh:
        reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True)
        done, turn = 0, 0
        while done < size:
            buf = bufs[turn % len(bufs)]
            n = _fill(reader, memoryview(buf)[: min(CHUNK, size - done)])
            if n == 0:
                return
            done, turn = done + n, turn + 1
            yield buf, n
        if reader.read(1):
            raise InvalidInput(f"the system image is longer than system.json says ({size} bytes)")


_checked: set[tuple[int, int, int, int, int, str]] = set()


def check_image(
    image_zst: Path, size: int, sha256: str, progress: Callable[[Progress], None]
) -> None:
    """Decompress and hash the whole image; raises InvalidInput unless it is exactly as described.

    A file already checked in this process (same inode, size and mtime) is not read again: the
    installer checks at start, so that nothing is asked for a bad image, and the writer checks
    before it writes. The read-back after writing still proves the bytes on the disk.
    """
    st = os.stat(image_zst)
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, size, sha256)
    if identity in _checked:
        return
    digest = hashlib.sha256()
    buf = mmap.mmap(-1, CHUNK)
    start, done = time.monotonic(), 0
    try:
        for _, n in _chunks(image_zst, size, [buf]):
            if done == 0 and bytes(buf[SECTOR : SECTOR + 8]) != b"EFI PART":
                raise InvalidInput("the system image has no GPT header: not an appliance system")
            digest.update(memoryview(buf)[:n])
            done += n
            progress(Progress("check", done, size, time.monotonic() - start))
    except zstandard.ZstdError as exc:
        raise InvalidInput(f"the system image is damaged (zstd: {exc})") from exc
    if done != size:
        raise InvalidInput(f"the system image is short: {done} of {size} bytes")
    if digest.hexdigest() != sha256:
        raise InvalidInput(
            f"the system image is damaged: sha256 {digest.hexdigest()}, expected {sha256}"
        )
    _checked.add(identity)


def _open_target(target_dev: str, flags: int) -> tuple[int, bool]:
    """Open with O_DIRECT where the device allows it (honest progress, an uncached read-back)."""
    try:
        return os.open(target_dev, flags | os.O_DIRECT), True
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    return os.open(target_dev, flags), False


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def _check_target(target_dev: str, size: int) -> int:
    """The target's size; Conflict when it is too small, in use, or not 512-byte sectors."""
    try:
        # O_EXCL on a block device fails while it is mounted or otherwise claimed.
        fd = os.open(target_dev, os.O_RDONLY | os.O_EXCL)
    except OSError as exc:
        raise Conflict(f"{target_dev} cannot be opened for writing: {exc.strerror}") from exc
    try:
        device_size = _device_size(fd)
        with contextlib.suppress(OSError):
            sector = int.from_bytes(fcntl.ioctl(fd, 0x1268, b"\0" * 4), "little")  # BLKSSZGET
            if sector != SECTOR:
                raise Conflict(f"{target_dev} has {sector}-byte sectors; the image needs {SECTOR}")
    finally:
        os.close(fd)
    if device_size < size:
        raise Conflict(
            f"{target_dev} holds {human_size(device_size)}; the system needs {human_size(size)}"
        )
    return device_size


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_system(
    image_zst: Path,
    size: int,
    sha256: str,
    target_dev: str,
    progress: Callable[[Progress], None],
) -> WriteReport:
    """Write the image onto ``target_dev``, zeros included, and prove it by reading it back."""
    device_size = _check_target(target_dev, size)
    check_image(image_zst, size, sha256, progress)
    report = WriteReport(size=size)
    fd, direct = _open_target(target_dev, os.O_WRONLY | os.O_EXCL)
    bufs = [mmap.mmap(-1, CHUNK), mmap.mmap(-1, CHUNK)]
    try:
        start, done = time.monotonic(), 0
        # Two buffers: the next chunk decompresses while the previous one is written.
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: Future[None] | None = None
            for i, (buf, n) in enumerate(_chunks(image_zst, size, bufs)):
                if pending is not None:
                    pending.result()
                pending = writer.submit(_write_all, fd, memoryview(buf)[:n], done)
                done += n
                if not direct and i % 16 == 15:
                    pending.result()
                    os.fdatasync(fd)  # page-cache writes: keep the percentage honest
                progress(Progress("write", done, size, time.monotonic() - start))
            if pending is not None:
                pending.result()
        if done != size:
            raise InvalidInput(f"the system image changed while it was written ({done} bytes)")
        if device_size - TAIL >= size:
            bufs[0][:TAIL] = bytes(TAIL)  # an aligned buffer: O_DIRECT refuses others
            _write_all(fd, memoryview(bufs[0])[:TAIL], device_size - TAIL)
        os.fsync(fd)
        report.write_seconds = time.monotonic() - start
    finally:
        os.close(fd)
    # The mmaps are left to the garbage collector: a memoryview of a failed write may still
    # point into them, and closing would then raise over the real error.
    report.verify_seconds = verify_written(target_dev, size, sha256, bufs[0], progress)
    return report


def verify_written(
    target_dev: str, size: int, sha256: str, buf: mmap.mmap, progress: Callable[[Progress], None]
) -> float:
    fd, direct = _open_target(target_dev, os.O_RDONLY)
    try:
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        digest = hashlib.sha256()
        start, done = time.monotonic(), 0
        while done < size:
            n = os.preadv(fd, [buf], done)
            if n <= 0:
                break
            take = min(n, size - done)
            digest.update(memoryview(buf)[:take])
            done += take
            progress(Progress("verify", done, size, time.monotonic() - start))
    finally:
        os.close(fd)
    if done != size or digest.hexdigest() != sha256:
        raise Conflict(
            f"{target_dev} returned different data when read back (a failing disk?): "
            f"sha256 {digest.hexdigest()} of {done} bytes, expected {sha256}"
        )
    return time.monotonic() - start


# --- the console program ------------------------------------------------------------------------


def _progress_printer(out: TextIO) -> Callable[[Progress], None]:
    labels = {"check": "Checking the image", "write": "Writing the system", "verify": "Verifying"}
    last: dict[str, int] = {}

    def show(p: Progress) -> None:
        if last.get(p.phase) == p.percent and p.done != p.total:
            return
        last[p.phase] = p.percent
        end = "\n" if p.done == p.total else ""
        out.write(f"\r{labels[p.phase]}: {p.percent:3d} %  {p.mib_per_s:7.1f} MiB/s{end}")
        out.flush()

    return show


def _scan(info: ImageInfo, allow_loop: bool, only: list[str]) -> list[Disk]:
    subprocess.run(["udevadm", "settle"], capture_output=True)
    found = candidate_disks(
        read_lsblk(), boot_disk(layout.INSTALLER_ROOT_LABEL), info.size, allow_loop
    )
    if only:
        wanted = {os.path.realpath(p) for p in only}
        found = [d for d in found if os.path.realpath(d.path) in wanted]
    return found


def install(inp: LineSource, out: TextIO, args: argparse.Namespace) -> str:
    """One installation from the first question to the written disk; the action that follows."""
    try:
        doc = json.loads(Path(args.image_info).read_text())
    except ValueError as exc:
        raise InvalidInput(f"{args.image_info} is not JSON: {exc}") from exc
    info = parse_image_info(doc)
    out.write(f"Appliance installer, system version {info.version}\n")
    show = _progress_printer(out)
    check_image(Path(args.image), info.size, info.sha256, show)
    while True:
        choice = ask(inp, out, _scan(info, args.allow_loop, args.only))
        if choice.action != "rescan":
            break
    if choice.action == "poweroff" or choice.system is None:
        return "poweroff"
    out.write(f"\nErasing {choice.system.path} and writing the system...\n")
    report = write_system(Path(args.image), info.size, info.sha256, choice.system.path, show)
    out.write(
        f"Written {human_size(info.size)} in {report.write_seconds:.1f} s "
        f"({report.write_mib_per_s:.1f} MiB/s), verified in {report.verify_seconds:.1f} s\n"
    )
    grow_and_record(choice.system, choice.pool, out, choice.root_password)
    out.write("Installed. Remove the installation medium; the box restarts into the appliance.\n")
    out.flush()
    return "reboot"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance-installer", description=__doc__.split("\n")[0])
    p.add_argument("--tty", action="store_true", help="run on this console (the systemd unit)")
    p.add_argument("--no-reboot", action="store_true", help="exit instead of rebooting")
    p.add_argument("--allow-loop", action="store_true", help="offer loop devices (tests)")
    p.add_argument("--only", action="append", default=[], metavar="DEV", help="offer only DEV")
    p.add_argument("--image", default=str(IMAGE))
    p.add_argument("--image-info", default=str(IMAGE_INFO))
    p.add_argument("--lock", default=str(LOCK), help=argparse.SUPPRESS)
    return p


def _tty_session(args: argparse.Namespace, out: TextIO) -> str:
    name = os.path.basename(os.ttyname(0)) if os.isatty(0) else "console"
    lock = ConsoleLock(Path(args.lock), name)
    try:
        while True:
            try:
                return install(TtyInput(0, lock), out, args)
            except OtherConsole as exc:
                out.write(f"\n\nThe installation runs on the other console ({exc}). Waiting.\n")
                out.flush()
                lock.wait_for_release()
                with contextlib.suppress(termios.error):
                    termios.tcflush(0, termios.TCIFLUSH)  # what was typed meanwhile answers nothing
                out.write("The other console stopped. Starting again here.\n")
    finally:
        lock.close()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout
    try:
        action = _tty_session(args, out) if args.tty else install(sys.stdin, out, args)
    except Aborted:
        return 1
    except (InvalidInput, Conflict, OSError) as exc:
        out.write(f"\nINSTALLATION FAILED: {exc}\n")
        out.flush()
        if args.tty:
            # Keep the reason on screen: the unit restarts the installer after this exits.
            with contextlib.suppress(OSError):
                out.write("Press Enter to start again.\n")
                out.flush()
                sys.stdin.readline()
        return 2
    if args.no_reboot:
        return 0
    subprocess.run(["sync"], check=False)
    subprocess.run(["systemctl", "reboot" if action == "reboot" else "poweroff"], check=False)
    if args.tty:
        # Keep the console lock until the shutdown ends this process: the other console must not
        # offer a fresh installation during the last seconds.
        while True:
            time.sleep(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
