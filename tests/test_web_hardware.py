"""The Storage screens (Playwright driving Debian's Chromium, headless) against a live uvicorn on
127.0.0.1 whose device monitor rescans every half second, on real loop devices.

The issue's "done when", from the page: an administrator builds a btrfs raid1 pool from two loop
disks (the Create pool dialog, a job with its progress, the pool's card "Healthy" with its two
disks); initialises a USB disk offered on the page; pulls it and plugs it in again, and sees the
export start by itself and the disk declared "safe to remove"; then a fresh data directory
restores a file from that disk (``appliance usb import`` + ``restore --from``, the command line).

The "USB disk" is a loop device of an image file; the service's test-only overlay
(``Settings.test_usb_overlay``) gives it the udev properties recorded from a real USB stick
(``tests/usb_support.py``: ``block/sda`` of the usb-storage recording), run through discovery's
own converter. Plugging in is ``losetup``, pulling is ``losetup -d``: the monitor's rescans see
the device come and go (no udevd runs on the test host; with udevd its events would trigger the
same rescans). Every loop device is detached and every mount below the module's folder
unmounted afterwards.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from api_support import ADMIN, PASSWORDS, LiveServer, bootstrapped_server, login
from engine_support import digest, run_cli
from usb_support import LoopDisk, mounts_below, recorded_device, unmount_below, until
from web_support import LAPTOP, SCREENSHOTS_ENV, PageWatch, Screenshots, expect

GIB = 1 << 30

pytestmark = pytest.mark.root


class Site:
    """The module's server, its folder, and the loop devices it attached (detached at the end)."""

    def __init__(self, server: LiveServer, root: Path) -> None:
        self.server = server
        self.root = root
        self.images: list[Path] = []
        self.usb = LoopDisk(root / "offsite-a.img")
        self.images.append(self.usb.image)

    def pool_disk(self, name: str) -> str:
        path = self.root / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(GIB)
        self.images.append(path)
        return subprocess.run(
            ["losetup", "--find", "--show", str(path)], check=True, capture_output=True, text=True
        ).stdout.strip()

    def cleanup(self) -> None:
        for path in self.images:
            out = subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True)
            for line in out.stdout.splitlines():
                devnode = line.split(":", 1)[0]
                subprocess.run(
                    ["btrfs", "device", "scan", "--forget", devnode], capture_output=True
                )
                subprocess.run(["losetup", "-d", devnode], capture_output=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("web-hardware")
    overlay = root / "usb-overlay.json"
    found: Site | None = None
    try:
        with bootstrapped_server(
            root,
            keep_env=(SCREENSHOTS_ENV,),
            device_monitor_interval=0.5,
            test_usb_overlay=overlay,
        ) as live:
            found = Site(live, root)
            # The loop device of offsite-a.img is the recorded USB stick, wherever it attaches.
            overlay.write_text(json.dumps({str(found.usb.image): recorded_device()}))
            yield found
    finally:
        unmount_below(root)
        if found is not None:
            found.cleanup()
        assert not mounts_below(root)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    return Screenshots(tmp_path_factory.mktemp("screenshots"))


def signed_in(browser: Any, server: LiveServer, name: str, password: str) -> tuple[Any, PageWatch]:
    context = browser.new_context(viewport=LAPTOP, locale="en-GB")
    page = context.new_page()
    watch = PageWatch(page, server.url)
    with server.client() as c:
        login(c, name, password)
        cookies = [{"name": n, "value": v, "url": server.url} for n, v in c.cookies.items()]
    context.add_cookies(cookies)
    page.goto(server.url + "/")
    expect(page.locator(".user-name")).to_have_text(name)
    return page, watch


def tab(page: Any, name: str) -> None:
    """Open one of the Storage area's tabs (Pools, Disks, USB disks)."""
    storage = page.get_by_role("navigation", name="Storage")
    storage.get_by_role("link", name=name, exact=True).click()


def seen_by_service(server: LiveServer, devnode: str) -> None:
    with server.as_role("viewer") as viewer:
        until(
            lambda: devnode in {d["devnode"] for d in viewer.get("/api/disks").json()["disks"]}, 20
        )


def test_a_pool_from_two_disks_and_a_usb_disk_rotated_then_restored_on_a_fresh_appliance(
    browser: Any, site: Site, shots: Screenshots
) -> None:
    server = site.server
    source = site.root / "docs"
    source.mkdir()
    for i in range(3):
        (source / f"report-{i}.txt").write_bytes(os.urandom(30_000))
    point = server.service.app.backup_files(str(source), "docs").point.id
    page, watch = signed_in(browser, server, *ADMIN)

    # --- a pool from two disks ---
    first, second = site.pool_disk("pool-a"), site.pool_disk("pool-b")
    seen_by_service(server, second)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Pools").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Storage")
    default = page.locator(".pool").filter(has=page.get_by_role("heading", name="default"))
    if os.stat(server.settings.data_dir).st_dev == os.stat("/").st_dev:
        expect(default).to_contain_text("Shares the system disk")
    page.get_by_role("button", name="Create pool").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Pool name").fill("mirror")
    dialog.get_by_label(re.compile(f"^Disk {first} ")).check()
    dialog.get_by_label(re.compile(f"^Disk {second} ")).check()
    expect(dialog.get_by_label("Layout")).to_have_value("btrfs:raid1")
    expect(dialog).to_contain_text("the pool keeps working when one disk fails")
    dialog.get_by_role("button", name="Create pool").click()
    expect(dialog.get_by_role("alert")).to_contain_text("Tick the box to confirm")
    dialog.get_by_label(re.compile("everything on the chosen disks is erased")).check()
    shots.take(page, "storage-create-pool")
    dialog.get_by_role("button", name="Create pool").click()
    started = page.locator(".storage-jobs li[data-kind=pool_create]")
    expect(started).to_contain_text("Pool mirror is ready.", timeout=60_000)
    mirror = page.locator(".pool").filter(has=page.get_by_role("heading", name="mirror"))
    expect(mirror).to_contain_text("Healthy")
    expect(mirror).to_contain_text("btrfs on 2 disks, mirrored")
    expect(mirror.locator("li[data-member]")).to_have_count(2)
    expect(mirror.get_by_role("button", name="Scrub pool mirror")).to_be_visible()
    expect(mirror).to_contain_text("sampled on two days")
    # A week of hourly samples (what the scheduler's pool tick records) draws the growth chart.
    with server.as_role("viewer") as viewer:
        now = {p["name"]: p for p in viewer.get("/api/pools").json()}["mirror"]
    catalog, at = server.service.app.catalog, server.clock()
    for days in range(7, -1, -1):
        used = max(0, now["used_bytes"] - days * 500_000)
        catalog.add_pool_usage("mirror", at - timedelta(days=days), used, now["total_bytes"])
    page.reload()
    expect(mirror.locator("svg.chart")).to_be_visible()
    expect(mirror).to_contain_text("a day")
    shots.take(page, "storage-pools")

    tab(page, "Disks")
    row = page.locator(f"tr[data-devnode='{first}']")
    expect(row).to_contain_text("Pool mirror")
    expect(row).to_contain_text("Already a pool member")
    shots.take(page, "storage-disks", tablet=True)

    # --- a USB disk: offered, initialised, pulled, plugged in: exported by itself ---
    usb = site.usb.plug_in()
    tab(page, "USB disks")
    offered = page.get_by_role("table", name="USB disks offered")
    expect(offered).to_contain_text("QEMU HARDDISK")
    expect(offered).to_contain_text(usb)
    offered.get_by_role("button", name=f"Initialise {usb}").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Everything on {usb}")
    dialog.get_by_label("Label", exact=True).fill("OFFSITE-A")
    dialog.get_by_label("Rotation set").fill("Offsite")
    dialog.get_by_label(re.compile("everything on this disk is erased")).check()
    dialog.get_by_role("button", name="Initialise (erase the disk)").click()
    expect(page.locator(".storage-jobs li[data-kind=usb_initialise]")).to_contain_text(
        "USB disk OFFSITE-A is ready and safe to remove.", timeout=30_000
    )
    medium = page.locator("tr[data-medium=OFFSITE-A]")
    expect(medium).to_contain_text("Safe to remove")
    expect(medium).to_contain_text("Never")  # initialised, not written yet
    expect(page.get_by_role("table", name="USB disks offered")).to_have_count(0)

    site.usb.pull()  # taken off-site ...
    expect(medium).to_have_attribute("data-state", "out")
    expect(medium).to_contain_text("Out")
    site.usb.plug_in()  # ... and brought back: nobody clicks anything
    expect(page.locator("[data-safe=OFFSITE-A]")).to_have_text(
        "USB disk OFFSITE-A is safe to remove.", timeout=60_000
    )
    expect(medium).to_have_attribute("data-state", "safe_to_remove")
    expect(medium.get_by_role("cell").nth(3)).not_to_have_text("Never")
    expect(medium).to_contain_text("1 point")
    sets = page.get_by_role("table", name="Rotation sets")
    expect(sets.locator("tr[data-set=Offsite]")).to_contain_text("OFFSITE-A in, written")
    shots.take(page, "storage-media", tablet=True)
    page.context.close()
    watch.check()
    # One export normally. A disk missing from one scan counts as pulled and plugged in again,
    # and its second export finds nothing to copy: that happens here while another process on
    # this host starts a udevd (a scan then skips the devices udevd has not processed yet).
    app = server.service.app

    def exports() -> list[Any]:
        return [j for j in app.catalog.list_jobs(limit=100) if j.kind == "usb_export"]

    until(lambda: all(j.state in ("succeeded", "failed") for j in exports()), 60)
    assert exports() and all(j.state == "succeeded" for j in exports()), exports()
    assert [c["point"] for j in exports() for c in j.result["copied"]] == [point]
    first = exports()[-1]
    log = [line.message for line in app.catalog.job_log(first.id)]
    assert "USB disk OFFSITE-A is safe to remove" in log, log
    # The old appliance is switched off: nothing of it reacts to the disk any more.
    server.service.monitor.stop()
    mountpoint = server.settings.data_dir / "media" / first.params["medium"]
    assert not os.path.ismount(mountpoint)

    # --- a freshly installed appliance restores a file from the disk ---
    fresh = site.root / "fresh"
    assert site.usb.devnode is not None  # plugged in again: maybe on another node than first
    imported = json.loads(
        run_cli("--json", "usb", "import", site.usb.devnode, data_dir=fresh).stdout
    )
    assert imported["seeded"] and imported["points_added"] == 1, imported
    out = site.root / "restored"
    run_cli("restore", point, str(out), "--from", "OFFSITE-A", data_dir=fresh)
    assert digest(out / "report-1.txt") == digest(source / "report-1.txt")
    run_cli("usb", "eject", "OFFSITE-A", data_dir=fresh)


def test_a_viewer_sees_the_storage_screens_without_actions(browser: Any, site: Site) -> None:
    page, watch = signed_in(browser, site.server, "viewer", PASSWORDS["viewer"])
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Pools").click()
    expect(page.locator(".pool").first).to_be_visible()
    expect(page.get_by_role("button", name="Create pool")).to_have_count(0)
    expect(page.get_by_role("button", name=re.compile("^Scrub pool"))).to_have_count(0)
    tab(page, "Disks")
    expect(page.get_by_role("table", name="Disks")).to_be_visible()
    expect(page.get_by_role("button", name="Rescan")).to_have_count(0)
    tab(page, "USB disks")
    expect(page.get_by_role("heading", name="Rotation sets")).to_be_visible()
    expect(
        page.get_by_role("button", name=re.compile("^(Export|Eject|Initialise|Edit)"))
    ).to_have_count(0)
    page.context.close()
    watch.check()
