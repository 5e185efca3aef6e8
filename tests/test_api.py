"""The service's JSON API against a live uvicorn on 127.0.0.1: every route, every role.

One server (and data directory) serves the whole module; tests use names of their own so that
their order does not matter. Jobs that must stay running for a while (cancel, event streams)
are tested in tests/test_api_jobs.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import (
    LiveServer,
    bootstrapped_server,
    wait_job,
)

MISSING_POINT = "ffffffffffffffff"
LOGIN_FREE_FAILURES = 3


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(
        tmp_path_factory.mktemp("service"),
        login_throttle=LOGIN_FREE_FAILURES,
        max_parallel_jobs=3,
    ) as live:
        yield live


def _write_tree(root: Path) -> None:
    (root / "docs").mkdir(parents=True)
    (root / "many").mkdir()
    (root / "top.txt").write_text("hello from the top\n")
    (root / "docs" / "readme.md").write_text("# readme\n" * 100)
    (root / "docs" / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024 + 123))
    (root / "docs" / "empty").write_bytes(b"")
    os.symlink("readme.md", root / "docs" / "link")
    os.link(root / "top.txt", root / "docs" / "hard.txt")
    for i in range(25):
        (root / "many" / f"f{i:02d}").write_text(f"file {i}\n")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(root: Path) -> dict[str, str]:
    """path -> digest / link target / 'dir' of every entry under ``root``."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if full.is_symlink():
                out[rel] = "-> " + os.readlink(full)
            elif full.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = _digest(full)
    return out


@pytest.fixture(scope="module")
def files_point(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """A backed-up tree: {"source": Path, "asset": name, "point": id}."""
    source = tmp_path_factory.mktemp("tree") / "src"
    _write_tree(source)
    r = admin.post("/api/assets", json={"name": "tree", "kind": "files", "path": str(source)})
    assert r.status_code == 201, r.text
    r = operator.post("/api/assets/tree/backup", json={"mode": "full"})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/api/jobs/{r.json()['id']}"
    job = wait_job(operator, r.json()["id"])
    assert job["state"] == "succeeded", job
    return {"source": source, "asset": "tree", "point": job["result"]["point"]}


# --- assets, policies ---------------------------------------------------------------------------------------


def test_assets_crud(admin: httpx.Client, viewer: httpx.Client, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    r = admin.post(
        "/api/assets",
        json={"name": "crud", "kind": "files", "path": str(tmp_path / "a"), "description": "d"},
    )
    assert r.status_code == 201
    assert r.json()["path"] == str(tmp_path / "a") and r.json()["policies"] == []
    assert viewer.get("/api/assets/crud").json()["description"] == "d"
    updated = admin.put("/api/assets/crud", json={"path": str(tmp_path / "b")})
    assert updated.status_code == 200 and updated.json()["path"] == str(tmp_path / "b")
    assert "crud" in [a["name"] for a in viewer.get("/api/assets").json()]
    inside = admin.put("/api/assets/crud", json={"path": str(admin_data_dir(admin))})
    assert inside.status_code == 400
    wrong_kind = admin.post(
        "/api/assets", json={"name": "crud2", "kind": "vm", "path": str(tmp_path)}
    )
    assert wrong_kind.status_code == 400
    assert admin.delete("/api/assets/crud").status_code == 204
    assert admin.get("/api/assets/crud").status_code == 404


def admin_data_dir(client: httpx.Client) -> Path:
    pools = client.get("/api/pools").json()
    return Path(pools[0]["path"]).parents[2]


def test_policies_crud_with_several_schedule_entries(admin: httpx.Client, tmp_path: Path) -> None:
    admin.post("/api/assets", json={"name": "pol-asset", "kind": "files", "path": str(tmp_path)})
    body = {
        "name": "hourly-weekly",
        "asset": "pol-asset",
        "schedule": {
            "entries": [
                {"cron": "0 * * * *", "mode": "incremental"},
                {"cron": "0  3 * * 0", "mode": "full"},
            ],
            "catch_up": "once",
        },
        "mode": "incremental",
        "retention": {"keep_daily": 7, "keep_weekly": 4},
        "rpo_seconds": 7200,
    }
    r = admin.post("/api/policies", json=body)
    assert r.status_code == 201, r.text
    policy = r.json()
    assert policy["schedule"]["entries"][1]["cron"] == "0 3 * * 0"  # normalised
    assert policy["retention"] == {"keep_daily": 7, "keep_weekly": 4}
    assert [e["next_at"] is not None for e in policy["entries"]] == [True, True]
    assert all(e["last_fired_at"] is not None for e in policy["entries"])
    assert admin.get("/api/assets/pol-asset").json()["policies"] == ["hourly-weekly"]
    bad = {**body, "name": "bad", "schedule": {"entries": [{"cron": "61 * * * *"}]}}
    r = admin.post("/api/policies", json=bad)
    assert r.status_code == 422 and "cron" in r.json()["message"]
    twice = {**body, "name": "twice", "schedule": {"entries": [{"cron": "0 * * * *"}] * 2}}
    assert admin.post("/api/policies", json=twice).status_code == 400
    assert admin.get("/api/policies/twice").status_code == 404
    never = {**body, "name": "never", "schedule": {"entries": [{"cron": "0 0 31 2 *"}]}}
    assert admin.post("/api/policies", json=never).status_code == 422
    update = {k: v for k, v in body.items() if k != "name"}
    update["rpo_seconds"] = 60
    r = admin.put("/api/policies/hourly-weekly", json=update)
    assert r.status_code == 200 and r.json()["rpo_seconds"] == 60
    assert [
        p["name"] for p in admin.get("/api/policies", params={"asset": "pol-asset"}).json()
    ] == ["hourly-weekly"]
    assert admin.delete("/api/assets/pol-asset").status_code == 409  # still has a policy
    assert admin.delete("/api/policies/hourly-weekly").status_code == 204
    assert admin.delete("/api/assets/pol-asset").status_code == 204


def test_policy_run_backs_up_then_prunes_by_its_retention(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client, tmp_path: Path
) -> None:
    (tmp_path / "f.txt").write_text("v1")
    admin.post("/api/assets", json={"name": "ret-asset", "kind": "files", "path": str(tmp_path)})
    admin.post(
        "/api/policies",
        json={"name": "keep-two", "asset": "ret-asset", "retention": {"keep_last": 2}},
    )
    for i in range(3):
        (tmp_path / "f.txt").write_text(f"v{i + 2}")
        r = operator.post("/api/policies/keep-two/run", json={})
        assert r.status_code == 202
        job = wait_job(operator, r.json()["id"])
        assert job["state"] == "succeeded" and job["kind"] == "policy_backup", job["error"]
        prune = wait_job(operator, job["result"]["prune_job"])
        assert prune["state"] == "succeeded"
    points = operator.get("/api/points", params={"asset": "ret-asset"}).json()
    assert len(points) == 2


# --- points: browse, download, restore -------------------------------------------------------------------


def test_point_list_and_detail(viewer: httpx.Client, files_point: dict[str, Any]) -> None:
    points = viewer.get("/api/points", params={"asset": "tree"}).json()
    assert [p["id"] for p in points] == [files_point["point"]]
    detail = viewer.get(f"/api/points/{files_point['point']}").json()
    assert detail["id"] == files_point["point"] and detail["kind"] == "files"
    assert detail["manifest"]["source"] == str(files_point["source"])
    assert detail["manifest"]["stats"]["files"] >= 25
    assert detail["copies"][0]["location_kind"] == "pool_dir"
    assert detail["copies"][0]["state"] == "present"


def test_browse_directories_with_pages(viewer: httpx.Client, files_point: dict[str, Any]) -> None:
    pid = files_point["point"]
    top = viewer.get(f"/api/points/{pid}/files").json()
    assert [(e["name"], e["type"]) for e in top["entries"]] == [
        ("docs", "dir"),
        ("many", "dir"),
        ("top.txt", "file"),
    ]
    docs = viewer.get(f"/api/points/{pid}/files", params={"path": "docs"}).json()
    by_name = {e["name"]: e for e in docs["entries"]}
    assert set(by_name) == {"big.bin", "empty", "hard.txt", "link", "readme.md"}
    assert by_name["big.bin"]["size"] == 5 * 1024 * 1024 + 123
    assert by_name["link"]["type"] == "symlink" and by_name["link"]["target"] == "readme.md"
    assert by_name["hard.txt"]["type"] == "file"  # the first name of the pair (walk order)
    top_txt = top["entries"][2]
    assert top_txt["type"] == "file" and top_txt["target"] == "docs/hard.txt"
    assert top_txt["size"] == (files_point["source"] / "top.txt").stat().st_size
    names: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"path": "/many/", "limit": 10}
        if after:
            params["after"] = after
        page = viewer.get(f"/api/points/{pid}/files", params=params).json()
        names += [e["name"] for e in page["entries"]]
        after = page["next_after"]
        if after is None:
            break
    assert names == [f"f{i:02d}" for i in range(25)]
    missing = viewer.get(f"/api/points/{pid}/files", params={"path": "nope"})
    assert missing.status_code == 404
    not_dir = viewer.get(f"/api/points/{pid}/files", params={"path": "top.txt"})
    assert not_dir.status_code == 400
    escape = viewer.get(f"/api/points/{pid}/files", params={"path": "../etc"})
    assert escape.status_code == 400 and escape.json()["code"] == "unsafe_restore_path"


def test_download_a_file_streams_its_exact_bytes(
    server: LiveServer, operator: httpx.Client, viewer: httpx.Client, files_point: dict[str, Any]
) -> None:
    pid, source = files_point["point"], files_point["source"]
    with operator.stream(
        "GET", f"/api/points/{pid}/download", params={"path": "docs/big.bin"}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-length"] == str((source / "docs" / "big.bin").stat().st_size)
        assert 'filename="big.bin"' in r.headers["content-disposition"]
        data = b"".join(r.iter_bytes())
    assert data == (source / "docs" / "big.bin").read_bytes()
    hard = operator.get(f"/api/points/{pid}/download", params={"path": "docs/hard.txt"})
    assert hard.content == (source / "top.txt").read_bytes()
    empty = operator.get(f"/api/points/{pid}/download", params={"path": "docs/empty"})
    assert empty.status_code == 200 and empty.content == b""
    assert viewer.get(f"/api/points/{pid}/download", params={"path": "top.txt"}).status_code == 403
    link = operator.get(f"/api/points/{pid}/download", params={"path": "docs/link"})
    assert link.status_code == 400
    audit = server.service.app.catalog.list_audit(50)
    assert any(
        a.action == "point.download"
        and a.actor == "operator"
        and a.details["path"] == "docs/big.bin"
        for a in audit
    )


def test_download_a_folder_as_tar(
    operator: httpx.Client, files_point: dict[str, Any], tmp_path: Path
) -> None:
    pid, source = files_point["point"], files_point["source"]
    r = operator.get(f"/api/points/{pid}/download", params={"path": "docs"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path, filter="tar")
    assert _snapshot(tmp_path / "docs") == _snapshot(source / "docs")
    whole = operator.get(f"/api/points/{pid}/download", params={"format": "tar"})
    with tarfile.open(fileobj=io.BytesIO(whole.content)) as tar:
        assert "many/f24" in tar.getnames()


def test_download_a_folder_as_zip(operator: httpx.Client, files_point: dict[str, Any]) -> None:
    pid, source = files_point["point"], files_point["source"]
    r = operator.get(f"/api/points/{pid}/download", params={"path": "docs", "format": "zip"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        assert archive.testzip() is None
        names = set(archive.namelist())
        assert names == {
            "docs/",
            "docs/big.bin",
            "docs/empty",
            "docs/hard.txt",
            "docs/link",
            "docs/readme.md",
        }
        for name in ("big.bin", "readme.md", "empty"):
            assert archive.read(f"docs/{name}") == (source / "docs" / name).read_bytes()
        assert archive.read("docs/hard.txt") == (source / "top.txt").read_bytes()
        link = archive.getinfo("docs/link")
        assert stat.S_ISLNK(link.external_attr >> 16) and archive.read(link) == b"readme.md"


def test_restore_job_restores_byte_exact(
    server: LiveServer, operator: httpx.Client, files_point: dict[str, Any], tmp_path: Path
) -> None:
    pid, source = files_point["point"], files_point["source"]
    area = server.settings.data_dir / "restores"
    target = area / "restored"
    r = operator.post(f"/api/points/{pid}/restore", json={"target": str(target)})
    assert r.status_code == 202
    job = wait_job(operator, r.json()["id"])
    assert job["state"] == "succeeded", job
    assert _snapshot(target) == _snapshot(source)
    assert os.stat(target / "docs" / "hard.txt").st_ino == os.stat(target / "top.txt").st_ino
    one = operator.post(
        f"/api/points/{pid}/restore",
        json={"target": str(area / "one"), "path": "docs/readme.md"},
    )
    assert wait_job(operator, one.json()["id"])["state"] == "succeeded"
    assert (area / "one" / "readme.md").read_bytes() == (source / "docs" / "readme.md").read_bytes()
    into_data = operator.post(
        f"/api/points/{pid}/restore", json={"target": str(server.settings.data_dir / "x")}
    )
    assert into_data.status_code == 403
    assert into_data.json()["details"]["rule"] == "outside_restore_areas"
    relative = operator.post(f"/api/points/{pid}/restore", json={"target": "relative/path"})
    assert relative.status_code == 422
    audit = server.service.app.catalog.list_audit(100)
    assert any(a.action == "point.restore" and a.actor == "operator" for a in audit)


def operator_area(client: httpx.Client) -> Path:
    """The default restore area, as the restore choices name it."""
    pid = client.get("/api/points", params={"limit": 1}).json()[0]["id"]
    return Path(client.get(f"/api/points/{pid}/restore-targets").json()["areas"][0])


def test_locations_copies_and_restore_from_a_copy(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    viewer: httpx.Client,
    files_point: dict[str, Any],
    tmp_path: Path,
) -> None:
    """A folder becomes a location; a point is copied there by a job; its copies show where they
    live; a restore reads from the named copy; a location holding copies cannot be removed."""
    pid = files_point["point"]
    refused = admin.post("/api/locations", json={"path": "/etc"})
    assert refused.status_code == 403 and refused.json()["details"]["rule"] == "system_folder"
    assert (
        admin.post("/api/locations", json={"path": str(server.settings.data_dir)}).status_code
        == 403
    )
    folder = tmp_path / "second-pool"
    folder.mkdir()
    r = admin.post("/api/locations", json={"path": str(folder), "label": "second"})
    assert r.status_code == 201, r.text
    location = r.json()
    assert (location["label"], location["home"], location["copies"]) == ("second", False, 0)
    assert (folder / "location.json").is_file()
    job = wait_job(
        operator, operator.post(f"/api/points/{pid}/copy", json={"location": "second"}).json()["id"]
    )
    assert job["state"] == "succeeded", job
    assert job["result"]["packs_copied"] == job["result"]["packs_needed"] > 0
    listed = {loc["label"]: loc for loc in viewer.get("/api/locations").json()}
    assert listed["second"]["copies"] == 1 and sum(loc["home"] for loc in listed.values()) == 1
    copies = {c["location"]: c for c in viewer.get(f"/api/points/{pid}").json()["copies"]}
    assert copies["second"]["state"] == "present" and copies["second"]["verified_at"]
    assert copies["second"]["location_kind"] == "pool_dir"
    target = server.settings.data_dir / "restores" / "from-second"
    r = operator.post(
        f"/api/points/{pid}/restore", json={"target": str(target), "location": "second"}
    )
    assert wait_job(operator, r.json()["id"])["state"] == "succeeded"
    assert _snapshot(target) == _snapshot(files_point["source"])
    checked = operator.post(f"/api/points/{pid}/verify", params={"location": "second"})
    job = wait_job(operator, checked.json()["id"])
    assert job["state"] == "succeeded" and job["kind"] == "verify_copy", job
    assert job["result"]["ok"] and job["result"]["blobs_checked"] > 0
    nowhere = operator.post(f"/api/points/{pid}/verify", params={"location": "nowhere"})
    assert nowhere.status_code == 404
    busy = admin.delete(f"/api/locations/{location['id']}")
    assert busy.status_code == 409, busy.text


def test_vm_asset_backup_and_disk_restore(
    admin: httpx.Client, operator: httpx.Client, tmp_path: Path
) -> None:
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(4 * 1024 * 1024)
        f.seek(1024 * 1024)
        f.write(os.urandom(256 * 1024))
    spec = tmp_path / "vm.json"
    spec.write_text(json.dumps({"name": "web", "vcpus": 2, "memory_mib": 1024}))
    r = admin.post(
        "/api/assets",
        json={"name": "web", "kind": "vm", "disks": [str(disk)], "vm_spec": str(spec)},
    )
    assert r.status_code == 201, r.text
    assert r.json()["disks"] == [str(disk)] and r.json()["vm_spec"] == str(spec)
    job = wait_job(operator, operator.post("/api/assets/web/backup", json={}).json()["id"])
    assert job["state"] == "succeeded", job
    point = operator.get(f"/api/points/{job['result']['point']}").json()
    assert point["kind"] == "image" and point["manifest"]["disks"][0]["size"] == 4 * 1024 * 1024
    assert point["manifest"]["vm"]["vcpus"] == 2
    assert operator.get(f"/api/points/{point['id']}/files").status_code == 400
    out = operator_area(operator) / "restored.img"
    r = operator.post(f"/api/points/{point['id']}/restore", json={"target": str(out)})
    assert wait_job(operator, r.json()["id"])["state"] == "succeeded"
    assert out.read_bytes() == disk.read_bytes()


# --- maintenance ------------------------------------------------------------------------------------------------


def test_verify_jobs_mark_points(operator: httpx.Client, files_point: dict[str, Any]) -> None:
    pid = files_point["point"]
    job = wait_job(operator, operator.post(f"/api/points/{pid}/verify").json()["id"])
    assert job["state"] == "succeeded" and job["result"]["ok"] is True
    assert operator.get(f"/api/points/{pid}").json()["verify_status"] == "ok"
    store = wait_job(operator, operator.post("/api/verify", json={}).json()["id"])
    assert store["state"] == "succeeded"


def test_retention_preview_then_prune_then_gc(
    admin: httpx.Client, operator: httpx.Client, viewer: httpx.Client, tmp_path: Path
) -> None:
    (tmp_path / "x").write_text("1")
    admin.post("/api/assets", json={"name": "prunable", "kind": "files", "path": str(tmp_path)})
    ids = []
    for i in range(3):
        (tmp_path / "x").write_text(str(i) * 1000)
        job = wait_job(operator, operator.post("/api/assets/prunable/backup", json={}).json()["id"])
        ids.append(job["result"]["point"])
    rules = {"asset": "prunable", "rules": {"keep_last": 1}}
    preview = viewer.post("/api/retention/preview", json=rules).json()
    assert [p["id"] for p in preview["keep"]] == [ids[-1]]
    assert preview["keep"][0]["reasons"] == ["last"]
    assert sorted(p["id"] for p in preview["remove"]) == sorted(ids[:2])
    assert len(viewer.get("/api/points", params={"asset": "prunable"}).json()) == 3  # dry run
    empty = viewer.post("/api/retention/preview", json={"asset": "prunable", "rules": {}})
    assert empty.status_code == 400
    assert operator.post("/api/retention/prune", json=rules).status_code == 403
    job = wait_job(admin, admin.post("/api/retention/prune", json=rules).json()["id"])
    assert job["state"] == "succeeded" and sorted(job["result"]["remove"]) == sorted(ids[:2])
    assert [p["id"] for p in viewer.get("/api/points", params={"asset": "prunable"}).json()] == [
        ids[-1]
    ]
    gc = wait_job(admin, admin.post("/api/gc", json={"grace_seconds": 0}).json()["id"])
    assert gc["state"] == "succeeded", gc


def test_delete_point_and_rebuild_catalog(
    admin: httpx.Client, operator: httpx.Client, tmp_path: Path
) -> None:
    (tmp_path / "y").write_text("y")
    admin.post("/api/assets", json={"name": "deletable", "kind": "files", "path": str(tmp_path)})
    job = wait_job(operator, operator.post("/api/assets/deletable/backup", json={}).json()["id"])
    pid = job["result"]["point"]
    assert operator.delete(f"/api/points/{pid}").status_code == 403
    assert admin.delete(f"/api/points/{pid}").status_code == 204
    assert admin.get(f"/api/points/{pid}").status_code == 404
    rebuild = wait_job(admin, admin.post("/api/catalog/rebuild").json()["id"])
    assert rebuild["state"] == "succeeded" and rebuild["result"]["damaged"] == 0


def test_recovery_key_is_admin_only_and_audited(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client
) -> None:
    assert operator.get("/api/recovery-key").status_code == 403
    key = admin.get("/api/recovery-key").json()
    assert key["store_id"] == server.service.app.repo.store_id and len(key["recovery_key"]) > 20
    assert server.service.app.catalog.list_audit(5)[0].action == "key.export"


# --- dashboard, pools, settings, audit, metrics ------------------------------------------------------------------


def test_dashboard_rpo_status_follows_the_clock(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    viewer: httpx.Client,
    tmp_path: Path,
) -> None:
    (tmp_path / "z").write_text("z")
    admin.post("/api/assets", json={"name": "rpo-asset", "kind": "files", "path": str(tmp_path)})
    admin.post("/api/assets", json={"name": "rpo-none", "kind": "files", "path": str(tmp_path)})
    admin.post(
        "/api/policies", json={"name": "rpo-policy", "asset": "rpo-asset", "rpo_seconds": 3600}
    )

    def status_of(name: str) -> dict[str, Any]:
        board = viewer.get("/api/dashboard").json()
        return dict(next(a for a in board["assets"] if a["asset"] == name))

    before = status_of("rpo-asset")
    assert before["rpo_status"] == "missed" and before["last_point_id"] is None
    assert status_of("rpo-none")["rpo_status"] == "none"
    job = wait_job(operator, operator.post("/api/policies/rpo-policy/run", json={}).json()["id"])
    try:
        server.clock.offset = timedelta(minutes=30)
        met = status_of("rpo-asset")
        assert met["rpo_status"] == "met" and met["rpo_seconds"] == 3600
        assert met["last_point_id"] == job["result"]["point"]
        assert 1790 <= met["age_seconds"] <= 1900
        assert met["copies"][0]["location_kind"] == "pool_dir" and met["points"] == 1
        assert met["logical_bytes"] == 1 and met["stored_bytes"] > 0
        server.clock.offset = timedelta(hours=2)
        assert status_of("rpo-asset")["rpo_status"] == "missed"
    finally:
        server.clock.offset = timedelta(0)
    board = viewer.get("/api/dashboard").json()
    capacity = board["capacity"]
    assert capacity["total_bytes"] > capacity["free_bytes"] > 0
    assert len(capacity["series"]) == 30 and capacity["series"][-1]["bytes"] > 0
    # One day of backups is no trend: no growth rate (and so no forecast) before a week.
    assert capacity["store_bytes"] > 0 and capacity["history_days"] == 1
    assert capacity["growth_bytes_per_day"] == 0
    assert set(board["jobs"]) == {"queued", "running", "failed", "interrupted"}


def test_pools(viewer: httpx.Client, files_point: dict[str, Any]) -> None:
    pools = viewer.get("/api/pools").json()
    assert [p["name"] for p in pools] == ["default"]
    pool = pools[0]
    assert pool["total_bytes"] >= pool["used_bytes"] > 0 and pool["free_bytes"] > 0
    assert pool["points"] >= 1 and pool["store_bytes"] > 0


def test_settings_document(server: LiveServer, admin: httpx.Client, viewer: httpx.Client) -> None:
    assert viewer.get("/api/settings").json()["timezone"] == "UTC"
    assert viewer.put("/api/settings", json={}).status_code == 403
    bad = admin.put("/api/settings", json={"timezone": "Mars/Olympus_Mons"})
    assert bad.status_code == 400
    r = admin.put(
        "/api/settings",
        json={
            "appliance_name": "Office NAS",
            "timezone": "Europe/Berlin",
            "scheduler_paused": True,
        },
    )
    assert r.status_code == 200 and r.json()["appliance_name"] == "Office NAS"
    scheduler = server.service.scheduler
    assert str(scheduler.tz) == "Europe/Berlin" and scheduler.paused
    assert viewer.get("/api/dashboard").json()["appliance_name"] == "Office NAS"
    admin.put("/api/settings", json={})
    assert viewer.get("/api/settings").json()["appliance_name"] == "Backup appliance"
    assert not scheduler.paused


def test_audit_log_records_changes_with_their_actor(admin: httpx.Client, tmp_path: Path) -> None:
    admin.post("/api/assets", json={"name": "audited", "kind": "files", "path": str(tmp_path)})
    admin.put("/api/assets/audited", json={"description": "changed"})
    admin.delete("/api/assets/audited")
    entries = admin.get("/api/audit", params={"limit": 20}).json()
    mine = [(e["action"], e["actor"]) for e in entries if e["target"] == "audited"]
    assert mine[:3] == [
        ("asset.delete", "admin"),
        ("asset.update", "admin"),
        ("asset.create", "admin"),
    ]
    assert entries[0]["details"]["via"].startswith("token ")


def test_metrics_in_prometheus_format(server: LiveServer, files_point: dict[str, Any]) -> None:
    with server.client() as anonymous:
        assert anonymous.get("/metrics").status_code == 401
    with server.as_role("viewer") as client:
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for needle in (
        'appliance_jobs{state="succeeded"}',
        "appliance_backup_logical_bytes_total ",
        'appliance_pool_bytes{pool="default",kind="free"}',
        'appliance_newest_point_age_seconds{asset="tree"}',
        "appliance_job_duration_seconds_bucket{",
    ):
        assert needle in text, needle
    succeeded = next(
        line for line in text.splitlines() if line.startswith('appliance_jobs{state="succeeded"}')
    )
    assert int(succeeded.split()[-1]) >= 1
