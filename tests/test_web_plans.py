"""Recovery plans through the web page, with real QEMU (TCG here).

A real uvicorn serves the app on 127.0.0.1; two VM assets (``dc`` and ``app``), each a copy of
the busybox test guest with its VM definition and boot proof, are registered and backed up
through the API. The page then creates a two-group plan (dc, then app) in the editor, runs its
test (both VMs boot isolated in order, are proven, screenshotted and discarded), shows each VM's
RTO and the plan's total, and lists the plan with its last test. "Fail over" asks first.

Missing QEMU, Playwright or Chromium FAILS with the install step. With
``APPLIANCE_WEB_SCREENSHOTS=docs/screenshots`` the screenshots are kept as ``plans-*.png``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import ADMIN, LiveServer, bootstrapped_server, wait_job
from guest_support import PROOF, guest_image_path
from web_support import LAPTOP, SCREENSHOTS_ENV, PageWatch, Screenshots, add_api_session, expect

from image.testguest import copy_sparse

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

ASSETS = ("dc", "app")
#: Two TCG boots one after the other on shared cores, plus the job's queueing.
RUN_TIMEOUT_MS = 400_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("web-plans"),
        keep_env=(SCREENSHOTS_ENV, "APPLIANCE_TEST_GUEST_CACHE"),
    ) as live:
        yield live


@pytest.fixture(scope="module")
def vms(
    admin: httpx.Client, operator: httpx.Client, tmp_path_factory: pytest.TempPathFactory
) -> list[str]:
    """Both VM assets registered with their definition and boot proof, and backed up."""
    image = guest_image_path()
    root = tmp_path_factory.mktemp("web-plans-vms")
    for name in ASSETS:
        disk = root / f"{name}.raw"
        copy_sparse(image, str(disk))
        spec = root / f"{name}.json"
        vm = {
            "name": name,
            "memory_mib": 256,
            "vcpus": 1,
            "disks": [{"name": name, "bus": "virtio"}],
        }
        spec.write_text(json.dumps(vm))
        r = admin.post(
            "/api/assets",
            json={"name": name, "kind": "vm", "disks": [str(disk)], "vm_spec": str(spec)},
        )
        assert r.status_code == 201, r.text
        r = admin.put(
            f"/api/assets/{name}/failover-settings",
            json={"proof": {**PROOF, "timeout": 240}, "network": {"mode": "isolated"}},
        )
        assert r.status_code == 200, r.text
        r = operator.post(f"/api/assets/{name}/backup", json={"mode": "full"})
        assert r.status_code == 202, r.text
        job = wait_job(operator, r.json()["id"], timeout=300)
        assert job["state"] == "succeeded", job
    return list(ASSETS)


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    context = browser.new_context(viewport=LAPTOP, locale="en-GB")
    page = context.new_page()
    watch = PageWatch(page, server.url)
    yield page
    context.close()
    watch.check()


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_create_a_two_vm_plan_and_run_its_test_from_the_page(
    page: Any, server: LiveServer, admin: httpx.Client, vms: list[str], tmp_path: Path
) -> None:
    shots = Screenshots(tmp_path / "shots")
    add_api_session(page, server, *ADMIN)
    page.get_by_role("link", name="Recovery plans").click()
    expect(page.get_by_text("No recovery plans yet")).to_be_visible()

    # The editor: a name, group 1 with dc, group 2 with app (waiting for dc's boot proof).
    page.get_by_role("button", name="New plan").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name").fill("Head office")
    groups = dialog.locator(".plan-group-edit")
    groups.nth(0).get_by_label("Virtual machine").select_option("dc")
    dialog.get_by_role("button", name="Add a group").click()
    expect(groups).to_have_count(2)
    expect(groups.nth(1).locator(".plan-group-title")).to_have_text("Group 2")
    groups.nth(1).get_by_label("Virtual machine").select_option("app")
    expect(groups.nth(0).get_by_label("Before the next group")).to_have_value("proof")
    shots.take(page, "plans-editor")
    dialog.get_by_role("button", name="Create plan").click()
    expect(page).to_have_url(re.compile(r"#/plans/[0-9a-f]+$"))
    plan_id = page.url.rsplit("/", 1)[1]
    expect(page.get_by_role("heading", level=1)).to_have_text("Head office")
    expect(page.locator(".plan-group")).to_have_count(2)
    expect(page.locator(".plan-group").nth(0)).to_contain_text("Group 1: dc")
    expect(page.locator(".plan-group").nth(0)).to_contain_text("once every VM here has booted")
    expect(page.locator(".plan-group").nth(1)).to_contain_text("Group 2: app")
    stored = admin.get(f"/api/plans/{plan_id}").json()
    assert [[vm["asset"] for vm in g["vms"]] for g in stored["groups"]] == [["dc"], ["app"]]
    assert stored["groups"][0]["vms"][0]["network"] is None  # "as configured"

    # "Fail over" asks first; cancelling starts nothing.
    jobs_before = len(admin.get("/api/jobs").json())
    page.get_by_role("button", name="Fail over Head office").click()
    confirm = page.get_by_role("dialog")
    expect(confirm).to_contain_text("This starts 2 VMs in 2 groups from their backups")
    confirm.get_by_role("button", name="Cancel").click()
    expect(confirm).to_have_count(0)
    assert len(admin.get("/api/jobs").json()) == jobs_before

    # The test run: both VMs proven in order, each RTO and the total shown.
    page.get_by_role("button", name="Run a test of Head office").click()
    summary = page.locator(".plan-run-summary")
    expect(summary).to_have_attribute("data-state", "succeeded", timeout=RUN_TIMEOUT_MS)
    expect(summary).to_contain_text("Every VM proven, total RTO")
    (run,) = admin.get(f"/api/plans/{plan_id}/runs").json()
    assert run["kind"] == "test" and run["state"] == "succeeded"
    first, second = run["vms"]
    assert (first["asset"], second["asset"]) == ("dc", "app")
    assert _at(second["started_at"]) >= _at(first["proven_at"])
    assert run["total_rto_seconds"] >= second["rto_seconds"] - 0.05
    for vm in run["vms"]:
        row = page.locator(f"tr[data-vm='{vm['asset']}']")
        expect(row).to_have_attribute("data-state", "proven")
        expect(row).to_contain_text(f"{vm['rto_seconds']:.1f} s")
        # The screenshot kept after the VM was discarded is shown.
        image = row.get_by_role("img", name=f"The screen of {vm['asset']} when it booted")
        expect(image).to_be_visible()
        page.wait_for_function(
            "(img) => img.complete && img.naturalWidth > 0", arg=image.element_handle()
        )
        session = admin.get(f"/api/failover/{vm['session']}").json()
        assert session["state"] == "stopped" and session["purpose"] == "boot_test"
    expect(page.locator(".plan-total")).to_contain_text(f"{run['total_rto_seconds']:.1f} s")
    shots.take(page, "plans-run", tablet=True)

    # The list: the plan with its last test.
    page.get_by_role("link", name="Recovery plans").click()
    row = page.locator("tr[data-plan='Head office']")
    expect(row).to_contain_text("2 VMs in 2 groups")
    expect(row).to_contain_text("Proven")
    expect(row).to_contain_text(f"total RTO {run['total_rto_seconds']:.1f} s")
    shots.take(page, "plans-list")
    audit = [(a["action"], a["target"]) for a in admin.get("/api/audit").json()]
    assert ("plan.create", "Head office") in audit and ("plan.test", "Head office") in audit


def test_edit_a_plan_to_wait_a_fixed_time(
    page: Any, server: LiveServer, admin: httpx.Client, vms: list[str]
) -> None:
    r = admin.post(
        "/api/plans",
        json={
            "name": "Branch office",
            "groups": [{"vms": [{"asset": "dc"}]}, {"vms": [{"asset": "app"}]}],
        },
    )
    assert r.status_code == 201, r.text
    plan_id = r.json()["id"]
    add_api_session(page, server, *ADMIN)
    page.goto(f"{server.url}/#/plans/{plan_id}")
    page.get_by_role("button", name="Edit", exact=True).click()
    dialog = page.get_by_role("dialog")
    groups = dialog.locator(".plan-group-edit")
    expect(groups).to_have_count(2)
    expect(groups.nth(0).get_by_label("Virtual machine")).to_have_value("dc")
    expect(groups.nth(1).get_by_label("Virtual machine")).to_have_value("app")
    groups.nth(0).get_by_label("Before the next group").select_option("delay")
    groups.nth(0).get_by_label("Seconds to wait").fill("5")
    dialog.get_by_role("button", name="Save").click()
    expect(page.locator(".plan-group").nth(0)).to_contain_text("starts 5 seconds later")
    stored = admin.get(f"/api/plans/{plan_id}").json()
    assert stored["groups"][0]["after"] == "delay" and stored["groups"][0]["delay_seconds"] == 5
    assert [g["vms"][0]["network"] for g in stored["groups"]] == [None, None]
    # A bad delay is refused in words and nothing is stored.
    page.get_by_role("button", name="Edit", exact=True).click()
    dialog = page.get_by_role("dialog")
    dialog.locator(".plan-group-edit").nth(0).get_by_label("Seconds to wait").fill("-3")
    dialog.get_by_role("button", name="Save").click()
    expect(dialog.get_by_role("alert")).to_be_visible()
    assert admin.get(f"/api/plans/{plan_id}").json()["groups"][0]["delay_seconds"] == 5
