"""The failover routes of the API, without booting QEMU (the image tests boot real VMs).

Routes exist and enforce roles, a failover that cannot start says why before a job is queued,
and the job kinds are registered by the service (a failover job of a folder asset fails with a
clear error).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_support import (
    LiveServer,
    bootstrapped_server,
    wait_job,
)

from appliance.jobs import JOB_KINDS

FAILOVER_KINDS = {
    "failover_start",
    "failover_stop",
    "failover_migrate",
    "failover_failback",
    "boot_test",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("failover-service")) as live:
        yield live


@pytest.fixture(scope="module")
def assets(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """A folder asset with a point, and a VM asset without any point."""
    root = tmp_path_factory.mktemp("failover-sources")
    folder = root / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("hello\n")
    disk = root / "vm.raw"
    disk.write_bytes(b"\0" * 1024 * 1024)
    r = admin.post("/api/assets", json={"name": "share", "kind": "files", "path": str(folder)})
    assert r.status_code == 201, r.text
    r = admin.post("/api/assets", json={"name": "web", "kind": "vm", "disks": [str(disk)]})
    assert r.status_code == 201, r.text
    r = operator.post("/api/assets/share/backup", json={"mode": "full"})
    assert r.status_code == 202, r.text
    job = wait_job(operator, r.json()["id"])
    assert job["state"] == "succeeded", job
    return {"files": "share", "vm": "web", "files_point": job["result"]["point"]}


def _paths(server: LiveServer) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in server.app.openapi()["paths"].items()
        for method in operations
    }


def test_routes_exist(server: LiveServer) -> None:
    assert {
        ("POST", "/api/assets/{name}/failover"),
        ("POST", "/api/assets/{name}/boot-test"),
        ("GET", "/api/failover"),
        ("GET", "/api/failover/{session_id}"),
        ("GET", "/api/failover/{session_id}/screenshot"),
        ("POST", "/api/failover/{session_id}/stop"),
        ("POST", "/api/failover/{session_id}/migrate"),
        ("POST", "/api/failover/{session_id}/failback"),
    } <= _paths(server)


def test_service_registers_the_failover_job_kinds(server: LiveServer) -> None:
    assert set(JOB_KINDS) >= FAILOVER_KINDS
    assert server.service.failover is not None


def test_viewer_cannot_fail_over_or_act_on_a_session(
    viewer: httpx.Client, assets: dict[str, Any]
) -> None:
    for path in (
        f"/api/assets/{assets['vm']}/failover",
        f"/api/assets/{assets['vm']}/boot-test",
        "/api/failover/missing/stop",
        "/api/failover/missing/migrate",
        "/api/failover/missing/failback",
    ):
        r = viewer.post(path, json={})
        assert r.status_code == 403, (path, r.text)
        assert r.json()["code"] == "forbidden"
    r = viewer.get("/api/failover")
    assert r.status_code == 200 and r.json() == []


def test_unauthenticated_is_401(server: LiveServer) -> None:
    with server.client() as anonymous:
        assert anonymous.get("/api/failover").status_code == 401
        assert anonymous.post("/api/assets/web/failover", json={}).status_code == 401


def test_vm_without_an_image_point_is_a_clear_404(
    operator: httpx.Client, assets: dict[str, Any]
) -> None:
    for route in ("failover", "boot-test"):
        r = operator.post(f"/api/assets/{assets['vm']}/{route}", json={})
        assert r.status_code == 404, r.text
        body = r.json()
        assert body["code"] == "not_found"
        assert "no VM image recovery point" in body["message"]
        assert body["details"]["asset"] == assets["vm"]


def test_an_unknown_location_to_read_from_is_a_clear_404(
    operator: httpx.Client, assets: dict[str, Any]
) -> None:
    for route in ("failover", "boot-test"):
        r = operator.post(f"/api/assets/{assets['vm']}/{route}", json={"location": "nowhere"})
        assert r.status_code == 404, r.text
        assert r.json()["message"] == "no location 'nowhere' of this store"
        r = operator.post(f"/api/assets/{assets['vm']}/{route}", json={"location": ""})
        assert r.status_code == 422, r.text


def test_folder_asset_cannot_fail_over(operator: httpx.Client, assets: dict[str, Any]) -> None:
    r = operator.post(f"/api/assets/{assets['files']}/failover", json={})
    assert r.status_code == 400, r.text
    assert r.json()["code"] == "invalid_input"
    assert "only virtual machines" in r.json()["message"]
    # naming a point of another asset, or a folder point, is refused too
    r = operator.post(f"/api/assets/{assets['vm']}/failover", json={"point": assets["files_point"]})
    assert r.status_code == 400, r.text
    assert "belongs to share" in r.json()["message"]


def test_unknown_asset_and_session_are_404(operator: httpx.Client, viewer: httpx.Client) -> None:
    assert operator.post("/api/assets/nothing/failover", json={}).status_code == 404
    for path in ("/api/failover/nope", "/api/failover/nope/screenshot"):
        r = viewer.get(path)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["code"] == "not_found"
    for action in ("stop", "migrate", "failback"):
        r = operator.post(f"/api/failover/nope/{action}", json={})
        assert r.status_code == 404, (action, r.text)


def test_request_bodies_are_validated(operator: httpx.Client, assets: dict[str, Any]) -> None:
    r = operator.post(
        f"/api/assets/{assets['vm']}/failover",
        json={"network": {"mode": "isolated", "port_forwards": [{"host": 0, "guest": 0}]}},
    )
    assert r.status_code == 422, r.text
    r = operator.post(f"/api/assets/{assets['vm']}/failover", json={"network": {"mode": "routed"}})
    assert r.status_code == 422, r.text
    r = operator.post("/api/failover/nope/failback", json={"new_point": False})
    assert r.status_code == 400, r.text
    assert "failback makes a new point" in r.json()["message"]


def test_failover_job_of_a_folder_asset_fails_clearly(
    server: LiveServer, operator: httpx.Client, assets: dict[str, Any]
) -> None:
    """The job kind runs in the service: submitted directly (the route refuses a folder asset
    before queueing), it fails with a message that names the problem, and no VM starts."""
    job = server.service.jobs.submit("failover_start", {"asset": assets["files"]})
    r = operator.get(f"/api/jobs/{job.id}")
    assert r.status_code == 200, r.text
    done = wait_job(operator, job.id)
    assert done["state"] == "failed", done
    assert done["error"]["code"] == "not_found"
    assert "no VM image recovery point" in done["error"]["message"]
    assert done["description"] == f"failover of {assets['files']}"
    job = server.service.jobs.submit(
        "failover_start", {"asset": assets["files"], "point": assets["files_point"]}
    )
    done = wait_job(operator, job.id)
    assert done["state"] == "failed", done
    assert "not a VM image point" in done["error"]["message"]
    assert operator.get("/api/failover").json() == []
