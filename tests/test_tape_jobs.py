"""Tape jobs through the job runner and across a kill -9: waiting for a tape by barcode (woken
when it is back in the library), erase refusing a tape still needed, and a tape backup killed
mid-write that leaves a store that verifies and a set catalog that is right after the rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from engine_support import PASSPHRASE, REPO_ROOT, random_bytes, set_engine_env

from appliance.engine import Appliance
from appliance.errors import Conflict, JobWaiting
from appliance.jobs import JobRunner
from hardware.tape.changer import export_cartridge
from hardware.tape.deck import open_deck
from hardware.tape.jobs import backup_to_tape, erase_tape, register_tape_jobs
from hardware.tape.layout import SetCatalog
from hardware.tape.library import (
    STATE_FILE,
    clear_exported,
    create_virtual_library,
    mark_exported,
    register_library,
)
from hardware.tape.reader import read_objects, scan_tape

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


def _until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _setup(
    tmp_path: Path, sizes: dict[str, int], capacity: int = 8 * MiB
) -> tuple[Appliance, str, dict[str, str]]:
    points: dict[str, str] = {}
    app, _ = Appliance.init(str(tmp_path / "data"), PASSPHRASE, pack_size=256 * KiB)
    for i, (asset, size) in enumerate(sizes.items()):
        src = tmp_path / f"src-{asset}"
        src.mkdir()
        (src / "f.bin").write_bytes(random_bytes(size, 50 + i))
        points[asset] = app.backup_files(str(src), asset).point.id
    library = create_virtual_library(
        tmp_path / "lib", slots=4, cartridges=[("JOB001", capacity), ("JOB002", capacity)]
    )
    register_library(app.catalog, library.root)
    app.catalog.put_tape_pool("daily", allocation="continue", retention_days=7)
    return app, library.drive_identity(0), points


def _take_out(lib: Path, barcode: str) -> None:
    """An operator takes the cartridge out of the library (from its drive or its slot)."""
    state = json.loads((lib / STATE_FILE).read_text())
    state["slots"] = {k: (None if v == barcode else v) for k, v in state["slots"].items()}
    state["loaded"] = [None if e and e["barcode"] == barcode else e for e in state["loaded"]]
    (lib / STATE_FILE).write_text(json.dumps(state))


def _put_back(lib: Path, barcode: str) -> None:
    state = json.loads((lib / STATE_FILE).read_text())
    empty = next(k for k, v in state["slots"].items() if v is None)
    state["slots"][empty] = barcode
    (lib / STATE_FILE).write_text(json.dumps(state))


def test_a_job_waits_for_its_tape_by_barcode_and_resumes(tmp_path: Path) -> None:
    app, drive, points = _setup(tmp_path, {"docs": 200 * KiB, "mail": 150 * KiB})
    with app:
        first = backup_to_tape(app, open_deck(app.catalog, drive), "daily", [points["docs"]])
        assert first["tapes"] == ["JOB001"]
        _take_out(tmp_path / "lib", "JOB001")
        register_tape_jobs()
        runner = JobRunner(app)
        runner.start()
        try:
            job = runner.submit(
                "tape_backup", {"pool": "daily", "points": [points["mail"]], "drive": drive}
            )
            _until(lambda: app.catalog.get_job(job.id).state == "waiting")
            waiting = app.catalog.get_job(job.id)
            assert waiting.wait_reason is not None and waiting.wait_reason.startswith(
                "needs tape JOB001"
            )
            _put_back(tmp_path / "lib", "JOB001")
            runner.wake(job.id)
            done = runner.wait(job.id, 30)
            assert done.state == "succeeded", done.error
            assert done.result["points_written"] == [points["mail"]]
            assert done.result["tapes"] == ["JOB001"]  # appended to the set's tape
        finally:
            runner.shutdown()
        record = app.catalog.get_tape_set(first["set"])
        assert sorted(record.catalog["points"]) == sorted(points.values())
        medium = app.catalog.get_tape_medium("JOB001")
        assert medium.point_count == 2 and medium.state == "writable"


@pytest.mark.parametrize("mail_slots", [1, 0])
def test_an_exported_tape_stays_out(tmp_path: Path, mail_slots: int) -> None:
    """Exported (to the mail slot, or emulated: to a storage slot), a tape is on its way out:
    a job starting neither records it back in the library nor loads it from there."""
    app, _drive, points = _setup(tmp_path, {"docs": 100 * KiB, "mail": 100 * KiB})
    library = create_virtual_library(
        tmp_path / "out", slots=3, ie=mail_slots, cartridges=[("OUT001", 8 * MiB)], name="out"
    )
    register_library(app.catalog, library.root)
    drive = library.drive_identity(0)
    with app:
        first = backup_to_tape(app, open_deck(app.catalog, drive), "daily", [points["docs"]])
        assert first["tapes"] == ["OUT001"]
        plan = export_cartridge(
            library, "OUT001", mark=lambda b, place: app.catalog.set_tape_medium_place(b, place)
        )
        mark_exported(app.catalog, "OUT001", library.identity, plan.destination)
        assert plan.emulated == (mail_slots == 0)
        deck = open_deck(app.catalog, drive)
        assert "OUT001" not in deck.library_barcodes()
        with pytest.raises(JobWaiting, match="needs tape OUT001"):
            backup_to_tape(app, deck, "daily", [points["mail"]])
        medium = app.catalog.get_tape_medium("OUT001")
        assert (medium.place, medium.slot) == ("shelf", None)  # not reset to "library"
        status = library.status()
        assert status.drive(0) is not None and not status.drive(0).full  # never loaded
        moved = {s.number: s.barcode for s in status.all_slots() if s.full}
        assert moved == {plan.destination: "OUT001"}
        # Put back on purpose (the mark is cleared): it is the library's again.
        clear_exported(app.catalog, ["OUT001"])
        done = backup_to_tape(app, open_deck(app.catalog, drive), "daily", [points["mail"]])
        assert done["points_written"] == [points["mail"]]
        assert app.catalog.get_tape_medium("OUT001").place == "library"


def test_erase_refuses_a_needed_tape_and_forced_loses_its_copies(tmp_path: Path) -> None:
    app, drive, points = _setup(tmp_path, {"docs": 100 * KiB})
    with app:
        written = backup_to_tape(app, open_deck(app.catalog, drive), "daily", "newest")
        with pytest.raises(Conflict, match="still needed"):
            erase_tape(app, open_deck(app.catalog, drive), "JOB001")
        erased = erase_tape(app, open_deck(app.catalog, drive), "JOB001", force=True)
        assert erased["lost"] == [points["docs"]]
        states = {c.location_id: c.state for c in app.catalog.copies_of(points["docs"])}
        assert states[written["set"]] == "lost"
        medium = app.catalog.get_tape_medium("JOB001")
        assert medium.state == "blank" and medium.media_set_id is None
        deck = open_deck(app.catalog, drive)
        assert scan_tape(deck.bring("JOB001")).verdict == "blank"  # type: ignore[arg-type]
        deck.release()


CHILD = """
import os, signal, sys
from hardware.tape import virtual
from appliance.engine import Appliance
from hardware.tape.deck import open_deck
from hardware.tape.jobs import backup_to_tape

def main():
    data, drive, point, after = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    real = virtual.VirtualDrive.write_block
    count = [0]
    def dying(self, data):
        count[0] += 1
        if count[0] > after:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, data)
    virtual.VirtualDrive.write_block = dying
    with Appliance.open(data, passphrase=os.environ["PW"]) as app:
        backup_to_tape(app, open_deck(app.catalog, drive), "daily", [point])

if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
def test_tape_backup_killed_mid_write_reruns_safely(tmp_path: Path) -> None:
    app, drive, points = _setup(tmp_path, {"docs": 300 * KiB, "mail": 900 * KiB})
    with app:
        first = backup_to_tape(app, open_deck(app.catalog, drive), "daily", [points["docs"]])
        before = app.catalog.get_tape_set(first["set"]).catalog
    env = {**os.environ, "PW": PASSPHRASE, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "data"), drive, points["mail"], "3"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    with Appliance.open(str(tmp_path / "data"), passphrase=PASSPHRASE) as app:
        assert app.verify().ok  # the store never depended on the tape
        # Nothing of the killed session was recorded: the set is as the first session left it.
        assert app.catalog.get_tape_set(first["set"]).catalog == before
        assert {c.point_id for c in app.catalog.copies_at(first["set"], "present")} == {
            points["docs"]
        }
        again = backup_to_tape(app, open_deck(app.catalog, drive), "daily", [points["mail"]])
        assert again["points_written"] == [points["mail"]] and again["tapes"] == ["JOB001"]
        catalog = SetCatalog.from_document(app.catalog.get_tape_set(first["set"]).catalog)
        assert sorted(catalog.points) == sorted(points.values())
        deck = open_deck(app.catalog, drive)
        tape = deck.bring("JOB001")
        assert tape is not None
        assert scan_tape(tape).catalog == catalog  # the newest catalog on tape is the recorded one
        names = [o.name for o in catalog.objects]
        got: list[str] = []
        read_objects(catalog, names, lambda s: tape, lambda o, d: got.append(o.name))  # sha-checked
        assert sorted(got) == sorted(set(names))
        deck.release()


@pytest.mark.slow
def test_bench_tape_phase_runs(tmp_path: Path) -> None:
    """`scripts/bench --phases tape` at its smallest: both ratios and the restore's positions."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "scripts" / "bench"),
            *("--phases", "tape", "--scale", "0.02", "--repeat", "1", "--work", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "virtual drive write >= 0.8x dd" in proc.stdout
    assert "PASS  single-file restore reads only what it needs" in proc.stdout


def test_a_new_set_reuses_an_expired_tape_and_loses_its_old_copies(tmp_path: Path) -> None:
    app, drive, points = _setup(tmp_path, {"docs": 100 * KiB, "mail": 80 * KiB}, capacity=4 * MiB)
    with app:
        app.catalog.put_tape_pool("daily", allocation="new_set", retention_days=7)
        first = backup_to_tape(app, open_deck(app.catalog, drive), "daily", [points["docs"]])
        second = backup_to_tape(app, open_deck(app.catalog, drive), "daily", [points["mail"]])
        assert first["tapes"] == ["JOB001"] and second["tapes"] == ["JOB002"]  # blank first
        assert app.catalog.get_tape_set(first["set"]).closed_at is not None
        # Every tape now holds a point within its retention with no other verified copy.
        with pytest.raises(JobWaiting, match="needs a new tape of pool daily"):
            backup_to_tape(app, open_deck(app.catalog, drive), "daily", [points["docs"]])
        app.catalog.put_tape_pool("daily", allocation="new_set", retention_days=0)
        third = backup_to_tape(app, open_deck(app.catalog, drive), "daily", [points["docs"]])
        # The oldest closed set's tape is written over; its copy there is lost.
        assert third["tapes"] == ["JOB001"] and third["set"] not in (first["set"], second["set"])
        states = {c.location_id: c.state for c in app.catalog.copies_of(points["docs"])}
        assert states[first["set"]] == "lost" and states[third["set"]] == "present"
        medium = app.catalog.get_tape_medium("JOB001")
        assert medium.media_set_id == third["set"] and medium.sequence == 1
