"""What ``mtx`` prints, turned into frozen records: pure functions, no subprocess.

``mtx -f /dev/sgN status`` (mtx 1.3) prints a header and one line per element::

      Storage Changer /dev/sg1:1 Drives, 10 Slots ( 1 Import/Export )
    Data Transfer Element 0:Full (Storage Element 3 Loaded):VolumeTag = ABC001L6
          Storage Element 1:Full :VolumeTag=ABC002L6
          Storage Element 2:Empty
          Storage Element 10 IMPORT/EXPORT:Empty

Facts the parser relies on (from mtx's manual page and the strings it prints):

* drives are numbered from 0, storage elements from 1; the numbers printed are the ones the
  ``load``/``unload``/``transfer`` commands take;
* the header's slot count includes the import/export ("mail") slots, which are storage elements
  marked `` IMPORT/EXPORT`` and numbered after (or among) the ordinary ones;
* a drive says which storage element its cartridge came from (``Storage Element 3 Loaded``), or
  ``Unknown Storage Element Loaded`` when the library does not know;
* a library with a barcode reader adds ``:VolumeTag = X`` (drives) or ``:VolumeTag=X`` (slots),
  and optionally ``:AlternateVolumeTag``; the tag may be padded with spaces; a library without a
  reader (or ``mtx nobarcode``) prints no tag at all;
* SCSI sense dumps (``mtx: Request Sense: ...``) may be interleaved and carry no element.

A status whose counts disagree with its header is refused (:class:`MtxParseError`): half a
status would make the appliance think a cartridge is missing.

:func:`explain_error` turns what mtx printed when a command failed into a kind (for the
changer's error classes) and a sentence a person understands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

_HEADER = re.compile(
    r"^\s*Storage Changer\s+(?P<device>\S+?):(?P<drives>\d+)\s+Drives?,\s*(?P<slots>\d+)\s+Slots?"
    r"(?:\s*\(\s*(?P<ie>\d+)\s+Import/Export\s*\))?"
)
_DRIVE = re.compile(r"^\s*Data Transfer Element\s+(?P<index>\d+)\s*:(?P<rest>.*)$")
_SLOT = re.compile(
    r"^\s*Storage Element\s+(?P<number>\d+)(?P<ie>\s+IMPORT/EXPORT)?\s*:(?P<rest>.*)$"
)
_SOURCE = re.compile(
    r"\(\s*(?:Storage Element\s+(?P<slot>\d+)|Unknown Storage Element)\s+Loaded\s*\)"
)


class MtxParseError(ValueError):
    """The text is not a complete ``mtx status`` output; the message says what is wrong."""


@dataclass(frozen=True)
class DriveElement:
    """A drive of the library (mtx's "Data Transfer Element")."""

    #: mtx's drive number (from 0), as ``load SLOT DRIVE`` takes it.
    index: int
    full: bool
    #: The cartridge's barcode (primary volume tag), None without a reader or when empty.
    barcode: str | None = None
    alternate_barcode: str | None = None
    #: The storage slot the cartridge was loaded from, None when empty or unknown.
    source_slot: int | None = None


@dataclass(frozen=True)
class SlotElement:
    """A storage slot, or an import/export (mail) slot when ``import_export``."""

    #: mtx's storage element number (from 1), as ``load``/``transfer`` take it.
    number: int
    full: bool
    barcode: str | None = None
    alternate_barcode: str | None = None
    import_export: bool = False


@dataclass(frozen=True)
class ChangerStatus:
    """A whole library at one moment: its drives, storage slots and mail slots."""

    drives: tuple[DriveElement, ...]
    #: Ordinary storage slots, by number.
    slots: tuple[SlotElement, ...]
    #: Import/export (mail) slots, by number; empty for a library without any.
    import_export: tuple[SlotElement, ...] = ()
    #: The device mtx named in its header (``/dev/sg1``), None for a virtual library.
    device: str | None = None

    def all_slots(self) -> tuple[SlotElement, ...]:
        return tuple(sorted((*self.slots, *self.import_export), key=lambda s: s.number))

    def slot(self, number: int) -> SlotElement | None:
        return next((s for s in self.all_slots() if s.number == number), None)

    def drive(self, index: int) -> DriveElement | None:
        return next((d for d in self.drives if d.index == index), None)

    def find(self, barcode: str) -> DriveElement | SlotElement | None:
        """Where the cartridge with ``barcode`` is (a drive or a slot), None if not here."""
        elements: list[DriveElement | SlotElement] = [*self.drives, *self.all_slots()]
        return next((e for e in elements if e.full and e.barcode == barcode), None)

    def barcodes(self) -> list[str]:
        """Every barcode in the library (drives first), in element order."""
        elements: list[DriveElement | SlotElement] = [*self.drives, *self.all_slots()]
        return [e.barcode for e in elements if e.full and e.barcode]

    def empty_slots(self) -> list[int]:
        """Numbers of the empty ordinary storage slots (not mail slots)."""
        return [s.number for s in self.slots if not s.full]


def _tags(rest: str) -> tuple[str | None, str | None]:
    """The primary and alternate volume tags in the part of a line after the state."""
    primary: str | None = None
    alternate: str | None = None
    for part in rest.split(":"):
        name, sep, value = part.partition("=")
        if not sep:
            continue
        tag = value.strip() or None
        if name.strip() == "VolumeTag":
            primary = tag
        elif name.strip() == "AlternateVolumeTag":
            alternate = tag
    return primary, alternate


def _state(rest: str, line: str) -> bool:
    word = rest.strip().split(":", 1)[0].split("(", 1)[0].strip()
    if word == "Full":
        return True
    if word == "Empty":
        return False
    raise MtxParseError(f"mtx status line {line.strip()!r} says neither Full nor Empty")


def parse_status(text: str) -> ChangerStatus:
    """Parse the output of ``mtx status`` (see the module doc for the format).

    Raises :class:`MtxParseError` when the header is missing, an element is listed twice, or
    the numbers of drives, slots and mail slots differ from what the header announced.
    """
    header: re.Match[str] | None = None
    drives: dict[int, DriveElement] = {}
    slots: dict[int, SlotElement] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("mtx:"):
            continue
        if header is None and (found := _HEADER.match(line)):
            header = found
            continue
        if found := _DRIVE.match(line):
            index, rest = int(found["index"]), found["rest"]
            if index in drives:
                raise MtxParseError(f"mtx status lists drive {index} twice")
            full = _state(rest, line)
            source = _SOURCE.search(rest)
            primary, alternate = _tags(rest) if full else (None, None)
            drives[index] = DriveElement(
                index=index,
                full=full,
                barcode=primary,
                alternate_barcode=alternate,
                source_slot=int(source["slot"]) if full and source and source["slot"] else None,
            )
        elif found := _SLOT.match(line):
            number, rest = int(found["number"]), found["rest"]
            if number in slots:
                raise MtxParseError(f"mtx status lists storage element {number} twice")
            full = _state(rest, line)
            primary, alternate = _tags(rest) if full else (None, None)
            slots[number] = SlotElement(
                number=number,
                full=full,
                barcode=primary,
                alternate_barcode=alternate,
                import_export=bool(found["ie"]),
            )
    if header is None:
        raise MtxParseError(
            "this is not the output of 'mtx status': the line 'Storage Changer ...' is missing"
        )
    ordinary = tuple(slots[n] for n in sorted(slots) if not slots[n].import_export)
    mail = tuple(slots[n] for n in sorted(slots) if slots[n].import_export)
    want_drives, want_slots = int(header["drives"]), int(header["slots"])
    want_ie = int(header["ie"]) if header["ie"] is not None else None
    if len(drives) != want_drives:
        raise MtxParseError(
            f"mtx announced {want_drives} drive(s) but listed {len(drives)}: the status is "
            "incomplete"
        )
    if len(slots) != want_slots:
        raise MtxParseError(
            f"mtx announced {want_slots} slot(s) but listed {len(slots)}: the status is incomplete"
        )
    if want_ie is not None and len(mail) != want_ie:
        raise MtxParseError(f"mtx announced {want_ie} import/export slot(s) but listed {len(mail)}")
    return ChangerStatus(
        drives=tuple(drives[i] for i in sorted(drives)),
        slots=ordinary,
        import_export=mail,
        device=header["device"],
    )


# --- errors ------------------------------------------------------------------------------------

ErrorKind = Literal[
    "slot_empty", "destination_full", "drive_empty", "no_such_element", "no_device", "failed"
]

_ERRORS: tuple[tuple[re.Pattern[str], ErrorKind, str], ...] = (
    (
        re.compile(r"Source Element Address (\d+) is Empty", re.I),
        "slot_empty",
        "there is no cartridge at the source (element address {0})",
    ),
    (
        re.compile(r"Storage Element (\d+) is Empty", re.I),
        "slot_empty",
        "slot {0} is empty: there is no cartridge to move",
    ),
    (
        re.compile(r"Medium source element empty", re.I),
        "slot_empty",
        "there is no cartridge at the source",
    ),
    (
        re.compile(r"Data Transfer Element (\d+) is Empty", re.I),
        "drive_empty",
        "drive {0} is empty: there is no cartridge to unload",
    ),
    (
        re.compile(r"Drive (\d+) Full \(Storage Element (\d+) loaded\)", re.I),
        "destination_full",
        "drive {0} already holds a cartridge (from slot {1}): unload it first",
    ),
    (
        re.compile(r"Storage Element (\d+) is Already Full", re.I),
        "destination_full",
        "slot {0} already holds a cartridge",
    ),
    (
        re.compile(r"Destination Element Address (\d+) is Already Full", re.I),
        "destination_full",
        "the destination (element address {0}) already holds a cartridge",
    ),
    (
        re.compile(r"Medium destination element full", re.I),
        "destination_full",
        "the destination already holds a cartridge",
    ),
    (
        re.compile(r"(?:illegal|invalid) <storage-element-number> argument '?(-?\d+)'?", re.I),
        "no_such_element",
        "the library has no slot {0}",
    ),
    (
        re.compile(r"(?:illegal|invalid) <drive-number> argument '?(-?\d+)'?", re.I),
        "no_such_element",
        "the library has no drive {0}",
    ),
    (
        re.compile(r"Invalid element address|Invalid (?:source|destination)\b", re.I),
        "no_such_element",
        "the library has no such slot or drive",
    ),
    (
        re.compile(r"cannot open SCSI device '([^']*)' - (.*)", re.I),
        "no_device",
        "the changer device {0} cannot be opened ({1})",
    ),
)


def explain_error(output: str) -> tuple[ErrorKind, str]:
    """What went wrong, from what a failed mtx command printed (stdout and stderr together):
    a kind and a sentence (without a final full stop) a person understands."""
    for pattern, kind, words in _ERRORS:
        found = pattern.search(output)
        if found:
            return kind, words.format(*(g.strip() for g in found.groups()))
    lines = [
        line.strip()
        for line in output.splitlines()
        if line.strip() and not line.lstrip().startswith("mtx: Request Sense")
    ]
    said = lines[-1] if lines else "no message"
    return "failed", f"the changer refused the command ({said})"
