"""The recovery plan routes of the API, without booting QEMU (tests/test_plans_qemu.py and the
page test boot real VMs): roles, validation with clear errors, CRUD, runs as jobs, the audit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server

from appliance.errors import Conflict
from appliance.jobs import JOB_KINDS


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("plans-service")) as live:
        yield live


@pytest.fixture(scope="module")
def assets(admin: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two VM assets without points and a folder asset."""
    root: Path = tmp_path_factory.mktemp("plan-sources")
    for name in ("dc", "app"):
        disk = root / f"{name}.raw"
        disk.write_bytes(b"\0" * 1024 * 1024)
        r = admin.post("/api/assets", json={"name": name, "kind": "vm", "disks": [str(disk)]})
        assert r.status_code == 201, r.text
    (root / "share").mkdir()
    r = admin.post(
        "/api/assets", json={"name": "share", "kind": "files", "path": str(root / "share")}
    )
    assert r.status_code == 201, r.text
    return {"first": "dc", "second": "app", "files": "share"}


def _body(name: str, *groups: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": name, "groups": [{"vms": [{"asset": a} for a in g]} for g in groups], **extra}


def test_routes_exist_and_the_job_kinds_are_registered(server: LiveServer) -> None:
    paths = {
        (method.upper(), path)
        for path, operations in server.app.openapi()["paths"].items()
        for method in operations
    }
    assert {
        ("GET", "/api/plans"),
        ("POST", "/api/plans"),
        ("GET", "/api/plans/{plan_id}"),
        ("PUT", "/api/plans/{plan_id}"),
        ("DELETE", "/api/plans/{plan_id}"),
        ("POST", "/api/plans/{plan_id}/failover"),
        ("POST", "/api/plans/{plan_id}/test"),
        ("GET", "/api/plans/{plan_id}/runs"),
        ("GET", "/api/plan-runs/{run_id}"),
    } <= paths
    assert {"plan_failover", "plan_test"} <= set(JOB_KINDS)


def test_operator_creates_a_plan_viewer_reads_it_and_cannot_change_it(
    operator: httpx.Client, viewer: httpx.Client, admin: httpx.Client, assets: dict[str, str]
) -> None:
    body = _body("Head office", ["dc"], ["app"], test_cron="0  4 * * *")
    body["groups"][0]["after"] = "delay"
    body["groups"][0]["delay_seconds"] = 20
    body["groups"][1]["vms"][0]["network"] = {"mode": "isolated", "port_forwards": [{"guest": 80}]}
    r = viewer.post("/api/plans", json=body)
    assert r.status_code == 403 and r.json()["code"] == "forbidden"
    r = operator.post("/api/plans", json=body)
    assert r.status_code == 201, r.text
    plan = r.json()
    assert r.headers["location"] == f"/api/plans/{plan['id']}"
    assert plan["name"] == "Head office" and plan["test_cron"] == "0 4 * * *"
    assert [g["vms"][0]["asset"] for g in plan["groups"]] == ["dc", "app"]
    assert plan["groups"][0]["after"] == "delay" and plan["groups"][0]["delay_seconds"] == 20
    assert plan["groups"][1]["vms"][0]["network"]["port_forwards"] == [{"host": 0, "guest": 80}]
    assert plan["last_test"] is None and plan["last_run"] is None
    listed = viewer.get("/api/plans")
    assert listed.status_code == 200 and [p["id"] for p in listed.json()] == [plan["id"]]
    assert viewer.get(f"/api/plans/{plan['id']}").json()["name"] == "Head office"
    for method, path in (
        ("PUT", f"/api/plans/{plan['id']}"),
        ("DELETE", f"/api/plans/{plan['id']}"),
        ("POST", f"/api/plans/{plan['id']}/failover"),
        ("POST", f"/api/plans/{plan['id']}/test"),
    ):
        r = viewer.request(method, path, json=body if method == "PUT" else None)
        assert r.status_code == 403, (method, path, r.text)
    # A second plan of the same name is a conflict; the first is unchanged.
    r = operator.post("/api/plans", json=_body("Head office", ["app"]))
    assert r.status_code == 409 and "already exists" in r.json()["message"]
    renamed = operator.put(f"/api/plans/{plan['id']}", json=_body("Branch", ["app", "dc"]))
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["name"] == "Branch" and renamed.json()["test_cron"] is None
    audit = [(a["action"], a["target"]) for a in admin.get("/api/audit").json()]
    assert ("plan.create", "Head office") in audit and ("plan.update", "Branch") in audit
    assert operator.delete(f"/api/plans/{plan['id']}").status_code == 204
    assert viewer.get(f"/api/plans/{plan['id']}").status_code == 404
    audit = [(a["action"], a["target"]) for a in admin.get("/api/audit").json()]
    assert ("plan.delete", "Branch") in audit


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (_body("x", ["dc"], ["app", "dc"]), 400, "dc is in group 1 and group 2"),
        (_body("x", ["share"]), 400, "share is a folder asset"),
        (_body("x", ["ghost"]), 400, "asset ghost does not exist"),
        (_body("x"), 400, "at least one group"),
        (_body("x", []), 400, "group 1 has no VMs"),
        (_body("x", ["dc"], test_cron="every night"), 422, "five fields"),
        (_body("", ["dc"]), 422, ""),
        (_body("x", ["../etc"]), 422, ""),
    ],
)
def test_bad_plans_are_refused_with_a_clear_error(
    operator: httpx.Client, assets: dict[str, str], body: dict[str, Any], status: int, message: str
) -> None:
    r = operator.post("/api/plans", json=body)
    assert r.status_code == status, r.text
    assert message in r.text
    assert [p["name"] for p in operator.get("/api/plans").json()].count("x") == 0


def test_a_bad_delay_is_refused(operator: httpx.Client, assets: dict[str, str]) -> None:
    body = _body("x", ["dc"], ["app"])
    body["groups"][0].update(after="delay", delay_seconds=-5)
    assert operator.post("/api/plans", json=body).status_code == 422
    body["groups"][0].update(after="soon", delay_seconds=5)
    assert operator.post("/api/plans", json=body).status_code == 422


def test_running_a_plan_whose_vm_has_no_point_says_so_before_a_job(
    operator: httpx.Client, assets: dict[str, str]
) -> None:
    plan = operator.post("/api/plans", json=_body("No points", ["dc"])).json()
    jobs_before = len(operator.get("/api/jobs").json())
    for route in ("failover", "test"):
        r = operator.post(f"/api/plans/{plan['id']}/{route}")
        assert r.status_code == 404, r.text
        assert "dc has no VM image recovery point" in r.json()["message"]
    assert len(operator.get("/api/jobs").json()) == jobs_before
    assert operator.post("/api/plans/ffffff/test").status_code == 404
    assert operator.get("/api/plans/not-an-id!/runs").status_code == 422
    assert operator.get(f"/api/plans/{plan['id']}/runs").json() == []


def test_a_run_whose_job_ended_unfinished_is_shown_failed(
    server: LiveServer, operator: httpx.Client, assets: dict[str, str]
) -> None:
    """A restart (or a cancel) ends a run's job without the run's own end: it reads as failed."""
    plan = operator.post("/api/plans", json=_body("Interrupted", ["app"])).json()
    catalog = server.service.app.catalog
    record = catalog.get_plan(plan["id"])
    # A kind no runner knows, cancelled at once: the live runner must not run a plan here.
    job = catalog.create_job("test_unfinished_plan_run", {"plan": plan["id"]})
    with contextlib.suppress(Conflict):
        catalog.update_job(job.id, state="cancelled")
    ended = catalog.get_job(job.id).state
    assert ended in ("cancelled", "failed")
    run = catalog.add_plan_run(record, "test", job.created_at, job_id=job.id)
    (listed,) = operator.get(f"/api/plans/{plan['id']}/runs").json()
    assert listed["id"] == run.id and listed["state"] == "failed"
    assert listed["error"] == f"the run ended before every VM was proven (its job was {ended})"
    assert operator.get(f"/api/plan-runs/{run.id}").json()["state"] == "failed"
    assert operator.get(f"/api/plans/{plan['id']}").json()["last_test"]["state"] == "failed"
    # A run still going (no job ended) reads as running.
    going = catalog.add_plan_run(record, "test", job.created_at)
    assert operator.get(f"/api/plan-runs/{going.id}").json()["state"] == "running"
