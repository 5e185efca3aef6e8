"""The Alerts entry of the navigation carries the number of open, unacknowledged alerts
(Playwright driving Debian's Chromium, headless, against a live uvicorn on 127.0.0.1):

- hidden while nothing is open; raised alerts show up at the next poll of the page (the page's
  timers run on Playwright's clock, moved past the 30 s poll) in the colour of the most severe;
- acknowledging an alert on the Alerts screen lowers it at once, resolving the last hides it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from api_support import PASSWORDS, LiveServer, bootstrapped_server
from web_support import LAPTOP, PageWatch, add_api_session, expect

from appliance.alerts.events import AlertEvent

#: main.js BADGE_SECONDS, and a second more.
POLL_MS = 31_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("web-alert-badge")) as live:
        yield live


def raise_alert(server: LiveServer, kind: str, subject: str, message: str) -> int:
    alert = server.service.alerts.emit(AlertEvent(kind, subject, message, server.service.now()))
    assert alert is not None
    return int(alert.id)


def test_the_alerts_entry_counts_what_is_open_and_follows_the_page(
    browser: Any, server: LiveServer
) -> None:
    context = browser.new_context(viewport=LAPTOP, locale="en-GB")
    page = context.new_page()
    watch = PageWatch(page, server.url)
    page.clock.install()  # the page's timers run when the test moves this clock
    add_api_session(page, server, "operator", PASSWORDS["operator"])
    link = page.locator(".nav-link", has_text="Alerts")
    badge = link.locator(".nav-badge")
    number = badge.locator(".nav-badge-n")  # the rest is for screen readers: "Alerts 2 open alerts"
    expect(page.locator(".user-name")).to_have_text("operator")
    expect(badge).to_be_hidden()  # nothing open

    filling = raise_alert(
        server, "pool_filling", "big", "Disk pool big will be full in about 9 days."
    )
    expect(badge).to_be_hidden()  # not read yet: the page polls
    page.clock.run_for(POLL_MS)
    expect(badge).to_be_visible()
    expect(number).to_have_text("1")
    expect(badge).to_have_class("nav-badge nav-badge-warn")
    expect(page.get_by_role("link", name="Alerts 1 open alert")).to_be_visible()

    failed = raise_alert(
        server, "backup_failed", "docs", "The backup of docs failed: the folder is gone."
    )
    page.clock.run_for(POLL_MS)
    expect(number).to_have_text("2")
    expect(badge).to_have_class("nav-badge nav-badge-bad")  # the most severe decides
    expect(badge).to_have_attribute("title", "2 open alerts not acknowledged")

    # Acknowledged on the Alerts screen: the badge follows at once, no poll needed.
    link.click()
    row = page.locator(f'tr[data-alert="{failed}"]')
    row.get_by_role("button", name="Acknowledge: A backup failed (docs)").click()
    expect(row).to_have_count(0)
    expect(number).to_have_text("1")
    expect(badge).to_have_class("nav-badge nav-badge-warn")
    page.locator(f'tr[data-alert="{filling}"]').get_by_role("button", name="Resolve").click()
    expect(badge).to_be_hidden()

    # Raised elsewhere (by the API, another browser): the next screen change reads it too.
    raise_alert(server, "usb_overdue", "weekly", "USB disk USB-A of weekly is 4 days overdue.")
    page.locator(".nav-link", has_text="Dashboard").click()
    expect(number).to_have_text("1")
    with server.as_role("admin") as admin:
        assert admin.get("/api/alerts/counts").json()["total"] == 1
    context.close()
    watch.check()
