"""Protection status through the real service (uvicorn on 127.0.0.1, real backups): the
dashboard's verdict for a demo-like VM (no policy, one copy on the system disk), its reasons
going away as they are fixed, a VM running from backup first, an RPO miss, an asset's trends
and the weekly report with a failed backup."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server, wait_job


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("prot")) as live:
        yield live


@pytest.fixture(scope="module")
def points(admin: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A VM asset like the demo's (no policy) and a folder with an hourly RPO, backed up once."""
    root = tmp_path_factory.mktemp("prot-sources")
    (root / "docs").mkdir()
    (root / "docs" / "a.txt").write_text("hello\n")
    disk = root / "demo.raw"
    disk.write_bytes(os.urandom(128 * 1024) + b"\0" * (384 * 1024))
    for body in (
        {"name": "demo", "kind": "vm", "disks": [str(disk)]},
        {"name": "docs", "kind": "files", "path": str(root / "docs")},
    ):
        r = admin.post("/api/assets", json=body)
        assert r.status_code == 201, r.text
    r = admin.post(
        "/api/policies", json={"name": "docs-hourly", "asset": "docs", "rpo_seconds": 3600}
    )
    assert r.status_code == 201, r.text
    made = {}
    for name in ("demo", "docs"):
        job = wait_job(admin, admin.post(f"/api/assets/{name}/backup", json={}).json()["id"])
        assert job["state"] == "succeeded", job
        made[name] = job["result"]["point"]
    return made


def board(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/api/dashboard")
    assert r.status_code == 200, r.text
    return dict(r.json())


def row(d: dict[str, Any], name: str) -> dict[str, Any]:
    return dict(next(a for a in d["assets"] if a["asset"] == name))


def test_demo_like_vm_needs_attention_with_its_reasons(
    server: LiveServer, viewer: httpx.Client, points: dict[str, str]
) -> None:
    # The data directory's default pool is a folder on the root filesystem here, as on the demo.
    assert os.stat(server.settings.data_dir).st_dev == os.stat("/").st_dev
    d = board(viewer)
    demo = row(d, "demo")
    assert demo["state"] == "needs_attention"
    assert [r["code"] for r in demo["reasons"]] == [
        "no_policy",
        "one_copy",
        "system_disk_only",
        "no_offsite_copy",
        "no_immutable_or_offline_copy",
        "never_boot_tested",
    ]
    fixes = {r["code"]: r["fix"] for r in demo["reasons"]}
    assert fixes["no_policy"] == {
        "action": "add_policy",
        "label": "Add a policy",
        "link": "#/assets?add_policy=demo",
        "point": None,
    }
    assert fixes["never_boot_tested"]["action"] == "run_boot_test"
    # the backup job checked the VM's point before it ended (appliance/point_check.py)
    assert demo["last_verified_at"]
    assert demo["legs"]["copies"] == 1 and demo["legs"]["media"] == ["system_disk"]
    assert demo["legs"]["system_disk_only"] and not demo["legs"]["offsite"]
    assert d["summary"]["all_protected"] is False
    assert d["summary"]["needs_attention"] == 2 and d["summary"]["protected"] == 0
    assert [a["asset"] for a in d["attention"]] == ["demo", "docs"]
    assert d["attention"][0]["reasons"] == demo["reasons"]
    # The folder with a fresh backup and a policy still misses its copy legs and a verify.
    docs = row(d, "docs")
    assert docs["state"] == "needs_attention" and docs["rpo_status"] == "met"
    assert "no_policy" not in [r["code"] for r in docs["reasons"]]
    assert "never_boot_tested" not in [r["code"] for r in docs["reasons"]]


def test_reasons_go_away_as_they_are_fixed_and_a_running_vm_leads(
    server: LiveServer, admin: httpx.Client, viewer: httpx.Client, points: dict[str, str]
) -> None:
    catalog = server.service.app.catalog
    job = wait_job(admin, admin.post(f"/api/points/{points['demo']}/verify", json={}).json()["id"])
    assert job["state"] == "succeeded", job
    r = admin.post(
        "/api/policies", json={"name": "demo-daily", "asset": "demo", "rpo_seconds": 86400}
    )
    assert r.status_code == 201, r.text
    proven = catalog.add_failover_session("demo", points["demo"], {"purpose": "boot_test"})
    catalog.update_failover_session(
        proven.id,
        state="stopped",
        details={"proven_at": server.clock().isoformat(), "rto_seconds": 12.5},
    )
    demo = row(board(viewer), "demo")
    assert [r["code"] for r in demo["reasons"]] == [
        "one_copy",
        "system_disk_only",
        "no_offsite_copy",
        "no_immutable_or_offline_copy",
    ]
    assert demo["last_proven_boot"]["rto_seconds"] == 12.5 and demo["last_verified_at"]

    # A failover (not a boot test) running now puts the VM first, with a link to it.
    running = catalog.add_failover_session("demo", points["demo"], {"purpose": "failover"})
    catalog.update_failover_session(running.id, state="running")
    try:
        d = board(viewer)
        assert row(d, "demo")["state"] == "running_from_backup"
        first = d["attention"][0]
        assert first["asset"] == "demo" and first["state"] == "running_from_backup"
        assert first["reasons"][0]["fix"]["link"] == f"#/failover/{running.id}"
        assert d["summary"]["running_from_backup"] == 1
    finally:
        catalog.update_failover_session(running.id, state="stopped")
    assert row(board(viewer), "demo")["state"] == "needs_attention"


def test_an_rpo_miss_puts_the_asset_at_risk(
    server: LiveServer, viewer: httpx.Client, points: dict[str, str]
) -> None:
    server.clock.offset = timedelta(hours=3)
    try:
        d = board(viewer)
    finally:
        server.clock.offset = timedelta(0)
    docs = row(d, "docs")
    assert docs["state"] == "at_risk" and docs["reasons"][0]["code"] == "rpo_missed"
    assert docs["reasons"][0]["message"].startswith("The newest good backup is 3 hours old")
    assert docs["reasons"][0]["fix"]["action"] == "run_backup"
    assert d["attention"][0]["asset"] == "docs"  # at risk before needs attention


def test_trends_of_an_asset(
    server: LiveServer, viewer: httpx.Client, points: dict[str, str]
) -> None:
    r = viewer.get("/api/assets/docs/trends", params={"days": 30})
    assert r.status_code == 200, r.text
    t = r.json()
    assert t["asset"] == "docs" and t["rpo_seconds"] == 3600 and t["days"] == 30
    ages = [s["age_seconds"] for s in t["rpo"]]
    assert ages[0] is None and ages[-2] == 0.0 and 0 <= ages[-1] < 600  # the sawtooth's drop
    assert [s["point"] for s in t["bytes_added"]] == [points["docs"]]
    assert t["bytes_added"][0]["stored_bytes"] > 0
    demo = viewer.get("/api/assets/demo/trends").json()
    assert [s["rto_seconds"] for s in demo["rto"]] == [12.5]
    missing = viewer.get("/api/assets/nope/trends")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    assert viewer.get("/api/assets/docs/trends", params={"days": 0}).status_code == 422
    assert viewer.get("/api/assets/docs/trends", params={"days": 366}).status_code == 422


def test_weekly_report_lists_status_copies_and_failed_jobs(
    admin: httpx.Client, viewer: httpx.Client, points: dict[str, str], tmp_path: Path
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    r = admin.post("/api/assets", json={"name": "gone", "kind": "files", "path": str(gone)})
    assert r.status_code == 201, r.text
    shutil.rmtree(gone)
    job = wait_job(admin, admin.post("/api/assets/gone/backup", json={}).json()["id"])
    assert job["state"] == "failed", job
    r = viewer.get("/api/protection/report")
    assert r.status_code == 200, r.text
    rep = r.json()
    assert rep["days"] == 7 and rep["summary"]["all_protected"] is False
    by_name = {a["asset"]: a for a in rep["assets"]}
    assert rep["assets"][0]["asset"] == "gone"  # no good point at all: at risk, listed first
    assert by_name["gone"]["state"] == "at_risk"
    assert [j["id"] for j in by_name["gone"]["failed_jobs"]] == [job["id"]]
    assert by_name["gone"]["failed_jobs"][0]["error"]
    docs = by_name["docs"]
    assert docs["points_made"] == 1 and docs["bytes_added"] > 0
    assert docs["copies"][0]["location_kind"] == "pool_dir" and docs["legs"]["copies"] == 1
    assert by_name["demo"]["rto_seconds"] == [12.5]
    assert viewer.get("/api/protection/report", params={"days": 32}).status_code == 422
