"""Tiering over the API: rules validated in words, the plan previewed with its cost, a run as a
job against a real S3 server, prices overridable; roles enforced."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server, wait_job


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("tiering-service")) as live:
        yield live


@pytest.fixture(scope="module")
def site(server: LiveServer, s3: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two old points of a folder asset (made with the engine at past times) and a cold bucket."""
    app = server.service.app
    root = tmp_path_factory.mktemp("tiering-tree")
    real = app.clock
    points = []
    try:
        for days_ago in (75, 45, 0):
            (root / f"f{days_ago}").write_bytes(os.urandom(100_000))
            app.clock = lambda d=days_ago: datetime.now(UTC) - timedelta(days=d)  # type: ignore[misc]
            points.append(app.backup_files(str(root), "share").point.id)
    finally:
        app.clock = real
    app.add_location(
        f"s3://{s3.bucket(lock=True)}/t",
        kind="s3_bucket",
        label="cold",
        options=s3.options(cold=True, lock_mode="GOVERNANCE"),
    )
    return {"points": points}


RULES = {
    "rules": [
        {
            "name": "monthly",
            "location": "cold",
            "classes": ["monthly"],
            "min_age_days": 30,
            "storage_class": "DEEP_ARCHIVE",
            "keep_days": 400,
        }
    ],
    "schedule": {"cron": "0 2 * * *", "window_hours": 5},
}


def test_rules_are_validated_in_words_and_only_admins_set_them(
    admin: httpx.Client, operator: httpx.Client, viewer: httpx.Client, site: dict
) -> None:
    bad = admin.put(
        "/api/tiering", json={"rules": [{"name": "x", "location": "cold", "classes": ["hourly"]}]}
    )
    assert bad.status_code == 400 and "'hourly' is not a point class" in bad.json()["message"], (
        bad.text
    )
    assert operator.put("/api/tiering", json=RULES).status_code == 403
    r = admin.put("/api/tiering", json=RULES)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["settings"]["rules"][0]["storage_class"] == "DEEP_ARCHIVE"
    planned = [c["point"] for c in body["plan"]["copies"]]
    assert planned == site["points"][:2]
    assert body["plan"]["cost"]["monthly"]["DEEP_ARCHIVE"] > 0
    assert viewer.get("/api/tiering").json()["plan"]["copies"] == body["plan"]["copies"]


def test_a_run_is_a_job_that_copies_the_planned_points(
    admin: httpx.Client, operator: httpx.Client, viewer: httpx.Client, site: dict
) -> None:
    assert admin.put("/api/tiering", json=RULES).status_code == 200
    assert viewer.post("/api/tiering/run").status_code == 403
    r = operator.post("/api/tiering/run")
    assert r.status_code == 202, r.text
    job = wait_job(operator, r.json()["id"])
    assert job["state"] == "succeeded", job
    assert job["result"]["copied"] == site["points"][:2]
    assert viewer.get("/api/tiering").json()["plan"]["copies"] == []  # nothing left to do


def test_prices_can_be_overridden_and_bad_ones_are_refused(
    admin: httpx.Client, viewer: httpx.Client
) -> None:
    shipped = viewer.get("/api/tiering/prices").json()
    assert shipped["as_of"] and shipped["classes"]["GLACIER"]["gb_month"] > 0
    r = admin.put("/api/tiering/prices", json={"classes": {"GLACIER": {"gb_month": "free"}}})
    assert r.status_code == 400 and "gb_month is a number" in r.json()["message"]
    r = admin.put(
        "/api/tiering/prices",
        json={"as_of": "2026-12-01", "classes": {"GLACIER": {"gb_month": 0.002}}},
    )
    assert r.status_code == 200, r.text
    prices = viewer.get("/api/tiering/prices").json()
    assert prices["as_of"] == "2026-12-01" and prices["classes"]["GLACIER"]["gb_month"] == 0.002
    assert (
        prices["classes"]["GLACIER"]["put_per_1000"]
        == shipped["classes"]["GLACIER"]["put_per_1000"]
    )
