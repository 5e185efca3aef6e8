"""The first-run wizard in a real browser (views/firstrun.js): a new appliance's first admin is
created, the recovery key is shown once (Continue waits for the "kept it" box), the network and
time steps write the OS files under a temporary OS root (a refusal shown in words first), the
pool step is left, and the dashboard follows. A second visit to the key step says it is gone."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import ADMIN, LiveServer, live_server, service_settings, weak_kdf_env
from usb_support import mounts_below, unmount_below
from web_support import LAPTOP, PageWatch, Screenshots, expect

from api import system_config as osc
from appliance.store.crypto import MasterKey


@contextlib.contextmanager
def new_appliance(folder: Path, first_pool: list[str]) -> Iterator[LiveServer]:
    """A new appliance (no admin yet) whose OS settings live under ``folder/os``, where the
    installer suggested ``first_pool`` for the first pool."""
    root = folder / "os"
    (root / "etc/appliance").mkdir(parents=True)
    (root / osc.FIRST_POOL_FILE).write_text(json.dumps({"disks": first_pool}))
    with pytest.MonkeyPatch.context() as mp:
        weak_kdf_env(mp)
        settings = service_settings(folder / "data", os_root=root, device_monitor=False)
        with live_server(settings) as live:
            yield live


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[LiveServer]:
    with new_appliance(tmp_path, []) as live:
        yield live


def create_admin(page: Any, fresh: LiveServer) -> None:
    page.goto(fresh.url + "/")
    page.get_by_label("Administrator name").fill(ADMIN[0])
    page.get_by_label("Password", exact=True).fill(ADMIN[1])
    page.get_by_label("Repeat the password").fill(ADMIN[1])
    page.get_by_label("Set-up code").fill(fresh.service.setup_code)
    page.get_by_role("button", name="Create administrator").click()


def test_first_run_wizard_shows_the_key_once(
    browser: Any, fresh: LiveServer, tmp_path: Path
) -> None:
    root = fresh.settings.os_root
    assert root is not None
    shots = Screenshots(tmp_path / "shots")
    context = browser.new_context(viewport=LAPTOP, locale="en-GB")
    page = context.new_page()
    watch = PageWatch(page, fresh.url)
    create_admin(page, fresh)

    # (a) the recovery key, with the steps ahead
    expect(page.get_by_role("heading", name="Your recovery key")).to_be_visible()
    steps = page.get_by_role("list", name="Set-up steps")
    expect(steps.locator("[aria-current=step]")).to_contain_text("Recovery key")
    expect(page.get_by_text("opens the store's copies")).to_be_visible()
    key = page.get_by_label("The store's recovery key").inner_text().strip()
    assert MasterKey.from_recovery_key(key).material == fresh.service.app.repo.key.material
    expect(page.get_by_role("button", name="Print")).to_be_visible()
    expect(page.get_by_role("button", name="Copy")).to_be_visible()
    shots.take(page, "first-run-recovery-key")
    go_on = page.get_by_role("button", name="Continue")
    expect(go_on).to_be_disabled()
    kept = page.get_by_label("I printed or saved the recovery key somewhere safe")
    kept.check()
    expect(go_on).to_be_enabled()
    kept.uncheck()
    expect(go_on).to_be_disabled()
    kept.check()
    go_on.click()

    # (b) network: a gateway outside the network is refused in words, then a static address
    expect(page.get_by_role("heading", name="Network")).to_be_visible()
    expect(steps.locator("[aria-current=step]")).to_contain_text("Network")
    assert fresh.service.app.catalog.get_settings("recovery_key")["confirmed_by"] == ADMIN[0]
    expect(page.get_by_label("Automatic (DHCP)")).to_be_checked()
    expect(page.get_by_label("Gateway")).to_be_hidden()
    page.get_by_label("Static").check()
    shots.take(page, "first-run-network")
    page.get_by_label("Address with prefix length").fill("192.168.50.10/24")
    page.get_by_label("Gateway").fill("192.168.60.1")
    page.get_by_label("DNS servers").fill("192.168.50.1")
    page.get_by_label("Interface").fill("eth0")
    page.get_by_role("button", name="Save and continue").click()
    expect(page.get_by_role("alert")).to_contain_text("outside the address's network")
    assert not (root / osc.NETWORK_FILE).exists()
    page.get_by_label("Gateway").fill("192.168.50.1")
    page.get_by_role("button", name="Save and continue").click()

    # (c) time
    expect(page.get_by_role("heading", name="Time zone and time servers")).to_be_visible()
    assert (root / osc.NETWORK_FILE).read_text() == (
        osc.NETWORK_HEADER + "[Match]\nName=eth0\n\n[Network]\nAddress=192.168.50.10/24\n"
        "Gateway=192.168.50.1\nDNS=192.168.50.1\n"
    )
    shots.take(page, "first-run-time")
    page.get_by_label("Time zone").fill("Europe/Berlin")
    page.get_by_label("Time servers", exact=True).fill("ntp.example.org")
    page.get_by_role("button", name="Save and continue").click()

    # (d) the first pool: left for later
    expect(page.get_by_role("heading", name="First pool")).to_be_visible()
    shots.take(page, "first-run-pool")
    assert (root / "etc/timezone").read_text() == "Europe/Berlin\n"
    assert (root / osc.TIMESYNCD_FILE).read_text() == "[Time]\nNTP=ntp.example.org\n"
    page.get_by_role("button", name=re.compile(r"^(Skip|Finish)$")).click()
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    expect(page.locator(".user-name")).to_have_text(ADMIN[0])

    # a second visit to the key step: the key is gone, and the page says where it is now
    page.goto(fresh.url + "/#/first-run/recovery-key")
    expect(page.get_by_text("The recovery key is no longer shown here.")).to_be_visible()
    expect(page.get_by_text("key export --paper")).to_be_visible()
    assert key not in page.content()
    context.close()
    watch.check()


@pytest.mark.root
def test_the_wizard_makes_the_suggested_first_pool(browser: Any, tmp_path: Path) -> None:
    """The installer's suggestion is ticked; the pool is made by the pool route's job."""
    image = tmp_path / "pool-a.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    devnode = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        with new_appliance(tmp_path, [f"loop:{os.path.realpath(image)}"]) as fresh:
            context = browser.new_context(viewport=LAPTOP, locale="en-GB")
            page = context.new_page()
            watch = PageWatch(page, fresh.url)
            create_admin(page, fresh)
            page.get_by_label("I printed or saved the recovery key somewhere safe").check()
            page.get_by_role("button", name="Continue").click()
            for step in ("Network", "Time zone and time servers"):
                expect(page.get_by_role("heading", name=step)).to_be_visible()
                page.get_by_role("button", name="Keep as it is").click()
            expect(page.get_by_role("heading", name="First pool")).to_be_visible()
            disk = page.get_by_label(re.compile(f"^Disk {re.escape(devnode)} "))
            expect(disk).to_be_checked()
            expect(page.get_by_text("The installer suggested the ticked disks.")).to_be_visible()
            page.get_by_label("Pool name").fill("first")
            page.get_by_role("button", name="Create pool").click()
            expect(page.get_by_role("alert")).to_contain_text("Tick the box to confirm")
            page.get_by_label("I understand that everything on the chosen disks is erased").check()
            page.get_by_role("button", name="Create pool").click()
            expect(page.get_by_text("The pool is ready")).to_be_visible(timeout=120_000)
            page.get_by_role("button", name="Finish").click()
            expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
            with fresh.client() as c:
                c.post("/api/login", json={"name": ADMIN[0], "password": ADMIN[1]})
                pools = {p["name"]: p for p in c.get("/api/pools").json()}
            assert pools["first"]["members"][0]["identity"] == f"loop:{os.path.realpath(image)}"
            context.close()
            watch.check()
    finally:
        unmount_below(tmp_path)
        subprocess.run(["losetup", "-d", devnode], capture_output=True)
        assert not mounts_below(tmp_path)
