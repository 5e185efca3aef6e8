"""The dashboard's honest protection status on the web page (Playwright driving Debian's
Chromium, headless) against a live uvicorn on 127.0.0.1 with real backups.

- A demo-like VM (no policy, one backup on the system disk, never verified nor test-booted)
  is listed as not fully protected with each reason in words; its row shows the missing 3-2-1
  legs; nothing on the page says everything is fine.
- "Verify now" really verifies the newest backup, and its reason goes away; "Add a policy"
  takes the owner to the Assets page with the policy dialog for that asset.
- The trends card draws the RPO sawtooth; the weekly report opens from the dashboard and is
  styled for print.

Screenshots go to a temporary folder; with ``APPLIANCE_WEB_SCREENSHOTS=docs/screenshots`` they are
copied there too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from api_support import ADMIN, LiveServer, bootstrapped_server, wait_job
from web_support import SCREENSHOTS_ENV, Screenshots, expect, signed_in


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("web-dash"), keep_env=(SCREENSHOTS_ENV,)
    ) as live:
        yield live


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    return Screenshots(tmp_path_factory.mktemp("screenshots"))


@pytest.fixture(scope="module")
def demo(admin: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A VM like the demo's, backed up once, with no policy; returns its point."""
    disk = tmp_path_factory.mktemp("web-dash-src") / "demo.raw"
    disk.write_bytes(os.urandom(128 * 1024) + b"\0" * (384 * 1024))
    r = admin.post("/api/assets", json={"name": "demo", "kind": "vm", "disks": [str(disk)]})
    assert r.status_code == 201, r.text
    job = wait_job(admin, admin.post("/api/assets/demo/backup", json={}).json()["id"])
    assert job["state"] == "succeeded", job
    return str(job["result"]["point"])


@pytest.fixture(scope="module")
def docs(admin: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder backed up once, with no policy (a folder's backup is not verified as it ends)."""
    folder = tmp_path_factory.mktemp("web-dash-docs")
    (folder / "report.txt").write_text("quarterly numbers\n" * 200)
    r = admin.post("/api/assets", json={"name": "docs", "kind": "files", "path": str(folder)})
    assert r.status_code == 201, r.text
    job = wait_job(admin, admin.post("/api/assets/docs/backup", json={}).json()["id"])
    assert job["state"] == "succeeded", job
    return str(job["result"]["point"])


@pytest.fixture
def admin_page(browser: Any, server: LiveServer) -> Iterator[Any]:
    with signed_in(browser, server, *ADMIN) as page:
        yield page


def test_the_dashboard_names_what_is_not_protected(
    admin_page: Any, demo: str, shots: Screenshots
) -> None:
    page = admin_page
    attention = page.get_by_role("region", name="Needs attention")
    item = attention.locator("li[data-asset=demo]")
    expect(item).to_contain_text("Needs attention")
    for words in (
        "demo has no policy: nothing backs it up on a schedule.",
        "Only one copy of demo's newest backup exists",
        "Every copy of demo's newest backup sits on the appliance's system disk.",
        "No copy is kept off site",
        "No copy is immutable or offline",
        "demo was never test-booted",
    ):
        expect(item).to_contain_text(words)
    # A VM's new point is checked before its backup job ends.
    expect(item).not_to_contain_text("never verified")
    expect(item.get_by_role("link", name="Add a policy: demo")).to_be_visible()
    expect(item.get_by_role("button", name="Run a boot test: demo")).to_be_visible()
    # The row shows the 3-2-1 legs at a glance: all four missing.
    row = page.locator("tr[data-asset=demo]")
    expect(row).to_have_attribute("data-state", "needs_attention")
    expect(row.locator(".leg[data-met=no]")).to_have_count(4)
    expect(row.locator(".leg[data-met=yes]")).to_have_count(0)
    # Nothing claims all is well.
    stat = page.locator(".stat").filter(has_text="Needs attention")
    expect(stat).to_contain_text("1 asset")
    expect(page.get_by_text("All assets within target")).to_have_count(0)
    expect(page.get_by_text("Every rule passes for every asset")).to_have_count(0)
    # Trends: the RPO sawtooth of the asset.
    trends = page.locator(".trends-card")
    expect(
        trends.get_by_role("img", name=re.compile("^Age of the newest good backup"))
    ).to_be_visible()
    expect(trends.get_by_role("img", name="No proven boot in this period.")).to_be_visible()
    shots.take(page, "dashboard-attention", tablet=True)


def test_add_a_policy_goes_to_the_assets_page(admin_page: Any, demo: str) -> None:
    page = admin_page
    page.get_by_role("link", name="Add a policy: demo").click()
    expect(page).to_have_url(re.compile(r"#/assets\?add_policy=demo$"))
    expect(page.get_by_role("heading", name="Assets & policies")).to_be_visible()


def test_add_a_policy_opens_the_policy_dialog_for_that_asset(admin_page: Any, demo: str) -> None:
    page = admin_page
    page.get_by_role("link", name="Add a policy: demo").click()
    dialog = page.get_by_role("dialog", name="Add a protection policy")
    expect(dialog).to_be_visible()
    chosen = dialog.locator("input[name=assets]:checked")
    expect(chosen).to_have_count(1)
    expect(chosen).to_have_value("demo")


def test_the_weekly_report_prints(admin_page: Any, demo: str, shots: Screenshots) -> None:
    page = admin_page
    page.get_by_role("link", name="Weekly report").click()
    expect(page.get_by_role("heading", name="Weekly protection report")).to_be_visible()
    section = page.locator(".report-asset[data-asset=demo]")
    expect(section).to_contain_text("Needs attention")
    expect(section).to_contain_text("demo has no policy")
    expect(section).to_contain_text("1 backup this week")
    expect(section).to_contain_text("No proven boot this week.")
    expect(page.locator(".report-headline")).to_have_text("1 of 1 asset is not fully protected.")
    page.emulate_media(media="print")
    expect(page.locator(".sidebar")).to_be_hidden()
    expect(section).to_be_visible()
    shots.take(page, "protection-report")


# Last: it adds a second asset, which the tests above do not count.
def test_verify_now_fixes_its_reason(admin_page: Any, admin: Any, docs: str) -> None:
    page = admin_page
    page.get_by_role("button", name="Refresh").click()
    item = page.get_by_role("region", name="Needs attention").locator("li[data-asset=docs]")
    expect(item).to_contain_text("The backups were never verified.")
    item.get_by_role("button", name="Verify now: docs").click()
    toast = page.locator(".toast").filter(has_text="Verify of docs's newest backup started.")
    expect(toast).to_be_visible()
    job_id = toast.get_by_role("link", name="Watch progress").get_attribute("href").split("/")[-1]
    assert wait_job(admin, job_id)["state"] == "succeeded"
    page.get_by_role("button", name="Refresh").click()
    expect(item.locator("[data-code=no_policy]")).to_be_visible()
    expect(item).not_to_contain_text("never verified")
