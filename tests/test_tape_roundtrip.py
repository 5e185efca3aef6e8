"""The whole way: back up, write a media set across two small virtual tapes, wipe the data
directory, scan the tapes on a fresh appliance with the recovery key, restore byte-exact.

Real parts throughout: the engine, its store and catalog, the file-backed virtual library and
drive (hardware.tape.library / virtual), and the tape layout as written. A single-file restore
counts the tape positions it touched (locates, rewinds, spaces) and reads only the files that
hold what the file needs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from engine_support import (
    PASSPHRASE,
    compare_trees,
    digest,
    random_bytes,
    run_cli,
    set_engine_env,
    snapshot,
    text_bytes,
    write_sparse,
)

from appliance.engine import Appliance
from appliance.errors import ApplianceError, JobWaiting
from appliance.store.crypto import MasterKey
from hardware.tape.deck import library_deck, open_deck
from hardware.tape.jobs import backup_to_tape
from hardware.tape.library import VirtualLibrary, create_virtual_library, register_library
from hardware.tape.restore import restore_from_tape
from hardware.tape.scan import scan_tapes, seed_store_from_tape
from hardware.tape.virtual import VirtualCartridge

KiB = 1024
MiB = 1024 * KiB
TAPE = int(2.5 * MiB)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


def _tree(root: Path) -> None:
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "one.bin").write_bytes(random_bytes(600 * KiB, 1))
    (root / "a" / "notes.txt").write_bytes(text_bytes(40 * KiB))
    (root / "b" / "big.bin").write_bytes(random_bytes(1400 * KiB, 2))
    for i in range(5):
        (root / "b" / f"small{i}.bin").write_bytes(random_bytes(3 * KiB, 10 + i))


@pytest.mark.slow
def test_round_trip_across_two_tapes_to_a_fresh_appliance(tmp_path: Path) -> None:
    source = tmp_path / "src"
    _tree(source)
    disk = tmp_path / "disk0.img"
    write_sparse(disk, 2 * MiB, {0: random_bytes(512 * KiB, 3), MiB: random_bytes(256 * KiB, 4)})
    lib_dir = tmp_path / "lib"
    create_virtual_library(
        lib_dir, slots=4, cartridges=[("TAPE01", TAPE), ("TAPE02", TAPE), ("TAPE03", TAPE)]
    )
    first = tmp_path / "first"
    app, recovery = Appliance.init(str(first), PASSPHRASE, pack_size=256 * KiB)
    with app:
        tree_point = app.backup_files(str(source), "docs").point.id
        image_point = app.backup_image([str(disk)], "vm1").point.id
        library = register_library(app.catalog, lib_dir)
        app.catalog.put_tape_pool("weekly", allocation="continue", retention_days=30)
        deck = open_deck(app.catalog, library.drive_identity(0))
        written = backup_to_tape(app, deck, "weekly", "newest", verify=True)
        assert sorted(written["points_written"]) == sorted([tree_point, image_point])
        # Two small tapes: the set spans them, the first was filled at its early warning.
        assert written["tapes"] == ["TAPE01", "TAPE02"]
        assert written["tapes_filled"] == ["TAPE01"]
        media = {m.barcode: m for m in app.catalog.list_tape_media()}
        assert media["TAPE01"].state == "full" and media["TAPE02"].state == "writable"
        assert media["TAPE03"].state == "blank"
        set_id = written["set"]
        assert app.catalog.get_location(set_id).kind == "tape_set"
        on_set = app.catalog.copies_at(set_id, "present")
        assert {c.point_id for c in on_set} == {tree_point, image_point}
        assert all(c.verified_at is not None for c in on_set)  # read back from both tapes
        # Written again: nothing new goes to tape.
        again = backup_to_tape(app, open_deck(app.catalog, library.drive_identity(0)), "weekly")
        assert again["points_written"] == [] and sorted(again["skipped"]) == sorted(
            written["points"]
        )
    expected_tree = snapshot(source)
    shutil.rmtree(first)  # the appliance is gone; the tapes and the recovery key are left

    fresh = tmp_path / "fresh"
    seeded = seed_store_from_tape(str(fresh), library_deck(VirtualLibrary(lib_dir)))
    assert seeded["seeded"] is True
    with Appliance.open(str(fresh), recovery_key=recovery) as app:
        register_library(app.catalog, lib_dir)
        deck = library_deck(VirtualLibrary(lib_dir))
        scanned = scan_tapes(app, deck)
        (found,) = scanned["sets"]
        assert found["set"] == set_id and found["points_added"] == 2
        assert sorted(found["points"]) == sorted([tree_point, image_point])
        assert {m.barcode: m.state for m in app.catalog.list_tape_media()} == {
            "TAPE01": "full",
            "TAPE02": "writable",
            "TAPE03": "blank",
        }

        # Before anything is read back, a restore says where the data is, in words.
        with pytest.raises(ApplianceError, match="on tape: restore the point from tape first"):
            app.restore(image_point, str(tmp_path / "too-early.img"))
        # One file: only what it needs is read from tape, into the set's mirror.
        one = restore_from_tape(app, deck, tree_point, subpath="a/one.bin")
        assert one["home"] is False and one["objects_read"] >= 1
        listed = app.catalog.get_tape_set(set_id).catalog["points"][tree_point]
        data_packs = [n for n in listed if n.startswith("data/")]
        assert one["objects_read"] < len(data_packs)  # only the packs holding a/one.bin
        assert one["locates"] <= one["objects_read"] + 2
        print(f"single-file restore: {one['positions']} tape positions, {one['locates']} locates")
        target = tmp_path / "one"
        app.restore(tree_point, str(target), subpath="a/one.bin", location=one["read_from"])
        assert digest(target / "one.bin") == digest(source / "a" / "one.bin")

        # Whole points come back into the home pool; the normal restore then works.
        for point in (tree_point, image_point):
            back = restore_from_tape(app, deck, point)
            assert back["home"] is True
        out = tmp_path / "out"
        app.restore(tree_point, str(out))
        compare_trees(expected_tree, snapshot(out), ignore_root=True)
        app.restore(image_point, str(tmp_path / "disk.out"))
        assert digest(tmp_path / "disk.out") == digest(disk)
        assert app.verify().ok


def test_write_protected_tape_is_passed_over_and_the_job_waits(tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "d").mkdir(parents=True)
    (source / "d" / "f.bin").write_bytes(random_bytes(64 * KiB, 5))
    lib_dir = tmp_path / "lib"
    library = create_virtual_library(lib_dir, slots=3, cartridges=[("WP0001", TAPE)])
    VirtualCartridge.set_write_protected(library.cartridge_path("WP0001"), True)
    app, _ = Appliance.init(str(tmp_path / "data"), PASSPHRASE)
    with app:
        point = app.backup_files(str(source), "docs").point.id
        register_library(app.catalog, lib_dir)
        app.catalog.put_tape_pool("weekly")
        deck = open_deck(app.catalog, library.drive_identity(0))
        with pytest.raises(JobWaiting, match="needs a new tape of pool weekly"):
            backup_to_tape(app, deck, "weekly", [point])
        medium = app.catalog.get_tape_medium("WP0001")
        assert medium.write_protected and medium.state == "blank"
        # A blank tape inserted into the library: the next run writes it without asking.
        library.add_cartridge("NEW001", TAPE)
        done = backup_to_tape(
            app, open_deck(app.catalog, library.drive_identity(0)), "weekly", [point]
        )
        assert done["tapes"] == ["NEW001"] and done["points_written"] == [point]
        assert os.path.getsize(library.cartridge_path("WP0001")) == 4096  # untouched
        # The set's tape protected since: the set goes on on another tape, this one is left alone.
        (source / "d" / "h.bin").write_bytes(random_bytes(64 * KiB, 6))
        second = app.backup_files(str(source), "docs").point.id
        VirtualCartridge.set_write_protected(library.cartridge_path("NEW001"), True)
        size = os.path.getsize(library.cartridge_path("NEW001"))
        library.add_cartridge("NEW002", TAPE)
        more = backup_to_tape(
            app, open_deck(app.catalog, library.drive_identity(0)), "weekly", [second]
        )
        assert more["set"] == done["set"] and more["tapes"] == ["NEW001", "NEW002"]
        assert os.path.getsize(library.cartridge_path("NEW001")) == size
        assert app.catalog.get_tape_medium("NEW001").state == "full"


@pytest.mark.slow
def test_the_command_line_round_trip(tmp_path: Path) -> None:
    """`tape pools`, `tape backup`, a wiped data directory, `tape scan --library` with only the
    recovery key, `tape restore`, then the normal `restore`."""
    source = tmp_path / "src"
    (source / "d").mkdir(parents=True)
    (source / "d" / "f.bin").write_bytes(random_bytes(300 * KiB, 7))
    (source / "d" / "g.txt").write_bytes(text_bytes(20 * KiB))
    lib = tmp_path / "lib"
    create_virtual_library(lib, slots=2, cartridges=[("CLI001", 8 * MiB)])
    data = tmp_path / "data"
    app, recovery = Appliance.init(str(data), PASSPHRASE)
    with app:
        point = app.backup_files(str(source), "docs").point.id
    run_cli("tape", "pools", "--pool", "weekly", "--allocation", "new_set", data_dir=data)
    out = run_cli(
        "--json", "tape", "backup", "--pool", "weekly", "--library", str(lib), data_dir=data
    )
    assert json.loads(out.stdout)["points_written"] == [point]
    media = json.loads(run_cli("--json", "tape", "media", data_dir=data).stdout)
    assert [(m["barcode"], m["state"], m["point_count"]) for m in media] == [
        ("CLI001", "writable", 1)
    ]
    shutil.rmtree(data)
    # A wrong key is found on the tapes' index before anything is written.
    wrong = {"APPLIANCE_RECOVERY_KEY": MasterKey.generate().recovery_key()}
    refused = run_cli(
        "tape",
        "scan",
        "--library",
        str(lib),
        data_dir=data,
        passphrase=None,
        env=wrong,
        check=False,
    )
    assert refused.returncode != 0
    assert b"does not unlock store" in refused.stderr, refused.stderr
    assert not (data / "pools" / "default" / "store" / "config").exists()
    key = {"APPLIANCE_RECOVERY_KEY": recovery}
    scanned = run_cli(
        "--json", "tape", "scan", "--library", str(lib), data_dir=data, passphrase=None, env=key
    )
    document = json.loads(scanned.stdout)
    assert document["seeded"] is True and document["sets"][0]["points_added"] == 1
    back = run_cli(
        "--json",
        "tape",
        "restore",
        point,
        "--library",
        str(lib),
        data_dir=data,
        passphrase=None,
        env=key,
    )
    assert json.loads(back.stdout)["home"] is True
    run_cli("restore", point, str(tmp_path / "out"), data_dir=data, passphrase=None, env=key)
    assert digest(tmp_path / "out" / "d" / "f.bin") == digest(source / "d" / "f.bin")
