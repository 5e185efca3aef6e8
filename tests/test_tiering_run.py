"""A tiering run end to end against a real S3 server: rules set and planned from the CLI, old
monthly points copied to a cold, locked bucket, local copies dropped, nothing done twice."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_support import PASSPHRASE, new_appliance, run_cli, set_engine_env

from appliance.catalog.records import home_location_id
from appliance.engine import Appliance
from appliance.maintenance import collect_garbage
from appliance.point_packs import point_packs
from appliance.store import format as fmt


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


def test_old_monthly_points_move_to_a_cold_bucket_and_leave_the_local_pool(
    s3: Any, tmp_path: Path
) -> None:
    app, _ = new_appliance(tmp_path / "app")
    now = datetime.now(UTC)
    tree = tmp_path / "tree"
    tree.mkdir()
    points = []
    for days_ago in (70, 40, 0):
        (tree / f"f{days_ago}.bin").write_bytes(os.urandom(200_000))
        app.clock = lambda d=days_ago: now - timedelta(days=d)  # type: ignore[misc]
        points.append(app.backup_files(str(tree), "docs").point.id)
    app.clock = lambda: datetime.now(UTC)
    bucket = s3.bucket(lock=True)
    app.add_location(
        f"s3://{bucket}/a",
        kind="s3_bucket",
        label="cold",
        options=s3.options(cold=True, lock_mode="COMPLIANCE"),
    )
    data = tmp_path / "app"
    # f70.bin is in every point: its pack is shared by a point locked less long than the next.
    shared = {
        pack.hex()
        for pack, kind in point_packs(app.repo, app.manifest(points[0]), "f70.bin").packs.items()
        if kind == fmt.PACK_KIND_DATA
    }
    app.close()

    rules = {
        "rules": [
            {
                "name": "monthly",
                "location": "cold",
                "classes": ["monthly"],
                "min_age_days": 30,
                "storage_class": "GLACIER",
                "keep_days": 365,
                "keep_local_days": 0,
            }
        ]
    }
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    run_cli("tier", "rules", "--set", str(tmp_path / "rules.json"), data_dir=data)
    plan = json.loads(run_cli("tier", "plan", "--json", data_dir=data).stdout)
    assert [c["point"] for c in plan["copies"]] == points[:2], plan
    assert plan["cost"]["monthly_total"] > 0 and plan["cost"]["currency"] == "USD"
    text = run_cli("tier", "plan", data_dir=data).stdout.decode()
    assert "-> cold (GLACIER, locked until" in text

    # The run uses the credentials the location was added with (kept in the data directory).
    result = json.loads(run_cli("tier", "run", "--json", data_dir=data).stdout)
    assert result["copied"] == points[:2] and result["dropped"] == points[:2], result
    assert result["failed"] == []

    app = Appliance.open(str(data), passphrase=PASSPHRASE)
    try:
        home = home_location_id(app.repo.store_id)
        location = app.find_location("cold")
        for pid, days_ago in zip(points[:2], (70, 40), strict=True):
            states = {c.location_id: c for c in app.catalog.copies_of(pid)}
            assert states[home].state == "deleted"
            cold = states[location.id]
            assert cold.state == "archived" and cold.storage_class == "GLACIER"
            assert cold.retain_until is not None
            expected = now - timedelta(days=days_ago) + timedelta(days=365)
            assert abs(cold.retain_until - expected) < timedelta(minutes=5)
            assert pid not in app.repo.manifest_ids()
        newest = {c.location_id: c.state for c in app.catalog.copies_of(points[2])}
        assert newest == {home: "present"}  # the newest point stays, and is not a monthly copy
        # GC frees what only the dropped points used; the local store still verifies.
        collect_garbage(app.repo, grace_seconds=0)
        assert app.verify().ok
        # The bucket really locks the cold packs (read back from the server).
        client = s3.client()
        later = now - timedelta(days=40) + timedelta(days=365)
        for item in client.list_objects_v2(Bucket=bucket, Prefix="a/data/")["Contents"]:
            head = client.head_object(Bucket=bucket, Key=item["Key"])
            assert head["StorageClass"] == "GLACIER" and head["ObjectLockMode"] == "COMPLIANCE"
            if item["Key"].rsplit("/", 1)[1] in shared:  # extended to the later point's date
                assert abs(head["ObjectLockRetainUntilDate"] - later) < timedelta(minutes=5)
        # Manifests and indexes are locked as long as the data, in the hot class.
        for prefix in ("a/manifests/", "a/index/", "a/meta/", "a/keys/"):
            for item in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
                head = client.head_object(Bucket=bucket, Key=item["Key"])
                assert head.get("StorageClass", "STANDARD") == "STANDARD"
                assert head["ObjectLockMode"] == "COMPLIANCE", item["Key"]
    finally:
        app.close()

    again = json.loads(run_cli("tier", "run", "--json", data_dir=data).stdout)
    assert again["copied"] == [] and again["dropped"] == []
