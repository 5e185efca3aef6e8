"""The live console on the session screen, in headless Chromium, with real QEMU (TCG here).

The test guest is failed over through the API; the session screen connects noVNC to the
service's WebSocket relay; a key typed into the canvas reaches the guest (its serial console,
shown on the page, says ``key: q``) and changes what the canvas shows. The guest's cursor
blinks, so the canvas is compared against every picture it showed while idle, not against one.
A viewer gets the screenshot only; without noVNC the panel names the package to install.

One boot (~6-30 s under TCG). Missing QEMU, Playwright or Chromium FAILS with the install step.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_support import ADMIN, PASSWORDS, LiveServer
from console_support import (
    console_server,
    running_guest,
    wait_serial,
)
from web_support import EXPECT_TIMEOUT_MS, LAPTOP, TABLET, expect, signed_in

from api import console as console_module

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with console_server(tmp_path_factory.mktemp("web-console")) as live:
        yield live


@pytest.fixture(scope="module")
def session(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    with running_guest(admin, operator, tmp_path_factory.mktemp("web-console-vm")) as running:
        yield running


def canvas_picture(page: Any) -> str:
    png = page.locator(".console-screen canvas").screenshot()
    return hashlib.sha256(png).hexdigest()


def idle_pictures(page: Any, seconds: float = 2.5) -> set[str]:
    """Every picture the canvas shows while nobody types (the cursor blinks)."""
    seen = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.add(canvas_picture(page))
        time.sleep(0.2)
    return seen


def open_session(page: Any, server: LiveServer, session_id: str) -> None:
    page.goto(f"{server.url}/#/failover/{session_id}")
    expect(page.locator(".console-live")).to_be_visible(timeout=EXPECT_TIMEOUT_MS)
    expect(page.locator(".console-screen")).to_have_attribute(
        "data-connected", "true", timeout=EXPECT_TIMEOUT_MS
    )
    expect(page.locator(".console-status")).to_contain_text("Connected")


def test_typing_into_the_console_reaches_the_vm(
    browser: Any, server: LiveServer, viewer: httpx.Client, session: dict[str, Any]
) -> None:
    with signed_in(browser, server, *ADMIN) as page:
        open_session(page, server, session["id"])
        # the screenshot card gives way to the live screen
        expect(page.locator(".fo-screen")).to_be_hidden()
        canvas = page.locator(".console-screen canvas")
        expect(canvas).to_be_visible()
        idle = idle_pictures(page)
        assert 1 <= len(idle) <= 3, "the idle screen keeps changing"
        canvas.click()
        page.keyboard.press("q")
        wait_serial(viewer, session["id"], "key: q")
        # the page's serial tail shows it too, and the canvas shows a picture never seen idle
        expect(page.locator(".fo-serial")).to_contain_text("key: q", timeout=EXPECT_TIMEOUT_MS)
        deadline = time.monotonic() + 10
        changed = False
        while not changed and time.monotonic() < deadline:
            changed = canvas_picture(page) not in idle
            time.sleep(0.2)
        assert changed, "the canvas did not change after a key was typed"
        # the live screen never makes the page wider than the window
        for size in (LAPTOP, TABLET):
            page.set_viewport_size(size)
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= size["width"], (size, width)


def test_paste_as_keystrokes_and_ctrl_alt_del_from_the_page(
    browser: Any, server: LiveServer, viewer: httpx.Client, session: dict[str, Any]
) -> None:
    with signed_in(browser, server, "operator", PASSWORDS["operator"]) as page:
        open_session(page, server, session["id"])
        page.get_by_role("button", name="Paste as keystrokes").click()
        box = page.get_by_label("Text to type into the VM")
        expect(box).to_be_focused()
        box.fill("Z!")
        page.get_by_role("button", name="Type it").click()
        expect(page.locator(".toast")).to_contain_text("2 keys typed into the VM.")
        expect(box).to_be_hidden()
        serial = wait_serial(viewer, session["id"], "key: !")
        keys = [line for line in serial.splitlines() if line.startswith("key: ")]
        assert keys[-2:] == ["key: Z", "key: !"], keys
        # scale to fit is the default; the button switches to the actual size and back
        page.get_by_role("button", name="Actual size").click()
        expect(page.get_by_role("button", name="Scale to fit")).to_be_visible()
        page.get_by_role("button", name="Ctrl-Alt-Del").click()
        expect(page.locator(".toast").last).to_contain_text("Ctrl-Alt-Del sent to the VM.")


def test_a_viewer_sees_the_screenshot_only(
    browser: Any, server: LiveServer, session: dict[str, Any]
) -> None:
    with signed_in(browser, server, "viewer", PASSWORDS["viewer"]) as page:
        sockets: list[str] = []
        page.on("websocket", lambda ws: sockets.append(ws.url))
        page.goto(f"{server.url}/#/failover/{session['id']}")
        expect(page.locator(".fo-screen")).to_be_visible(timeout=EXPECT_TIMEOUT_MS)
        expect(page.locator(".console-live")).to_have_count(0)
        expect(page.get_by_role("button", name="Paste as keystrokes")).to_have_count(0)
        assert sockets == []


def test_without_novnc_the_panel_names_the_package(
    browser: Any, server: LiveServer, session: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console_module, "NOVNC_DIR", console_module.Path("/nonexistent/novnc"))
    context = browser.new_context()
    try:
        page = context.new_page()
        from api_support import login

        with server.client() as c:
            login(c, *ADMIN)
            cookies = [{"name": n, "value": v, "url": server.url} for n, v in c.cookies.items()]
        context.add_cookies(cookies)
        page.goto(f"{server.url}/#/failover/{session['id']}")
        expect(page.locator(".console-missing")).to_contain_text(
            "install the Debian package novnc", timeout=EXPECT_TIMEOUT_MS
        )
        expect(page.locator(".fo-screen")).to_be_visible(timeout=EXPECT_TIMEOUT_MS)
        expect(page.locator(".console-live")).to_be_hidden()
    finally:
        context.close()
