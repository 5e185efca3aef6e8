"""The tape API against a live uvicorn on 127.0.0.1 with real virtual libraries on disk:
registering a library (admin), the overview (libraries, slots, drives, media), moving
cartridges (operator, audited), refusals in words, export with and without mail slots and the
catalog's place, and the tape jobs queued (jobs do not run here: ``max_parallel_jobs=0``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server

from hardware.tape.library import VirtualLibrary, create_virtual_library

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("tape-api")
    with bootstrapped_server(root, device_monitor=False, max_parallel_jobs=0) as live:
        yield live


@pytest.fixture(scope="module")
def mailslot(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> VirtualLibrary:
    return create_virtual_library(
        tmp_path_factory.mktemp("libs") / "lab",
        slots=4,
        drives=1,
        ie=1,
        cartridges=[("LAB001", MiB), ("LAB002", MiB)],
    )


@pytest.fixture(scope="module")
def plain(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> VirtualLibrary:
    return create_virtual_library(
        tmp_path_factory.mktemp("libs") / "plain", slots=3, cartridges=[("PLN001", MiB)]
    )


def _library(overview: dict[str, Any], identity: str) -> dict[str, Any]:
    return next(lib for lib in overview["libraries"] if lib["identity"] == identity)


def _audit(admin: httpx.Client, action: str) -> list[dict[str, Any]]:
    return [a for a in admin.get("/api/audit").json() if a["action"] == action]


def test_registering_is_for_admins_and_checked(
    admin: httpx.Client,
    operator: httpx.Client,
    viewer: httpx.Client,
    mailslot: VirtualLibrary,
    plain: VirtualLibrary,
    tmp_path: Path,
) -> None:
    body = {"path": str(mailslot.root)}
    assert operator.post("/api/tape/libraries", json=body).status_code == 403
    assert viewer.post("/api/tape/libraries", json=body).status_code == 403
    r = admin.post("/api/tape/libraries", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["identity"] == "virtual:lab"
    r = admin.post("/api/tape/libraries", json=body)
    assert r.status_code == 409 and "registered already" in r.json()["message"]
    r = admin.post("/api/tape/libraries", json={"path": str(tmp_path)})
    assert r.status_code == 409 and "is not a virtual tape library" in r.json()["message"]
    assert admin.post("/api/tape/libraries", json={"path": str(plain.root)}).status_code == 201
    entries = _audit(admin, "tape.library.register")
    assert sorted(e["target"] for e in entries) == ["virtual:lab", "virtual:plain"]
    assert {e["actor"] for e in entries} == {"admin"}


def test_overview_shows_slots_drives_and_mail_slots(
    viewer: httpx.Client, mailslot: VirtualLibrary
) -> None:
    r = viewer.get("/api/tape")
    assert r.status_code == 200, r.text
    lab = _library(r.json(), "virtual:lab")
    assert lab["available"] and lab["kind"] == "virtual" and not lab["emulated_export"]
    assert [(s["number"], s["barcode"], s["import_export"]) for s in lab["slots"]] == [
        (1, "LAB001", False),
        (2, "LAB002", False),
        (3, None, False),
        (4, None, False),
        (5, None, True),
    ]
    assert lab["drives"] == [
        {
            "index": 0,
            "identity": "virtual:lab-drive0",
            "full": False,
            "barcode": None,
            "source_slot": None,
            "busy": False,
            "state": None,
            "problem": None,
        }
    ]
    assert _library(r.json(), "virtual:plain")["emulated_export"] is True
    assert r.json()["drives"] == []  # no st drive on this host


def test_moves_are_for_operators_audited_and_refused_in_words(
    admin: httpx.Client, operator: httpx.Client, viewer: httpx.Client, mailslot: VirtualLibrary
) -> None:
    base = "/api/tape/libraries/virtual:lab"
    assert viewer.post(f"{base}/load", json={"slot": 1, "drive": 0}).status_code == 403
    r = operator.post(f"{base}/load", json={"slot": 1, "drive": 0})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "LAB001 loaded into drive 0"
    drive = r.json()["library"]["drives"][0]
    assert (drive["barcode"], drive["source_slot"], drive["state"]) == ("LAB001", 1, None)
    probed = _library(viewer.get("/api/tape", params={"probe": 1}).json(), "virtual:lab")
    state = probed["drives"][0]["state"]
    assert state["loaded"] and state["at_bot"] and not state["write_protected"]
    held = mailslot.drive(0)  # another opener holds the cartridge: said, not a failure
    try:
        probed = _library(viewer.get("/api/tape", params={"probe": 1}).json(), "virtual:lab")
        assert probed["drives"][0]["problem"] == "in use by another process"
    finally:
        held.close()
    (entry,) = _audit(admin, "tape.load")
    assert (entry["actor"], entry["target"]) == ("operator", "virtual:lab")
    assert entry["details"]["barcode"] == "LAB001"

    r = operator.post(f"{base}/load", json={"slot": 2, "drive": 0})
    assert r.status_code == 409
    assert "drive 0 of virtual library lab already holds LAB001" in r.json()["message"]
    r = operator.post(f"{base}/load", json={"slot": 3, "drive": 0})
    assert r.status_code == 409 and "slot 3 of virtual library lab is empty" in r.json()["message"]
    r = operator.post(f"{base}/transfer", json={"source": 2, "destination": 9})
    assert r.status_code == 404 and "has no slot 9" in r.json()["message"]
    r = operator.post(f"{base}/load", json={"slot": 0, "drive": 0})
    assert r.status_code == 422
    r = operator.post("/api/tape/libraries/virtual:nope/load", json={"slot": 1})
    assert r.status_code == 404 and "no tape library virtual:nope" in r.json()["message"]

    r = operator.post(f"{base}/unload", json={"drive": 0})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "LAB001 unloaded from drive 0 into slot 1"
    r = operator.post(f"{base}/transfer", json={"source": 2, "destination": 4})
    assert r.status_code == 200 and r.json()["message"].startswith("LAB002 moved from slot 2")
    assert mailslot.status().slot(4).barcode == "LAB002"  # type: ignore[union-attr]
    assert [a["details"]["slot"] for a in _audit(admin, "tape.unload")] == [1]
    assert operator.post(f"{base}/inventory").status_code == 200


def test_export_marks_the_medium_and_lists_it_to_take_out(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client, viewer: httpx.Client
) -> None:
    catalog = server.service.app.catalog
    catalog.put_tape_medium("LAB001", state="writable")
    catalog.put_tape_medium("PLN001", state="full")
    r = operator.post("/api/tape/libraries/virtual:lab/export", json={"barcode": "LAB001"})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "LAB001 moved from slot 1 to mail slot 5: take it out"
    r = operator.post("/api/tape/libraries/virtual:plain/export", json={"barcode": "PLN001"})
    assert r.status_code == 200, r.text
    assert r.json()["message"] == "PLN001 moved from slot 1 to slot 3: take it out"
    r = operator.post("/api/tape/libraries/virtual:plain/export", json={"barcode": "NOPE01"})
    assert r.status_code == 404 and "tape NOPE01 is not in virtual library plain" in r.text

    overview = viewer.get("/api/tape").json()
    plain_slots = {s["number"]: s for s in _library(overview, "virtual:plain")["slots"]}
    assert plain_slots[3]["barcode"] == "PLN001" and plain_slots[3]["to_take_out"]
    lab_slots = {s["number"]: s for s in _library(overview, "virtual:lab")["slots"]}
    assert lab_slots[5]["barcode"] == "LAB001" and lab_slots[5]["to_take_out"]
    assert not lab_slots[4]["to_take_out"]
    media = {m["barcode"]: m for m in overview["media"]}
    assert media["PLN001"]["place"] == "shelf" and media["PLN001"]["to_take_out"]
    assert media["PLN001"]["located"] == "plain slot 3"
    assert media["LAB001"]["located"] == "lab mail slot 5"
    assert len(_audit(admin, "tape.export")) == 2

    assert viewer.put("/api/tape/media/PLN001/place", json={"place": "offsite"}).status_code == 403
    r = operator.put("/api/tape/media/PLN001/place", json={"place": "offsite"})
    assert r.status_code == 200 and r.json()["place"] == "offsite"
    assert not r.json()["to_take_out"]  # told where it is: no longer on its way out
    r = operator.post(
        "/api/tape/libraries/virtual:lab/transfer", json={"source": 5, "destination": 1}
    )
    assert r.status_code == 200  # LAB001 put back: not to be taken out any more
    lab = _library(viewer.get("/api/tape").json(), "virtual:lab")
    assert not any(s["to_take_out"] for s in lab["slots"])
    assert operator.put("/api/tape/media/PLN001/place", json={"place": "moon"}).status_code == 422
    r = operator.put("/api/tape/media/ZZZ999/place", json={"place": "shelf"})
    assert r.status_code == 404 and "ZZZ999" in r.json()["message"]
    (entry,) = _audit(admin, "tape.medium.place")
    assert entry["details"] == {**entry["details"], "from": "shelf", "to": "offsite"}


def test_tape_jobs_are_checked_queued_and_listed(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    viewer: httpx.Client,
    tmp_path: Path,
) -> None:
    kinds = viewer.get("/api/tape").json()["job_kinds"]
    assert kinds == ["tape_backup", "tape_restore", "tape_scan", "tape_erase"]
    body = {"drive": "virtual:lab-drive0"}
    assert viewer.post("/api/tape/scan", json=body).status_code == 403
    r = operator.post("/api/tape/scan", json={"drive": "virtual:lab-drive7"})
    assert r.status_code == 404 and "no tape drive virtual:lab-drive7" in r.json()["message"]
    r = operator.post("/api/tape/scan", json=body)
    assert r.status_code == 202, r.text
    scan = r.json()
    assert r.headers["Location"] == f"/api/jobs/{scan['id']}"
    assert (scan["kind"], scan["params"], scan["state"]) == ("tape_scan", body, "queued")

    r = operator.post("/api/tape/backup", json={"pool": "weekly", **body})
    assert r.status_code == 404 and "tape pool 'weekly'" in r.json()["message"]
    server.service.app.catalog.put_tape_pool("weekly", allocation="continue", retention_days=7)
    r = operator.post("/api/tape/backup", json={"pool": "weekly", "points": ["nope"], **body})
    assert r.status_code == 404
    r = operator.post("/api/tape/backup", json={"pool": "weekly", **body})
    assert r.status_code == 202 and r.json()["params"]["points"] == "newest"
    r = operator.post("/api/tape/restore", json={"point": "nope", **body})
    assert r.status_code == 404
    source = tmp_path / "docs"
    source.mkdir()
    (source / "a.txt").write_text("on tape")
    server.service.app.backup_files(str(source), "docs")
    (point,) = server.service.app.catalog.list_points()
    r = operator.post("/api/tape/restore", json={"point": point.id, "path": "a.txt", **body})
    assert r.status_code == 202, r.text
    assert r.json()["params"] == {"point": point.id, "path": "a.txt", **body}

    erase = {"barcode": "LAB002", **body}
    assert operator.post("/api/tape/erase", json=erase).status_code == 403
    r = admin.post("/api/tape/erase", json=erase)
    assert r.status_code == 202 and r.json()["params"] == erase
    listed = [(j["kind"], j["state"]) for j in viewer.get("/api/tape/jobs").json()]
    assert sorted(listed) == [
        ("tape_backup", "queued"),
        ("tape_erase", "queued"),
        ("tape_restore", "queued"),
        ("tape_scan", "queued"),
    ]
    catalog = server.service.app.catalog
    catalog.update_job(scan["id"], state="running")  # as the runner would (it runs none here)
    lab = _library(viewer.get("/api/tape", params={"probe": 1}).json(), "virtual:lab")
    assert lab["drives"][0]["busy"] and lab["drives"][0]["state"] is None  # never opened
    catalog.update_job(scan["id"], state="cancelled")
    (entry,) = _audit(admin, "tape.tape_scan")
    assert entry["details"]["drive"] == "virtual:lab-drive0" and entry["actor"] == "operator"


def test_a_virtual_library_made_in_the_data_directory(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client
) -> None:
    body = {"name": "demo", "slots": 4, "import_export": 1, "cartridges": 3, "capacity_mib": 2}
    assert operator.post("/api/tape/libraries/virtual", json=body).status_code == 403
    r = admin.post("/api/tape/libraries/virtual", json=body)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["identity"] == "virtual:demo"
    assert made["where"] == str(Path(server.service.app.data_dir.path) / "tape" / "demo")
    assert [s["barcode"] for s in made["slots"]] == ["DEMO001", "DEMO002", "DEMO003", None, None]
    assert VirtualLibrary(made["where"]).status().slot(5).import_export  # type: ignore[union-attr]
    r = admin.post("/api/tape/libraries/virtual", json=body)
    assert r.status_code == 409 and "registered already" in r.json()["message"]
    r = admin.post("/api/tape/libraries/virtual", json={**body, "name": "big", "cartridges": 9})
    assert r.status_code == 409 and "do not fit" in r.json()["message"]
    r = admin.post("/api/tape/libraries/virtual", json={**body, "name": "../etc"})
    assert r.status_code == 422
    (entry,) = _audit(admin, "tape.library.create")
    assert entry["details"]["cartridges"] == 3
    assert admin.delete("/api/tape/libraries/demo").status_code == 204


def test_unregistering(
    admin: httpx.Client, operator: httpx.Client, viewer: httpx.Client, plain: VirtualLibrary
) -> None:
    (plain.root / "library.json").rename(plain.root / "moved-away.json")
    (broken,) = [
        lib for lib in viewer.get("/api/tape").json()["libraries"] if lib["name"] == "plain"
    ]
    assert (broken["identity"], broken["available"]) == ("virtual:plain", False)
    assert "library plain: " in broken["problem"] and "has no library.json" in broken["problem"]
    assert operator.delete("/api/tape/libraries/plain").status_code == 403
    assert admin.delete("/api/tape/libraries/plain").status_code == 204
    assert admin.delete("/api/tape/libraries/plain").status_code == 404
    identities = [lib["identity"] for lib in viewer.get("/api/tape").json()["libraries"]]
    assert identities == ["virtual:lab"]


def test_a_real_drive_is_opened_only_when_asked_and_idle(tmp_path: Path) -> None:
    """The st drives udev finds (none can exist on this host): the drive of the record is a
    node that is not there, opened through the real ``open_st``."""
    from api.routers.tape import _drive_public, _Seen
    from hardware.records import TapeDrive

    drive = TapeDrive("serial:HU1234", str(tmp_path / "nst0"), vendor="HP", model="Ultrium 5")
    quiet = _drive_public(drive, _Seen({}, {}))
    assert (quiet.state, quiet.problem, quiet.busy) == (None, None, False)
    probed = _drive_public(drive, _Seen({}, {}, probe=True))
    assert probed.state is None and "does not exist" in (probed.problem or "")
    held = _drive_public(drive, _Seen({}, {"serial:HU1234": "job1"}, probe=True))
    assert held.busy and held.problem is None  # a job holds it: never opened
