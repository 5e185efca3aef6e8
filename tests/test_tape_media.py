"""Media rules (hardware.tape.media), the tape catalog tables (appliance.catalog.tape), and the
writer/reader on the real file-backed virtual drive: spanning at early warning and at the
physical end, appending after the recorded catalog, scanning a tape a crash left behind."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from catalog_support import point
from engine_support import random_bytes

from appliance.catalog import Catalog
from appliance.errors import Conflict, InvalidInput, NotFound
from hardware.tape.drive import Drive
from hardware.tape.layout import BLOCK_SIZE, SetCatalog, TapeLabel
from hardware.tape.media import PointOnTape, allocate, label_action, may_overwrite
from hardware.tape.reader import CountingDrive, read_objects, scan_tape
from hardware.tape.virtual import VirtualCartridge, VirtualDrive
from hardware.tape.writer import SetWriter, read_label, write_label

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
STORE = "0123456789abcdef"


# --- pure rules ---------------------------------------------------------------------------------


def test_overwrite_only_when_every_point_expired_or_kept_elsewhere() -> None:
    old = NOW - timedelta(days=40)
    fresh = NOW - timedelta(days=5)
    assert may_overwrite([PointOnTape("p1", old, False)], 30, NOW).allowed
    assert may_overwrite([PointOnTape("p2", fresh, True)], 30, NOW).allowed
    refused = may_overwrite(
        [PointOnTape("p1", old, False), PointOnTape("p3", fresh, False)], 30, NOW
    )
    assert not refused.allowed and "p3" in refused.reason and "2026-12-30" in refused.reason
    assert may_overwrite([], 30, NOW).allowed


def test_labels_foreign_or_unreadable_tapes_need_an_erase() -> None:
    assert label_action("blank").action == "label"
    assert label_action("ours").action == "use"
    for verdict in ("foreign", "unreadable"):
        refused = label_action(verdict)
        assert refused.action == "refuse" and "erase" in refused.reason
        assert label_action(verdict, erase_requested=True).action == "label"


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    with Catalog.open(f"sqlite:///{tmp_path}/catalog.sqlite", clock=lambda: NOW) as cat:
        cat.ensure_store(STORE, "pool", str(tmp_path / "store"))
        yield cat


def test_catalog_tables_and_allocation(catalog: Catalog) -> None:
    pool = catalog.put_tape_pool("weekly", allocation="continue", retention_days=30)
    with pytest.raises(InvalidInput, match="allocation"):
        catalog.put_tape_pool("bad", allocation="sometimes")
    with pytest.raises(NotFound, match="TAPE09"):
        catalog.get_tape_medium("TAPE09")
    catalog.put_tape_medium("B00001", place="shelf")
    catalog.put_tape_medium("A00001")
    with pytest.raises(InvalidInput, match="tape place"):
        catalog.set_tape_medium_place("A00001", "moon")
    # No set yet: the library's blank tape starts one (the shelf's would need fetching).
    first = allocate(pool, [], catalog.list_tape_media(), set())
    assert (first.kind, first.barcode, first.sequence) == ("new", "A00001", 1)
    catalog.put_tape_set("s1", pool="weekly", store_id=STORE, catalog={"generation": 2})
    catalog.put_tape_medium(
        "A00001", pool="weekly", media_set_id="s1", sequence=1, state="writable"
    )
    sets, media = catalog.list_tape_sets("weekly"), catalog.list_tape_media()
    assert allocate(pool, sets, media, set()).kind == "append"
    catalog.put_tape_medium("A00001", state="full")
    joined = allocate(pool, sets, catalog.list_tape_media(), set())
    assert (joined.kind, joined.barcode, joined.sequence, joined.media_set_id) == (
        "new",
        "B00001",
        2,
        "s1",
    )
    catalog.put_tape_medium("B00001", write_protected=True)
    need = allocate(pool, sets, catalog.list_tape_media(), set())
    assert need.kind == "need" and "needs a new tape of pool weekly" in need.reason
    # An older catalog never replaces a newer one (a scan that finds an old tape first).
    catalog.put_tape_set("s1", pool="weekly", store_id=STORE, catalog={"generation": 1})
    assert catalog.get_tape_set("s1").catalog == {"generation": 2}
    moved = catalog.set_tape_medium_place("A00001", "offsite", 3)
    assert moved.place == "offsite" and moved.slot is None


def test_a_pool_is_deleted_only_once_nothing_is_left_in_it(catalog: Catalog) -> None:
    with pytest.raises(NotFound, match="tape pool 'gone' does not exist"):
        catalog.delete_tape_pool("gone")
    catalog.put_tape_pool("weekly", retention_days=30)
    catalog.set_tape_pool_schedule(
        "weekly", schedule="0 3 * * 6", drive="virtual:lab-drive0", points_rule={"rule": "newest"}
    )
    catalog.put_tape_set("s1", pool="weekly", store_id=STORE)
    catalog.add_location(STORE, "tape_set", "s1", location_id="s1")
    catalog.add_point(point("00000000000000aa"), STORE)
    catalog.set_copy("00000000000000aa", "s1", "present")
    catalog.put_tape_medium("A00001", pool="weekly", media_set_id="s1", sequence=1)
    with pytest.raises(Conflict, match="pool weekly still has 1 tape\\(s\\): erase them"):
        catalog.delete_tape_pool("weekly")
    # The tape erased (as erase_tape leaves it), but the catalog still says a copy is there.
    catalog.put_tape_medium("A00001", pool=None, media_set_id=None, sequence=None)
    with pytest.raises(Conflict, match="pool weekly still has 1 media set\\(s\\) holding"):
        catalog.delete_tape_pool("weekly")
    assert catalog.get_tape_pool("weekly").schedule == "0 3 * * 6"  # a refusal changes nothing
    catalog.set_copy("00000000000000aa", "s1", "lost")
    catalog.put_tape_pool("other")
    catalog.put_tape_set("s2", pool="other", store_id=STORE)

    catalog.delete_tape_pool("weekly")
    assert [p.name for p in catalog.list_tape_pools()] == ["other"]
    with pytest.raises(NotFound):
        catalog.get_tape_pool("weekly")
    assert catalog.list_tape_sets("weekly") == []  # its emptied set went with it
    assert [s.id for s in catalog.list_tape_sets()] == ["s2"]
    assert [c.state for c in catalog.copies_at("s1")] == ["lost"]  # history stays
    assert catalog.get_tape_medium("A00001").pool is None
    # A new pool of the same name starts afresh, without the old schedule or sets.
    again = catalog.put_tape_pool("weekly")
    assert again.schedule is None and again.retention_days == 365


# --- writer and reader on the virtual drive -------------------------------------------------------


def _cartridge(tmp_path: Path, barcode: str, capacity: int, early: int) -> Path:
    path = tmp_path / f"{barcode}.tape"
    VirtualCartridge.create(path, capacity=capacity, early_warning=early, barcode=barcode)
    return path


def _label(barcode: str, sequence: int) -> TapeLabel:
    return TapeLabel(
        f"label-{barcode}", barcode, "weekly", "set1", sequence, STORE, NOW.isoformat()
    )


def _objects() -> dict[str, bytes]:
    found = {"config": b'{"format": 1}\n'}
    for i in range(6):
        data = random_bytes(300 * 1024 + i, 100 + i)
        found[f"data/{i:02x}/{hashlib.sha256(data).hexdigest()}"] = data
    found["manifests/00000000000000aa"] = b"m" * 100
    return found


@pytest.mark.parametrize("early", [200 * 1024, 0], ids=["early-warning", "physical-end"])
def test_a_set_spans_tapes_and_reads_back(tmp_path: Path, early: int) -> None:
    paths = [_cartridge(tmp_path, f"T{i}", 1024 * 1024, early) for i in (1, 2, 3, 4)]
    drive = VirtualDrive("d0")
    drive.load(paths[0])
    write_label(drive, _label("T1", 1))
    objects = _objects()

    def next_tape(sequence: int) -> tuple[Drive, TapeLabel]:
        drive.unload()
        drive.load(paths[sequence - 1])
        label = _label(f"T{sequence}", sequence)
        write_label(drive, label)
        return drive, label

    writer = SetWriter(
        drive, _label("T1", 1), SetCatalog("set1", STORE, "weekly", 0, ""), next_tape
    )
    names = list(objects)
    writer.write_objects(names, [len(objects[n]) for n in names], objects.__getitem__)
    writer.add_point("00000000000000aa", names)
    result = writer.finish()
    catalog = result.catalog
    assert len(catalog.media) >= 2 and result.filled
    assert {o.name for o in catalog.objects} == set(names)  # every object complete somewhere
    if early:
        assert result.catalogs_written == len(catalog.media)  # one on every tape
    drive.unload()

    read: dict[str, bytes] = {}

    def tape_for(sequence: int) -> Drive:
        if not drive.unloaded:
            drive.unload()
        drive.load(paths[sequence - 1])
        return drive

    read_objects(catalog, names, tape_for, lambda o, d: read.__setitem__(o.name, d))
    assert read == objects
    # The last tape's newest catalog is found by a scan; an early-warning tape has its own too.
    last = scan_tape(drive)
    assert (
        last.catalog == catalog
        and last.label is not None
        and last.label.sequence == len(catalog.media)
    )
    drive.close()


def test_append_overwrites_the_old_catalog_and_a_crash_is_harmless(tmp_path: Path) -> None:
    path = _cartridge(tmp_path, "A1", 4 * 1024 * 1024, 64 * 1024)
    drive = VirtualDrive("d0")
    drive.load(path)
    label = _label("A1", 1)
    write_label(drive, label)
    first = SetWriter(drive, label, SetCatalog("set1", STORE, "weekly", 0, ""), _no_more)
    first.write_objects(["config"], [3], lambda n: b"cfg")
    first.add_point("p1", ["config"])
    one = first.finish().catalog
    # A second session that dies after a data file, before its catalog (kill -9: no filemark).
    crashed = SetWriter(drive, label, one, _no_more)
    crashed.write_objects(["index/aa"], [BLOCK_SIZE + 5], lambda n: b"i" * (BLOCK_SIZE + 5))
    drive.write_block(b"half a file")
    drive.close()  # st writes a filemark on close; the scan must not be fooled either way
    drive = VirtualDrive("d0")
    drive.load(path)
    scanned = scan_tape(drive)
    assert scanned.catalog == one and scanned.data_files >= 1
    # The next session appends after what the recorded catalog lists: the crashed files go.
    again = SetWriter(drive, label, one, _no_more)
    again.write_objects(["manifests/p2"], [2], lambda n: b"m2")
    again.add_point("p2", ["config", "manifests/p2"])
    two = again.finish().catalog
    assert two.generation == one.generation + 1 and set(two.points) == {"p1", "p2"}
    counting = CountingDrive(drive)
    got: dict[str, bytes] = {}
    read_objects(
        two, ["manifests/p2", "config"], lambda s: counting, lambda o, d: got.__setitem__(o.name, d)
    )
    assert got == {"config": b"cfg", "manifests/p2": b"m2"}
    assert counting.locates == 2  # config, then the manifest a file further on
    assert scan_tape(drive).catalog == two
    assert read_label(drive)[0] == "ours"
    drive.close()


def _no_more(sequence: int) -> tuple[Drive, TapeLabel]:
    raise AssertionError("this session must fit one tape")
