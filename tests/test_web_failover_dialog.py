"""The fail-over dialog in the page (headless Chromium), with a real service and a real TCG boot.

The test guest is registered as VM ``web`` and backed up twice through the API (each backup job
checks its point). Then, in the page:

- "Fail over" opens the dialog: both points, the newest preselected, each with its age, its
  check and its boot proof, and the network choice; the older point is picked and started, and
  the session screen shows that point booted;
- "Boot test" opens the same dialog without a network choice (a boot test is always isolated);
- once the newest point's pack is damaged and its check fails, the dialog preselects the older
  point and says why in words.

One boot (~10-30 s under TCG). Missing QEMU, Playwright or Chromium FAILS with the install step.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import ADMIN, LiveServer, bootstrapped_server, wait_job
from guest_support import VM, guest_image_path
from web_support import SCREENSHOTS_ENV, expect, signed_in

from appliance.point_check import verify_new_point
from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.packs import pack_object_name
from image.testguest import MARKER, copy_sparse

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

ASSET = "web"
PROOF = {"serial": MARKER, "timeout": 150}
BOOT_TIMEOUT_MS = 180_000
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("web-fd"),
        keep_env=(SCREENSHOTS_ENV, "APPLIANCE_TEST_GUEST_CACHE"),
    ) as live:
        yield live


def _backup(operator: httpx.Client, mode: str) -> str:
    r = operator.post(f"/api/assets/{ASSET}/backup", json={"mode": mode})
    assert r.status_code == 202, r.text
    job = wait_job(operator, r.json()["id"], timeout=300)
    assert job["state"] == "succeeded" and job["result"]["check"]["ok"], job
    return str(job["result"]["point"])


@pytest.fixture(scope="module")
def points(
    admin: httpx.Client, operator: httpx.Client, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """VM ``web`` with two checked points: ``older`` and ``newest`` (new data in the disk's
    unallocated tail, which the guest never reads, so the newest has a pack of its own)."""
    root = tmp_path_factory.mktemp("web-fd-vm")
    disk = root / "web.raw"
    copy_sparse(guest_image_path(), str(disk))
    spec = root / "web.json"
    spec.write_text(json.dumps(VM))
    r = admin.post(
        "/api/assets",
        json={"name": ASSET, "kind": "vm", "disks": [str(disk)], "vm_spec": str(spec)},
    )
    assert r.status_code == 201, r.text
    r = admin.put(f"/api/assets/{ASSET}/failover-settings", json={"proof": PROOF})
    assert r.status_code == 200, r.text
    older = _backup(operator, "full")
    with open(disk, "r+b") as f:
        f.seek(100 * MIB)
        f.write(random.Random(3).randbytes(MIB))
    newest = _backup(operator, "incremental")
    return {"older": older, "newest": newest}


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    with signed_in(browser, server, *ADMIN, path="/#/assets") as page:
        yield page


def _screenshot(page: Any, tmp: Path, name: str) -> None:
    path = tmp / f"{name}.png"
    page.screenshot(path=str(path), animations="disabled", caret="hide")
    extra = os.environ.get(SCREENSHOTS_ENV)
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        (Path(extra) / path.name).write_bytes(path.read_bytes())


def test_pick_an_older_point_and_it_boots(
    page: Any, server: LiveServer, admin: httpx.Client, points: dict[str, str], tmp_path: Path
) -> None:
    page.get_by_role("button", name=re.compile(f"^Fail over {ASSET}:")).click()
    dialog = page.get_by_role("dialog", name=f"Fail over {ASSET}")
    rows = dialog.locator(".fd-point")
    expect(rows).to_have_count(2)
    newest, older = rows.nth(0), rows.nth(1)
    expect(newest).to_have_attribute("data-point", points["newest"])
    expect(older).to_have_attribute("data-point", points["older"])
    # the newest is preselected and needs no explanation
    expect(newest.locator("input[name=point]")).to_be_checked()
    expect(dialog.locator(".fd-why")).to_have_count(0)
    expect(newest).to_contain_text("Newest")
    for row in (newest, older):
        expect(row).to_contain_text("Checked")
        expect(row).to_contain_text("Never test-booted")
        expect(row).to_contain_text("Kept on ")
    expect(older).to_contain_text("Full backup")
    expect(newest).to_contain_text(re.compile(r"(Just now|minutes? ago)"))
    # the network choice, from the network picker: the VM's own setting by default
    expect(dialog.locator(".np")).to_be_visible()
    expect(dialog.get_by_text("As set for this VM")).to_be_visible()
    _screenshot(page, tmp_path, "failover-dialog")

    older.click()
    expect(older.locator("input[name=point]")).to_be_checked()
    dialog.get_by_role("button", name="Fail over", exact=True).click()
    page.wait_for_url(re.compile(r"#/failover/[^/?]+$"), timeout=60_000)
    session_id = page.url.rsplit("/", 1)[1]
    details = page.get_by_role("region", name="Details")
    expect(details).to_contain_text(f"Recovery point{points['older'][:8]}")
    expect(page.locator(".fo-state")).to_have_text("Running from backup", timeout=BOOT_TIMEOUT_MS)
    info = admin.get(f"/api/failover/{session_id}").json()
    assert info["point_id"] == points["older"] and info["state"] == "running", info
    r = admin.post(f"/api/failover/{session_id}/stop", json={"discard": True})
    assert r.status_code == 202, r.text
    assert wait_job(admin, r.json()["id"], timeout=120)["state"] == "succeeded"


def test_a_boot_test_has_no_network_choice(page: Any, points: dict[str, str]) -> None:
    page.get_by_role("button", name=f"Test-boot a point of {ASSET}").click()
    dialog = page.get_by_role("dialog", name=f"Boot test of {ASSET}")
    expect(dialog.locator(".fd-point")).to_have_count(2)
    expect(dialog).to_contain_text("A boot test always runs isolated")
    expect(dialog.locator(".np-modes")).to_have_count(0)
    expect(dialog.get_by_role("button", name="Start the boot test")).to_be_enabled()
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_have_count(0)


def test_a_damaged_newest_point_is_explained(
    page: Any, server: LiveServer, points: dict[str, str], tmp_path: Path
) -> None:
    app = server.service.app
    older = set(point_packs(app.repo, app.repo.get_manifest(points["older"])).packs)
    newer = point_packs(app.repo, app.repo.get_manifest(points["newest"])).packs
    own = sorted(p for p, k in newer.items() if k == fmt.PACK_KIND_DATA and p not in older)
    path = os.path.join(app.data_dir.store_path, pack_object_name(own[0], fmt.PACK_KIND_DATA))
    with open(path, "r+b") as f:
        f.seek(64)
        byte = f.read(1)
        f.seek(64)
        f.write(bytes([byte[0] ^ 0x80]))
    assert not verify_new_point(app, points["newest"]).ok

    page.get_by_role("button", name=re.compile(f"^Fail over {ASSET}:")).click()
    dialog = page.get_by_role("dialog", name=f"Fail over {ASSET}")
    why = dialog.locator(".fd-why")
    expect(why).to_contain_text(
        f"failed its check: pack {own[0].hex()[:16]} is damaged: its content does not match "
        "its name."
    )
    expect(why).to_contain_text("is chosen instead.")
    expect(why).to_have_text(re.compile(r"^The newest point \(.+\) failed its check"))
    newest = dialog.locator(f".fd-point[data-point='{points['newest']}']")
    expect(newest).to_contain_text("Failed its check")
    expect(newest.locator("input[name=point]")).not_to_be_checked()
    chosen = dialog.locator(f".fd-point[data-point='{points['older']}']")
    expect(chosen.locator("input[name=point]")).to_be_checked()
    expect(chosen).to_contain_text("Chosen by the appliance")
    # the first test's boot was a failover, not a boot test: no boot proof is claimed
    expect(chosen).to_contain_text("Never test-booted")
    _screenshot(page, tmp_path, "failover-dialog-reason")
    dialog.get_by_role("button", name="Cancel").click()
