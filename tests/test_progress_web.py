"""The job page follows a backup of one large file as it is read (Playwright on Chromium against
a live service on 127.0.0.1): the percentage moves before the file ends, instead of "Working…"
until the end, and the total shown stays the same."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import PASSWORDS, LiveServer, bootstrapped_server
from test_progress import MiB, big_random_file
from web_support import expect, signed_in_page


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("web-progress")) as live:
        yield live


def test_the_job_page_moves_within_one_large_file(
    browser: Any, server: LiveServer, admin: Any, tmp_path: Path
) -> None:
    src = tmp_path / "export"
    src.mkdir()
    big_random_file(src / "disk.raw", 768 * MiB)
    r = admin.post("/api/assets", json={"name": "export", "kind": "files", "path": str(src)})
    assert r.status_code == 201, r.text
    page, watch = signed_in_page(browser, server, "operator", PASSWORDS["operator"])
    job_id = admin.post("/api/assets/export/backup", json={"mode": "full"}).json()["id"]
    page.goto(f"{server.url}/#/jobs/{job_id}")
    expect(page.get_by_role("heading", name="Backup of export")).to_be_visible()
    shown: list[str] = []
    data: set[str] = set()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        pct = page.locator(".big-pct").first
        text = pct.inner_text().strip() if pct.count() else ""
        if text and text != "100%" and text not in shown:
            shown.append(text)
            data.add(page.locator(".dl-grid").inner_text())
        if text == "100%":
            break
        page.wait_for_timeout(100)
    expect(page.locator(".big-pct")).to_have_text("100%")
    moving = [t for t in shown if re.fullmatch(r"\d+%", t) and t != "0%"]
    assert len(moving) >= 2, f"the page did not move within the file: {shown}"
    assert [int(t[:-1]) for t in moving] == sorted(int(t[:-1]) for t in moving)
    totals = {m.group(1) for d in data if (m := re.search(r"of ([\d.]+ [KMG]B)", d))}
    assert len(totals) == 1, f"the total changed while the file was read: {data}"
    # The time shown moves too (it was "Elapsed under 1 s" for the whole file).
    elapsed = {m.group(1) for d in data if (m := re.search(r"Elapsed\s+(.+)", d))}
    assert len(elapsed) >= 2, f"the elapsed time stood still while the file was read: {data}"
    page.context.close()
    watch.check()
