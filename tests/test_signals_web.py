"""The ransomware warning on the points page (Playwright on Chromium against a live service on
127.0.0.1): the suspicious badge with its reasons, the review buttons for an operator, none for a
viewer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from api_support import PASSWORDS, LiveServer, bootstrapped_server
from test_signals import encrypt, make_office, normal_day
from web_support import SCREENSHOTS_ENV, Screenshots, expect, signed_in_page


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("web-signals"), keep_env=(SCREENSHOTS_ENV,)
    ) as live:
        yield live


@pytest.fixture(scope="module")
def attacked(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Four ordinary backups of a folder, then one after a simulated encryption."""
    app = server.service.app
    src = tmp_path_factory.mktemp("office") / "share"
    make_office(src)
    for n in range(4):
        if n:
            normal_day(src, n)
        assert app.backup_files(str(src), "office").point.suspicion == []
    encrypt(src)
    point = app.backup_files(str(src), "office").point
    assert point.suspicion
    return point.id


def test_a_viewer_sees_the_reasons_without_buttons(
    browser: Any, server: LiveServer, attacked: str
) -> None:
    page, watch = signed_in_page(browser, server, "viewer", PASSWORDS["viewer"])
    page.goto(server.url + "/#/points?asset=office")
    row = page.locator(f"tr[data-point='{attacked}']")
    expect(row.locator(".suspicion-reasons")).to_contain_text("gained the extension .locked.")
    expect(row.locator(".pill", has_text="Suspicious")).to_be_visible()  # nobody answered yet
    expect(row.get_by_role("button", name="It was expected")).to_have_count(0)
    page.context.close()
    watch.check()


def test_an_operator_sees_why_and_answers(
    browser: Any, server: LiveServer, attacked: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    page, watch = signed_in_page(browser, server, "operator", PASSWORDS["operator"])
    page.goto(server.url + "/#/points?asset=office")
    expect(page.get_by_role("alert")).to_contain_text("One backup looks like ransomware at work")
    row = page.locator(f"tr[data-point='{attacked}']")
    expect(row.locator(".pill", has_text="Suspicious")).to_be_visible()
    expect(row.locator(".suspicion-reasons")).to_contain_text("gained the extension .locked.")
    expect(row.locator(".suspicion-reasons")).to_contain_text("% of files changed against a usual")
    Screenshots(tmp_path_factory.mktemp("shots")).take(page, "points-suspicious")
    row.get_by_role("button", name="It is an attack").click()
    page.locator("dialog button[type=submit]").click()
    expect(page.get_by_text("Marked as an attack")).to_be_visible()
    row = page.locator(f"tr[data-point='{attacked}']")
    expect(row.locator(".pill", has_text="Attack confirmed")).to_be_visible()
    expect(row.get_by_role("button", name="It is an attack")).to_have_count(0)
    row.get_by_role("button", name="It was expected").click()
    page.locator("dialog button[type=submit]").click()
    expect(page.get_by_text("Marked as expected")).to_be_visible()
    row = page.locator(f"tr[data-point='{attacked}']")
    expect(row.locator(".pill", has_text="Looked at")).to_be_visible()
    expect(page.get_by_role("alert")).to_have_count(0)
    assert server.service.app.point(attacked).review["verdict"] == "expected"
    page.context.close()
    watch.check()
