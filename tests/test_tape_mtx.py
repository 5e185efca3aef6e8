"""The mtx status parser and error words (hardware.tape.mtx), the export decision
(hardware.tape.changer.plan_export), and MtxChanger against the real mtx program.

The fixtures in tests/fixtures/tape/mtx-*.txt are written by hand from the format mtx 1.3 prints
(its manual page and the strings in its binary); mtx-status-tgt*.txt, when present, is a real
recording from tgt's changer in a QEMU guest and is parsed here too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hardware.tape.changer import (
    CartridgeNotFound,
    ChangerUnavailable,
    DriveEmpty,
    ElementFull,
    MtxChanger,
    NoSuchElement,
    export_cartridge,
    plan_export,
    to_take_out,
    unload_destination,
)
from hardware.tape.mtx import (
    ChangerStatus,
    DriveElement,
    MtxParseError,
    SlotElement,
    explain_error,
    parse_status,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tape"


def fixture(name: str) -> ChangerStatus:
    return parse_status((FIXTURES / name).read_text())


def test_one_drive_library_with_mail_slot() -> None:
    status = fixture("mtx-status-one-drive.txt")
    assert status.device == "/dev/sg1"
    assert status.drives == (DriveElement(index=0, full=True, barcode="ABC001L6", source_slot=3),)
    assert [s.number for s in status.slots] == list(range(1, 10))
    assert status.slot(1) == SlotElement(number=1, full=True, barcode="ABC002L6")
    assert status.slot(3) == SlotElement(number=3, full=False)
    assert status.import_export == (SlotElement(number=10, full=False, import_export=True),)
    assert status.barcodes() == ["ABC001L6", "ABC002L6", "ABC003L6", "ABC004L6", "CLN001L1"]
    assert status.empty_slots() == [3, 5, 6, 7, 8]
    assert status.find("ABC001L6") == status.drives[0]
    assert status.find("NOPE") is None


def test_padded_and_alternate_tags_unknown_source_two_mail_slots() -> None:
    status = fixture("mtx-status-two-drives-padded.txt")
    first, second = status.drives
    assert first == DriveElement(
        index=0, full=True, barcode="000101L5", alternate_barcode="SIDE-B", source_slot=None
    )
    assert second == DriveElement(index=1, full=False)
    assert status.slot(1) is not None and status.slot(1).barcode == "000102L5"  # type: ignore[union-attr]
    third = status.slot(3)
    assert third is not None and (third.barcode, third.alternate_barcode) == ("000103L5", "ALT103")
    assert [s.number for s in status.import_export] == [5, 6]
    assert status.import_export[0].barcode == "000104L5" and status.import_export[0].full
    assert [s.number for s in status.slots] == [1, 2, 3, 4]


def test_no_barcode_reader() -> None:
    status = fixture("mtx-status-no-barcode-reader.txt")
    assert status.drives[0] == DriveElement(index=0, full=True, barcode=None, source_slot=2)
    assert [(s.number, s.full, s.barcode) for s in status.slots] == [
        (1, True, None),
        (2, False, None),
        (3, True, None),
        (4, False, None),
    ]
    assert status.import_export == ()
    assert status.barcodes() == []


def test_sense_lines_before_the_status_are_skipped() -> None:
    status = fixture("mtx-status-sense-noise.txt")
    assert status.barcodes() == ["TAPE01L8", "TAPE02L8", "TAPE03L8"]
    assert status.drives == (DriveElement(index=0, full=False),)


def test_recorded_tgt_status_parses_when_present() -> None:
    recordings = sorted(FIXTURES.glob("mtx-status-tgt*.txt"))
    for path in recordings:
        status = parse_status(path.read_text())
        assert status.drives, path.name
        assert status.slots, path.name


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "'Storage Changer ...' is missing"),
        ("mtx: Request Sense: Long Report=yes\n", "'Storage Changer ...' is missing"),
        (
            "  Storage Changer /dev/sg1:2 Drives, 1 Slots ( 0 Import/Export )\n"
            "Data Transfer Element 0:Empty\n      Storage Element 1:Empty\n",
            "announced 2 drive(s) but listed 1",
        ),
        (
            "  Storage Changer /dev/sg1:1 Drives, 3 Slots ( 0 Import/Export )\n"
            "Data Transfer Element 0:Empty\n      Storage Element 1:Empty\n",
            "announced 3 slot(s) but listed 1",
        ),
        (
            "  Storage Changer /dev/sg1:1 Drives, 2 Slots ( 1 Import/Export )\n"
            "Data Transfer Element 0:Empty\n      Storage Element 1:Empty\n"
            "      Storage Element 2:Empty\n",
            "announced 1 import/export slot(s) but listed 0",
        ),
        (
            "  Storage Changer /dev/sg1:1 Drives, 1 Slots ( 0 Import/Export )\n"
            "Data Transfer Element 0:Empty\nData Transfer Element 0:Empty\n"
            "      Storage Element 1:Empty\n",
            "drive 0 twice",
        ),
        (
            "  Storage Changer /dev/sg1:1 Drives, 1 Slots ( 0 Import/Export )\n"
            "Data Transfer Element 0:Jammed\n      Storage Element 1:Empty\n",
            "neither Full nor Empty",
        ),
    ],
)
def test_incomplete_or_foreign_text_is_refused(text: str, words: str) -> None:
    with pytest.raises(MtxParseError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_status(text)


@pytest.mark.parametrize(
    ("output", "kind", "words"),
    [
        ("Source Element Address 1003 is Empty\n", "slot_empty", "no cartridge at the source"),
        ("Data Transfer Element 1 is Empty\n", "drive_empty", "drive 1 is empty"),
        ("Drive 0 Full (Storage Element 4 loaded)\n", "destination_full", "drive 0 already holds"),
        ("Storage Element 7 is Already Full\n", "destination_full", "slot 7 already holds"),
        (
            "Invalid <storage-element-number> argument '99' to 'load' command\n",
            "no_such_element",
            "no slot 99",
        ),
        (
            "illegal <drive-number> argument '5' to 'load' command\n",
            "no_such_element",
            "no drive 5",
        ),
        (
            "cannot open SCSI device '/dev/sg9' - No such file or directory\n",
            "no_device",
            "/dev/sg9 cannot be opened (No such file or directory)",
        ),
        (
            "mtx: Request Sense: Sense Key=Illegal Request\nMOVE MEDIUM from Element Address "
            "1000 to 1 Failed\n",
            "failed",
            "MOVE MEDIUM from Element Address 1000 to 1 Failed",
        ),
    ],
)
def test_mtx_errors_in_words(output: str, kind: str, words: str) -> None:
    found_kind, sentence = explain_error(output)
    assert found_kind == kind
    assert words in sentence


# --- decisions -----------------------------------------------------------------------------------


def test_unload_goes_back_to_its_source_or_the_first_empty_slot() -> None:
    status = fixture("mtx-status-one-drive.txt")
    assert unload_destination(status, 0, None, "lib") == 3
    assert unload_destination(status, 0, 8, "lib") == 8
    no_source = fixture("mtx-status-two-drives-padded.txt")
    assert unload_destination(no_source, 0, None, "lib") == 2
    with pytest.raises(DriveEmpty, match="drive 1 of lib is empty"):
        unload_destination(no_source, 1, None, "lib")
    with pytest.raises(NoSuchElement, match="no drive 4"):
        unload_destination(no_source, 4, None, "lib")


def test_export_uses_a_mail_slot_when_there_is_one() -> None:
    status = fixture("mtx-status-one-drive.txt")
    plan = plan_export(status, "ABC002L6")
    assert (plan.source_kind, plan.source, plan.destination, plan.emulated) == (
        "slot",
        1,
        10,
        False,
    )
    from_drive = plan_export(status, "ABC001L6")
    assert (from_drive.source_kind, from_drive.source, from_drive.destination) == (
        "drive",
        0,
        10,
    )
    with pytest.raises(NoSuchElement, match="no mail slot 5"):
        plan_export(status, "ABC002L6", slot=5)
    with pytest.raises(CartridgeNotFound, match="tape XYZ is not in the library"):
        plan_export(status, "XYZ")


def test_export_refuses_full_mail_slots_and_a_tape_already_in_one() -> None:
    status = fixture("mtx-status-two-drives-padded.txt")
    with pytest.raises(ElementFull, match=r"mail slot 5 .* already"):
        plan_export(status, "000104L5")
    assert plan_export(status, "000102L5").destination == 6
    full = ChangerStatus(
        drives=(DriveElement(0, False),),
        slots=(SlotElement(1, True, "A1"),),
        import_export=(SlotElement(2, True, "A2", import_export=True),),
    )
    with pytest.raises(ElementFull, match=r"every mail slot .* is full"):
        plan_export(full, "A1")


def test_export_without_mail_slots_is_emulated_in_a_chosen_or_the_last_empty_slot() -> None:
    unread = fixture("mtx-status-no-barcode-reader.txt")
    with pytest.raises(CartridgeNotFound, match="tape X is not in lib"):
        plan_export(unread, "X", name="lib")  # without a barcode reader no tape is found
    library = ChangerStatus(
        drives=(DriveElement(0, True, "T3", source_slot=3),),
        slots=(
            SlotElement(1, True, "T1"),
            SlotElement(2, False),
            SlotElement(3, False),
            SlotElement(4, False),
        ),
    )
    plan = plan_export(library, "T1")
    assert (plan.destination, plan.emulated) == (4, True)
    assert plan_export(library, "T3", slot=2).destination == 2
    with pytest.raises(ElementFull, match=r"slot 1 .* already holds"):
        plan_export(library, "T3", slot=1)


class _Robot:
    """An in-memory stand-in recording the moves asked for (for the pure decision only)."""

    def __init__(self, status: ChangerStatus) -> None:
        self.current = status
        self.moves: list[tuple[str, int, int | None]] = []

    def describe(self) -> str:
        return "robot"

    def status(self) -> ChangerStatus:
        return self.current

    def unload(self, drive: int, slot: int | None = None) -> int:
        self.moves.append(("unload", drive, slot))
        return slot or 0

    def transfer(self, source: int, destination: int) -> None:
        self.moves.append(("transfer", source, destination))


def test_export_moves_and_marks_the_medium_as_leaving() -> None:
    robot = _Robot(fixture("mtx-status-one-drive.txt"))
    places: dict[str, str] = {}
    export_cartridge(robot, "ABC001L6", mark=places.__setitem__)  # type: ignore[arg-type]
    export_cartridge(robot, "ABC004L6", mark=places.__setitem__)  # type: ignore[arg-type]
    assert robot.moves == [("unload", 0, 10), ("transfer", 4, 10)]
    assert places == {"ABC001L6": "shelf", "ABC004L6": "shelf"}
    status = fixture("mtx-status-one-drive.txt")
    # Still where it was exported to: listed; moved elsewhere since (put back): not listed.
    assert to_take_out(status, {"ABC002L6": 1, "ABC003L6": 7}) == [("ABC002L6", 1)]


# --- MtxChanger against the real program -------------------------------------------------------


def test_mtx_changer_names_a_missing_device(tmp_path: Path) -> None:
    mtx = shutil.which("mtx")
    assert mtx, "mtx is needed for this test: apt-get install mtx"
    changer = MtxChanger(str(tmp_path / "sg9"), "serial:TEST", mtx=mtx)
    with pytest.raises(ChangerUnavailable, match=r"cannot be opened") as caught:
        changer.status()
    assert str(tmp_path / "sg9") in caught.value.message
    assert caught.value.code == "changer_unavailable"


def test_mtx_changer_without_mtx_says_how_to_install_it(tmp_path: Path) -> None:
    changer = MtxChanger("/dev/sg1", "serial:TEST", mtx=str(tmp_path / "no-mtx"))
    with pytest.raises(ChangerUnavailable, match=r"apt-get install mtx"):
        changer.load(1, 0)


def test_mtx_changer_refuses_nonsense_numbers_before_running_anything(tmp_path: Path) -> None:
    changer = MtxChanger("/dev/sg1", "serial:TEST", mtx=str(tmp_path / "no-mtx"))
    with pytest.raises(NoSuchElement, match="slot 0"):
        changer.load(0, 0)
    with pytest.raises(NoSuchElement, match="drive -1"):
        changer.load(1, -1)
    with pytest.raises(NoSuchElement, match="slot True"):
        changer.transfer(True, 2)
