"""Bucket locations on the web page (Playwright driving Debian's Chromium, headless), against a
live uvicorn on 127.0.0.1 and a real S3 server (moto's, on 127.0.0.1; the session fixture ``s3``).

- Pools: an administrator adds a cold bucket with Object Lock through the "Add bucket" form; a
  missing bucket is refused in words first; the new row says "Cold · GLACIER" and "Locked
  (COMPLIANCE, 2 days)"; the secret appears nowhere on the page; "Check" says it is available.
- Points: a point whose only readable copy is in that cold bucket shows the copy "Archived",
  "protected until …" (the Copy… dialog); its restore first shows what it would recall
  ("This restore first recalls N packs … tier Expedited, typically 1-5 minutes") and, confirmed,
  the restore job waits on the jobs screen, saying why.

Screenshots go to a temporary folder; with ``APPLIANCE_WEB_SCREENSHOTS=docs/screenshots`` they are
copied there too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import ADMIN, LiveServer, bootstrapped_server, wait_job
from s3_support import CREDENTIALS, S3Server
from web_support import SCREENSHOTS_ENV, Screenshots, expect, nav, signed_in

from appliance.catalog.records import home_location_id

SECRET = CREDENTIALS["secret_access_key"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("web-loc"), keep_env=(SCREENSHOTS_ENV,)
    ) as live:
        yield live


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    return Screenshots(tmp_path_factory.mktemp("screenshots"))


@pytest.fixture
def admin_page(browser: Any, server: LiveServer) -> Iterator[Any]:
    with signed_in(browser, server, *ADMIN) as page:
        yield page


def test_a_bucket_added_from_the_page_is_listed_as_cold_and_locked(
    admin_page: Any, server: LiveServer, s3: S3Server, shots: Screenshots
) -> None:
    page = admin_page
    bucket = s3.bucket(lock=True)
    nav(page, "Pools")
    page.get_by_role("button", name="Add bucket").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Bucket", exact=True).fill("s3://no-such-bucket-here/site")
    dialog.get_by_label("Name").fill("offsite-cold")
    dialog.get_by_label("Endpoint").fill(s3.endpoint)
    dialog.get_by_label("Region").fill("us-east-1")
    dialog.get_by_label("Addressing").select_option("path")
    dialog.get_by_label("Access key").fill(CREDENTIALS["access_key_id"])
    dialog.get_by_label("Secret key").fill(SECRET)
    dialog.get_by_label(re.compile("^Cold storage")).check()
    dialog.get_by_label("Data class").select_option("GLACIER")
    dialog.get_by_label("Restore tier").select_option("Expedited")
    dialog.get_by_label("Object Lock").select_option("COMPLIANCE")
    dialog.get_by_label("Days locked").fill("2")
    dialog.get_by_role("button", name="Add bucket").click()
    alert = dialog.get_by_role("alert")
    expect(alert).to_contain_text("The location could not be added")
    expect(alert).to_contain_text("Bucket no-such-bucket-here does not exist")
    shots.take(page, "bucket-refused")

    dialog.get_by_label("Bucket", exact=True).fill(f"s3://{bucket}/site")
    dialog.get_by_role("button", name="Add bucket").click()
    expect(page.locator(".toast").filter(has_text="Bucket added.")).to_be_visible()
    row = page.locator("tr[data-location=offsite-cold]")
    expect(row).to_contain_text("object storage bucket, off-site")
    expect(row).to_contain_text("Cold · GLACIER")
    expect(row).to_contain_text("Recall tier Expedited")
    expect(row).to_contain_text("Locked (COMPLIANCE, 2 days)")
    expect(row).to_contain_text(f"s3://{bucket}/site")
    expect(row).to_contain_text("Available")
    assert SECRET not in page.content()

    row.get_by_role("button", name="Check location offsite-cold").click()
    expect(page.locator(".toast").filter(has_text="offsite-cold is available.")).to_be_visible()
    shots.take(page, "locations-bucket")
    with server.as_role("viewer") as viewer:
        listed = {loc["label"]: loc for loc in viewer.get("/api/locations").json()}
    cold = listed["offsite-cold"]
    assert (cold["access"], cold["lock_mode"], cold["lock_days"]) == ("cold", "COMPLIANCE", 2)
    assert (cold["restore_tier"], cold["addressing_style"]) == ("Expedited", "path")


@pytest.fixture
def cold_only_point(server: LiveServer, s3: S3Server, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A point copied (by the API) to a cold locked bucket "vault", whose local copy is then
    marked deleted: its only readable copy is archived."""
    source = tmp_path / "src"
    source.mkdir()
    for i in range(4):
        (source / f"f{i}.bin").write_bytes(os.urandom(150_000))
    app = server.service.app
    with server.as_role("admin") as admin:
        r = admin.post(
            "/api/assets", json={"name": "cold-docs", "kind": "files", "path": str(source)}
        )
        assert r.status_code == 201, r.text
        job = wait_job(admin, admin.post("/api/assets/cold-docs/backup", json={}).json()["id"])
        assert job["state"] == "succeeded", job
        point = job["result"]["point"]
        options = {"endpoint_url": s3.endpoint, "region": "us-east-1", **CREDENTIALS}
        body = {
            "kind": "s3_bucket",
            "address": f"s3://{s3.bucket(lock=True)}/vault",
            "label": "vault",
            "bucket": {
                **options,
                "cold": True,
                "lock_mode": "GOVERNANCE",
                "lock_days": 3,
                "restore_tier": "Expedited",
            },
        }
        r = admin.post("/api/locations", json=body)
        assert r.status_code == 201, r.text
        copied = admin.post(f"/api/points/{point}/copy", json={"location": "vault"}).json()
        assert wait_job(admin, copied["id"])["state"] == "succeeded"
    home = home_location_id(app.repo.store_id)
    app.catalog.set_copy(point, home, "deleted")
    try:
        yield {"point": point, "source": source}
    finally:
        app.catalog.set_copy(point, home, "present")


def test_a_restore_from_cold_storage_shows_its_recall_first_then_waits(
    admin_page: Any,
    server: LiveServer,
    cold_only_point: dict[str, Any],
    shots: Screenshots,
) -> None:
    page = admin_page
    point = cold_only_point["point"]
    nav(page, "Recovery points")
    row = page.locator(f"tr[data-point='{point}']")

    row.get_by_role("button", name=f"Copy point {point[:8]}").click()
    dialog = page.get_by_role("dialog")
    vault = dialog.locator("li[data-copy=vault]")
    expect(vault).to_contain_text("Archived")
    expect(vault).to_contain_text("GLACIER")
    expect(vault).to_contain_text("protected until")
    dialog.get_by_role("button", name="Cancel").click()

    row.get_by_role("button", name="Restore").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Its readable copies are all in cold storage")
    dialog.get_by_role("button", name="Start restore").click()
    note = dialog.locator(".recall-note")
    expect(note).to_contain_text(
        re.compile(
            r"This restore first recalls \d+ packs? \([\d.]+ [kKMG]?B\) from vault \(s3://.+/vault\), "
            r"tier Expedited, typically 1-5 minutes\."
        )
    )
    expect(note).to_contain_text("shown under Jobs as waiting")
    shots.take(page, "restore-recall")
    dialog.get_by_role("button", name="Recall and restore").click()
    toast = page.locator(".toast").filter(has_text="started")
    expect(toast).to_contain_text(
        re.compile(r"It waits while \d+ packs? (is|are) recalled from vault")
    )

    job = next(
        j
        for j in server.service.app.catalog.list_jobs()
        if j.kind == "restore" and j.params.get("point") == point
    )
    try:
        nav(page, "Jobs")
        job_row = page.locator(f"tr[data-job='{job.id}']")
        expect(job_row).to_contain_text(re.compile(r"Waiting: recalling \d+ of \d+ pack\(s\)"))
        expect(job_row).to_contain_text("from vault (tier Expedited, typically 1-5 minutes)")
        shots.take(page, "jobs-recall-waiting")
    finally:
        with server.as_role("operator") as operator:
            operator.post(f"/api/jobs/{job.id}/cancel")
