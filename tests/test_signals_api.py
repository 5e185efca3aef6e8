"""The ransomware warning through the service: a backup job that looks like an attack, the
point's signals and suspicion in the points API, the retention preview's hold, and the review
(roles, input, audit)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server, wait_job
from test_signals import encrypt, make_office, normal_day


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("signals-service")) as live:
        yield live


def _backup(operator: httpx.Client) -> dict[str, Any]:
    r = operator.post("/api/assets/office/backup", json={})
    assert r.status_code == 202, r.text
    job = wait_job(operator, r.json()["id"])
    assert job["state"] == "succeeded", job
    return job


@pytest.fixture(scope="module")
def attacked(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    src = tmp_path_factory.mktemp("office") / "share"
    make_office(src)
    r = admin.post("/api/assets", json={"name": "office", "kind": "files", "path": str(src)})
    assert r.status_code == 201, r.text
    clean = []
    for n in range(5):
        if n:
            normal_day(src, n)
        job = _backup(operator)
        assert job["result"]["suspicion"] == []
        clean.append(job["result"]["point"])
    encrypted = encrypt(src)
    job = _backup(operator)
    return {"job": job, "point": job["result"]["point"], "clean": clean, "encrypted": encrypted}


def test_the_job_and_the_points_api_say_why(attacked: dict[str, Any], viewer: httpx.Client) -> None:
    reasons = attacked["job"]["result"]["suspicion"]
    encrypted = attacked["encrypted"]
    assert f"{encrypted} files gained the extension .locked" in reasons
    points = viewer.get("/api/points", params={"asset": "office"}).json()
    newest = points[0]
    assert newest["id"] == attacked["point"]
    assert newest["suspicious"] is True and newest["suspicion"] == reasons
    assert newest["signals"]["extensions"] == {".locked": encrypted}
    assert newest["review"] is None
    assert all(p["suspicious"] is False for p in points[1:])
    detail = viewer.get(f"/api/points/{attacked['point']}").json()
    assert detail["suspicion"] == reasons and detail["signals"]["renamed"] == encrypted


def test_retention_preview_names_the_hold(attacked: dict[str, Any], viewer: httpx.Client) -> None:
    r = viewer.post("/api/retention/preview", json={"asset": "office", "rules": {"keep_last": 1}})
    assert r.status_code == 200, r.text
    keep = {p["id"]: p["reasons"] for p in r.json()["keep"]}
    assert set(keep) == {attacked["point"], attacked["clean"][-1]}
    assert keep[attacked["clean"][-1]] == ["held"]


def test_review_roles_input_and_audit(
    attacked: dict[str, Any], viewer: httpx.Client, operator: httpx.Client, admin: httpx.Client
) -> None:
    url = f"/api/points/{attacked['point']}/review"
    assert viewer.post(url, json={"verdict": "expected"}).status_code == 403
    r = operator.post(url, json={"verdict": "maybe"})
    assert r.status_code == 422
    r = operator.post(url, json={"verdict": "attack"})
    assert r.status_code == 200, r.text
    assert r.json()["suspicious"] is True and r.json()["review"]["verdict"] == "attack"
    r = operator.post(url, json={"verdict": "expected"})
    assert r.json()["suspicious"] is False and r.json()["review"]["by"] == "operator"
    listed = operator.get("/api/points", params={"asset": "office"}).json()[0]
    assert listed["suspicious"] is False and listed["suspicion"]  # the reasons stay, answered
    clean = operator.post(f"/api/points/{attacked['clean'][0]}/review", json={"verdict": "attack"})
    assert clean.status_code == 409 and clean.json()["code"] == "conflict"
    entries = admin.get("/api/audit", params={"limit": 50}).json()
    reviews = [e["details"]["verdict"] for e in entries if e["action"] == "point.review"]
    assert reviews[:2] == ["expected", "attack"]
