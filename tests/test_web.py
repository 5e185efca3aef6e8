"""The web admin page in a real browser (Playwright driving Debian's Chromium, headless).

A real uvicorn serves the app on 127.0.0.1 (plain HTTP on loopback) over a temporary data
directory. The tests click through the page as a person would and assert on the words it shows:
first run, sign-in, an asset and a policy, a backup whose progress reaches 100 % on the jobs
screen, browsing its point and downloading a file whose bytes match the source, the dashboard,
live progress with cancel and retry. The admin screens (users, tokens, audit, pools, settings)
are in test_web_admin.py.

Screenshots go to a temporary folder; with ``APPLIANCE_WEB_SCREENSHOTS=docs/screenshots`` they
are copied there too (that is how the ones in docs/web.md were made).
"""

from __future__ import annotations

import io
import os
import re
import time
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import ADMIN, LiveServer, live_server, login, service_settings, wait_job
from web_support import (
    LAPTOP,
    PageWatch,
    Screenshots,
    expect,
    nav,
)

from appliance.errors import BackupCancelled
from appliance.jobs import JobKind, register_job_kind

ASSET = "docs"
POLICY = "nightly"


# --- a job the tests can watch: it runs for a while, reporting progress ------------------------------


def _slow_transfer(app: Any, p: dict[str, Any], ctx: Any) -> dict[str, Any]:
    steps = int(p.get("steps", 100))
    step_bytes = 4_000_000
    for i in range(steps):
        if ctx.cancel.is_set():
            raise BackupCancelled("cancelled")
        ctx.progress(
            {"files": i + 1, "bytes_done": (i + 1) * step_bytes, "bytes_total": steps * step_bytes}
        )
        if i % 20 == 0:
            ctx.log("info", f"copied part {i + 1} of {steps}")
        time.sleep(float(p.get("pause", 0.05)))
    return {"steps": steps}


register_job_kind(
    "web_test_transfer",
    JobKind(
        _slow_transfer,
        lambda p: [(f"web-test:{p.get('lane', 'a')}", True)],
        False,
        lambda p: f"test transfer {p.get('lane', 'a')}",
    ),
)


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weak_kdf() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
        for name in list(os.environ):
            if name.startswith("APPLIANCE_") and name not in (
                "APPLIANCE_TEST_WEAK_KDF",
                "APPLIANCE_WEB_SCREENSHOTS",
            ):
                mp.delenv(name)
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, weak_kdf: None) -> Iterator[LiveServer]:
    """One appliance for the module; the first admin is created by the first-run test or, when
    that test does not run first, by :func:`admin_api`."""
    settings = service_settings(tmp_path_factory.mktemp("web") / "data")
    with live_server(settings) as live:
        yield live


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    return Screenshots(tmp_path_factory.mktemp("screenshots"))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the tests protect: a few files, one of them binary, in nested folders."""
    root = tmp_path_factory.mktemp("source")
    (root / "reports" / "2024").mkdir(parents=True)
    (root / "hello.txt").write_text("hello from the appliance\n")
    (root / "reports" / "summary.md").write_text("# Summary\n" + "All systems nominal.\n" * 50)
    (root / "reports" / "2024" / "q4.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    return root


def _ensure_admin(server: LiveServer) -> None:
    with server.client() as c:
        if not c.get("/api/setup").json()["admin_exists"]:
            r = c.post("/api/setup", json=server.setup_body(*ADMIN))
            assert r.status_code == 201, r.text


@pytest.fixture
def admin_api(server: LiveServer) -> Iterator[httpx.Client]:
    """An API client signed in as the admin (with the CSRF header set)."""
    _ensure_admin(server)
    with server.client() as c:
        c.headers["X-CSRF-Token"] = login(c, *ADMIN)
        yield c


@pytest.fixture
def backed_up(admin_api: httpx.Client, source: Path) -> str:
    """The asset with a policy (RPO one day) and at least one point, made through the API when
    the page tests before did not make them. Returns the newest point's id."""
    c = admin_api
    if c.get(f"/api/assets/{ASSET}").status_code == 404:
        r = c.post("/api/assets", json={"name": ASSET, "kind": "files", "path": str(source)})
        assert r.status_code == 201, r.text
    if c.get(f"/api/policies/{POLICY}").status_code == 404:
        body = {"name": POLICY, "asset": ASSET, "rpo_seconds": 86400}
        r = c.post("/api/policies", json=body)
        assert r.status_code == 201, r.text
    points = c.get("/api/points", params={"asset": ASSET}).json()
    if not points:
        job = c.post(f"/api/assets/{ASSET}/backup", json={}).json()
        assert wait_job(c, job["id"])["state"] == "succeeded"
        points = c.get("/api/points", params={"asset": ASSET}).json()
    return str(points[0]["id"])


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    context = browser.new_context(viewport=LAPTOP, accept_downloads=True, locale="en-GB")
    page = context.new_page()
    watch = PageWatch(page, server.url)
    yield page
    context.close()
    watch.check()


@pytest.fixture
def admin_page(page: Any, server: LiveServer) -> Any:
    """The page signed in as the admin. The session comes from the API (the sign-in form is
    tested by itself), which saves every test a round of typing."""
    _ensure_admin(server)
    with server.client() as c:
        login(c, *ADMIN)
        cookies = [
            {"name": name, "value": value, "url": server.url} for name, value in c.cookies.items()
        ]
    page.context.add_cookies(cookies)
    page.goto(server.url + "/")
    expect(page.locator(".user-name")).to_have_text(ADMIN[0])
    return page


# --- the tests -------------------------------------------------------------------------------------------


def test_first_run_sign_in_and_out(
    browser: Any, tmp_path: Path, weak_kdf: None, shots: Screenshots
):
    """A fresh appliance asks for the admin password; then sign-in, a wrong password in words,
    and sign-out."""
    with live_server(service_settings(tmp_path / "data")) as fresh:
        context = browser.new_context(viewport=LAPTOP)
        page = context.new_page()
        watch = PageWatch(page, fresh.url)
        page.goto(fresh.url + "/")
        expect(page.get_by_role("heading", name="Welcome to your backup appliance")).to_be_visible()
        expect(page.get_by_text("No administrator exists yet")).to_be_visible()
        # Loopback too must give the set-up code, and the page says where it is.
        code_file = str(tmp_path / "data" / "secrets" / "setup-code")
        expect(page.get_by_text(code_file)).to_be_visible()
        shots.take(page, "first-run")

        page.get_by_label("Administrator name").fill(ADMIN[0])
        page.get_by_label("Password", exact=True).fill(ADMIN[1])
        page.get_by_label("Repeat the password").fill("something else")
        page.get_by_role("button", name="Create administrator").click()
        expect(page.get_by_role("alert")).to_contain_text("The passwords differ")

        page.get_by_label("Repeat the password").fill(ADMIN[1])
        page.get_by_label("Set-up code").fill("not-the-code")
        page.get_by_role("button", name="Create administrator").click()
        expect(page.get_by_role("alert")).to_contain_text("set-up code")
        page.get_by_label("Set-up code").fill(fresh.service.setup_code)
        page.get_by_role("button", name="Create administrator").click()
        # the set-up wizard (test_web_first_run.py): the key kept, the host's network and time,
        # no pool now
        expect(page.get_by_role("heading", name="Your recovery key")).to_be_visible()
        page.get_by_label("I printed or saved the recovery key somewhere safe").check()
        page.get_by_role("button", name="Continue").click()
        for step in ("Network", "Time zone and time servers"):
            expect(page.get_by_role("heading", name=step)).to_be_visible()
            page.get_by_role("button", name="Continue").click()
        expect(page.get_by_role("heading", name="First pool")).to_be_visible()
        page.get_by_role("button", name=re.compile(r"^(Skip|Finish)$")).click()
        expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
        expect(page.locator(".user-name")).to_have_text(ADMIN[0])
        expect(page.locator(".user-role")).to_have_text("Administrator")
        expect(page.get_by_text("Nothing is protected yet")).to_be_visible()

        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        expect(page.get_by_text("You have signed out.")).to_be_visible()

        page.get_by_label("User name").fill(ADMIN[0])
        page.get_by_label("Password").fill("not-the-password")
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("alert")).to_contain_text("The user name or password is wrong.")
        shots.take(page, "sign-in-error")

        page.get_by_label("Password").fill(ADMIN[1])
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()

        # a session that ends (cookies gone) sends the page back to sign-in, in words
        context.clear_cookies()
        nav(page, "Jobs")
        expect(page.get_by_text("Your session has ended.")).to_be_visible()
        context.close()
        watch.check()


def test_asset_policy_and_backup_to_100_percent(
    admin_page: Any, server: LiveServer, source: Path, admin_api: httpx.Client, shots: Screenshots
):
    """Create the asset and its policy on the page, back it up, watch the job reach 100 %."""
    page = admin_page
    if admin_api.get(f"/api/assets/{ASSET}").status_code == 200:
        pytest.fail("the asset exists already: this test must run on a fresh appliance")
    nav(page, "Assets & policies")
    expect(page.get_by_text("No assets yet")).to_be_visible()

    page.get_by_role("button", name="Add asset").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name").fill("bad name!")
    dialog.get_by_label("Folder", exact=True).fill(str(source))
    dialog.get_by_role("button", name="Add asset").click()
    expect(dialog.get_by_role("alert")).to_contain_text(
        "Name may use only letters, digits, dots, dashes and underscores"
    )
    dialog.get_by_label("Name").fill(ASSET)
    dialog.get_by_label("Folder", exact=True).fill(str(source / "missing"))
    dialog.get_by_role("button", name="Add asset").click()
    expect(dialog.get_by_role("alert")).to_contain_text("is not a folder on the appliance")
    dialog.get_by_label("Folder", exact=True).fill(str(source))
    dialog.get_by_role("button", name="Add asset").click()
    expect(page.get_by_role("dialog")).to_have_count(0)
    row = page.locator(f"tr[data-asset={ASSET}]")
    expect(row).to_contain_text(str(source))
    expect(row).to_contain_text("No policy")

    page.get_by_role("button", name="Add policy").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name").fill(POLICY)
    expect(dialog.get_by_text("Every day at 02:00").last).to_be_visible()
    dialog.get_by_label("RPO target").fill("1")
    dialog.get_by_label("RPO unit").select_option("86400")
    dialog.get_by_label("Daily").fill("14")
    shots.take(page, "policy-dialog")
    dialog.get_by_role("button", name="Add policy").click()
    expect(page.get_by_role("dialog")).to_have_count(0)
    policy = page.locator(f"tr[data-policy={POLICY}]")
    expect(policy).to_contain_text("Every day at 02:00 · Incremental")
    expect(policy).to_contain_text("Keep 14 daily, 4 weekly")
    expect(policy).to_contain_text("1 day")
    expect(row).to_contain_text(POLICY)
    shots.take(page, "assets", tablet=True)

    page.get_by_role("button", name=f"Back up {ASSET} now").click()
    expect(page.locator(".toast").filter(has_text=f"Backup of {ASSET} started.")).to_be_visible()
    nav(page, "Jobs")
    job = page.locator("tr[data-job]").filter(has_text=f"Backup of {ASSET}").first
    expect(job).to_be_visible()
    expect(job.locator(".jp-pct")).to_have_text("100%")
    expect(job.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(job).to_contain_text("Succeeded")
    expect(job).to_contain_text("3 files")

    job.get_by_role("link", name=re.compile("Backup of")).click()
    expect(page.get_by_role("heading", name=f"Backup of {ASSET}")).to_be_visible()
    expect(page.locator(".big-pct")).to_have_text("100%")
    expect(page.get_by_text("Made recovery point")).to_be_visible()
    expect(page.locator(".log")).to_contain_text("finished")
    shots.take(page, "job-done")


def test_browse_point_and_download(
    admin_page: Any, server: LiveServer, source: Path, backed_up: str, shots: Screenshots
):
    """Browse the point's folders (breadcrumbs), download a file whose bytes match the source,
    and a folder as zip."""
    page = admin_page
    nav(page, "Recovery points")
    page.get_by_label("Asset").select_option(ASSET)
    row = page.locator(f"tr[data-point='{backed_up}']")
    expect(row).to_contain_text(ASSET)
    expect(row).to_contain_text("3 files")
    shots.take(page, "points", tablet=True)

    row.get_by_role("link", name=re.compile("^Browse")).click()
    expect(page.get_by_role("heading", name=f"Browse: {ASSET}")).to_be_visible()
    expect(page.locator("tr[data-entry='hello.txt']")).to_be_visible()
    page.get_by_role("link", name="reports", exact=True).click()
    expect(page.locator("tr[data-entry='summary.md']")).to_be_visible()
    page.get_by_role("link", name="2024", exact=True).click()
    crumbs = page.get_by_role("navigation", name="Breadcrumb")
    expect(crumbs.get_by_role("link", name="Recovery points")).to_be_visible()
    expect(crumbs.get_by_role("link", name=ASSET, exact=True)).to_be_visible()
    expect(crumbs.locator("[aria-current=page]")).to_have_text("2024")
    entry = page.locator("tr[data-entry='q4.bin']")
    expect(entry).to_contain_text("3.15 MB")

    with page.expect_download() as info:
        entry.get_by_role("link", name="Download q4.bin").click()
    download = info.value
    assert download.suggested_filename == "q4.bin"
    assert (
        Path(download.path()).read_bytes() == (source / "reports" / "2024" / "q4.bin").read_bytes()
    )

    crumbs.get_by_role("link", name="reports").click()
    expect(crumbs.locator("[aria-current=page]")).to_have_text("reports")
    expect(page.locator("tr[data-entry='2024'][data-type=dir]")).to_be_visible()
    shots.take(page, "browse", tablet=True)
    with page.expect_download() as info:
        page.get_by_role("link", name="Download as .zip").click()
    with zipfile.ZipFile(io.BytesIO(Path(info.value.path()).read_bytes())) as archive:
        names = set(archive.namelist())
        assert "reports/summary.md" in names, names
        assert (
            archive.read("reports/summary.md") == (source / "reports" / "summary.md").read_bytes()
        )

    # restore the folder into the restore area, as a job; the dialog offers only safe targets
    target = server.settings.data_dir / "restores" / "restored"
    page.get_by_role("button", name="Restore…").click()
    dialog = page.get_by_role("dialog")
    expect(dialog.get_by_label("Only this file or folder (optional)")).to_have_value("reports")
    expect(dialog.locator("input[name=destination]")).to_have_count(3)
    expect(dialog.get_by_text("Download", exact=True)).to_be_visible()
    expect(dialog.get_by_text("Into a restore area")).to_be_visible()
    expect(dialog.get_by_text("Back to where it came from")).to_be_visible()
    expect(dialog.get_by_text("Onto a restore device")).to_have_count(0)
    # In place needs an explicit choice and a confirmation before anything is asked for.
    dialog.get_by_text("Back to where it came from").click()
    expect(dialog.get_by_text("Keep both", exact=True)).to_be_visible()
    shots.take(page, "restore-dialog")
    dialog.get_by_role("button", name="Start restore").click()
    expect(dialog.get_by_role("alert")).to_contain_text("keep both or overwrite")
    dialog.get_by_text("Into a restore area").click()
    dialog.get_by_role("textbox", name="New folder").fill("restored")
    dialog.get_by_role("button", name="Start restore").click()
    expect(page.locator(".toast").filter(has_text="Restore to")).to_be_visible()
    page.locator(".toast").filter(has_text="Restore to").get_by_role(
        "link", name="Watch progress"
    ).click()
    expect(page.get_by_role("heading", name=re.compile("^Restore of"))).to_be_visible()
    expect(page.locator(".page-head .pill")).to_have_text("Succeeded")
    restored = target / "reports" / "summary.md"
    assert restored.read_bytes() == (source / "reports" / "summary.md").read_bytes()


def test_dashboard_shows_the_new_point(admin_page: Any, backed_up: str, shots: Screenshots):
    """The asset's row: last good point with its age, RPO met, the copy and where it lives;
    the capacity card with its chart."""
    page = admin_page
    expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    row = page.locator(f"tr[data-asset={ASSET}]")
    expect(row).to_be_visible()
    expect(page.get_by_role("columnheader", name="Last good point")).to_be_visible()
    expect(row.get_by_role("link", name=re.compile(r"\d{4}, \d\d:\d\d"))).to_be_visible()
    expect(row).to_contain_text(re.compile(r"just now|minutes? ago"))
    expect(row).to_contain_text("RPO met")
    expect(row).to_contain_text("Target 1 day")
    expect(row).to_contain_text("1 copy")
    expect(row).to_contain_text("disk pool")
    expect(page.get_by_text("1 of 1 met")).to_be_visible()
    capacity = page.get_by_role("region", name="Capacity")
    expect(capacity.get_by_role("img", name=re.compile("^Used .* of"))).to_be_visible()
    expect(capacity).to_contain_text("used")
    # One day of backups is no rate to forecast from (appliance.protection.MIN_TREND_DAYS).
    expect(capacity).to_contain_text("Too early for a forecast: 1 day of backups so far")
    shots.take(page, "dashboard", tablet=True)


def test_live_progress_waiting_cancel_and_retry(
    admin_page: Any, server: LiveServer, shots: Screenshots
):
    """The jobs screen follows running jobs over server-sent events: the percentage grows
    without a reload; a job queued behind another says why it waits; cancel and retry."""
    page = admin_page
    nav(page, "Jobs")
    expect(page.locator(".live")).to_contain_text("Live")
    jobs = server.service.jobs
    first = jobs.submit("web_test_transfer", {"lane": "a", "steps": 400, "pause": 0.05})
    second = jobs.submit("web_test_transfer", {"lane": "a", "steps": 4, "pause": 0.01})
    row1 = page.locator(f"tr[data-job='{first.id}']")
    row2 = page.locator(f"tr[data-job='{second.id}']")
    expect(row1).to_contain_text("Running")
    expect(row2).to_contain_text("Waiting for job")
    expect(row2).to_contain_text("is busy")

    def percent() -> int:
        text = row1.locator(".jp-pct").inner_text().strip()
        return int(text.rstrip("%") or 0)

    start = percent()
    deadline = time.monotonic() + 10
    while percent() < start + 3 and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    assert percent() >= start + 3, f"progress did not move live: {start}% -> {percent()}%"
    expect(row1).to_contain_text(re.compile(r"MB of [\d.]+ GB"))
    expect(row1).to_contain_text("left")
    shots.take(page, "jobs-live", tablet=True)

    # the job's own screen follows it too: figures and log lines arrive as they happen
    row1.get_by_role("link", name=re.compile("^Details")).click()
    expect(page.get_by_role("heading", name="Test transfer a")).to_be_visible()
    expect(page.locator(".dl-grid")).to_contain_text("Time left")
    expect(page.locator(".log")).to_contain_text("copied part 21 of 400")
    shots.take(page, "job-live")
    page.go_back()
    expect(row1).to_contain_text("Running")

    row1.get_by_role("button", name=re.compile("^Cancel")).click()
    expect(row1).to_contain_text("Cancelled")
    expect(row2).to_contain_text("Succeeded")
    expect(row2.locator(".jp-pct")).to_have_text("100%")

    row1.get_by_role("button", name=re.compile("^Retry")).click()
    expect(page.locator(".toast").filter(has_text="started again")).to_be_visible()
    retried = page.locator("tr[data-job]").filter(has_text="test transfer a").first
    expect(retried).to_contain_text("Running")
    retried.get_by_role("button", name=re.compile("^Cancel")).click()
    expect(retried).to_contain_text("Cancelled")

    page.get_by_role("tab", name="Cancelled").click()
    expect(page.locator("tr[data-job]")).to_have_count(2)
    page.get_by_role("tab", name="Failed").click()
    expect(page.get_by_text("No failed jobs")).to_be_visible()


def test_dashboard_shows_the_last_proven_boot_and_a_failed_boot_test(
    admin_page: Any,
    server: LiveServer,
    admin_api: httpx.Client,
    backed_up: str,
    tmp_path: Path,
    shots: Screenshots,
):
    """A VM's row says when its boot was last proven and the RTO; a failed boot test raises an
    alert at the top, in words, linking to its session. The policy form offers a boot test for
    the VM. (Boot-test sessions are written to the catalog as the failover code records them.)"""
    page = admin_page
    disk = tmp_path / "vm-web.raw"
    disk.write_bytes(b"\0" * 65536)
    r = admin_api.post("/api/assets", json={"name": "vm-web", "kind": "vm", "disks": [str(disk)]})
    assert r.status_code in (201, 409), r.text
    catalog = server.service.app.catalog
    proven = catalog.add_failover_session("vm-web", "0123456789abcdef", {"purpose": "boot_test"})
    proven_at = server.clock() - timedelta(hours=3)
    catalog.update_failover_session(
        proven.id,
        state="running",
        details={"proven_at": proven_at.isoformat(), "rto_seconds": 11.2},
    )
    catalog.update_failover_session(proven.id, state="stopped")
    page.reload()
    row = page.locator("tr[data-asset=vm-web]")
    expect(page.get_by_role("columnheader", name="Boot test")).to_be_visible()
    expect(row).to_contain_text("Boot proven")
    expect(
        row.get_by_role("link", name="Last proven boot: 3 hours ago, RTO 11.2 s")
    ).to_have_attribute("href", f"#/failover/{proven.id}")
    expect(page.get_by_role("region", name="Alerts").filter(has_text="vm-web")).to_have_count(0)

    failed = catalog.add_failover_session("vm-web", "0123456789abcdef", {"purpose": "boot_test"})
    catalog.update_failover_session(
        failed.id,
        state="failed",
        details={
            "error": "boot proof failed after 120 s: serial console never printed a line "
            "matching 'login:'",
            "failed_at": server.clock().isoformat(),
        },
    )
    page.get_by_role("button", name="Refresh").click()
    alerts = page.get_by_role("region", name="Alerts")
    message = (
        "last boot test of vm-web failed: serial console never printed a line matching 'login:'"
    )
    link = alerts.get_by_role("link", name=message)
    expect(link).to_be_visible()
    expect(link).to_have_attribute("href", f"#/failover/{failed.id}")
    expect(alerts).to_contain_text("Critical")
    expect(row).to_contain_text("Boot test failed")
    expect(row).to_contain_text("serial console never printed")
    expect(row).to_contain_text("Last proven boot: 3 hours ago, RTO 11.2 s")
    # The summary card agrees with the banner: something needs attention.
    attention = page.locator(".stat").filter(has_text="Needs attention")
    expect(attention).to_contain_text("1 alert")
    shots.take(page, "dashboard-boot-test")

    # The policy form: a boot test is offered for the VM (and not for a folder).
    nav(page, "Assets & policies")
    page.get_by_role("button", name="Add policy").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name").fill("vm-web-verify")
    for box in dialog.get_by_role("checkbox").all():
        box.uncheck()
    dialog.get_by_role("checkbox", name="docs (folder)").check()
    expect(dialog.get_by_role("button", name="Add a boot test")).to_be_hidden()
    dialog.get_by_role("checkbox", name="docs (folder)").uncheck()
    dialog.get_by_role("checkbox", name="vm-web (virtual machine)").check()
    dialog.get_by_role("button", name="Add a boot test").click()
    expect(dialog).to_contain_text("Boot test of the newest point")
    dialog.get_by_role("button", name="Add policy").click()
    expect(page.locator(".toast").filter(has_text="Policy vm-web-verify added.")).to_be_visible()
    policy = admin_api.get("/api/policies/vm-web-verify").json()
    assert [e["mode"] for e in policy["schedule"]["entries"]] == ["incremental", "boot_test"]
    expect(page.get_by_role("table", name="Protection policies")).to_contain_text(
        "Boot test of the newest point"
    )
