"""``GET /api/assets/{name}/failover-points`` and the point a failover is asked to boot, through
a live service (no QEMU: the boots are in test_failover_points_qemu.py and the page test).

Backups run as real jobs, so each new point is checked by the backup job itself; damage is real
(a byte flipped in a pack the next backup shares), and a boot proof is a boot-test session
recorded in the catalog the way the failover records it.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server, wait_job

from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.packs import pack_object_name

VM = "web"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("fo-points")) as live:
        yield live


def _backup(operator: httpx.Client, asset: str, mode: str = "incremental") -> dict[str, Any]:
    r = operator.post(f"/api/assets/{asset}/backup", json={"mode": mode})
    assert r.status_code == 202, r.text
    job = wait_job(operator, r.json()["id"], timeout=120)
    assert job["state"] == "succeeded", job
    return job


@pytest.fixture(scope="module")
def assets(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """VM ``web`` with one verified point, folder ``share`` with one point, VM ``empty``."""
    root = tmp_path_factory.mktemp("fo-points-src")
    disk = root / "web.raw"
    rnd = random.Random(7)
    disk.write_bytes(b"".join(rnd.randbytes(65536) if i % 2 else bytes(65536) for i in range(32)))
    folder = root / "share"
    folder.mkdir()
    (folder / "a.txt").write_text("hello\n")
    (root / "empty.raw").write_bytes(bytes(65536))
    for body in (
        {"name": VM, "kind": "vm", "disks": [str(disk)]},
        {"name": "share", "kind": "files", "path": str(folder)},
        {"name": "empty", "kind": "vm", "disks": [str(root / "empty.raw")]},
    ):
        r = admin.post("/api/assets", json=body)
        assert r.status_code == 201, r.text
    first = _backup(operator, VM, "full")
    share = _backup(operator, "share", "full")
    return {"first": first["result"]["point"], "share_point": share["result"]["point"]}


def test_a_fresh_backup_is_verified_and_is_the_point_that_boots(
    server: LiveServer, viewer: httpx.Client, assets: dict[str, Any]
) -> None:
    r = viewer.get(f"/api/assets/{VM}/failover-points")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["chosen"] == body["newest"] == assets["first"]
    assert body["why"] == "newest_ok" and body["reason"] is None
    [point] = body["points"]
    assert point["id"] == assets["first"] and point["verify_status"] == "ok"
    assert point["verified_at"] is not None and point["verify_problem"] is None
    assert point["boot_proof"] is None
    assert 0 <= point["age_seconds"] < 600
    assert [c["state"] for c in point["copies"]] == ["present"]
    assert point["copies"][0]["location_kind"] == "pool_dir"


def test_the_route_refuses_what_is_not_a_vm(
    server: LiveServer, viewer: httpx.Client, assets: dict[str, Any]
) -> None:
    r = viewer.get("/api/assets/nothing/failover-points")
    assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    r = viewer.get("/api/assets/share/failover-points")
    assert r.status_code == 400 and "only virtual machines" in r.json()["message"], r.text
    r = viewer.get(f"/api/assets/{VM}/failover-points", params={"limit": 0})
    assert r.status_code == 422, r.text
    r = viewer.get("/api/assets/empty/failover-points")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "asset": "empty",
        "chosen": None,
        "newest": None,
        "why": "no_point",
        "reason": None,
        "points": [],
    }
    with server.client() as anonymous:
        assert anonymous.get(f"/api/assets/{VM}/failover-points").status_code == 401


def test_a_point_named_in_a_start_request_is_checked_first(
    operator: httpx.Client, assets: dict[str, Any]
) -> None:
    for route in ("failover", "boot-test"):
        r = operator.post(f"/api/assets/{VM}/{route}", json={"point": assets["share_point"]})
        assert r.status_code == 400, r.text
        assert r.json()["code"] == "invalid_input"
        assert r.json()["message"] == f"point {assets['share_point']} belongs to share, not {VM}"
        r = operator.post(f"/api/assets/{VM}/{route}", json={"point": "0123456789abcdef"})
        assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
        r = operator.post(f"/api/assets/{VM}/{route}", json={"point": "x" * 65})
        assert r.status_code == 422, r.text


def test_a_damaged_newest_point_gives_way_with_the_reason_and_its_proof_shows(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    viewer: httpx.Client,
    assets: dict[str, Any],
) -> None:
    app = server.service.app
    first = assets["first"]
    # The first point passed a boot test (as the failover records one).
    session = app.catalog.add_failover_session(VM, first, {"purpose": "boot_test"})
    proven_at = app.clock()
    app.catalog.update_failover_session(
        session.id,
        state="stopped",
        details={"proven_at": proven_at.isoformat(), "rto_seconds": 9.5},
    )
    # A byte flipped in a data pack of the first point: the next backup shares that pack.
    packs = point_packs(app.repo, app.repo.get_manifest(first)).packs
    pack = sorted(p for p, kind in packs.items() if kind == fmt.PACK_KIND_DATA)[0]
    path = os.path.join(app.data_dir.store_path, pack_object_name(pack, fmt.PACK_KIND_DATA))
    with open(path, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0x01]))
    server.clock.offset += timedelta(minutes=5)
    job = _backup(operator, VM)
    newest = job["result"]["point"]
    problem = f"pack {pack.hex()[:16]} is damaged: its content does not match its name"
    assert job["result"]["check"]["ok"] is False
    assert job["result"]["check"]["problems"] == [problem]

    body = viewer.get(f"/api/assets/{VM}/failover-points").json()
    assert body["newest"] == newest and body["chosen"] == first
    assert body["why"] == "newest_failed"
    # times in words, in UTC ("today 16:35"; near midnight the first may be "yesterday")
    when = r"(today|yesterday) \d\d:\d\d"
    assert re.fullmatch(
        rf"the newest point \({when}\) failed verification: {re.escape(problem)}; "
        rf"booting the one of {when} instead",
        body["reason"],
    ), body["reason"]
    assert [p["id"] for p in body["points"]] == [newest, first]
    damaged, good = body["points"]
    assert damaged["verify_status"] == "damaged" and damaged["verify_problem"] == problem
    assert good["age_seconds"] > damaged["age_seconds"] >= 0
    proof = good["boot_proof"]
    assert proof["state"] == "proven" and proof["rto_seconds"] == 9.5
    assert proof["session"] == session.id and proof["link"] == f"#/failover/{session.id}"
    # the reason speaks the appliance's time zone (UTC+05:30 moves the minutes)
    r = admin.put("/api/settings", json={"timezone": "Asia/Kolkata"})
    assert r.status_code == 200, r.text
    try:
        local = viewer.get(f"/api/assets/{VM}/failover-points").json()["reason"]
    finally:
        assert admin.put("/api/settings", json={"timezone": "UTC"}).status_code == 200
    created = datetime.fromisoformat(damaged["created_at"])
    kolkata = created.astimezone(ZoneInfo("Asia/Kolkata")).strftime("%H:%M")
    assert f" {kolkata}) failed verification" in local, local
    # the points page says the same (the status was recorded as a verify job records it)
    listed = {p["id"]: p for p in viewer.get("/api/points", params={"asset": VM}).json()}
    assert listed[newest]["verify_status"] == "damaged" and listed[first]["verify_status"] == "ok"
