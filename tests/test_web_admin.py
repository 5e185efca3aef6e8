"""The admin screens in a real browser: users and API tokens, the audit log, pools and
locations, settings and maintenance (the recovery key shown once), and what a viewer's page
leaves out. Split from test_web.py (first run, assets, jobs, browsing); same conventions.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import ADMIN, LiveServer, bootstrapped_server, login
from web_support import (
    LAPTOP,
    SCREENSHOTS_ENV,
    PageWatch,
    Screenshots,
    expect,
    nav,
    sign_in,
    signed_in,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("web-admin"), keep_env=(SCREENSHOTS_ENV,)
    ) as live:
        yield live


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Screenshots:
    return Screenshots(tmp_path_factory.mktemp("screenshots"))


@pytest.fixture
def admin_page(browser: Any, server: LiveServer) -> Iterator[Any]:
    with signed_in(browser, server, *ADMIN) as page:
        yield page


@pytest.fixture
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    context = browser.new_context(viewport=LAPTOP, locale="en-GB")
    page = context.new_page()
    watch = PageWatch(page, server.url)
    yield page
    context.close()
    watch.check()


def test_users_tokens_audit_and_pools(
    admin_page: Any, server: LiveServer, admin: httpx.Client, tmp_path: Path, shots: Screenshots
):
    """Create a user with a role; create an API token (shown once, works), revoke it; the audit
    log and the pools screen in words."""
    page = admin_page
    nav(page, "Users & tokens")
    page.get_by_role("button", name="Add user").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("User name").fill("olivia")
    dialog.get_by_label("Role").select_option("operator")
    dialog.get_by_label("Password").fill("short")
    dialog.get_by_role("button", name="Add user").click()
    expect(dialog.get_by_role("alert")).to_contain_text("Password must be at least 8 characters")
    dialog.get_by_label("Password").fill("olivia-password-1")
    dialog.get_by_role("button", name="Add user").click()
    user = page.locator("tr[data-user=olivia]")
    expect(user.get_by_label("Role of olivia")).to_have_value("operator")

    page.get_by_role("button", name="Create token").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("For user").select_option("olivia")
    dialog.get_by_label("Role of the token").select_option("viewer")
    dialog.get_by_role("button", name="Create token").click()
    reveal = page.get_by_role("dialog").filter(has_text="Your new API token")
    expect(reveal).to_contain_text("this is the only time it is shown")
    token = reveal.get_by_label(re.compile("^API token for olivia")).input_value()
    assert token.startswith("apl_")
    with server.client(headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.get("/api/me").json() == {"name": "olivia", "role": "viewer", "via": "token"}
    shots.take(page, "token-once")
    reveal.get_by_role("button", name="Done").click()
    token_row = page.locator("tr[data-token]").filter(has_text="olivia")
    expect(token_row).to_contain_text("Active")
    expect(token_row).to_contain_text("Viewer")
    shots.take(page, "users", tablet=True)

    token_row.get_by_role("button", name=re.compile("^Revoke")).click()
    page.get_by_role("dialog").get_by_role("button", name="Revoke token").click()
    expect(token_row).to_contain_text("Revoked")
    with server.client(headers={"Authorization": f"Bearer {token}"}) as c:
        assert c.get("/api/me").status_code == 401

    # Disabling signs the user out everywhere and refuses sign-in; enabling lets them back.
    with server.client() as c:
        c.headers["X-CSRF-Token"] = login(c, "olivia", "olivia-password-1")
        user.get_by_role("button", name="Disable olivia").click()
        page.get_by_role("dialog").get_by_role("button", name="Disable user").click()
        expect(user).to_contain_text("Disabled")
        assert c.get("/api/me").status_code == 401
        assert (
            c.post(
                "/api/login", json={"name": "olivia", "password": "olivia-password-1"}
            ).status_code
            == 403
        )
    user.get_by_role("button", name="Enable olivia").click()
    expect(user).not_to_contain_text("Disabled")

    # The row's trash-can button asks first, then deletes: the user is gone for the API too.
    user.get_by_role("button", name="Delete user olivia").click()
    confirm = page.get_by_role("dialog")
    expect(confirm).to_contain_text("They can no longer sign in")
    confirm.get_by_role("button", name="Delete user").click()
    expect(page.locator(".toast").filter(has_text="User olivia deleted.")).to_be_visible()
    expect(user).to_have_count(0)
    assert admin.get("/api/users/olivia").status_code == 404

    nav(page, "Audit log")
    table = page.get_by_role("table", name="Audit log")
    expect(table).to_contain_text("Revoked an API token")
    expect(table).to_contain_text("Created an API token")
    expect(table).to_contain_text("Added user olivia")
    page.get_by_label("Filter the audit log").fill("olivia")
    expect(table.locator("tbody tr").first).to_contain_text("olivia")
    shots.take(page, "audit")

    nav(page, "Pools")
    pool = page.locator(".pool").first
    expect(pool.get_by_role("heading", name="default")).to_be_visible()
    expect(pool).to_contain_text("used of")
    expect(pool).to_contain_text("Backup store")

    # Locations: the appliance's own pool, and a folder added from the page.
    locations = page.get_by_role("table", name="Locations")
    expect(locations.locator("tbody tr")).to_have_count(1)
    expect(locations).to_contain_text("this appliance's pool")
    folder = tmp_path / "second-disk"
    folder.mkdir()
    page.get_by_role("button", name="Add location").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Folder").fill(str(folder))
    dialog.get_by_label("Name").fill("second-disk")
    dialog.get_by_label(re.compile("Only when a disk is mounted")).uncheck()
    dialog.get_by_role("button", name="Add location").click()
    row = page.locator("tr[data-location=second-disk]")
    expect(row).to_contain_text("Available")
    expect(row).to_contain_text("0 points")
    shots.take(page, "pools")
    assert (folder / "location.json").is_file()


def test_settings_maintenance_and_recovery_key(
    admin_page: Any, admin: httpx.Client, tmp_path: Path, shots: Screenshots
):
    """Rename the appliance (the header follows), set where restores may go, start a store
    verification, and show the recovery key (which the audit log records)."""
    page = admin_page
    nav(page, "Settings")
    page.get_by_label("Appliance name").fill("Branch office backup")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator(".appliance-name")).to_have_text("Branch office backup")
    page.get_by_label("Time zone of the schedules").fill("Mars/Olympus")
    page.get_by_role("button", name="Save settings").click()
    expect(page.get_by_role("alert")).to_contain_text("Mars/Olympus")
    page.get_by_label("Time zone of the schedules").fill("UTC")

    # Where restores may go: a system folder is refused with the rule in words; a folder is kept.
    area = tmp_path / "restore-area"
    area.mkdir()
    page.get_by_label("Restore areas (one folder per line)").fill("/etc")
    page.get_by_role("button", name="Save restore targets").click()
    expect(page.get_by_role("alert").filter(has_text="system folder /etc")).to_be_visible()
    page.get_by_label("Restore areas (one folder per line)").fill(str(area))
    page.get_by_role("button", name="Save restore targets").click()
    expect(page.locator(".toast").filter(has_text="Restore targets saved.")).to_be_visible()
    assert str(area) in admin.get("/api/settings/restore").json()["areas"]
    shots.take(page, "settings")
    assert admin.put("/api/settings/restore", json={}).status_code == 200

    page.get_by_role("button", name="Verify now").click()
    expect(page.locator(".toast").filter(has_text="Store verification started.")).to_be_visible()
    page.get_by_role("button", name="Show the recovery key").click()
    expect(page.get_by_label("The store's recovery key")).to_contain_text(re.compile(r"\w{4}"))
    # Once an admin confirmed keeping it (the first-run wizard's step), Settings does not show
    # it again: it names the console command that does.
    assert admin.post("/api/system/recovery-key/confirm").status_code == 200
    page.reload()
    page.get_by_role("button", name="Show the recovery key").click()
    expect(page.get_by_role("alert").filter(has_text="key export --paper")).to_be_visible()
    expect(page.get_by_label("The store's recovery key")).to_have_count(0)
    nav(page, "Audit log")
    expect(page.get_by_role("table", name="Audit log")).to_contain_text("Viewed the recovery key")


def test_roles_shape_the_page(page: Any, server: LiveServer, admin: httpx.Client):
    """A viewer sees no admin screens and no buttons that would be refused."""
    r = admin.post(
        "/api/users", json={"name": "vera", "role": "viewer", "password": "vera-password-1"}
    )
    assert r.status_code in (201, 409), r.text
    sign_in(page, server.url, "vera", "vera-password-1")
    expect(page.locator(".user-role")).to_have_text("Viewer")
    menu = page.get_by_role("navigation", name="Main")
    # Replication, Alerts, Recovery plans, Tape, Hosts: every role reads them.
    expect(menu.get_by_role("link")).to_have_count(12)
    expect(menu.get_by_role("link", name="Hosts")).to_have_count(1)
    expect(menu).not_to_contain_text("Users & tokens")
    nav(page, "Assets & policies")
    expect(page.get_by_role("button", name="Add asset")).to_have_count(0)
    expect(page.get_by_role("button", name=re.compile("Back up .* now"))).to_have_count(0)
    page.goto(server.url + "/#/users")
    expect(page.get_by_role("alert")).to_contain_text("Not allowed for your role")
