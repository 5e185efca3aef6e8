"""Scheduled boot verification without booting: the catalog's boot-test query (SQLite and
PostgreSQL), what a boot-test record says, policies with boot-test entries, and the dashboard,
points API and metrics driven by real failover session records in the catalog.

The boot itself (real QEMU through the scheduler) is in ``test_boot_verification_qemu.py``.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import (
    LiveServer,
    bootstrapped_server,
    wait_job,
)

from appliance.boot_verification import boot_test_result, failed_check_words
from appliance.catalog import Catalog
from appliance.catalog.records import FailoverSessionRecord, PointRecord
from appliance.errors import InvalidInput

SERIAL_FAILURE = (
    "boot proof failed after 5 s: serial console never printed a line matching 'login:'"
)


class Ticks:
    """A catalog clock one minute further on every call: sessions get ordered start times."""

    def __init__(self) -> None:
        self.now = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


def _point(point_id: str, asset: str) -> PointRecord:
    return PointRecord(
        id=point_id,
        asset=asset,
        kind="image",
        mode="full",
        created_at=datetime(2024, 5, 1, tzinfo=UTC),
        source="/d.raw",
    )


def _proven(catalog: Catalog, asset: str, point: str, rto: float) -> FailoverSessionRecord:
    record = catalog.add_failover_session(asset, point, {"purpose": "boot_test"})
    catalog.update_failover_session(
        record.id,
        state="running",
        details={"proven_at": "2024-05-01T09:00:00+00:00", "rto_seconds": rto},
    )
    return catalog.update_failover_session(record.id, state="stopped", details={"x": 1})


def _failed(catalog: Catalog, asset: str, point: str) -> FailoverSessionRecord:
    record = catalog.add_failover_session(asset, point, {"purpose": "boot_test"})
    return catalog.update_failover_session(
        record.id,
        state="failed",
        details={"error": SERIAL_FAILURE, "failed_at": "2024-05-01T10:00:00+00:00"},
    )


# --- the catalog query -----------------------------------------------------------------------------


@pytest.fixture
def catalog(catalog_url: str) -> Iterator[Catalog]:
    with Catalog.open(catalog_url, clock=Ticks()) as opened:
        opened.ensure_store("s1", "pool", "/p")
        for point_id, asset in (("p1", "web"), ("p2", "web"), ("q1", "db")):
            opened.add_point(_point(point_id, asset), "s1")
        yield opened


def test_last_boot_tests_per_asset_and_point(catalog: Catalog) -> None:
    assert catalog.last_boot_tests() == {}
    old = _proven(catalog, "web", "p1", 12.5)
    # A failover (not a boot test) is never taken for one.
    failover = catalog.add_failover_session("web", "p2", {"purpose": "failover"})
    catalog.update_failover_session(failover.id, state="stopped", details={"proven_at": "x"})
    newer = _failed(catalog, "web", "p2")
    db = _proven(catalog, "db", "q1", 8.0)
    # One still booting does not hide the last result.
    running = catalog.add_failover_session("web", "p2", {"purpose": "boot_test"})
    catalog.update_failover_session(running.id, state="booting")

    per_asset = catalog.last_boot_tests(per="asset")
    assert {k: v.id for k, v in per_asset.items()} == {"web": newer.id, "db": db.id}
    proven = catalog.last_boot_tests(per="asset", proven_only=True)
    assert {k: v.id for k, v in proven.items()} == {"web": old.id, "db": db.id}
    per_point = catalog.last_boot_tests(per="point")
    assert {k: v.id for k, v in per_point.items()} == {"p1": old.id, "p2": newer.id, "q1": db.id}
    assert set(catalog.last_boot_tests(per="point", asset="db")) == {"q1"}
    assert per_asset["web"].details["error"] == SERIAL_FAILURE

    # A proven boot test still running (not yet shut down) counts as proven.
    catalog.update_failover_session(
        running.id, state="running", details={"proven_at": "2024-05-01T11:00:00+00:00"}
    )
    assert catalog.last_boot_tests()["web"].id == running.id
    with pytest.raises(InvalidInput):
        catalog.last_boot_tests(per="pool")


# --- what a record says ------------------------------------------------------------------------------


def _record(state: str, **details: Any) -> FailoverSessionRecord:
    return FailoverSessionRecord(
        id="s1",
        asset="web",
        point_id="p1",
        state=state,
        started_at=datetime(2024, 5, 1, 8, tzinfo=UTC),
        details={"purpose": "boot_test", **details},
    )


def test_a_proven_boot_test() -> None:
    result = boot_test_result(
        _record("stopped", proven_at="2024-05-01T08:00:11+00:00", rto_seconds=11.2, screenshot="/s")
    )
    assert result.state == "proven" and result.rto_seconds == 11.2
    assert result.at == datetime(2024, 5, 1, 8, 0, 11, tzinfo=UTC)
    assert result.failed_check is None and result.has_screenshot


def test_a_failed_boot_test_names_the_check() -> None:
    result = boot_test_result(
        _record("failed", error=SERIAL_FAILURE, failed_at="2024-05-01T08:05:00+00:00")
    )
    assert result.state == "failed" and result.rto_seconds is None
    assert result.failed_check == "serial console never printed a line matching 'login:'"
    assert result.at == datetime(2024, 5, 1, 8, 5, tzinfo=UTC)
    assert not result.has_screenshot
    # Anything else that stopped the boot is said as it is.
    assert failed_check_words("QEMU exited with status -9") == "QEMU exited with status -9"
    stopped = boot_test_result(_record("stopped", stopped_at="2024-05-01T08:01:00+00:00"))
    assert stopped.state == "failed" and "not proven" in str(stopped.failed_check)
    assert boot_test_result(_record("booting")).state == "running"


# --- the service -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("bv")) as live:
        yield live


@pytest.fixture(scope="module")
def assets(admin: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A folder asset and a VM asset (a small raw disk), each backed up once."""
    root = tmp_path_factory.mktemp("bv-sources")
    (root / "folder").mkdir()
    (root / "folder" / "a.txt").write_text("hello\n")
    disk = root / "web.raw"
    disk.write_bytes(os.urandom(256 * 1024) + b"\0" * (768 * 1024))
    for body in (
        {"name": "share", "kind": "files", "path": str(root / "folder")},
        {"name": "web", "kind": "vm", "disks": [str(disk)]},
    ):
        r = admin.post("/api/assets", json=body)
        assert r.status_code == 201, r.text
    points = {}
    for name in ("share", "web"):
        job = wait_job(admin, admin.post(f"/api/assets/{name}/backup", json={}).json()["id"])
        assert job["state"] == "succeeded", job
        points[name] = job["result"]["point"]
    return points


def _png(path: Path) -> bytes:
    """A real 2x2 PNG (what QMP screendump writes), so the screenshot route serves a picture."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = b"".join(b"\0" + b"\x10\x20\x30" * 2 for _ in range(2))
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    path.write_bytes(data)
    return data


def test_a_policy_can_test_boot_its_vm_on_a_schedule(
    admin: httpx.Client, viewer: httpx.Client, assets: dict[str, str]
) -> None:
    body = {
        "name": "web-daily",
        "asset": "web",
        "schedule": {
            "entries": [{"cron": "0 * * * *"}, {"cron": "0  5 * * *", "mode": "boot_test"}],
        },
    }
    r = admin.post("/api/policies", json=body)
    assert r.status_code == 201, r.text
    policy = r.json()
    assert policy["schedule"]["entries"][1] == {"cron": "0 5 * * *", "mode": "boot_test"}
    [backup, boot] = policy["entries"]
    assert backup["mode"] == "incremental" and boot["mode"] == "boot_test"
    assert boot["next_at"] is not None and boot["last_fired_at"] is not None
    assert viewer.get("/api/policies/web-daily").json()["entries"][1]["mode"] == "boot_test"
    # "Run now" stays a backup.
    assert policy["mode"] == "incremental"
    r = admin.post("/api/policies", json={**body, "name": "bad", "mode": "boot_test"})
    assert r.status_code == 422, r.text


def test_a_folder_asset_cannot_have_boot_test_entries(
    admin: httpx.Client, assets: dict[str, str]
) -> None:
    entries = [{"cron": "0 5 * * *", "mode": "boot_test"}]
    r = admin.post(
        "/api/policies",
        json={"name": "share-boot", "asset": "share", "schedule": {"entries": entries}},
    )
    assert r.status_code == 422, r.text
    error = r.json()
    assert error["code"] == "validation_error"
    assert "share is a folder asset" in error["message"]
    assert "only virtual machines can be test-booted" in error["message"]
    assert error["details"]["errors"][0]["loc"] == ["body", "schedule", "entries", 0, "mode"]
    assert admin.get("/api/policies/share-boot").status_code == 404
    # Nor can an existing policy of a folder asset gain one.
    r = admin.post("/api/policies", json={"name": "share-hourly", "asset": "share"})
    assert r.status_code == 201, r.text
    r = admin.put(
        "/api/policies/share-hourly",
        json={"asset": "share", "schedule": {"entries": [{"cron": "0 * * * *"}, *entries]}},
    )
    assert r.status_code == 422, r.text
    assert r.json()["details"]["errors"][0]["loc"][3] == 1
    r = admin.post(
        "/api/policies",
        json={
            "name": "typo",
            "asset": "web",
            "schedule": {"entries": [{"cron": "0 5 * * *", "mode": "boot-test"}]},
        },
    )
    assert r.status_code == 422, r.text


def _dashboard_asset(client: httpx.Client, name: str) -> dict[str, Any]:
    r = client.get("/api/dashboard")
    assert r.status_code == 200, r.text
    return next(a for a in r.json()["assets"] if a["asset"] == name)


def test_dashboard_points_and_metrics_show_boot_verification(
    server: LiveServer,
    admin: httpx.Client,
    viewer: httpx.Client,
    assets: dict[str, str],
    tmp_path: Path,
) -> None:
    catalog = server.service.app.catalog
    point = assets["web"]
    web = _dashboard_asset(viewer, "web")
    assert web["last_boot_test"] == {
        "state": "never",
        "session": None,
        "point_id": None,
        "at": None,
        "rto_seconds": None,
        "failed_check": None,
        "error": None,
        "screenshot_url": None,
        "link": None,
    }
    assert web["last_proven_boot"] is None
    assert _dashboard_asset(viewer, "share")["last_boot_test"] is None  # not a VM

    # A proven boot test, as the failover code records it.
    picture = _png(tmp_path / "proof.png")
    proven = catalog.add_failover_session("web", point, {"purpose": "boot_test"})
    proven_at = server.clock() - timedelta(hours=3)
    catalog.update_failover_session(
        proven.id,
        state="running",
        details={
            "proven_at": proven_at.isoformat(),
            "rto_seconds": 11.2,
            "screenshot": str(tmp_path / "proof.png"),
        },
    )
    catalog.update_failover_session(proven.id, state="stopped")
    web = _dashboard_asset(viewer, "web")
    test = web["last_boot_test"]
    assert test["state"] == "proven" and test["rto_seconds"] == 11.2
    assert test["session"] == proven.id and test["point_id"] == point
    assert datetime.fromisoformat(test["at"]) == proven_at
    assert test["screenshot_url"] == f"/api/failover/{proven.id}/screenshot"
    assert test["link"] == f"#/failover/{proven.id}"
    assert web["last_proven_boot"] == test
    assert not [a for a in viewer.get("/api/dashboard").json()["alerts"] if a["asset"] == "web"]
    shot = viewer.get(test["screenshot_url"])
    assert shot.status_code == 200 and shot.content == picture
    assert shot.headers["content-type"] == "image/png"

    # ... recorded against its point.
    listed = {p["id"]: p for p in viewer.get("/api/points", params={"asset": "web"}).json()}
    assert listed[point]["boot_proof"]["state"] == "proven"
    assert listed[point]["boot_proof"]["rto_seconds"] == 11.2
    detail = viewer.get(f"/api/points/{point}").json()
    assert detail["boot_proof"]["session"] == proven.id
    assert viewer.get(f"/api/points/{assets['share']}").json()["boot_proof"] is None

    # Then a boot test fails: the dashboard says which check, and raises an alert.
    failed = catalog.add_failover_session("web", point, {"purpose": "boot_test"})
    catalog.update_failover_session(
        failed.id,
        state="failed",
        details={"error": SERIAL_FAILURE, "failed_at": server.clock().isoformat()},
    )
    board = viewer.get("/api/dashboard").json()
    web = next(a for a in board["assets"] if a["asset"] == "web")
    assert web["last_boot_test"]["state"] == "failed"
    assert web["last_boot_test"]["failed_check"].startswith("serial console never printed")
    assert web["last_boot_test"]["error"] == SERIAL_FAILURE
    assert web["last_proven_boot"]["session"] == proven.id  # the last proven boot stays known
    [alert] = [a for a in board["alerts"] if a["asset"] == "web"]
    assert alert["severity"] == "critical" and alert["kind"] == "boot_test_failed"
    assert alert["message"] == (
        "last boot test of web failed: serial console never printed a line matching 'login:'"
    )
    assert alert["link"] == f"#/failover/{failed.id}"
    assert viewer.get(f"/api/points/{point}").json()["boot_proof"]["state"] == "failed"

    # A missed RPO is an alert too, after the failed boot test (less severe).
    r = admin.post("/api/policies", json={"name": "web-rpo", "asset": "web", "rpo_seconds": 3600})
    assert r.status_code == 201, r.text
    server.clock.offset = timedelta(hours=5)
    try:
        board = viewer.get("/api/dashboard").json()
    finally:
        server.clock.offset = timedelta(0)
    web_alerts = [a for a in board["alerts"] if a["asset"] == "web"]
    assert [a["kind"] for a in web_alerts] == ["boot_test_failed", "rpo_missed"]
    rpo = web_alerts[1]
    assert rpo["severity"] == "warning" and rpo["link"] == "#/assets"
    assert rpo["message"].startswith("RPO missed for web: its newest good point is 5")
    assert "(target 1 h)" in rpo["message"]
    severities = [a["severity"] for a in board["alerts"]]
    assert severities == sorted(severities, key=["critical", "warning"].index)

    # Prometheus: the last proven boot's RTO and time, and whether the last test passed.
    metrics = viewer.get("/metrics").text
    assert 'appliance_boot_test_rto_seconds{asset="web"} 11.2' in metrics
    assert (
        f'appliance_boot_test_last_success_timestamp_seconds{{asset="web"}} '
        f"{proven_at.timestamp():.0f}"
    ) in metrics
    assert 'appliance_boot_test_ok{asset="web"} 0' in metrics
    assert "# TYPE appliance_boot_test_rto_seconds gauge" in metrics
    assert 'asset="share"' not in "\n".join(
        line for line in metrics.splitlines() if line.startswith("appliance_boot_test")
    )
