"""Helpers of the browser tests: Playwright on Debian's Chromium, screenshots, signing in.

Playwright drives ``/usr/bin/chromium`` (never a browser Playwright downloads). A missing
Playwright or Chromium FAILS the tests with the install step: the page must not go untested
silently on a machine that was set up halfway.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError:  # reported by require_playwright(), as a failure
    sync_playwright = None  # type: ignore[assignment]
    expect = None  # type: ignore[assignment]
    Browser = BrowserContext = Page = Any  # type: ignore[assignment,misc]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
]
INSTALL_HINT = (
    "run scripts/setup (it installs Debian's chromium and the dev extra with playwright), "
    "or by hand: apt-get install -y chromium && .venv/bin/pip install -e '.[dev]'. "
    "Never run `playwright install`: the tests use /usr/bin/chromium."
)
LAPTOP = {"width": 1280, "height": 800}
TABLET = {"width": 768, "height": 1024}
#: Set to a folder (e.g. docs/screenshots) to copy the screenshots there as well.
SCREENSHOTS_ENV = "APPLIANCE_WEB_SCREENSHOTS"


def require_playwright() -> Callable[[], Any]:
    if sync_playwright is None:
        pytest.fail(f"Playwright for Python is not installed: {INSTALL_HINT}", pytrace=False)
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: {INSTALL_HINT}", pytrace=False)
    return sync_playwright


#: How long ``expect`` waits by default (a loaded CI machine runs QEMU beside the browser).
EXPECT_TIMEOUT_MS = 20_000


@contextlib.contextmanager
def launched_browser() -> Iterator[Any]:
    """Headless Debian Chromium under Playwright. One per test session (conftest's ``browser``):
    a second sync Playwright cannot start while the first one runs."""
    playwright_factory = require_playwright()
    with playwright_factory() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        expect.set_options(timeout=EXPECT_TIMEOUT_MS)
        try:
            yield browser
        finally:
            browser.close()


class Screenshots:
    """Saves full-page screenshots into a temporary folder (and the docs folder on request)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        extra = os.environ.get(SCREENSHOTS_ENV)
        self.extra = Path(extra) if extra else None
        self.taken: list[Path] = []

    def take(self, page: Page, name: str, *, tablet: bool = False) -> None:
        """``name``-1280.png, and ``name``-768.png too when ``tablet``."""
        sizes = [LAPTOP, TABLET] if tablet else [LAPTOP]
        original = page.viewport_size
        # notifications come and go: leave them out of the pictures
        page.evaluate("document.querySelectorAll('.toast').forEach((t) => t.remove())")
        # sticky header and sidebar are drawn where the window is scrolled to: start at the top
        page.evaluate("window.scrollTo(0, 0)")
        for size in sizes:
            if page.viewport_size != size:
                page.set_viewport_size(size)
                page.wait_for_timeout(150)  # let the layout settle
            path = self.directory / f"{name}-{size['width']}.png"
            page.screenshot(path=str(path), full_page=True, animations="disabled", caret="hide")
            self.taken.append(path)
            if self.extra is not None:
                self.extra.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, self.extra / path.name)
        if original and page.viewport_size != original:
            page.set_viewport_size(original)


class PageWatch:
    """Records what must never happen on the page: script errors, blocked content (CSP) and
    requests that leave the appliance (the page works offline: no CDN)."""

    def __init__(self, page: Page, origin: str) -> None:
        self.origin = origin
        self.errors: list[str] = []
        self.foreign: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(f"script error: {exc}"))
        page.on("console", self._console)
        page.on("request", self._request)

    def _console(self, message: Any) -> None:
        text = message.text
        if message.type == "error" and ("Content Security Policy" in text or "Refused to" in text):
            self.errors.append(f"blocked: {text}")

    def _request(self, request: Any) -> None:
        url = request.url
        if not (url.startswith(self.origin) or url.startswith(("data:", "blob:", "about:"))):
            self.foreign.append(url)

    def check(self) -> None:
        assert not self.errors, self.errors
        assert not self.foreign, f"the page fetched from outside the appliance: {self.foreign}"


def sign_in(page: Page, url: str, name: str, password: str) -> None:
    page.goto(url + "/")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator(".user-name")).to_have_text(name)


def add_api_session(page: Page, server: Any, name: str, password: str, *, path: str = "/") -> None:
    """Sign ``page``'s browser context in as ``name`` with a session from the API (the sign-in
    form is tested by itself) and open ``path``."""
    from api_support import login

    with server.client() as c:
        login(c, name, password)
        cookies = [{"name": n, "value": v, "url": server.url} for n, v in c.cookies.items()]
    page.context.add_cookies(cookies)
    page.goto(server.url + path)
    expect(page.locator(".user-name")).to_have_text(name)


def signed_in_page(
    browser: Browser, server: Any, name: str, password: str, *, path: str = "/"
) -> tuple[Page, PageWatch]:
    """A new page of ``server`` (an api_support LiveServer) signed in as ``name`` and its watch;
    over TLS the browser accepts the appliance's own certificate."""
    context = browser.new_context(
        viewport=LAPTOP, locale="en-GB", ignore_https_errors=server.url.startswith("https:")
    )
    page = context.new_page()
    watch = PageWatch(page, server.url)
    add_api_session(page, server, name, password, path=path)
    return page, watch


@contextlib.contextmanager
def signed_in(
    browser: Browser, server: Any, name: str, password: str, *, path: str = "/"
) -> Iterator[Page]:
    """:func:`signed_in_page` for a ``with`` block (or a fixture): the page's watch is checked
    when the block ends without an error, and its browser context closed in any case."""
    page, watch = signed_in_page(browser, server, name, password, path=path)
    try:
        yield page
        watch.check()
    finally:
        page.context.close()


def nav(page: Page, label: str) -> None:
    """Follow a link of the main navigation and wait for the screen's heading."""
    page.get_by_role("navigation", name="Main").get_by_role("link", name=label).click()
    expect(page.get_by_role("heading", level=1)).to_be_visible()
