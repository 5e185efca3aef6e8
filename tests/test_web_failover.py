"""Failover end to end through the web page and through the HTTP API, with real QEMU (TCG here).

A real uvicorn serves the app on 127.0.0.1 over a temporary data directory; the busybox test
guest's disk is registered as a VM asset through the API (its disk, its VM definition, its boot
proof: serial marker plus health page), backed up through the API, and then:

- the page: "Fail over" on the assets screen leads to the session screen, which shows the boot
  proof, the measured RTO, the console picture and the serial console; "Move to local disk",
  "Stop" and "Fail back" (a new recovery point plus the disk written to a new image) run from
  their buttons;
- the API alone: start, poll until proven, the screenshot is a PNG, the guest's health page
  answers through the forwarded port on 127.0.0.1, stop.

The module boots twice (~10-30 s each under TCG). Missing QEMU, Playwright or Chromium FAILS with
the install step. Screenshots go to a temporary folder; with
``APPLIANCE_WEB_SCREENSHOTS=docs/screenshots`` they are copied there as ``failover-*.png``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import (
    ADMIN,
    PASSWORDS,
    LiveServer,
    bootstrapped_server,
    wait_job,
)
from console_support import register_guest
from guest_support import guest_image_path
from web_support import (
    EXPECT_TIMEOUT_MS,
    LAPTOP,
    SCREENSHOTS_ENV,
    TABLET,
    PageWatch,
    add_api_session,
    expect,
    sign_in,
)

from image.boot_proof import png_is_blank
from image.testguest import HEALTH_TEXT, MARKER

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

ASSET = "web"
PROOF = {"serial": MARKER, "http_port": 80, "http_expect": "OK", "timeout": 150}
#: Generous: a TCG boot takes ~8 s on a quiet machine and several times that on a loaded one.
BOOT_TIMEOUT_MS = 180_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest_image() -> str:
    return guest_image_path()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("web-fo"),
        keep_env=(SCREENSHOTS_ENV, "APPLIANCE_TEST_GUEST_CACHE"),
    ) as live:
        yield live


@pytest.fixture(scope="module")
def vm_asset(
    guest_image: str,
    admin: httpx.Client,
    operator: httpx.Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """The test guest as VM asset ``web``: its disk and definition registered, its boot proof
    set, one full backup made, all through the API. ``state`` carries what later tests learn."""
    root = tmp_path_factory.mktemp("web-fo-vm")
    point = register_guest(admin, operator, guest_image, root, proof=PROOF)
    return {"disk": root / "web.raw", "root": root, "point": point, "state": {}}


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    context = browser.new_context(viewport=LAPTOP, locale="en-GB")
    page = context.new_page()
    watch = PageWatch(page, server.url)
    yield page
    context.close()
    watch.check()


def save_screenshots(page: Any, tmp: Path, name: str, *, tablet: bool = True) -> list[Path]:
    """``name``.png at 1280 px (and ``name``-768.png): full page, in ``tmp`` and, when asked
    for, in the docs folder."""
    extra = os.environ.get(SCREENSHOTS_ENV)
    page.evaluate("document.querySelectorAll('.toast').forEach((t) => t.remove())")
    page.evaluate("window.scrollTo(0, 0)")
    taken = []
    for size, suffix in [(LAPTOP, ""), (TABLET, "-768")][: 2 if tablet else 1]:
        page.set_viewport_size(size)
        page.wait_for_timeout(200)
        path = tmp / f"{name}{suffix}.png"
        page.screenshot(path=str(path), full_page=True, animations="disabled", caret="hide")
        taken.append(path)
        if extra:
            Path(extra).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, Path(extra) / path.name)
    page.set_viewport_size(LAPTOP)
    return taken


def fetch_health(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        return str(response.read().decode())


def assert_console_png(data: bytes) -> None:
    assert data.startswith(PNG_MAGIC), data[:16]
    assert not png_is_blank(data), "the console screenshot is a single colour"


# --- the API alone: routes that need no boot ---------------------------------------------------------------


def test_failover_settings_and_serial_routes(
    server: LiveServer,
    admin: httpx.Client,
    viewer: httpx.Client,
    operator: httpx.Client,
    vm_asset: dict[str, Any],
) -> None:
    r = viewer.get(f"/api/assets/{ASSET}/failover-settings")
    assert r.status_code == 200, r.text
    stored = r.json()
    assert stored["proof"]["serial"] == MARKER and stored["proof"]["http_port"] == 80
    assert stored["network"] == {"mode": "isolated", "port_forwards": []}
    # only an admin configures; a bad proof is refused before it is stored
    r = operator.put(f"/api/assets/{ASSET}/failover-settings", json={"proof": {"tcp": 22}})
    assert r.status_code == 403, r.text
    r = admin.put(f"/api/assets/{ASSET}/failover-settings", json={"proof": {"serial": "(["}})
    assert r.status_code == 400 and "bad serial pattern" in r.json()["message"], r.text
    r = admin.put(f"/api/assets/{ASSET}/failover-settings", json={"proof": {"http_port": 0}})
    assert r.status_code == 422, r.text
    assert viewer.get(f"/api/assets/{ASSET}/failover-settings").json() == stored
    assert admin.get("/api/assets/nothing/failover-settings").status_code == 404
    for path in ("/api/failover/nope/serial", "/api/failover/nope/screenshot"):
        r = viewer.get(path)
        assert r.status_code == 404 and r.json()["code"] == "not_found", (path, r.text)
    with server.client() as anonymous:
        assert anonymous.get("/api/failover/nope/serial").status_code == 401


# --- the page --------------------------------------------------------------------------------------------------


def test_fail_over_from_the_page(
    page: Any,
    browser: Any,
    server: LiveServer,
    admin: httpx.Client,
    vm_asset: dict[str, Any],
    tmp_path: Path,
) -> None:
    """Fail over -> session screen -> proof, RTO, console, serial -> Move to local disk -> Stop
    -> Fail back."""
    add_api_session(page, server, *ADMIN)
    page.goto(server.url + "/#/failover")
    expect(page.get_by_text("No failovers yet")).to_be_visible()

    page.goto(server.url + "/#/assets")
    page.get_by_role("button", name=re.compile(f"^Fail over {ASSET}:")).click()
    # the dialog preselects the point (test_web_failover_dialog.py tests it); confirm it
    page.get_by_role("dialog", name=f"Fail over {ASSET}").get_by_role(
        "button", name="Fail over", exact=True
    ).click()
    # the failover screen follows the job and opens the session as soon as it exists
    page.wait_for_url(re.compile(r"#/failover/[^/?]+$"), timeout=60_000)
    session_id = page.url.rsplit("/", 1)[1]
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Failover of {ASSET}")

    state = page.locator(".fo-state")
    expect(state).to_have_text("Running from backup", timeout=BOOT_TIMEOUT_MS)
    info = admin.get(f"/api/failover/{session_id}").json()
    assert info["state"] == "running" and info["live"], info
    assert info["point_id"] == vm_asset["point"]
    rto = info["rto_seconds"]
    assert 0 < rto < PROOF["timeout"]
    # the RTO the page shows is the one measured, click to proof
    expect(page.locator(".fo-rto-value")).to_have_text(f"{rto:.1f} s")
    expect(page.locator(".fo-rto")).to_contain_text("from the click to the boot proof")

    details = page.get_by_role("region", name="Details")
    accel = "KVM" if info["accel"] == "kvm" else "TCG"
    expect(details).to_contain_text(f"Accelerator{accel}")
    expect(details).to_contain_text("Backup: disks read from the store")
    host_port = info["ports"]["80"]
    expect(details).to_contain_text(f"127.0.0.1:{host_port} → guest port 80")
    # the address the VM got, from QEMU's own DHCP (asked through the monitor)
    expect(details).to_contain_text(
        "Address in the VM10.0.2.15given by the appliance's built-in DHCP"
    )
    health = details.get_by_role("link", name=f"http://127.0.0.1:{host_port}/")
    expect(health).to_have_attribute("href", f"http://127.0.0.1:{host_port}/")
    assert fetch_health(host_port).startswith(f"{HEALTH_TEXT} boots=")

    # the console picture: loaded, not blank (the page's <img> and the PNG behind it)
    page.wait_for_function(
        "() => { const i = document.querySelector('img.fo-screen');"
        " return i && !i.hidden && i.complete && i.naturalWidth > 0; }",
        timeout=EXPECT_TIMEOUT_MS,
    )
    src = page.locator("img.fo-screen").get_attribute("src")
    assert src and src.startswith(f"/api/failover/{session_id}/screenshot?t=")
    shot = page.context.request.get(server.url + src)
    assert shot.status == 200 and shot.headers["content-type"] == "image/png"
    assert_console_png(shot.body())
    # ... and refreshed: a new cache-busting query within a few seconds
    page.wait_for_function(
        f"() => document.querySelector('img.fo-screen').getAttribute('src') !== {src!r}",
        timeout=10_000,
    )
    expect(page.locator(".fo-serial")).to_contain_text(MARKER)

    actions = page.get_by_role("region", name="Actions")
    for label in ("Stop", "Move to local disk", "Fail back"):
        expect(actions.get_by_role("button", name=label, exact=True)).to_be_enabled()

    # readable at both widths: nothing wider than the window
    for size in (LAPTOP, TABLET):
        page.set_viewport_size(size)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= size["width"], (size, width)
    page.set_viewport_size(LAPTOP)
    save_screenshots(page, tmp_path, "failover-session")

    # a viewer sees the session but no action it may not take, and is told why
    viewer_context = browser.new_context(viewport=LAPTOP, locale="en-GB")
    try:
        viewer_page = viewer_context.new_page()
        sign_in(viewer_page, server.url, "viewer", PASSWORDS["viewer"])
        viewer_page.goto(f"{server.url}/#/failover/{session_id}")
        viewer_actions = viewer_page.get_by_role("region", name="Actions")
        expect(viewer_actions.get_by_role("button", name="Stop", exact=True)).to_be_disabled()
        expect(viewer_actions.get_by_role("button", name="Fail back")).to_be_disabled()
        expect(viewer_actions).to_contain_text("Not available: Needs the operator role.")
    finally:
        viewer_context.close()

    # Move to local disk: the VM keeps running, no longer on the backup
    actions.get_by_role("button", name="Move to local disk").click()
    page.get_by_role("dialog", name=f"Move {ASSET} to local disk?").get_by_role(
        "button", name="Move to local disk"
    ).click()
    expect(state).to_have_text("Running on local disk", timeout=120_000)
    expect(page.locator(".fo-job[data-kind=failover_migrate]")).to_contain_text(
        "The VM now runs on local disk"
    )
    expect(details).to_contain_text("StorageLocal disk (")
    expect(actions).to_contain_text("Not available: It already runs on local disk.")
    assert fetch_health(host_port).startswith(HEALTH_TEXT)

    # Stop: asked first, then the VM powers down
    actions.get_by_role("button", name="Stop", exact=True).click()
    dialog = page.get_by_role("dialog", name=f"Stop {ASSET}?")
    dialog.get_by_role("button", name="Stop the VM").click()
    expect(page.locator(".fo-job[data-kind=failover_stop]")).to_be_visible()
    expect(state).to_have_text("Stopped", timeout=90_000)
    expect(page.locator(".fo-job[data-kind=failover_stop]")).to_have_attribute(
        "data-state", "succeeded"
    )
    expect(actions.get_by_role("button", name="Stop", exact=True)).to_be_disabled()
    expect(actions).to_contain_text("Not available: The VM is not running.")
    # the RTO stays: it is what the failover measured
    expect(page.locator(".fo-rto-value")).to_have_text(f"{rto:.1f} s")

    # Fail back: a new recovery point, and the disk written to a new image file
    written = server.settings.data_dir / "restores" / "failback.img"  # inside a restore area
    actions.get_by_role("button", name="Fail back").click()
    dialog = page.get_by_role("dialog", name=f"Fail back {ASSET}")
    expect(dialog.get_by_label(re.compile("Make a new recovery point"))).to_be_checked()
    dialog.get_by_text("To a new image file").click()
    dialog.get_by_label("Image file", exact=True).fill(str(written))
    dialog.get_by_role("button", name="Fail back").click()
    job_row = page.locator(".fo-job[data-kind=failover_failback]")
    expect(job_row).to_have_attribute("data-state", "succeeded", timeout=120_000)
    expect(job_row).to_contain_text("Made recovery point")
    expect(job_row).to_contain_text(f"Wrote the disk to {written}.")
    points = admin.get("/api/points", params={"asset": ASSET}).json()
    new = [p for p in points if p["id"] != vm_asset["point"]]
    assert len(new) == 1, points
    expect(job_row.locator("a.mono")).to_have_text(new[0]["id"][:8])
    assert written.stat().st_size == vm_asset["disk"].stat().st_size
    vm_asset["state"]["failback_point"] = new[0]["id"]
    details = page.get_by_role("region", name="Details")
    expect(details).to_contain_text(f"Last failbacknew point {new[0]['id'][:8]}")
    save_screenshots(page, tmp_path, "failover-failback", tablet=False)

    # the list: this session, stopped, with its RTO
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Failover").click()
    row = page.locator(f"tr[data-session='{session_id}']")
    expect(row).to_contain_text("Stopped")
    expect(row).to_contain_text(f"{rto:.1f} s")
    save_screenshots(page, tmp_path, "failover-list", tablet=False)


# --- the API alone -----------------------------------------------------------------------------------------------


def test_fail_over_through_the_api(
    operator: httpx.Client, viewer: httpx.Client, vm_asset: dict[str, Any]
) -> None:
    """Start, poll until proven, screenshot, serial, health page through the forward, stop."""
    r = operator.post(f"/api/assets/{ASSET}/failover", json={})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["Location"] == f"/api/jobs/{job['id']}"
    deadline = time.monotonic() + BOOT_TIMEOUT_MS / 1000
    session: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        sessions = [
            s
            for s in viewer.get("/api/failover", params={"asset": ASSET}).json()
            if s["state"] not in ("stopped",)
        ]
        if sessions:
            session = viewer.get(f"/api/failover/{sessions[0]['id']}").json()
            assert session["state"] != "failed", session
            if session["state"] == "running":
                break
        time.sleep(0.5)
    assert session is not None and session["state"] == "running", session
    done = wait_job(operator, job["id"], timeout=30)
    assert done["state"] == "succeeded" and done["result"]["session"] == session["id"], done
    assert session["rto_seconds"] == done["result"]["rto_seconds"] > 0

    shot = viewer.get(f"/api/failover/{session['id']}/screenshot")
    assert shot.status_code == 200 and shot.headers["content-type"] == "image/png"
    assert_console_png(shot.content)
    serial = viewer.get(f"/api/failover/{session['id']}/serial", params={"max_bytes": 4096})
    assert serial.status_code == 200 and serial.headers["content-type"].startswith("text/plain")
    assert MARKER in serial.text and len(serial.content) <= 4096

    health = fetch_health(session["ports"]["80"])
    assert health.startswith(f"{HEALTH_TEXT} boots="), health
    # Every boot appends to the guest's disk: a point made by the page test's failback holds
    # the first failover's boot, the original backup none.
    failback_point = vm_asset["state"].get("failback_point")
    booted_failback = failback_point is not None and session["point_id"] == failback_point
    assert int(health.split("boots=")[1].split()[0]) == (2 if booted_failback else 1), health

    r = operator.post(f"/api/failover/{session['id']}/stop", json={"discard": True})
    assert r.status_code == 202, r.text
    stopped = wait_job(operator, r.json()["id"], timeout=90)
    assert stopped["state"] == "succeeded", stopped
    final = viewer.get(f"/api/failover/{session['id']}").json()
    assert final["state"] == "stopped" and not final["live"], final
    assert final["details"].get("discarded_at"), final


def test_boot_test_from_the_page(page: Any, server: LiveServer, vm_asset: dict[str, Any]) -> None:
    """ "Boot test" leads to its session too; it proves the boot, then shuts the VM down and
    discards it, which the screen says in words (and offers no action that no longer applies)."""
    add_api_session(page, server, *ADMIN)
    page.goto(server.url + "/#/assets")
    page.get_by_role("button", name=f"Test-boot a point of {ASSET}").click()
    page.get_by_role("dialog", name=f"Boot test of {ASSET}").get_by_role(
        "button", name="Start the boot test"
    ).click()
    page.wait_for_url(re.compile(r"#/failover/[^/?]+$"), timeout=60_000)
    expect(page.get_by_role("heading", level=1)).to_have_text(f"Boot test of {ASSET}")
    expect(page.locator(".fo-state")).to_have_text("Boot test passed", timeout=BOOT_TIMEOUT_MS)
    expect(page.locator(".fo-rto-value")).to_have_text(re.compile(r"^\d+\.\d s$"))
    # the picture kept from the proof is still shown after the VM is gone
    page.wait_for_function(
        "() => { const i = document.querySelector('img.fo-screen');"
        " return i && !i.hidden && i.complete && i.naturalWidth > 0; }",
        timeout=EXPECT_TIMEOUT_MS,
    )
    actions = page.get_by_role("region", name="Actions")
    expect(actions.get_by_role("button", name="Fail back")).to_be_disabled()
    expect(actions).to_contain_text("A boot test's disks are discarded after the test.")
