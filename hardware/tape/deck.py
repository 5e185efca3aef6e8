"""A drive and, when it sits in a library, the library's robot: getting a cartridge into a drive.

Jobs ask a :class:`Deck` for the tape they need by barcode (:meth:`Deck.bring`). In a library
(a :class:`~hardware.tape.changer.Changer`: mtx on a real one, :class:`VirtualLibrary` for tests
and the demo) the robot loads it when it is in a slot: the cartridge in the drive is first let go
by the drive (``unload``, MTOFFL) and put back in its slot. A drive without a library holds
whatever an operator inserted: its barcode is known only by the label (or, for a virtual drive,
by the cartridge file). A tape that is in neither is not there: the job then waits, saying which
barcode it needs.

Drives are named by identity: ``virtual:<library>-drive<N>`` for a registered virtual library,
``serial:<ID_SCSI_SERIAL>`` for a real drive udev sees (used standalone: which library serves it
is not known yet), or its ``/dev/nstN`` node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from appliance.errors import JobWaiting, NotFound
from hardware.tape.changer import Changer
from hardware.tape.drive import Drive, TapeError
from hardware.tape.library import SettingsStore, VirtualLibrary, exported, find_virtual_drive
from hardware.tape.virtual import VirtualCartridge

#: How long a job waiting for a tape waits before it looks again (an insert wakes it sooner).
TAPE_RETRY = timedelta(minutes=15)


class Deck:
    """One drive, and the changer that serves it (if any)."""

    def __init__(
        self,
        name: str,
        open_drive: Callable[[], Drive],
        changer: Changer | None = None,
        index: int = 0,
        leaving: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.name = name
        self._open_drive = open_drive
        self.changer = changer
        self.index = index
        #: Export marks of this library (barcode -> slot it was exported to), read when asked.
        self._leaving = leaving
        self._drive: Drive | None = None

    def describe(self) -> str:
        where = f" of {self.changer.describe()}" if self.changer is not None else ""
        return f"drive {self.name}{where}"

    def drive(self) -> Drive:
        """The drive, opened (with whatever cartridge is in it)."""
        if self._drive is None:
            self._drive = self._open_drive()
        return self._drive

    def release(self) -> None:
        """Close the drive (a real one writes its pending filemark); the deck reopens it."""
        if self._drive is not None:
            drive, self._drive = self._drive, None
            drive.close()

    close = release

    def loaded_barcode(self) -> str | None:
        """The barcode of the cartridge in the drive, when the library (or the cartridge file
        of a virtual drive) says; None when the drive is empty or nobody can tell."""
        if self.changer is not None:
            element = self.changer.status().drive(self.index)
            return element.barcode if element is not None and element.full else None
        path = getattr(self.drive(), "loaded_path", None)
        if isinstance(path, Path):
            return VirtualCartridge.barcode_of(path)
        return None

    def library_barcodes(self) -> dict[str, int]:
        """Barcode -> slot of every cartridge in the library's slots (none without a library),
        except those exported and still in the slot they were exported to (a mail slot, or the
        storage slot of a library without one): they are on their way out, no job takes them."""
        if self.changer is None:
            return {}
        leaving = self._leaving() if self._leaving is not None else {}
        return {
            s.barcode: s.number
            for s in self.changer.status().all_slots()
            if s.full and s.barcode and leaving.get(s.barcode) != s.number
        }

    def bring(self, barcode: str) -> Drive | None:
        """The drive holding ``barcode``: already there, or loaded by the robot from its slot.
        None when the tape is not within reach (the caller waits for it)."""
        if self.loaded_barcode() == barcode:
            return self.drive()
        slot = self.library_barcodes().get(barcode)
        if slot is None or self.changer is None:
            return None
        self.eject()
        self.changer.load(slot, self.index)
        self.release()  # opened empty (or with the old cartridge): open it again
        return self.drive()

    def eject(self) -> None:
        """Let the cartridge in the drive go and, in a library, put it back in its slot."""
        if self.changer is None:
            with contextlib.suppress(TapeError):
                self.drive().unload()
            return
        status = self.changer.status().drive(self.index)
        if status is None or not status.full:
            return
        with contextlib.suppress(TapeError):
            self.drive().unload()
        self.release()
        self.changer.unload(self.index)


def bring(
    deck: Deck, barcode: str, checkpoint: dict[str, Any], clock: Callable[[], datetime]
) -> Drive:
    """The drive holding ``barcode``, loaded by the library if it is in a slot; else the job
    waits for it (:class:`JobWaiting` with ``checkpoint``: "needs tape B in drive D")."""
    drive = deck.bring(barcode)
    if drive is None:
        raise JobWaiting(
            f"needs tape {barcode} in {deck.describe()}",
            wake_at=clock() + TAPE_RETRY,
            checkpoint=checkpoint,
        )
    return drive


def library_deck(
    library: VirtualLibrary, index: int = 0, catalog: SettingsStore | None = None
) -> Deck:
    """The deck of drive ``index`` of a virtual library; with ``catalog``, the cartridges
    exported from it (:func:`~hardware.tape.library.exported`) are out of the robot's reach."""

    def leaving() -> dict[str, int]:
        if catalog is None:
            return {}
        marks = exported(catalog)
        return {b: slot for b, (lib, slot) in marks.items() if lib == library.identity}

    return Deck(library.drive_name(index), lambda: library.drive(index), library, index, leaving)


def open_deck(catalog: SettingsStore, identity: str) -> Deck:
    """The deck of the drive ``identity`` (see the module doc); :class:`NotFound` in words."""
    found = find_virtual_drive(catalog, identity)
    if found is not None:
        return library_deck(*found, catalog)
    from hardware.tape.st import open_st

    if identity.startswith("/dev/"):
        return Deck(identity, lambda: open_st(identity, identity))
    if identity.startswith(("serial:", "wwn:")):
        from hardware.udev import scan  # pyudev: only when a real drive is named

        tape = scan().tapes.get(identity)
        if tape is not None:
            return Deck(tape.devnode, lambda: open_st(tape.devnode, identity))
    raise NotFound(
        f"no tape drive {identity} is known: register its virtual library, or name a real "
        "drive by its /dev/nstN node",
        drive=identity,
    )
