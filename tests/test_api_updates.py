"""The updates API: the running release and its changelog, and uploading a bundle.

Two services: one as in a checkout (no appliance OS: updates come from git, the upload is
refused with 409), one whose OS root is a temporary folder with releases side by side. The
launcher that would start ``systemd-run`` is replaced by one that records what it was given.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_support import ADMIN, LiveServer, bootstrapped_server
from test_os_releases import make_bundle

from api.routers.updates import IN_A_CHECKOUT, upgrade_command
from image.appliance_os.layout import Layout
from image.appliance_os.releases import switch_to
from image.appliance_os.upgrade import read_state, upgrades_dir

REPO = Path(__file__).resolve().parent.parent
TAR = {"Content-Type": "application/x-tar"}


def _fake_release(layout: Layout, version: str, built: str, changelog: str) -> None:
    folder = layout.release(version)
    folder.mkdir(parents=True)
    (folder / "CHANGELOG.md").write_text(changelog)
    (folder / "release.json").write_text(json.dumps({"version": version, "built": built}))


class Launches:
    def __init__(self) -> None:
        self.calls: list[tuple[Path, Path, Path]] = []
        self.fail: str | None = None

    def __call__(self, bundle: Path, root: Path, data_dir: Path) -> None:
        if self.fail:
            raise RuntimeError(self.fail)
        self.calls.append((bundle, root, data_dir))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("box")
    layout = Layout(root / "os")
    _fake_release(layout, "0.9", "2026-11-01T00:00:00+00:00", "## 0.9\n\n- older\n")
    _fake_release(layout, "1.0", "2026-12-01T00:00:00+00:00", "## 1.0\n\n- the running one\n")
    switch_to(layout, "0.9")
    switch_to(layout, "1.0")
    with bootstrapped_server(root, os_root=layout.root) as live:
        live.service.update_launcher = Launches()
        yield live


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("checkout")) as live:
        yield live


def test_a_checkout_shows_the_repository_changelog_and_refuses_uploads(
    checkout: LiveServer, tmp_path: Path
) -> None:
    with checkout.as_role("viewer") as viewer:
        body = viewer.get("/api/system/release").json()
    assert body["updates_from_page"] is False
    assert body["changelog"] == (REPO / "CHANGELOG.md").read_text()
    assert "## 0.1.0" in body["changelog"]
    assert body["previous_version"] is None and body["releases"] == []
    assert body["upgrade"] == {"running": False, "current": None, "history": []}
    with checkout.as_role("admin") as admin:
        r = admin.post("/api/system/update", content=b"x", headers=TAR)
    assert r.status_code == 409, r.text
    assert r.json()["message"] == IN_A_CHECKOUT


def test_the_release_document_lists_releases_and_the_changelog(
    server: LiveServer, viewer: Any
) -> None:
    body = viewer.get("/api/system/release").json()
    assert body["updates_from_page"] is True
    assert body["previous_version"] == "0.9"
    assert [r["version"] for r in body["releases"]] == ["1.0", "0.9"]
    assert body["changelog"] == "## 1.0\n\n- the running one\n"
    assert body["version"]  # the running code's own version


def test_only_admins_upload(server: LiveServer, viewer: Any, operator: Any) -> None:
    for client in (viewer, operator):
        assert client.post("/api/system/update", content=b"x", headers=TAR).status_code == 403


def test_a_bad_bundle_is_refused_and_not_kept(
    server: LiveServer, admin: Any, tmp_path: Path
) -> None:
    bad = make_bundle(tmp_path / "bad.tar", "2.0", extra={"../escape.whl": b"x"})
    r = admin.post("/api/system/update", content=bad.read_bytes(), headers=TAR)
    assert r.status_code == 400, r.text
    assert "without '..'" in r.json()["message"]
    r = admin.post("/api/system/update", content=b"", headers=TAR)
    assert r.status_code == 400, r.text
    incoming = upgrades_dir(server.settings.data_dir) / "incoming"
    assert list(incoming.iterdir()) == []
    assert server.service.update_launcher.calls == []


def test_an_upload_starts_the_upgrade_and_is_audited(
    server: LiveServer, admin: Any, tmp_path: Path
) -> None:
    launches: Launches = server.service.update_launcher
    bundle = make_bundle(tmp_path / "good.tar", "2.0")
    r = admin.post("/api/system/update", content=bundle.read_bytes(), headers=TAR)
    assert r.status_code == 202, r.text
    state = r.json()
    assert state["running"] is True
    assert state["current"]["outcome"] == "queued"
    assert state["current"]["from_version"] == "1.0"
    assert state["current"]["to_version"] == "2.0"
    data_dir = server.settings.data_dir
    kept = upgrades_dir(data_dir) / "incoming" / "2.0.tar"
    assert launches.calls == [(kept, server.settings.os_root, data_dir)]
    assert kept.read_bytes() == bundle.read_bytes()
    page = admin.get("/api/system/release").json()
    assert page["upgrade"]["running"] is True
    # One at a time.
    again = admin.post("/api/system/update", content=bundle.read_bytes(), headers=TAR)
    assert again.status_code == 409, again.text
    audit = admin.get("/api/audit").json()
    entry = next(a for a in audit if a["action"] == "system.update")
    assert entry["target"] == "2.0" and entry["details"]["from"] == "1.0"


def test_a_launch_that_fails_ends_in_the_history(
    server: LiveServer, admin: Any, tmp_path: Path
) -> None:
    data_dir = server.settings.data_dir
    (upgrades_dir(data_dir) / "state.json").unlink()  # the previous test's queued upgrade
    launches: Launches = server.service.update_launcher
    launches.fail = "systemd-run: no such unit"
    try:
        bundle = make_bundle(tmp_path / "good.tar", "3.0")
        r = admin.post("/api/system/update", content=bundle.read_bytes(), headers=TAR)
        assert r.status_code >= 400
    finally:
        launches.fail = None
    state = read_state(data_dir)
    assert state["running"] is False
    assert state["history"][0]["outcome"] == "failed"
    assert "no such unit" in state["history"][0]["reason"]


def test_the_upgrade_runs_outside_the_service_unit() -> None:
    argv = upgrade_command(
        "/opt/appliance/current/venv/bin/python",
        Path("/b.tar"),
        Path("/"),
        Path("/var/lib/appliance"),
    )
    assert argv[:3] == ["systemd-run", "--unit=appliance-upgrade", "--collect"]
    assert argv[3:6] == [
        "/opt/appliance/current/venv/bin/python",
        "-m",
        "image.appliance_os.upgrade",
    ]
    assert argv[-2:] == ["apply", "/b.tar"]


def test_a_real_sized_bundle_passes_the_body_cap(
    server: LiveServer, admin: Any, tmp_path: Path
) -> None:
    """Bundles are ~50-100 MB, far over the JSON API's 1 MiB cap: ``api.limits`` must list
    ``("POST", "/api/system/update", MAX_BUNDLE_BYTES)`` in ``LARGE_BODY_ROUTES``."""
    data_dir = server.settings.data_dir
    (upgrades_dir(data_dir) / "state.json").unlink(missing_ok=True)
    padding = os.urandom(3 << 20)
    pad = "padding-1-py3-none-any.whl"
    bundle = make_bundle(
        tmp_path / "big.tar",
        "4.0",
        extra={f"wheels/{pad}": padding},
        listed_only={pad: hashlib.sha256(padding).hexdigest()},
    )
    r = admin.post("/api/system/update", content=bundle.read_bytes(), headers=TAR)
    assert r.status_code == 202, r.text
    assert r.json()["current"]["to_version"] == "4.0"


def test_the_settings_page_shows_the_release_and_uploads_an_update(
    browser: Any, server: LiveServer, tmp_path: Path
) -> None:
    from web_support import expect, signed_in

    data_dir = server.settings.data_dir
    (upgrades_dir(data_dir) / "state.json").unlink(missing_ok=True)
    bundle = make_bundle(tmp_path / "page.tar", "5.0")
    with signed_in(browser, server, *ADMIN, path="/#/settings") as page:
        system = page.locator(".card", has=page.get_by_role("heading", name="System"))
        expect(system.locator("dd").nth(1)).to_have_text("0.9")
        system.get_by_text("What changed (changelog)").click()
        expect(system.locator("pre.changelog")).to_contain_text("the running one")
        system.get_by_label("Release bundle").set_input_files(str(bundle))
        system.get_by_role("button", name="Upload update").click()
        expect(system.get_by_role("heading", name="Upgrade in progress")).to_be_visible()
        expect(system.locator(".upgrade-running")).to_contain_text("1.0 → 5.0")
    assert (upgrades_dir(data_dir) / "incoming" / "5.0.tar").is_file()
