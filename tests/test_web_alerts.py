"""The Alerts screen (Playwright driving Debian's Chromium, headless) against a live uvicorn on
127.0.0.1 and a real webhook receiver (http.server on 127.0.0.1):

- an operator sees a failed backup's alert in words and acknowledges it; it leaves the list of
  what needs attention and shows under "Acknowledged", by whom;
- an administrator adds a webhook channel from the page, and "Send test alert" reaches the
  receiver; a channel whose receiver is gone says why in the banner.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from api_support import ADMIN, PASSWORDS, LiveServer, bootstrapped_server, free_port
from web_support import SCREENSHOTS_ENV, expect, signed_in_page

from appliance.alerts.events import AlertEvent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("web-alerts"), keep_env=(SCREENSHOTS_ENV,)
    ) as live:
        yield live


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/hook", received
    finally:
        httpd.shutdown()
        thread.join(10)


def test_an_operator_acknowledges_a_failed_backup(browser: Any, server: LiveServer) -> None:
    service = server.service
    alert = service.alerts.emit(
        AlertEvent(
            "backup_failed",
            "docs",
            "The backup of docs failed: the folder /srv/docs does not exist",
            service.now(),
        )
    )
    assert alert is not None
    page, watch = signed_in_page(browser, server, "operator", PASSWORDS["operator"])
    page.get_by_role("link", name="Alerts").click()
    row = page.locator(f'tr[data-alert="{alert.id}"]')
    expect(row).to_contain_text("A backup failed")
    expect(row).to_contain_text("the folder /srv/docs does not exist")
    expect(row).to_contain_text("Needs attention")
    # No channel yet: the page says where the alert went.
    expect(row).to_contain_text("Shown here only")
    row.get_by_role("button", name="Acknowledge: A backup failed (docs)").click()
    expect(page.locator(".toast")).to_contain_text("Acknowledged")
    expect(row).to_have_count(0)
    expect(page.get_by_text("No open alerts")).to_be_visible()
    # An empty list is not "all is well": it points to the dashboard for protection gaps.
    expect(page.locator(".empty")).to_contain_text("What is not fully protected")
    page.get_by_label("Show").select_option("acknowledged")
    expect(row).to_contain_text("Acknowledged by operator")
    # An operator does not manage channels.
    expect(page.get_by_role("button", name="Add webhook")).to_have_count(0)
    with server.as_role("admin") as admin:
        entries = admin.get("/api/audit").json()
    assert any(e["action"] == "alert.acknowledge" and e["actor"] == "operator" for e in entries)
    page.context.close()
    watch.check()


def test_an_admin_adds_a_webhook_and_sends_a_test_alert(
    browser: Any, server: LiveServer, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    url, received = receiver
    page, watch = signed_in_page(browser, server, *ADMIN)
    page.goto(server.url + "/#/alerts")
    page.get_by_role("button", name="Add webhook").click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_label("Name").fill("phone")
    dialog.get_by_label("Kind of receiver").select_option("ntfy")
    dialog.get_by_label("Address").fill(url + "/backups")
    dialog.get_by_role("button", name="Add channel").click()
    row = page.locator('tr[data-channel="phone"]')
    expect(row).to_contain_text("ntfy at 127.0.0.1")
    before = len(received)
    row.get_by_role("button", name="Send a test alert to phone").click()
    expect(page.locator(".toast").last).to_contain_text("Test alert sent to phone.")
    assert len(received) == before + 1
    assert received[-1]["topic"] == "backups" and "test alert" in received[-1]["message"]

    # A receiver that is gone: the banner says what went wrong.
    with server.as_role("admin") as admin:
        r = admin.post(
            "/api/alert-channels",
            json={
                "name": "gone",
                "kind": "webhook",
                "webhook": {"preset": "generic", "timeout": 5},
                "url": f"http://127.0.0.1:{free_port()}/hook",
            },
        )
        assert r.status_code == 201, r.text
    page.reload()
    page.locator('tr[data-channel="gone"]').get_by_role(
        "button", name="Send a test alert to gone"
    ).click()
    banner = page.locator(".banner-error")
    expect(banner).to_contain_text("The test alert did not reach gone")
    expect(banner).to_contain_text("Could not reach the webhook at 127.0.0.1")
    page.context.close()
    watch.check()
