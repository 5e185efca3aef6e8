"""Tape library robots: the :class:`Changer` protocol, ``mtx`` behind it, and exporting a tape.

A changer moves cartridges between storage slots, import/export ("mail") slots and drives. Two
implementations keep the same contract: :class:`MtxChanger` (a real library through
``mtx -f /dev/sgN``, the SCSI generic node udev names for a device of type 8) and
:class:`hardware.tape.library.VirtualLibrary` (a directory of virtual cartridges). Both describe
themselves with the same :class:`~hardware.tape.mtx.ChangerStatus`, numbered the way mtx numbers
(drives from 0, slots from 1, mail slots among the slots), so the page and the jobs never know
which one they talk to.

Errors are :class:`ChangerError` subclasses with a stable code and a sentence naming the
library; the API maps them like every other domain error (409/404).

**Export.** A cartridge leaves the library through a mail slot when there is one; a library
without mail slots *emulates* the export: the cartridge goes to a storage slot the operator
chose (or the last empty one). Either way the catalog's place of the medium becomes ``shelf``
and the appliance remembers the slot (:func:`hardware.tape.library.mark_exported`): the page
lists the cartridge "to be taken out" while it is still in that slot (:func:`to_take_out`).
:func:`plan_export` is the pure decision, :func:`export_cartridge` the move plus the mark.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from appliance.errors import ApplianceError
from hardware.tape.mtx import (
    ChangerStatus,
    DriveElement,
    ErrorKind,
    MtxParseError,
    explain_error,
    parse_status,
)

#: Seconds one mtx command may take: a robot crossing a large library, or an inventory scan.
MTX_TIMEOUT = 900.0
MTX_INSTALL = "apt-get install mtx"


class ChangerError(ApplianceError):
    """The tape library could not do what was asked."""

    code = "changer_error"
    kind = "conflict"


class SlotEmpty(ChangerError):
    """There is no cartridge where the move should start."""

    code = "changer_slot_empty"


class ElementFull(ChangerError):
    """The slot or drive the cartridge should go to already holds one."""

    code = "changer_element_full"


class DriveEmpty(ChangerError):
    """The drive holds no cartridge to unload."""

    code = "changer_drive_empty"


class NoSuchElement(ChangerError):
    """The library has no such slot or drive."""

    code = "changer_no_such_element"
    kind = "not_found"


class CartridgeNotFound(ChangerError):
    """No cartridge with this barcode is in the library."""

    code = "changer_cartridge_not_found"
    kind = "not_found"


class ChangerUnavailable(ChangerError):
    """The changer cannot be reached (device gone, mtx missing, status unreadable)."""

    code = "changer_unavailable"


_BY_KIND: dict[ErrorKind, type[ChangerError]] = {
    "slot_empty": SlotEmpty,
    "destination_full": ElementFull,
    "drive_empty": DriveEmpty,
    "no_such_element": NoSuchElement,
    "no_device": ChangerUnavailable,
    "failed": ChangerError,
}


class Changer(Protocol):
    """A tape library's robot.

    Slot numbers and drive indexes are the ones :meth:`status` reports. Every move either
    happens completely or raises a :class:`ChangerError` and moves nothing. A drive must have
    ejected its cartridge (``Drive.unload``) before :meth:`unload` takes it out, as on real
    libraries.
    """

    #: ``serial:<ID_SCSI_SERIAL>`` for a real changer, ``virtual:<name>`` for a virtual library.
    identity: str

    def describe(self) -> str:
        """A short name for messages and the page ("library demo", "changer /dev/sg1")."""
        ...

    def status(self) -> ChangerStatus:
        """Drives, slots and mail slots now, with barcodes."""
        ...

    def load(self, slot: int, drive: int) -> None:
        """Move the cartridge in ``slot`` into ``drive``."""
        ...

    def unload(self, drive: int, slot: int | None = None) -> int:
        """Move the cartridge in ``drive`` to ``slot`` (None: the slot it came from, or the
        first empty one if that is taken); returns the slot it went to."""
        ...

    def transfer(self, source: int, destination: int) -> None:
        """Move a cartridge from one slot (or mail slot) to another."""
        ...

    def inventory(self) -> ChangerStatus:
        """Make the library check every slot (barcode scan), then report its status."""
        ...


def _check_number(value: int, what: str, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        raise NoSuchElement(f"{what} {value!r} is not a valid number (from {lowest})")
    return value


def unload_destination(status: ChangerStatus, drive: int, slot: int | None, name: str) -> int:
    """Where ``unload(drive, slot)`` puts the cartridge: the slot asked for, else the one it
    came from when that is empty, else the first empty ordinary slot."""
    element = status.drive(drive)
    if element is None:
        raise NoSuchElement(f"{name} has no drive {drive}")
    if not element.full:
        raise DriveEmpty(f"drive {drive} of {name} is empty: there is no cartridge to unload")
    if slot is not None:
        return slot
    source = status.slot(element.source_slot) if element.source_slot is not None else None
    if source is not None and not source.full:
        return source.number
    empty = status.empty_slots()
    if not empty:
        raise ElementFull(f"{name} has no empty slot to unload drive {drive} into")
    return empty[0]


class MtxChanger:
    """A real library through the ``mtx`` command on its SCSI generic node."""

    def __init__(
        self, devnode: str, identity: str, *, mtx: str = "mtx", timeout: float = MTX_TIMEOUT
    ) -> None:
        self.devnode = devnode
        self.identity = identity
        self.mtx = mtx
        self.timeout = timeout

    def describe(self) -> str:
        return f"changer {self.devnode}"

    def _run(self, *args: str) -> str:
        argv = [self.mtx, "-f", self.devnode, *args]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except FileNotFoundError:
            raise ChangerUnavailable(
                f"the mtx program is not installed, so {self.describe()} cannot be used "
                f"({MTX_INSTALL})",
                changer=self.identity,
            ) from None
        except subprocess.TimeoutExpired:
            raise ChangerUnavailable(
                f"{self.describe()} did not answer 'mtx {' '.join(args)}' within "
                f"{self.timeout:.0f} seconds",
                changer=self.identity,
            ) from None
        if done.returncode != 0:
            kind, words = explain_error(f"{done.stdout}\n{done.stderr}")
            raise _BY_KIND[kind](
                f"{self.describe()}: {words}", changer=self.identity, command=" ".join(args)
            )
        return done.stdout

    def status(self) -> ChangerStatus:
        try:
            return parse_status(self._run("status"))
        except MtxParseError as exc:
            raise ChangerUnavailable(f"{self.describe()}: {exc}", changer=self.identity) from None

    def load(self, slot: int, drive: int) -> None:
        _check_number(slot, "slot", 1)
        _check_number(drive, "drive", 0)
        self._run("load", str(slot), str(drive))

    def unload(self, drive: int, slot: int | None = None) -> int:
        _check_number(drive, "drive", 0)
        if slot is not None:
            _check_number(slot, "slot", 1)
        target = unload_destination(self.status(), drive, slot, self.describe())
        self._run("unload", str(target), str(drive))
        return target

    def transfer(self, source: int, destination: int) -> None:
        _check_number(source, "slot", 1)
        _check_number(destination, "slot", 1)
        self._run("transfer", str(source), str(destination))

    def inventory(self) -> ChangerStatus:
        self._run("inventory")
        return self.status()


# --- export ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportPlan:
    """How a cartridge leaves the library (pure result of :func:`plan_export`)."""

    barcode: str
    #: Where it is now: a drive index or a slot number.
    source_kind: Literal["drive", "slot"]
    source: int
    #: The slot it goes to: a mail slot, or (emulated) a storage slot.
    destination: int
    #: True when the library has no mail slot and a storage slot stands in for one.
    emulated: bool


def plan_export(
    status: ChangerStatus, barcode: str, *, slot: int | None = None, name: str = "the library"
) -> ExportPlan:
    """Decide where ``barcode`` goes to be taken out of the library.

    With mail slots: ``slot`` if it names an empty one, else the first empty one; every mail
    slot full is refused (empty one first). Without: ``slot`` if it names an empty storage
    slot, else the highest-numbered empty one (the far end of the magazine, easy to find). A
    cartridge already in a mail slot is refused: it is out already for the robot's part.
    """
    element = status.find(barcode)
    if element is None:
        raise CartridgeNotFound(f"tape {barcode} is not in {name}", barcode=barcode)
    source_kind: Literal["drive", "slot"]
    if isinstance(element, DriveElement):
        source_kind, source = "drive", element.index
    else:
        source_kind, source = "slot", element.number
        if element.import_export:
            raise ElementFull(
                f"tape {barcode} is in mail slot {source} of {name} already: take it out there",
                barcode=barcode,
            )
    emulated = not status.import_export
    candidates = status.import_export if not emulated else status.slots
    if slot is not None:
        chosen = next((s for s in candidates if s.number == slot), None)
        if chosen is None:
            what = "storage slot" if emulated else "mail slot"
            raise NoSuchElement(f"{name} has no {what} {slot}", slot=slot)
        if chosen.full:
            raise ElementFull(f"slot {slot} of {name} already holds a cartridge", slot=slot)
        return ExportPlan(barcode, source_kind, source, slot, emulated)
    empty = [s.number for s in candidates if not s.full]
    if not empty:
        what = "every mail slot" if not emulated else "every slot"
        raise ElementFull(f"{what} of {name} is full: take a cartridge out first")
    destination = empty[-1] if emulated else empty[0]
    return ExportPlan(barcode, source_kind, source, destination, emulated)


#: Records the medium's new place in the catalog (``Catalog.set_tape_medium_place``).
MarkPlace = Callable[[str, str], object]


def export_cartridge(
    changer: Changer, barcode: str, *, slot: int | None = None, mark: MarkPlace | None = None
) -> ExportPlan:
    """Move ``barcode`` to a mail slot (or, emulated, a storage slot) and mark its place
    ``shelf`` through ``mark``: it is leaving the library, no job should load it again."""
    plan = plan_export(changer.status(), barcode, slot=slot, name=changer.describe())
    if plan.source_kind == "drive":
        changer.unload(plan.source, plan.destination)
    else:
        changer.transfer(plan.source, plan.destination)
    if mark is not None:
        mark(barcode, "shelf")
    return plan


def to_take_out(status: ChangerStatus, marks: dict[str, int]) -> list[tuple[str, int]]:
    """Cartridges still in the slot they were exported to (``marks``: barcode -> that slot):
    (barcode, slot) for the page's "to be taken out" list. One moved elsewhere since is not
    listed: it was taken out, or put back on purpose."""
    return [
        (s.barcode, s.number)
        for s in status.all_slots()
        if s.full and s.barcode and marks.get(s.barcode) == s.number
    ]
