"""Recovering a lost appliance from its tapes on the page of a fresh one (Playwright driving
Debian's Chromium, headless, against a live uvicorn; api.tape_recovery behind it).

A "lost" appliance wrote a point to a virtual library and its folder was removed; a fresh
appliance has that library registered. Its dashboard, empty, shows the administrator the way to
the Tape screen, where the card "Recover this appliance from tapes" takes a drive and a recovery
key: a wrong (well-formed) key fails in words and changes nothing; the right one reads the store,
restarts the service on it (the page rides out its 503s) and scans the tapes: "Recovered", and
the Points screen lists the lost point. An operator and a viewer never see the card.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import PASSWORDS, LiveServer, bootstrapped_server
from engine_support import text_bytes
from tape_lost import Lost, lost_appliance
from web_support import SCREENSHOTS_ENV, Screenshots, expect, nav, signed_in

from appliance.store.crypto import MasterKey
from hardware.tape.library import register_library

KiB = 1024
MiB = 1024 * KiB
CARD = "Recover this appliance from tapes"
#: The scan after the switch is a job: give the whole run time on a loaded machine.
RECOVERY_MS = 120_000
#: How long the service takes to start on the recovered store here (answering 503 meanwhile).
RESTART_S = 3


@pytest.fixture(scope="module")
def lost(tmp_path_factory: pytest.TempPathFactory) -> Lost:
    root = tmp_path_factory.mktemp("web-lost")
    return lost_appliance(root, {"notes.txt": text_bytes(30 * KiB)}, barcodes=("LST001",))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, lost: Lost) -> Iterator[LiveServer]:
    """A fresh appliance (an empty store) with the lost one's library registered."""
    root = tmp_path_factory.mktemp("web-fresh")
    with bootstrapped_server(root, keep_env=(SCREENSHOTS_ENV,), device_monitor=False) as live:
        register_library(live.service.app.catalog, lost.library)
        yield live


@pytest.mark.parametrize("role", ["operator", "viewer"])
def test_only_an_admin_sees_the_recovery(server: LiveServer, browser: Any, role: str) -> None:
    with signed_in(browser, server, role, PASSWORDS[role], path="/#/tape") as page:
        drives = page.get_by_role("table", name="Drives of lost")
        expect(drives.locator("tr[data-drive='0']")).to_contain_text("LST001")  # left there
        expect(page.get_by_role("region", name=CARD)).to_have_count(0)
        nav(page, "Dashboard")
        expect(page.get_by_text("Nothing is protected yet")).to_be_visible()
        expect(page.get_by_role("link", name="Recover it from its tapes")).to_have_count(0)


def test_admin_recovers_the_lost_appliance_from_its_tapes(
    server: LiveServer, browser: Any, lost: Lost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import api.service

    real = api.service.open_appliance

    def slow_start(*args: Any, **kwargs: Any) -> Any:
        time.sleep(RESTART_S)  # the service answers 503 meanwhile: the page must ride it out
        return real(*args, **kwargs)

    monkeypatch.setattr(api.service, "open_appliance", slow_start)
    shots = Screenshots(tmp_path / "shots")
    with signed_in(browser, server, "admin", PASSWORDS["admin"]) as page:
        hint = page.locator(".dash-recover")
        expect(hint).to_contain_text("Replacing an appliance that was lost?")
        shots.take(page, "dashboard-recover-from-tapes")
        hint.get_by_role("link", name="Recover it from its tapes").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Tape")
        recover = page.get_by_role("region", name=CARD)
        expect(recover).to_contain_text("replaces this appliance's empty store")
        expect(recover).to_contain_text("recovery key")
        shots.take(page, "tape-recover")

        # A well-formed key of another store: read, refused in words, nothing changed.
        recover.get_by_role("button", name="Recover from tapes…").click()
        dialog = page.get_by_role("dialog", name="Recover from tapes")
        dialog.get_by_label("Drive").select_option(lost.drive)
        key = dialog.get_by_label("Recovery key")
        expect(key).to_have_attribute("autocomplete", "off")
        expect(key).to_have_attribute("spellcheck", "false")
        key.fill(MasterKey.generate().recovery_key())
        dialog.get_by_role("button", name="Recover", exact=True).click()
        expect(dialog).to_be_hidden()
        failed = recover.locator("[data-recover-state='failed']")
        expect(failed).to_contain_text("Failed", timeout=RECOVERY_MS)
        expect(failed.get_by_role("alert")).to_contain_text(
            f"The recovery key does not unlock store {lost.store_id}"
        )
        expect(failed).to_contain_text("Nothing was changed")
        shots.take(page, "tape-recover-failed")

        # The right key: read, the service restarts on the recovered store, the tapes scanned.
        recover.get_by_role("button", name="Try again…").click()
        dialog = page.get_by_role("dialog", name="Recover from tapes")
        dialog.get_by_label("Drive").select_option(lost.drive)
        dialog.get_by_label("Recovery key").fill(lost.recovery_key)
        dialog.get_by_role("button", name="Recover", exact=True).click()
        expect(dialog).to_be_hidden()
        switching = recover.locator("[data-recover-state='switching']")
        expect(switching).to_contain_text("Restarting on the recovered store", timeout=RECOVERY_MS)
        done = recover.locator("[data-recover-state='done']")
        expect(done).to_contain_text("Recovered", timeout=RECOVERY_MS)
        expect(done).to_contain_text(f"Recovered store {lost.store_id}: its points are listed")
        expect(done).to_contain_text("restore one from tape")
        expect(done.get_by_role("link", name="tape scan")).to_be_visible()
        # The restart's 503s were ridden out: no error on the screen, no error toast.
        expect(page.locator(".banner-slot .banner-error")).to_have_count(0)
        expect(page.locator(".toast-error")).to_have_count(0)
        shots.take(page, "tape-recover-done")

        # The tape restore dialog is a click away; then the lost point is listed.
        recover.get_by_role("button", name="Restore from tape…").click()
        dialog = page.get_by_role("dialog", name="Restore from tape")
        expect(dialog.get_by_label("Drive")).to_have_value(lost.drive)
        dialog.get_by_role("button", name="Cancel").click()
        expect(dialog).to_be_hidden()
        recover.get_by_role("link", name="Show the recovered points").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Recovery points")
        expect(page.locator(f"tr[data-point='{lost.point}']")).to_contain_text("docs")
    with server.as_role("admin") as admin:
        assert admin.get("/api/recovery-key").json()["store_id"] == lost.store_id
        audit = admin.get("/api/audit").json()
    assert [e for e in audit if e["action"] == "tape.recover"]
    assert lost.recovery_key not in str(audit)
