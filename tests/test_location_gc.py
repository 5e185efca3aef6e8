"""Expiring copies and collecting a bucket location's garbage, against a real S3 server with
Object Lock: nothing locked is deleted (the report says until when), shared packs stay, and the
copies left restore."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_support import new_appliance, set_engine_env

from appliance.catalog.records import home_location_id
from appliance.errors import InvalidInput
from appliance.point_packs import point_packs
from appliance.store import format as fmt


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


def _objects(client: Any, bucket: str, prefix: str) -> set[str]:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {item["Key"].rsplit("/", 1)[1] for item in listed}


def test_an_expired_copy_leaves_and_only_its_unshared_unlocked_packs_go(
    s3: Any, tmp_path: Path
) -> None:
    app, _ = new_appliance(tmp_path / "app", pack_size=256 << 10)
    app.clock = lambda: datetime.now(UTC)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "shared.bin").write_bytes(os.urandom(300_000))
    (tree / "a.bin").write_bytes(os.urandom(300_000))
    first = app.backup_files(str(tree), "docs").point.id
    (tree / "a.bin").unlink()
    (tree / "b.bin").write_bytes(os.urandom(300_000))
    second = app.backup_files(str(tree), "docs").point.id
    (tree / "b.bin").unlink()
    (tree / "c.bin").write_bytes(os.urandom(300_000))
    third = app.backup_files(str(tree), "docs").point.id
    bucket = s3.bucket(lock=True)
    app.add_location(
        f"s3://{bucket}/g", kind="s3_bucket", label="b", options=s3.options(lock_mode="GOVERNANCE")
    )
    soon = datetime.now(UTC) + timedelta(seconds=2)
    app.copy_point(first, "b", retain_until=soon)
    app.copy_point(second, "b", retain_until=datetime.now(UTC) + timedelta(days=30))
    app.copy_point(third, "b", retain_until=datetime.now(UTC) + timedelta(days=1))

    only_first = {p.hex() for p in point_packs(app.repo, app.manifest(first), "a.bin").packs} - {
        p.hex() for p in point_packs(app.repo, app.manifest(second)).packs
    }
    shared = {
        p.hex()
        for p, kind in point_packs(app.repo, app.manifest(first), "shared.bin").packs.items()
        if kind == fmt.PACK_KIND_DATA
    }
    only_third = {p.hex() for p in point_packs(app.repo, app.manifest(third), "c.bin").packs} - {
        p.hex() for p in point_packs(app.repo, app.manifest(second)).packs
    }
    assert only_first and shared and only_third

    with pytest.raises(InvalidInput, match="kept until"):
        app.expire_copy(second, "b")
    time.sleep(2.5)
    outcome = app.expire_copy(first, "b")
    assert outcome == {"point": first, "location": "b", "point_removed": False}
    # The third point's manifest goes behind the appliance's back (an admin with the right to
    # bypass governance): its packs are unneeded but still locked for a day.
    client = s3.client()
    versions = client.list_object_versions(Bucket=bucket, Prefix=f"g/manifests/{third}")
    for version in versions["Versions"]:
        client.delete_object(
            Bucket=bucket,
            Key=version["Key"],
            VersionId=version["VersionId"],
            BypassGovernanceRetention=True,
        )

    preview = app.collect_location_garbage("b", dry_run=True, grace_seconds=0)
    assert set(preview.packs_deleted) >= only_first
    packs_in_bucket = _objects(client, bucket, "g/data/") | _objects(client, bucket, "g/meta/")
    assert packs_in_bucket >= only_first  # a dry run deletes nothing
    report = app.collect_location_garbage("b", grace_seconds=0)
    assert set(report.packs_deleted) == only_first, report
    assert {item["pack"] for item in report.locked} == only_third
    assert all(item["until"] for item in report.locked)
    left = _objects(client, bucket, "g/data/") | _objects(client, bucket, "g/meta/")
    assert not (left & only_first) and shared <= left and only_third <= left
    assert report.index_files_rewritten >= 1 or report.index_files_kept_locked >= 1

    # The second point still restores from the bucket alone, through the rewritten index.
    app.catalog.set_copy(second, home_location_id(app.repo.store_id), "deleted")
    out = tmp_path / "restored"
    app.restore(second, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["b.bin", "shared.bin"]
    assert (out / "shared.bin").read_bytes() == (tree / "shared.bin").read_bytes()
    app.close()
