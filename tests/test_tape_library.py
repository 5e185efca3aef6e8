"""The virtual tape library (hardware.tape.library): slots, mail slots and drives on real files,
moves persisted atomically and serialised across real processes, its drives real VirtualDrives,
exports (with and without mail slots), and the registry in a real catalog."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.catalog import Catalog
from hardware.tape.changer import (
    DriveEmpty,
    ElementFull,
    NoSuchElement,
    SlotEmpty,
    export_cartridge,
)
from hardware.tape.drive import DriveBusy
from hardware.tape.library import (
    STATE_FILE,
    LibraryError,
    VirtualLibrary,
    clear_exported,
    create_virtual_library,
    exported,
    find_virtual_drive,
    mark_exported,
    open_registered,
    register_library,
    registered,
    unregister_library,
)
from hardware.tape.mtx import DriveElement, SlotElement
from hardware.tape.virtual import VirtualCartridge

MiB = 1024 * 1024


@pytest.fixture
def library(tmp_path: Path) -> VirtualLibrary:
    return create_virtual_library(
        tmp_path / "lib1",
        slots=4,
        drives=2,
        ie=1,
        cartridges=[("TAPE01", 2 * MiB), ("TAPE02", 2 * MiB), ("TAPE03", 2 * MiB)],
    )


def test_a_new_library_reports_its_slots_like_mtx(library: VirtualLibrary) -> None:
    status = library.status()
    assert library.identity == "virtual:lib1"
    assert status.drives == (DriveElement(0, False), DriveElement(1, False))
    assert status.slots == (
        SlotElement(1, True, "TAPE01"),
        SlotElement(2, True, "TAPE02"),
        SlotElement(3, True, "TAPE03"),
        SlotElement(4, False),
    )
    assert status.import_export == (SlotElement(5, False, import_export=True),)
    assert VirtualCartridge.barcode_of(library.cartridge_path("TAPE02")) == "TAPE02"
    assert library.inventory() == status


def test_moves_persist_and_are_seen_by_a_new_instance(library: VirtualLibrary) -> None:
    library.load(2, 1)
    library.transfer(1, 5)
    again = VirtualLibrary(library.root)
    status = again.status()
    assert status.drive(1) == DriveElement(1, True, "TAPE02", source_slot=2)
    assert status.slot(1) == SlotElement(1, False)
    assert status.slot(5) == SlotElement(5, True, "TAPE01", import_export=True)
    assert again.unload(1) == 2  # back to where it came from
    library.load(3, 0)
    library.transfer(5, 3)
    assert library.unload(0) == 1  # its own slot is taken: the first empty one
    state = json.loads((library.root / STATE_FILE).read_text())
    assert state["slots"] == {"1": "TAPE03", "2": "TAPE02", "3": "TAPE01", "4": None, "5": None}
    assert sorted(p.name for p in library.root.iterdir()) == [
        "cartridges",
        "library.json",
        "library.lock",
    ]  # no temporary state file left behind


def test_refused_moves_say_why_and_change_nothing(library: VirtualLibrary) -> None:
    before = (library.root / STATE_FILE).read_bytes()
    with pytest.raises(SlotEmpty, match="slot 4 of virtual library lib1 is empty"):
        library.load(4, 0)
    with pytest.raises(NoSuchElement, match="no slot 9"):
        library.load(9, 0)
    with pytest.raises(NoSuchElement, match="no drive 2"):
        library.load(1, 2)
    with pytest.raises(DriveEmpty, match="drive 0 of virtual library lib1 is empty"):
        library.unload(0)
    with pytest.raises(ElementFull, match=r"slot 2 .* already holds"):
        library.transfer(1, 2)
    with pytest.raises(SlotEmpty):
        library.transfer(4, 5)
    assert (library.root / STATE_FILE).read_bytes() == before
    library.load(1, 0)
    with pytest.raises(ElementFull, match=r"drive 0 .* already holds TAPE01"):
        library.load(2, 0)
    with pytest.raises(ElementFull, match="slot 3"):
        library.unload(0, 3)


def test_bad_libraries_are_refused_in_words(tmp_path: Path) -> None:
    with pytest.raises(LibraryError, match=r"has no library\.json"):
        VirtualLibrary(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "junk").write_text("")
    with pytest.raises(LibraryError, match="not empty"):
        create_virtual_library(tmp_path / "x", slots=2)
    with pytest.raises(LibraryError, match="do not fit"):
        create_virtual_library(tmp_path / "y", slots=1, cartridges=[("A", MiB), ("B", MiB)])
    with pytest.raises(LibraryError, match="same barcode"):
        create_virtual_library(tmp_path / "y", slots=2, cartridges=[("A", MiB), ("A", MiB)])
    with pytest.raises(LibraryError, match="not a usable barcode"):
        create_virtual_library(tmp_path / "y", slots=2, cartridges=[("A B", MiB)])
    with pytest.raises(LibraryError, match="capacity"):
        create_virtual_library(tmp_path / "y", slots=2, cartridges=[("A", 100)])
    assert not (tmp_path / "y").exists()
    broken = create_virtual_library(tmp_path / "z", slots=1)
    (broken.root / STATE_FILE).write_text('{"format": 99}')
    with pytest.raises(LibraryError, match="state format"):
        broken.status()


def test_the_drive_holds_the_loaded_cartridge(library: VirtualLibrary) -> None:
    empty = library.drive(1)
    assert empty.unloaded and empty.identity == "virtual:lib1-drive1"
    empty.close()
    library.load(3, 1)
    drive = library.drive(1)
    try:
        assert drive.loaded_path == library.cartridge_path("TAPE03")
        assert drive.write_block(b"x" * 65536) is False
        with pytest.raises(DriveBusy, match="TAPE03"):
            library.drive(1)  # the cartridge is held by the first drive object
    finally:
        drive.close()
    again = library.drive(1)
    try:
        again.rewind()
        assert again.read_block(65536) == b"x" * 65536
        assert again.read_block(65536) == b""  # the filemark closing wrote
    finally:
        again.close()
    assert find_virtual_drive_of(library) == (library.root, 1)


def find_virtual_drive_of(library: VirtualLibrary) -> tuple[Path, int] | None:
    class Settings:
        doc = {"virtual": [{"name": library.name, "path": str(library.root)}]}

        def get_settings(self, key: str) -> dict[str, object]:
            return self.doc

        def put_settings(self, key: str, value: dict[str, object]) -> dict[str, object]:
            raise AssertionError("not written")

    found = find_virtual_drive(Settings(), "virtual:lib1-drive1")  # type: ignore[arg-type]
    return (found[0].root, found[1]) if found else None


def test_a_cartridge_inserted_goes_to_the_mail_slot(library: VirtualLibrary) -> None:
    assert library.add_cartridge("NEW001", 4 * MiB) == 5
    assert library.add_cartridge("NEW002", 4 * MiB) == 4
    with pytest.raises(ElementFull, match="every slot"):
        library.add_cartridge("NEW003", 4 * MiB)
    with pytest.raises(ElementFull, match="NEW001 already"):
        library.add_cartridge("NEW001", 4 * MiB, slot=4)
    assert library.status().slot(5) == SlotElement(5, True, "NEW001", import_export=True)


def test_export_through_the_mail_slot_and_emulated(tmp_path: Path, library: VirtualLibrary) -> None:
    places: dict[str, str] = {}
    library.load(1, 0)
    plan = export_cartridge(library, "TAPE01", mark=places.__setitem__)
    assert (plan.destination, plan.emulated) == (5, False)
    assert library.status().slot(5) == SlotElement(5, True, "TAPE01", import_export=True)
    assert places == {"TAPE01": "shelf"}
    with pytest.raises(ElementFull, match="every mail slot"):
        export_cartridge(library, "TAPE02")
    plain = create_virtual_library(
        tmp_path / "plain", slots=3, cartridges=[("P1", MiB), ("P2", MiB)]
    )
    emulated = export_cartridge(plain, "P1", mark=places.__setitem__)
    assert (emulated.destination, emulated.emulated) == (3, True)
    assert plain.status().slots[2] == SlotElement(3, True, "P1")
    assert places["P1"] == "shelf"


_RACER = """
import sys
from hardware.tape.library import VirtualLibrary
from hardware.tape.changer import ChangerError
lib = VirtualLibrary(sys.argv[1])
won = 0
for _ in range(40):
    try:
        lib.load(1, int(sys.argv[2]))
        won += 1
        lib.unload(int(sys.argv[2]), 1)
    except ChangerError:
        pass
print(won)
"""


def test_two_processes_never_move_one_cartridge_twice(library: VirtualLibrary) -> None:
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(library.root), str(drive)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parent.parent,
        )
        for drive in (0, 1)
    ]
    outputs = [r.communicate(timeout=120)[0] for r in racers]
    assert [r.returncode for r in racers] == [0, 0]
    assert sum(int(o) for o in outputs) > 0
    status = library.status()
    # Every cartridge is exactly once somewhere: none lost, none duplicated.
    assert sorted(status.barcodes()) == ["TAPE01", "TAPE02", "TAPE03"]
    assert status.slot(1) == SlotElement(1, True, "TAPE01")


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    with Catalog.open(f"sqlite:///{tmp_path / 'catalog.db'}") as opened:
        yield opened


def test_registry_in_the_catalog(tmp_path: Path, library: VirtualLibrary, catalog: Catalog) -> None:
    assert registered(catalog) == []
    register_library(catalog, library.root)
    assert registered(catalog) == [{"name": "lib1", "path": str(library.root)}]
    with pytest.raises(LibraryError, match="registered already"):
        register_library(catalog, library.root)
    with pytest.raises(LibraryError, match="not an absolute path"):
        register_library(catalog, "lib1")
    with pytest.raises(LibraryError, match=r"has no library\.json"):
        register_library(catalog, tmp_path)
    found = find_virtual_drive(catalog, "virtual:lib1-drive0")
    assert found is not None and found[1] == 0
    assert find_virtual_drive(catalog, "virtual:other-drive0") is None
    (library.root / STATE_FILE).rename(library.root / "moved.json")
    (opened,) = open_registered(catalog)
    assert isinstance(opened, LibraryError) and "library lib1" in opened.message
    unregister_library(catalog, "lib1")
    assert registered(catalog) == []
    assert exported(catalog) == {}
    mark_exported(catalog, "TAPE01", "virtual:lib1", 5)
    mark_exported(catalog, "TAPE02", "virtual:lib1", 4)
    assert exported(catalog) == {"TAPE01": ("virtual:lib1", 5), "TAPE02": ("virtual:lib1", 4)}
    clear_exported(catalog, ["TAPE01", "NOPE"])
    assert exported(catalog) == {"TAPE02": ("virtual:lib1", 4)}
    with pytest.raises(NoSuchElement, match="no virtual library lib1"):
        unregister_library(catalog, "lib1")
