"""A tape library made of Debian's ``tgt``: an SSC tape drive and an SMC changer over iSCSI.

``tgtd`` runs in the foreground as a child of the test, on 127.0.0.1 and a free port, with its
own management socket (``tgtd -C N``: ``/var/run/tgtd/socket.N``, a number no other tgtd on this
machine uses), so it never disturbs another tgtd. One target holds LUN 1, a tape drive (empty at
start: ``online=0``), and LUN 2, a changer whose storage slots hold the cartridges (files made by
``tgtimg`` in the library's directory, named by barcode: the changer's ``media_home``), plus one
import/export slot. The guest (:mod:`image.tape_guest`) attaches LUN 1 and LUN 2 through QEMU's
iSCSI driver and the real ``st``, ``ch`` and ``sg`` drivers take them from there.

tgtd ignores SIGTERM: it is stopped with ``tgtadm --op delete --mode system``, then by its pid if
it is still there. What tgt gets wrong (end of data; see TESTBED.md) is tgt's; the tests take
those semantics from the SSC standard and the st driver, not from here.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from image.probe_guest import QEMU
from image.tape_guest import IscsiLun

#: The iSCSI name of the library's target.
TARGET = "iqn.2026-12.test.appliance:tape-library"
#: The drive's and the changer's INQUIRY identity (what ``st``, ``mtx`` and udev report).
DRIVE_SERIAL = "TGTDRV0001"
#: A second drive outside the changer, holding a write-protected cartridge (LUN 3).
PROTECTED_DRIVE_SERIAL = "TGTDRV0002"
CHANGER_SERIAL = "TGTCHG0001"
VENDOR = "APPLIANC"
DRIVE_MODEL = "TGT-TAPE"
CHANGER_MODEL = "TGT-CHANGER"
#: SCSI element addresses (mtx renumbers them: drives from 0, slots from 1).
DRIVE_ADDRESS = 1
PICKER_ADDRESS = 2
FIRST_SLOT_ADDRESS = 1000
MAIL_SLOT_ADDRESS = 10
TGT_PACKAGES = "tgt"
RUN_DIR = "/var/run/tgtd"
#: QEMU's libiscsi block driver (Debian's qemu-block-extra).
QEMU_ISCSI = "/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _private_control_number() -> int:
    """A management socket number that no tgtd on this machine has (``socket.N`` is free)."""
    for _ in range(100):
        number = random.randint(20000, 30000)  # tgtd refuses numbers above 32767
        if not os.path.exists(os.path.join(RUN_DIR, f"socket.{number}")):
            return number
    raise RuntimeError("no free tgtd control socket number")


@dataclass(frozen=True)
class Cartridge:
    barcode: str
    size_mib: int = 8


class TgtLibrary:
    """A running tgtd serving one tape drive and one changer with ``cartridges`` in slots
    1..n (mtx's numbers) and ``spare_slots`` more empty ones, plus one mail slot."""

    def __init__(
        self,
        directory: Path,
        cartridges: Sequence[Cartridge],
        *,
        spare_slots: int = 1,
        protected: Cartridge | None = None,
    ) -> None:
        if not cartridges:
            raise ValueError("a tgt library needs at least one cartridge (the drive's backing)")
        self.directory = directory
        self.cartridges = tuple(cartridges)
        self.spare_slots = spare_slots
        self.protected = protected
        self.port = free_port()
        self.control = _private_control_number()
        self.log = directory / "tgtd.log"
        self.process: subprocess.Popen[bytes] | None = None
        #: True once our tgtd listened: only then are the control socket files ours to remove.
        self.owns_socket = False

    @property
    def luns(self) -> list[IscsiLun]:
        """The drive (LUN 1), the changer (LUN 2) and the protected drive (LUN 3, if any), as
        the guest attaches them."""
        portal = f"127.0.0.1:{self.port}"
        numbers = (1, 2, 3) if self.protected else (1, 2)
        return [IscsiLun(portal, TARGET, n) for n in numbers]

    def cartridge_path(self, barcode: str) -> Path:
        return self.directory / barcode

    def tgtadm(self, *args: str) -> str:
        done = subprocess.run(
            ["tgtadm", "-C", str(self.control), "--lld", "iscsi", *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if done.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args)} failed: {done.stderr or done.stdout}")
        return done.stdout

    def _lun(self, lun: int, params: str) -> None:
        self.tgtadm(
            "--mode", "logicalunit", "--op", "update", "--tid", "1", "--lun", str(lun),
            "--params", params,
        )  # fmt: skip

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for cartridge in (*self.cartridges, *([self.protected] if self.protected else [])):
            path = self.cartridge_path(cartridge.barcode)
            subprocess.run(
                ["tgtimg", "--op", "new", "--device-type", "tape", f"--barcode={cartridge.barcode}",
                 f"--size={cartridge.size_mib}", "--type=data", f"--file={path}"],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
        (self.directory / "smc").write_bytes(bytes(1024))
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                ["tgtd", "-f", "-C", str(self.control), "--iscsi", f"portal=127.0.0.1:{self.port}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()
        self.owns_socket = True
        slots = len(self.cartridges) + self.spare_slots
        first = self.cartridges[0].barcode  # tgt wants a backing file even for an empty drive
        self.tgtadm("--mode", "target", "--op", "new", "--tid", "1", "-T", TARGET)
        self.tgtadm(
            "--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "1",
            "-b", str(self.cartridge_path(first)), "--device-type=tape",
        )  # fmt: skip
        self._lun(1, "online=0")  # the drive starts empty; the changer loads it
        self._lun(
            1,
            f"vendor_id={VENDOR},product_id={DRIVE_MODEL},product_rev=0001,scsi_sn={DRIVE_SERIAL}",
        )
        self.tgtadm(
            "--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "2",
            "-b", str(self.directory / "smc"), "--device-type=changer",
        )  # fmt: skip
        self._lun(
            2,
            f"vendor_id={VENDOR},product_id={CHANGER_MODEL},product_rev=0001,"
            f"scsi_sn={CHANGER_SERIAL}",
        )
        self._lun(2, f"media_home={self.directory}")
        self._lun(2, f"element_type=4,start_address={DRIVE_ADDRESS},quantity=1")
        self._lun(2, f"element_type=4,address={DRIVE_ADDRESS},tid=1,lun=1")
        self._lun(2, f"element_type=1,start_address={PICKER_ADDRESS},quantity=1")
        self._lun(2, f"element_type=2,start_address={FIRST_SLOT_ADDRESS},quantity={slots}")
        for n, cartridge in enumerate(self.cartridges):
            address = FIRST_SLOT_ADDRESS + n
            self._lun(2, f"element_type=2,address={address},barcode={cartridge.barcode},sides=1")
        self._lun(2, f"element_type=3,start_address={MAIL_SLOT_ADDRESS},quantity=1")
        if self.protected is not None:
            self.tgtadm(
                "--mode", "logicalunit", "--op", "new", "--tid", "1", "--lun", "3",
                "-b", str(self.cartridge_path(self.protected.barcode)), "--device-type=tape",
            )  # fmt: skip
            self._lun(
                3,
                f"vendor_id={VENDOR},product_id={DRIVE_MODEL},product_rev=0001,"
                f"scsi_sn={PROTECTED_DRIVE_SERIAL},readonly=1",
            )
        self.tgtadm("--mode", "target", "--op", "bind", "--tid", "1", "-I", "127.0.0.1")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"tgtd exited at start: {self.log.read_text(errors='replace')}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"tgtd did not listen on 127.0.0.1:{self.port} within 15 s")

    def stop(self) -> None:
        """Delete the target, then ``tgtadm --op delete --mode system`` (tgtd ignores SIGTERM);
        then by pid if it is still there."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            # The system is only deleted once it has no targets (Debian's tgt.service does so).
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.tgtadm("--mode", "target", "--op", "delete", "--tid", "1", "--force")
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.tgtadm("--mode", "system", "--op", "delete")
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if not self.owns_socket:
            return  # another tgtd may hold that number: never touch its socket
        for name in (f"socket.{self.control}", f"socket.{self.control}.lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(RUN_DIR, name))


def require_tgt() -> None:
    """Fail (never skip) the test when tgt, mtx, mt, QEMU or QEMU's iSCSI driver is missing,
    naming the install step."""
    tools = ("tgtd", "tgtadm", "tgtimg", "mtx", "mt", QEMU)
    missing = [tool for tool in tools if not shutil.which(tool)]
    if not os.path.exists(QEMU_ISCSI):
        missing.append(QEMU_ISCSI)
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: run scripts/setup "
            "(apt-get install -y tgt mtx mt-st qemu-system-x86 qemu-block-extra)",
            pytrace=False,
        )


@contextlib.contextmanager
def tgt_library(
    directory: Path,
    cartridges: Sequence[Cartridge],
    *,
    spare_slots: int = 1,
    protected: Cartridge | None = None,
) -> Iterator[TgtLibrary]:
    """A started :class:`TgtLibrary`, stopped on leaving."""
    require_tgt()
    library = TgtLibrary(directory, cartridges, spare_slots=spare_slots, protected=protected)
    try:
        library.start()
        yield library
    finally:
        library.stop()
