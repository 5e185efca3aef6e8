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

from appliance.catalog.records import home_location_id


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


def test_a_recall_estimate_says_what_the_recall_would_cost(
    admin: httpx.Client,
    operator: httpx.Client,
    viewer: httpx.Client,
    server: LiveServer,
    site: dict,
) -> None:
    """A point tiered to the cold bucket, whose local copy is then gone: the estimate prices the
    recall of exactly its packs by the retrieval prices of its class and the location's tier."""
    assert admin.put("/api/tiering", json=RULES).status_code == 200
    job = wait_job(operator, operator.post("/api/tiering/run").json()["id"])
    assert job["state"] == "succeeded", job
    app = server.service.app
    point = site["points"][0]
    hot = viewer.get(f"/api/points/{point}/recall").json()
    assert hot["needed"] is False and hot["cost"] is None, hot

    home = home_location_id(app.repo.store_id)
    app.catalog.set_copy(point, home, "deleted")
    try:
        r = viewer.get(f"/api/points/{point}/recall")
        assert r.status_code == 200, r.text
        estimate = r.json()
        assert estimate["needed"] and estimate["reason"] is None and estimate["packs"] > 0, estimate
        assert (estimate["storage_class"], estimate["tier"]) == ("DEEP_ARCHIVE", "Standard")
        prices = viewer.get("/api/tiering/prices").json()
        rate = prices["retrieval"]["DEEP_ARCHIVE"]["Standard"]
        expected = (
            estimate["bytes"] / (1 << 30) * rate["per_gb"]
            + estimate["packs"] / 1000 * rate["per_1000"]
        )
        assert estimate["cost"] > 0 and estimate["cost"] == pytest.approx(expected, abs=1e-8)
        assert (estimate["currency"], estimate["prices_as_of"]) == (
            prices["currency"],
            prices["as_of"],
        )

        # The settings' override is what the next estimate uses: 1 per request, nothing per GiB.
        override = {
            "as_of": "2027-01-15",
            "retrieval": {"DEEP_ARCHIVE": {"Standard": {"per_gb": 0, "per_1000": 1000}}},
        }
        assert admin.put("/api/tiering/prices", json=override).status_code == 200
        repriced = viewer.get(f"/api/points/{point}/recall").json()
        assert repriced["cost"] == pytest.approx(estimate["packs"])
        assert repriced["prices_as_of"] == "2027-01-15"
    finally:
        app.catalog.set_copy(point, home, "present")
        admin.put("/api/tiering/prices", json={})
