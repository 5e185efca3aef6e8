"""A file-backed tape library for tests and the demo, behind the same :class:`Changer` protocol
as a real one; and the registry of the virtual libraries the service knows.

A virtual library is a directory::

    <dir>/library.json          the state (below), replaced atomically on every move
    <dir>/library.lock          flock'ed around every read-modify-write of the state
    <dir>/cartridges/<barcode>.tape   one virtual cartridge per barcode (hardware.tape.virtual)

``library.json`` (format 1)::

    {"format": 1, "name": "demo", "storage": 8, "import_export": 1, "drives": 1,
     "slots": {"1": "DEMO01L6", "2": null, ...},          # every slot, mail slots last
     "loaded": [{"barcode": "DEMO03L6", "source": 3}]}    # one entry per drive, or null

Slots are numbered from 1 as mtx numbers them, the ``import_export`` mail slots after the
``storage`` ones; drives from 0. A move is checked against the state read under the lock and
written back whole (temporary file, fsync, rename, fsync of the directory), so a crash leaves
either the old or the new state and two processes never move the same cartridge twice.

A drive of the library is :meth:`VirtualLibrary.drive`: a fresh
:class:`~hardware.tape.virtual.VirtualDrive` named ``<library>-drive<N>`` with the cartridge the
state says is in it. The caller owns it and closes it; as on a real library, the robot takes a
cartridge out of a drive (:meth:`unload`) only after the drive has let it go.

**Registry.** The service knows the virtual libraries registered in the catalog's settings under
:data:`REGISTRY_KEY` (``{"virtual": [{"name": ..., "path": ...}]}``): the demo registers its own,
an administrator registers a directory on the page. Real libraries come from udev discovery.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hardware.tape.changer import (
    ChangerUnavailable,
    DriveEmpty,
    ElementFull,
    NoSuchElement,
    SlotEmpty,
    unload_destination,
)
from hardware.tape.mtx import ChangerStatus, DriveElement, SlotElement
from hardware.tape.virtual import VirtualCartridge, VirtualDrive

STATE_FILE = "library.json"
LOCK_FILE = "library.lock"
CARTRIDGES = "cartridges"
FORMAT = 1
REGISTRY_KEY = "tape_libraries"
#: Where the export marks are kept (:func:`exported`).
EXPORTS_KEY = "tape_exports"
#: A cartridge's early-warning zone, as a share of its capacity, when none is given.
EARLY_WARNING_SHARE = 0.05
MIN_CAPACITY = 64 * 1024
MAX_CAPACITY = 64 * 1024**4
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_BARCODE = re.compile(r"^[A-Za-z0-9]{1,16}$")
_local = threading.Lock()


class LibraryError(ChangerUnavailable):
    """The directory is not a virtual tape library this software can use."""

    code = "virtual_library_invalid"


def check_library_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise LibraryError(
            f"{name!r} is not a usable library name: 1-32 letters, digits, '_', '.', '-'"
        )
    return name


def check_barcode(barcode: str) -> str:
    if not _BARCODE.match(barcode or ""):
        raise LibraryError(f"{barcode!r} is not a usable barcode: 1-16 letters and digits")
    return barcode


@dataclass(frozen=True)
class Cartridge:
    """A cartridge to put in a new library: its barcode and size in bytes."""

    barcode: str
    capacity: int
    early_warning: int | None = None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_state(root: Path, state: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".library-", suffix=".json", dir=root)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, root / STATE_FILE)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(root)


def create_virtual_library(
    path: str | Path,
    *,
    slots: int,
    drives: int = 1,
    ie: int = 0,
    cartridges: Sequence[tuple[str, int] | Cartridge] = (),
    name: str | None = None,
) -> VirtualLibrary:
    """Make a new library in the empty (or missing) directory ``path``: ``slots`` storage
    slots, ``ie`` mail slots, ``drives`` drives, and the ``cartridges`` (barcode, capacity)
    created in the first storage slots."""
    root = Path(path)
    label = check_library_name(name or root.name)
    if not 1 <= slots <= 1000 or not 1 <= drives <= 16 or not 0 <= ie <= 16:
        raise LibraryError("a library has 1-1000 slots, 1-16 drives and 0-16 mail slots")
    wanted = [c if isinstance(c, Cartridge) else Cartridge(*c) for c in cartridges]
    if len(wanted) > slots:
        raise LibraryError(f"{len(wanted)} cartridges do not fit in {slots} slots")
    codes = [check_barcode(c.barcode) for c in wanted]
    if len(set(codes)) != len(codes):
        raise LibraryError("two cartridges have the same barcode")
    for c in wanted:
        if not MIN_CAPACITY <= c.capacity <= MAX_CAPACITY:
            raise LibraryError(
                f"cartridge {c.barcode}: a capacity is {MIN_CAPACITY} bytes to 64 TiB, "
                f"not {c.capacity}"
            )
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise LibraryError(f"{root} is not empty: a new library needs an empty directory")
    (root / CARTRIDGES).mkdir()
    for c in wanted:
        warning = c.early_warning
        if warning is None:
            warning = max(1, int(c.capacity * EARLY_WARNING_SHARE))
        VirtualCartridge.create(
            root / CARTRIDGES / f"{c.barcode}.tape",
            capacity=c.capacity,
            early_warning=warning,
            barcode=c.barcode,
        )
    state: dict[str, Any] = {
        "format": FORMAT,
        "name": label,
        "storage": slots,
        "import_export": ie,
        "drives": drives,
        "slots": {
            str(n): (codes[n - 1] if n <= len(codes) else None) for n in range(1, slots + ie + 1)
        },
        "loaded": [None] * drives,
    }
    (root / LOCK_FILE).touch()
    _write_state(root, state)
    return VirtualLibrary(root)


class VirtualLibrary:
    """A directory of virtual cartridges in slots, with virtual drives (see the module doc)."""

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)
        state = self._read()
        self.name: str = state["name"]
        self.identity = f"virtual:{self.name}"

    def describe(self) -> str:
        return f"virtual library {self.name}"

    # --- state ---------------------------------------------------------------------------------

    def _read(self) -> dict[str, Any]:
        try:
            state = json.loads((self.root / STATE_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LibraryError(
                f"{self.root} is not a virtual tape library (it has no {STATE_FILE})"
            ) from None
        except (OSError, ValueError) as exc:
            raise LibraryError(
                f"the state of the library in {self.root} is unreadable: {exc}"
            ) from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise LibraryError(
                f"the library in {self.root} has a state format this software does not know"
            )
        return state

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The state, read under the library's lock; written back if the block changed it."""
        with _local, open(self.root / LOCK_FILE, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._read()
            before = json.dumps(state, sort_keys=True)
            yield state
            if json.dumps(state, sort_keys=True) != before:
                _write_state(self.root, state)

    def _status_of(self, state: dict[str, Any]) -> ChangerStatus:
        storage = int(state["storage"])
        slots = []
        for key, barcode in sorted(state["slots"].items(), key=lambda kv: int(kv[0])):
            number = int(key)
            slots.append(
                SlotElement(
                    number=number,
                    full=barcode is not None,
                    barcode=barcode,
                    import_export=number > storage,
                )
            )
        drives = tuple(
            DriveElement(
                index=i,
                full=entry is not None,
                barcode=entry["barcode"] if entry else None,
                source_slot=entry.get("source") if entry else None,
            )
            for i, entry in enumerate(state["loaded"])
        )
        return ChangerStatus(
            drives=drives,
            slots=tuple(s for s in slots if not s.import_export),
            import_export=tuple(s for s in slots if s.import_export),
        )

    def _slot(self, state: dict[str, Any], number: int) -> str:
        if (
            isinstance(number, bool)
            or not isinstance(number, int)
            or str(number) not in state["slots"]
        ):
            raise NoSuchElement(f"{self.describe()} has no slot {number!r}", slot=number)
        return str(number)

    def _drive(self, state: dict[str, Any], index: int) -> int:
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or not 0 <= index < len(state["loaded"])
        ):
            raise NoSuchElement(f"{self.describe()} has no drive {index!r}", drive=index)
        return index

    # --- the Changer protocol --------------------------------------------------------------------

    def status(self) -> ChangerStatus:
        with self._locked() as state:
            return self._status_of(state)

    def inventory(self) -> ChangerStatus:
        """The slots as the state says, each cartridge file checked to be there."""
        with self._locked() as state:
            for barcode in state["slots"].values():
                if barcode is not None and not self.cartridge_path(barcode).exists():
                    raise ChangerUnavailable(
                        f"{self.describe()}: the cartridge file of {barcode} is missing"
                    )
            return self._status_of(state)

    def load(self, slot: int, drive: int) -> None:
        with self._locked() as state:
            key, index = self._slot(state, slot), self._drive(state, drive)
            barcode = state["slots"][key]
            if barcode is None:
                raise SlotEmpty(
                    f"slot {slot} of {self.describe()} is empty: there is no cartridge to load"
                )
            held = state["loaded"][index]
            if held is not None:
                raise ElementFull(
                    f"drive {drive} of {self.describe()} already holds {held['barcode']}: unload it first"
                )
            state["slots"][key] = None
            state["loaded"][index] = {"barcode": barcode, "source": slot}

    def unload(self, drive: int, slot: int | None = None) -> int:
        with self._locked() as state:
            index = self._drive(state, drive)
            target = unload_destination(self._status_of(state), index, slot, self.describe())
            key = self._slot(state, target)
            if state["slots"][key] is not None:
                raise ElementFull(f"slot {target} of {self.describe()} already holds a cartridge")
            entry = state["loaded"][index]
            if entry is None:  # pragma: no cover - unload_destination refused it already
                raise DriveEmpty(f"drive {drive} of {self.describe()} is empty")
            state["slots"][key] = entry["barcode"]
            state["loaded"][index] = None
            return target

    def transfer(self, source: int, destination: int) -> None:
        with self._locked() as state:
            src, dst = self._slot(state, source), self._slot(state, destination)
            if state["slots"][src] is None:
                raise SlotEmpty(
                    f"slot {source} of {self.describe()} is empty: there is no cartridge to move"
                )
            if state["slots"][dst] is not None:
                raise ElementFull(
                    f"slot {destination} of {self.describe()} already holds a cartridge"
                )
            state["slots"][dst], state["slots"][src] = state["slots"][src], None

    # --- cartridges and drives -----------------------------------------------------------------

    def cartridge_path(self, barcode: str) -> Path:
        return self.root / CARTRIDGES / f"{check_barcode(barcode)}.tape"

    def drive_name(self, index: int) -> str:
        return f"{self.name}-drive{index}"

    def drive_identity(self, index: int) -> str:
        return f"virtual:{self.drive_name(index)}"

    def drive(self, index: int) -> VirtualDrive:
        """A drive of the library with the cartridge the state says is in it (the caller
        closes it)."""
        with self._locked() as state:
            entry = state["loaded"][self._drive(state, index)]
        drive = VirtualDrive(self.drive_name(index))
        if entry is not None:
            drive.load(self.cartridge_path(entry["barcode"]))
        return drive

    def add_cartridge(self, barcode: str, capacity: int, *, slot: int | None = None) -> int:
        """Put a new blank cartridge in ``slot`` (None: a mail slot if any is empty, else the
        first empty slot), like an operator inserting one; returns the slot."""
        path = self.cartridge_path(barcode)
        with self._locked() as state:
            if path.exists() or barcode in state["slots"].values():
                raise ElementFull(f"{self.describe()} has a cartridge {barcode} already")
            status = self._status_of(state)
            if slot is None:
                empty = [s.number for s in status.import_export if not s.full]
                empty = empty or status.empty_slots()
                if not empty:
                    raise ElementFull(f"every slot of {self.describe()} is full")
                slot = empty[0]
            key = self._slot(state, slot)
            if state["slots"][key] is not None:
                raise ElementFull(f"slot {slot} of {self.describe()} already holds a cartridge")
            if not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
                raise LibraryError(f"a capacity is {MIN_CAPACITY} bytes to 64 TiB, not {capacity}")
            VirtualCartridge.create(
                path,
                capacity=capacity,
                early_warning=max(1, int(capacity * EARLY_WARNING_SHARE)),
                barcode=barcode,
            )
            state["slots"][key] = barcode
            return slot


def barcodes_for(name: str, count: int, *, first: int = 1) -> list[str]:
    """Barcodes for ``count`` new cartridges of library ``name``: up to 8 letters and digits of
    the name, upper case, then a 3-digit number ("DEMO001", "DEMO002", ...)."""
    stem = re.sub(r"[^A-Za-z0-9]", "", name).upper()[:8] or "TAPE"
    return [f"{stem}{n:03d}" for n in range(first, first + count)]


# --- the registry --------------------------------------------------------------------------------


class SettingsStore(Protocol):
    """The catalog's settings documents (``Catalog.get_settings``/``put_settings``)."""

    def get_settings(self, key: str) -> dict[str, Any]: ...

    def put_settings(self, key: str, value: dict[str, Any]) -> dict[str, Any]: ...


def registered(catalog: SettingsStore) -> list[dict[str, str]]:
    """The registered virtual libraries: ``{"name", "path"}`` each."""
    entries = catalog.get_settings(REGISTRY_KEY).get("virtual") or []
    return [
        {"name": str(e["name"]), "path": str(e["path"])} for e in entries if isinstance(e, dict)
    ]


def open_registered(catalog: SettingsStore) -> list[VirtualLibrary | LibraryError]:
    """Every registered library opened, or the error saying why it cannot be (a directory
    that vanished is shown, never dropped silently)."""
    found: list[VirtualLibrary | LibraryError] = []
    for entry in registered(catalog):
        try:
            found.append(VirtualLibrary(entry["path"]))
        except LibraryError as exc:
            found.append(
                LibraryError(
                    f"library {entry['name']}: {exc.message}",
                    path=entry["path"],
                    name=entry["name"],
                )
            )
    return found


def register_library(catalog: SettingsStore, path: str | Path) -> VirtualLibrary:
    """Register the virtual library in ``path`` (absolute); a second one with the same name
    or directory is refused."""
    if not Path(path).is_absolute():
        raise LibraryError(f"{path} is not an absolute path")
    library = VirtualLibrary(Path(path).resolve())
    entries = registered(catalog)
    for e in entries:
        if e["name"] == library.name or Path(e["path"]).resolve() == library.root:
            raise LibraryError(
                f"a virtual library {e['name']} is registered already in {e['path']}"
            )
    entries.append({"name": library.name, "path": str(library.root)})
    catalog.put_settings(REGISTRY_KEY, {"virtual": entries})
    return library


def unregister_library(catalog: SettingsStore, name: str) -> None:
    """Forget the library ``name`` (its directory and cartridges stay)."""
    entries = registered(catalog)
    kept = [e for e in entries if e["name"] != name]
    if len(kept) == len(entries):
        raise NoSuchElement(f"no virtual library {name} is registered")
    catalog.put_settings(REGISTRY_KEY, {"virtual": kept})


def exported(catalog: SettingsStore) -> dict[str, tuple[str, int]]:
    """Cartridges exported and not yet seen gone: barcode -> (library identity, slot it was
    put in). Kept apart from the medium's place, which says where it goes (shelf), so a
    cartridge put back later is not mistaken for one on its way out."""
    marks = catalog.get_settings(EXPORTS_KEY).get("exported") or {}
    return {
        str(barcode): (str(mark["library"]), int(mark["slot"]))
        for barcode, mark in marks.items()
        if isinstance(mark, dict)
    }


def _put_exported(catalog: SettingsStore, marks: dict[str, tuple[str, int]]) -> None:
    document = {b: {"library": lib, "slot": slot} for b, (lib, slot) in sorted(marks.items())}
    catalog.put_settings(EXPORTS_KEY, {"exported": document})


def mark_exported(catalog: SettingsStore, barcode: str, library: str, slot: int) -> None:
    """Remember that ``barcode`` was put in ``slot`` of ``library`` to be taken out."""
    marks = exported(catalog)
    marks[barcode] = (library, slot)
    _put_exported(catalog, marks)


def clear_exported(catalog: SettingsStore, barcodes: Iterable[str]) -> None:
    """Forget the export marks of ``barcodes`` (taken out, or put back on purpose)."""
    marks = exported(catalog)
    gone = [b for b in barcodes if b in marks]
    for barcode in gone:
        del marks[barcode]
    if gone:
        _put_exported(catalog, marks)


def find_virtual_drive(catalog: SettingsStore, identity: str) -> tuple[VirtualLibrary, int] | None:
    """The registered library and drive index of the virtual drive ``identity``
    (``virtual:<library>-drive<N>``), None if no registered library has it."""
    for library in open_registered(catalog):
        if isinstance(library, LibraryError):
            continue
        drives = len(library.status().drives)
        for index in range(drives):
            if library.drive_identity(index) == identity:
                return library, index
    return None
