"""The Tiering screen (Playwright driving Debian's Chromium, headless) against a live uvicorn on
127.0.0.1 and a real S3 server (moto's, on 127.0.0.1; the session fixture ``s3``).

- An administrator adds a rule for a cold, locked bucket location from the page; the plan
  preview of the reply lists exactly the points old enough to move (the newest stays), where
  they go and until when they are locked, and the estimated monthly cost of their class by the
  dated prices; a rule or a schedule the appliance refuses is said in words in its form; **Run
  now** starts the ``tier`` job, which copies the planned points.
- A viewer sees the rules and the plan but no control that would change them or start a run; an
  operator may start a run, not change the rules.
- A restore of a tiered point whose local copy is gone says what its recall would cost.

The prices are overridden (``PUT /api/tiering/prices``) so that the tiny test data costs whole
cents, and the page's figures are compared with the API's own.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from api_support import ADMIN, PASSWORDS, LiveServer, bootstrapped_server, wait_job
from s3_support import S3Server
from web_support import (
    SCREENSHOTS_ENV,
    PageWatch,
    Screenshots,
    expect,
    signed_in,
    signed_in_page,
)

from appliance.catalog.records import home_location_id

PRICES = {
    "as_of": "2026-12-24",
    "classes": {"GLACIER": {"gb_month": 1000}},
    "retrieval": {"GLACIER": {"Standard": {"per_gb": 0, "per_1000": 10000}}},
}
RULE = {
    "name": "aged",
    "location": "cold",
    "classes": [],
    "assets": [],
    "min_age_days": 30,
    "storage_class": "GLACIER",
    "keep_days": 400,
    "keep_local_days": None,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("web-tier"), keep_env=(SCREENSHOTS_ENV,)
    ) as live:
        yield live


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    return Screenshots(tmp_path_factory.mktemp("screenshots"))


@pytest.fixture(scope="module")
def site(server: LiveServer, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three points of a folder asset made 75, 45 and 0 days ago (the engine at past times), a
    cold bucket "cold" locking in GOVERNANCE mode, and prices that make cents of kilobytes."""
    app = server.service.app
    root = tmp_path_factory.mktemp("tier-tree")
    real = app.clock
    points = []
    try:
        for days_ago in (75, 45, 0):
            (root / f"f{days_ago}").write_bytes(os.urandom(120_000))
            app.clock = lambda d=days_ago: datetime.now(UTC) - timedelta(days=d)
            points.append(app.backup_files(str(root), "share").point.id)
    finally:
        app.clock = real
    app.add_location(
        f"s3://{s3.bucket(lock=True)}/tier",
        kind="s3_bucket",
        label="cold",
        options=s3.options(cold=True, lock_mode="GOVERNANCE"),
    )
    with server.as_role("admin") as admin:
        r = admin.put("/api/tiering/prices", json=PRICES)
        assert r.status_code == 200, r.text
    return points


@pytest.fixture
def admin_page(browser: Any, server: LiveServer) -> Iterator[Any]:
    with signed_in(browser, server, *ADMIN) as page:
        yield page


def amount(text: str) -> float:
    """The first "$1,234.56" in ``text`` as a number."""
    found = re.search(r"\$([\d,]+\.\d\d)", text)
    assert found, f"no amount in {text!r}"
    return float(found.group(1).replace(",", ""))


def rules_in_place(server: LiveServer) -> None:
    """The rule saved and the plan carried out (through the API), whatever ran before."""
    with server.as_role("admin") as admin:
        r = admin.put("/api/tiering", json={"rules": [RULE]})
        assert r.status_code == 200, r.text
        job = wait_job(admin, admin.post("/api/tiering/run").json()["id"])
        assert job["state"] == "succeeded", job


def test_an_admin_adds_a_rule_sees_the_plan_and_its_cost_and_runs_it(
    admin_page: Any, server: LiveServer, site: list[str], shots: Screenshots
) -> None:
    page = admin_page
    old, older, newest = site[1], site[0], site[2]
    with server.as_role("admin") as admin:
        assert admin.put("/api/tiering", json={"rules": []}).status_code == 200
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Tiering").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Tiering")
    expect(page.get_by_text("No tiering rules")).to_be_visible()

    page.get_by_role("button", name="Add rule").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Rule name").fill("aged")
    dialog.get_by_label("Bucket location").select_option("cold")
    expect(dialog).to_contain_text("locks every copy (Object Lock GOVERNANCE)")
    dialog.get_by_label("Monthly").uncheck()  # every point, not only a month's newest
    dialog.get_by_label("Storage class").select_option("GLACIER")
    dialog.get_by_label("Minimum age (days)").fill("30")
    dialog.get_by_label("Keep copies (days)").fill("99999")
    dialog.get_by_role("button", name="Add rule").click()
    alert = dialog.get_by_role("alert")
    expect(alert).to_contain_text("Please check the details.")
    expect(alert).to_contain_text("Rule aged: keep_days is a whole number of days from 0 to 36500.")
    shots.take(page, "tiering-rule-refused")

    dialog.get_by_label("Keep copies (days)").fill("400")
    dialog.get_by_role("button", name="Add rule").click()
    expect(page.locator(".toast").filter(has_text="Rule aged added.")).to_be_visible()
    expect(page.get_by_role("dialog")).to_have_count(0)
    rule = page.locator("tr[data-rule=aged]")
    expect(rule).to_contain_text("Every complete point of every asset, at least 30 days old")
    expect(rule).to_contain_text("GLACIER")
    expect(rule).to_contain_text("400 days after the point was made, locked (GOVERNANCE)")
    with server.as_role("viewer") as viewer:
        saved = viewer.get("/api/tiering").json()
    assert saved["settings"]["rules"] == [RULE]

    plan = page.locator(".tier-plan")
    copies = plan.get_by_role("table", name="Points a run would copy")
    for point in (older, old):
        row = copies.locator(f"tr[data-point='{point}']")
        expect(row).to_contain_text("cold")
        expect(row).to_contain_text("GLACIER")
        expect(row).to_contain_text("Object Lock GOVERNANCE")
    expect(copies.locator(f"tr[data-point='{newest}']")).to_have_count(0)
    expect(plan.locator(".stat").filter(has_text="Points to copy")).to_contain_text("2")

    cost = saved["plan"]["cost"]
    assert cost["monthly"]["GLACIER"] > 0.05  # the prices make cents of kilobytes
    glacier = plan.locator("tr[data-class=GLACIER]")
    expect(glacier).to_contain_text("$")
    assert amount(glacier.inner_text()) == pytest.approx(cost["monthly"]["GLACIER"], abs=0.006)
    total = plan.locator("[data-total]")
    expect(total).to_contain_text("a month")
    assert amount(total.inner_text()) == pytest.approx(cost["monthly_total"], abs=0.006)
    expect(plan).to_contain_text("Estimates from the prices of 2026-12-24")
    shots.take(page, "tiering-plan")

    cron = page.get_by_label("Runs start (cron, UTC)")
    cron.fill("every night")
    page.get_by_role("button", name="Save schedule").click()
    expect(page.get_by_role("alert")).to_contain_text(
        "Cron expression 'every night' needs five fields"
    )
    cron.fill("0 1 * * *")
    page.get_by_label("Time window (hours)").fill("6")
    page.get_by_role("button", name="Save schedule").click()
    expect(page.locator(".toast").filter(has_text="Tiering schedule saved.")).to_be_visible()
    with server.as_role("viewer") as viewer:
        saved = viewer.get("/api/tiering").json()["settings"]
    assert saved["schedule"] == {"cron": "0 1 * * *", "window_hours": 6.0}
    assert saved["rules"] == [RULE]  # the schedule's save keeps the rules

    plan.get_by_role("button", name="Run now").click()
    link = page.locator(".tier-run").get_by_role("link", name="Watch progress")
    expect(link).to_have_attribute("href", re.compile(r"^#/jobs/\w+"))
    job_id = (link.get_attribute("href") or "").removeprefix("#/jobs/")
    with server.as_role("viewer") as viewer:
        job = wait_job(viewer, job_id)
    assert job["kind"] == "tier" and job["state"] == "succeeded", job
    assert job["result"]["copied"] == [older, old]
    page.reload()
    expect(page.locator(".tier-plan")).to_contain_text(
        "Nothing to copy: every point a rule matches has its copy."
    )


def test_a_viewer_reads_the_rules_and_plan_without_controls(
    browser: Any, server: LiveServer, site: list[str]
) -> None:
    ghost = {**RULE, "name": "ghost", "location": "nowhere"}
    with server.as_role("admin") as admin:
        assert admin.put("/api/tiering", json={"rules": [RULE, ghost]}).status_code == 200
    pages: dict[str, tuple[Any, PageWatch]] = {}
    try:
        for role in ("viewer", "operator"):
            page, watch = signed_in_page(browser, server, role, PASSWORDS[role])
            pages[role] = (page, watch)
            page.goto(server.url + "/#/tiering")
            expect(page.locator("tr[data-rule=aged]")).to_contain_text("GLACIER")
            expect(page.get_by_role("heading", name="What a run would do now")).to_be_visible()
            expect(page.locator("tr[data-rule=ghost]")).to_contain_text("Unknown location")
            expect(page.locator(".tier-problems")).to_contain_text(
                "Rule ghost: no location 'nowhere' of this store."
            )
            expect(page.get_by_role("button", name="Add rule")).to_have_count(0)
            expect(page.get_by_role("button", name="Edit rule aged")).to_have_count(0)
            expect(page.get_by_role("button", name="Remove rule aged")).to_have_count(0)
            expect(page.get_by_role("button", name="Save schedule")).to_have_count(0)
            expect(page.locator("input, select, textarea")).to_have_count(0)
            expect(page.get_by_text("Only when started")).to_be_visible()
        expect(pages["viewer"][0].get_by_role("button", name="Run now")).to_have_count(0)
        expect(pages["operator"][0].get_by_role("button", name="Run now")).to_be_visible()
    finally:
        for page, watch in pages.values():
            page.context.close()
            watch.check()


def test_a_restore_from_the_bucket_says_what_its_recall_costs(
    admin_page: Any, server: LiveServer, site: list[str]
) -> None:
    rules_in_place(server)
    point = site[0]
    app = server.service.app
    home = home_location_id(app.repo.store_id)
    app.catalog.set_copy(point, home, "deleted")
    try:
        with server.as_role("viewer") as viewer:
            estimate = viewer.get(f"/api/points/{point}/recall").json()
        assert estimate["needed"] and estimate["cost"] >= 10, estimate  # 10 per request
        page = admin_page
        page.goto(server.url + "/#/points")
        page.locator(f"tr[data-point='{point}']").get_by_role("button", name="Restore").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_role("button", name="Start restore").click()
        note = dialog.locator(".recall-note")
        expect(note).to_contain_text("tier Standard, typically 3-5 hours. Estimated cost of")
        expect(note).to_contain_text(
            re.compile(r"the recall: \$[\d,]+\.\d\d \(prices of 2026-12-24\)\.")
        )
        assert amount(note.inner_text()) == pytest.approx(estimate["cost"], abs=0.006)
        dialog.get_by_role("button", name="Cancel").click()
    finally:
        app.catalog.set_copy(point, home, "present")
