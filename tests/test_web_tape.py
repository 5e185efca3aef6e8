"""The Tape screen (Playwright driving Debian's Chromium, headless) against a live uvicorn on
127.0.0.1 with a real virtual library on disk (no mail slot: exports are emulated).

An operator opens Tape from the navigation, sees the library's slots with their barcodes, loads
a cartridge into the drive with the Load dialog (the drive's row then shows it, at the beginning
of the tape), unloads it, exports another one (listed "to be taken out", its place "on the
shelf") and moves it off-site in the media inventory; a viewer sees the same screen without any
control that would move a cartridge.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from api_support import PASSWORDS, LiveServer, bootstrapped_server
from web_support import SCREENSHOTS_ENV, Screenshots, expect, nav, signed_in

from hardware.tape.deck import open_deck
from hardware.tape.jobs import backup_to_tape
from hardware.tape.library import create_virtual_library, register_library

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("web-tape")
    with bootstrapped_server(
        root, keep_env=(SCREENSHOTS_ENV,), device_monitor=False, max_parallel_jobs=1
    ) as live:
        library = create_virtual_library(
            root / "shelf-lib",
            slots=4,
            cartridges=[("WEB001", MiB), ("WEB002", MiB)],
            name="office",
        )
        catalog = live.service.app.catalog
        register_library(catalog, library.root)
        catalog.put_tape_medium("WEB002", state="full", point_count=3)
        yield live


def test_operator_moves_and_exports_cartridges(
    server: LiveServer, browser: Any, tmp_path: Any
) -> None:
    shots = Screenshots(tmp_path / "shots")
    with signed_in(browser, server, "operator", PASSWORDS["operator"]) as page:
        nav(page, "Tape")
        expect(page.get_by_role("heading", level=1)).to_have_text("Tape")
        library = page.get_by_role("region", name="Library office")
        slots = library.get_by_role("table", name="Slots of office")
        expect(slots.locator("tr[data-slot='1']")).to_contain_text("WEB001")
        expect(slots.locator("tr[data-slot='3']")).to_contain_text("Empty")

        page.get_by_role("button", name="Load slot 1 of office").click()
        dialog = page.get_by_role("dialog", name="Load WEB001")
        dialog.get_by_role("button", name="Load").click()
        expect(dialog).to_be_hidden()
        drive = library.locator("tr[data-drive='0']")
        expect(drive).to_contain_text("WEB001")
        expect(drive).to_contain_text("from slot 1")
        expect(drive).not_to_contain_text("At the beginning")  # drives are opened when asked
        page.get_by_role("button", name="Read the drives of office").click()
        expect(drive).to_contain_text("At the beginning")
        expect(slots.locator("tr[data-slot='1']")).to_contain_text("Empty")

        page.get_by_role("button", name="Unload drive 0 of office").click()
        expect(slots.locator("tr[data-slot='1']")).to_contain_text("WEB001")

        page.get_by_role("button", name="Export WEB002").click()
        dialog = page.get_by_role("dialog", name="Take WEB002 out")
        expect(dialog).to_contain_text("no mail slot")
        dialog.get_by_role("button", name="Export").click()
        expect(slots.locator("tr[data-slot='4']")).to_contain_text("To be taken out")
        medium = page.locator("tr[data-medium='WEB002']")
        expect(medium).to_contain_text("office slot 4")
        expect(medium.get_by_label("Place of WEB002")).to_have_value("shelf")
        shots.take(page, "tape")

        medium.get_by_label("Place of WEB002").select_option("offsite")
        expect(page.locator("tr[data-medium='WEB002'][data-place='offsite']")).to_be_visible()
    audit = [a["action"] for a in _audit(server)]
    assert {"tape.load", "tape.unload", "tape.export", "tape.medium.place"} <= set(audit)


def _audit(server: LiveServer) -> list[dict[str, Any]]:
    with server.as_role("admin") as admin:
        return list(admin.get("/api/audit").json())


def test_admin_makes_a_virtual_library_from_the_page(server: LiveServer, browser: Any) -> None:
    with signed_in(browser, server, "admin", PASSWORDS["admin"], path="/#/tape") as page:
        page.get_by_role("button", name="New virtual library…").click()
        dialog = page.get_by_role("dialog", name="New virtual library")
        dialog.get_by_label("Name").fill("lab")
        dialog.get_by_label("Slots", exact=True).fill("3")
        dialog.get_by_label("Cartridges").fill("5")
        dialog.get_by_role("button", name="Create library").click()
        expect(dialog).to_contain_text("5 cartridges do not fit in 3 slots")
        dialog.get_by_label("Cartridges").fill("2")
        dialog.get_by_label("Capacity of each (MiB)").fill("1")
        dialog.get_by_role("button", name="Create library").click()
        expect(dialog).to_be_hidden()
        slots = page.get_by_role("table", name="Slots of lab")
        expect(slots.locator("tr[data-slot='2']")).to_contain_text("LAB002")
        expect(slots.locator("tr[data-slot='4']")).to_contain_text("Mail slot")
    with server.as_role("viewer") as viewer:
        libraries = viewer.get("/api/tape").json()["libraries"]
    assert sorted(lib["identity"] for lib in libraries) == ["virtual:lab", "virtual:office"]


@pytest.mark.slow
def test_a_backup_started_on_the_page_says_which_tape_it_waits_for(
    server: LiveServer, browser: Any, tmp_path: Any
) -> None:
    app = server.service.app
    source = tmp_path / "docs"
    source.mkdir()
    (source / "a.txt").write_text("for the tape")
    app.backup_files(str(source), "docs")
    app.catalog.put_tape_pool("weekly", allocation="continue", retention_days=7)
    empty = create_virtual_library(tmp_path / "empty", slots=2, name="bare")
    register_library(app.catalog, empty.root)
    with signed_in(browser, server, "operator", PASSWORDS["operator"], path="/#/tape") as page:
        jobs = page.get_by_role("region", name="Tape jobs")
        jobs.get_by_role("button", name="Back up to tape…").click()
        dialog = page.get_by_role("dialog", name="Back up to tape")
        dialog.get_by_label("Media pool").select_option("weekly")
        dialog.get_by_label("Drive").select_option("virtual:bare-drive0")
        dialog.get_by_role("button", name="Back up to tape").click()
        expect(dialog).to_be_hidden()
        waiting = jobs.locator("li[data-state='waiting']")
        expect(waiting).to_contain_text("Needs a new tape of pool weekly")
        expect(jobs.get_by_role("link", name="Tape backup to pool weekly")).to_be_visible()
    with server.as_role("admin") as admin:
        for job in admin.get("/api/tape/jobs").json():
            assert admin.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
        assert admin.delete("/api/tape/libraries/bare").status_code == 204


def test_operator_schedules_a_pool_in_words(server: LiveServer, browser: Any) -> None:
    with signed_in(browser, server, "operator", PASSWORDS["operator"], path="/#/tape") as page:
        pools = page.get_by_role("region", name="Media pools")
        pools.get_by_role("button", name="New media pool…").click()
        dialog = page.get_by_role("dialog", name="New media pool")
        dialog.get_by_label("Name").fill("nightly")
        dialog.get_by_label("Back up to this pool by itself").select_option("on")
        dialog.get_by_label("When the pool is written").select_option("daily")
        dialog.get_by_label("At", exact=True).fill("02:30")
        dialog.get_by_label("Drive of the scheduled backups").select_option("virtual:office-drive0")
        dialog.get_by_label("Which points").select_option("gfs")
        dialog.get_by_label("Daily", exact=True).fill("7")
        dialog.get_by_role("button", name="Create pool").click()
        expect(dialog).to_be_hidden()
        row = pools.locator("tr[data-pool='nightly'][data-scheduled='yes']")
        expect(row).to_contain_text("Every day at 02:30")
        expect(row).to_contain_text("the points GFS keeps: 7 daily, 4 weekly")
        row.get_by_role("button", name="Edit pool nightly").click()
        dialog = page.get_by_role("dialog", name="Media pool nightly")
        expect(dialog.get_by_label("When the pool is written")).to_have_value("daily")
        dialog.get_by_label("Back up to this pool by itself").select_option("off")
        dialog.get_by_role("button", name="Save pool").click()
        expect(pools.locator("tr[data-pool='nightly']")).to_contain_text("Only when asked")
    with server.as_role("viewer") as viewer:
        pool = next(p for p in viewer.get("/api/tape/pools").json() if p["name"] == "nightly")
    assert pool["schedule"] is None and pool["points"]["keep_daily"] == 7
    actions = [a for a in _audit(server) if a["action"] == "tape.pool.put"]
    assert [a["details"]["schedule"] for a in actions[:2]] == [None, "30 2 * * *"]  # newest first


@pytest.mark.slow
def test_a_waiting_backup_says_where_its_tape_is(
    server: LiveServer, browser: Any, tmp_path: Any
) -> None:
    app = server.service.app
    source = tmp_path / "far-docs"
    source.mkdir()
    (source / "a.txt").write_text("first")
    first = app.backup_files(str(source), "far-docs").point.id
    app.catalog.put_tape_pool("far", allocation="continue", retention_days=7)
    far = create_virtual_library(
        tmp_path / "far", slots=3, cartridges=[("FAR001", MiB)], name="far"
    )
    register_library(app.catalog, far.root)
    backup_to_tape(app, open_deck(app.catalog, far.drive_identity(0)), "far", [first])
    with server.as_role("operator") as operator:
        r = operator.post("/api/tape/libraries/virtual:far/export", json={"barcode": "FAR001"})
        assert r.status_code == 200, r.text
    (source / "b.txt").write_text("second")
    app.backup_files(str(source), "far-docs")
    with signed_in(browser, server, "operator", PASSWORDS["operator"], path="/#/tape") as page:
        jobs = page.get_by_role("region", name="Tape jobs")
        jobs.get_by_role("button", name="Back up to tape…").click()
        dialog = page.get_by_role("dialog", name="Back up to tape")
        dialog.get_by_label("Media pool").select_option("far")
        dialog.get_by_label("Drive").select_option("virtual:far-drive0")
        dialog.get_by_role("button", name="Back up to tape").click()
        expect(dialog).to_be_hidden()
        waiting = jobs.locator("li[data-state='waiting']")
        expect(waiting).to_contain_text("Needs tape FAR001")
        # Exported (emulated: it sits in slot 3 to be taken out): the job does not load it.
        expect(waiting).to_contain_text("Tape FAR001 is in far slot 3 (exported: to be taken out)")
    with server.as_role("admin") as admin:
        for job in admin.get("/api/tape/jobs").json():
            assert admin.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
        assert admin.delete("/api/tape/libraries/far").status_code == 204


def test_viewer_sees_no_controls(server: LiveServer, browser: Any) -> None:
    with signed_in(browser, server, "viewer", PASSWORDS["viewer"], path="/#/tape") as page:
        library = page.get_by_role("region", name="Library office")
        expect(library.get_by_role("table", name="Slots of office")).to_contain_text("WEB001")
        expect(page.get_by_role("button", name="Load slot 1 of office")).to_have_count(0)
        expect(page.get_by_role("button", name="Check the slots of office")).to_have_count(0)
        expect(page.get_by_role("button", name="Register a virtual library…")).to_have_count(0)
        expect(page.get_by_role("button", name="New virtual library…")).to_have_count(0)
        expect(page.get_by_label("Place of WEB002")).to_have_count(0)
