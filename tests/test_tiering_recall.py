"""A cold, locked bucket as a location, for real (moto's S3 server on 127.0.0.1 over HTTP).

A point is copied there: data packs in GLACIER with a COMPLIANCE lock, everything else STANDARD
(read back with ``head_object``). With the local copy gone, restoring one file recalls exactly
the packs that file needs, waits as a job (the server's restore takes 2 s), survives a restart
of the runner, and then restores the file byte-exact. A fresh appliance rebuilds its catalog
from the bucket alone.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_support import PASSPHRASE, new_appliance, run_cli, set_engine_env
from s3_support import CREDENTIALS

from appliance.catalog.records import home_location_id
from appliance.engine import Appliance
from appliance.errors import ObjectLocked
from appliance.jobs import JobRunner
from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.registry import open_backend

START = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture
def cold_site(s3: Any, tmp_path: Path) -> dict[str, Any]:
    app, recovery = new_appliance(tmp_path / "app", pack_size=256 << 10)
    app.clock = lambda: datetime.now(UTC)  # object locks are real dates on the server
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(12):
        (tree / f"f{i:02d}.bin").write_bytes(os.urandom(300_000))
    point = app.backup_files(str(tree), "docs").point.id
    bucket = s3.bucket(lock=True)
    location = app.add_location(
        f"s3://{bucket}/site-a",
        kind="s3_bucket",
        label="cold",
        options=s3.options(
            cold=True,
            lock_mode="COMPLIANCE",
            lock_days=2,
            restore_tier="Expedited",
            recall_poll_seconds=1,
            poll_seconds=0.2,
        ),
    )
    return {
        "app": app,
        "recovery": recovery,
        "tree": tree,
        "point": point,
        "bucket": bucket,
        "location": location,
        "s3": s3,
    }


def test_a_cold_copy_keeps_data_cold_and_locked_and_metadata_hot(cold_site: dict) -> None:
    app: Appliance = cold_site["app"]
    location = cold_site["location"]
    assert (location.access, location.immutable, location.offsite) == ("cold", True, True)
    # Credentials are kept apart from the catalog.
    assert "secret_access_key" not in location.details["options"]
    secrets = Path(app.data_dir.secrets_path) / f"{location.id}.json"
    assert secrets.stat().st_mode & 0o777 == 0o600
    result = app.copy_point(cold_site["point"], "cold")
    assert result["state"] == "archived" and result["storage_class"] == "GLACIER"
    copy = {c.location_id: c for c in app.catalog.copies_of(cold_site["point"])}[location.id]
    assert copy.state == "archived" and copy.storage_class == "GLACIER"
    assert copy.retain_until is not None

    client = cold_site["s3"].client()
    listed = client.list_objects_v2(Bucket=cold_site["bucket"], Prefix="site-a/")["Contents"]
    kinds: dict[str, set[str]] = {}
    for item in listed:
        head = client.head_object(Bucket=cold_site["bucket"], Key=item["Key"])
        folder = item["Key"].split("/")[1]
        kinds.setdefault(folder, set()).add(head.get("StorageClass") or "STANDARD")
        if folder == "data":
            assert head["ObjectLockMode"] == "COMPLIANCE"
            until = head["ObjectLockRetainUntilDate"]
            assert timedelta(days=1) < until - datetime.now(UTC) <= timedelta(days=2, minutes=5)
    assert kinds.pop("data") == {"GLACIER"}
    assert set(kinds) >= {"meta", "index", "manifests", "keys"}
    assert all(classes == {"STANDARD"} for classes in kinds.values()), kinds
    # The appliance cannot remove a locked pack early, whatever it asks.
    backend = open_backend(
        "s3_bucket",
        location.address,
        **{**location.details["options"], **cold_site["s3"].options()},
    )
    data = next(i.name for i in backend.list("data/"))
    with pytest.raises(ObjectLocked):
        backend.delete(data)
    assert backend.stat(data).size > 0


def test_restoring_one_file_recalls_only_its_packs_then_restores_it(cold_site: dict) -> None:
    app: Appliance = cold_site["app"]
    point = cold_site["point"]
    app.copy_point(point, "cold")
    everything = point_packs(app.repo, app.manifest(point))
    mine = point_packs(app.repo, app.manifest(point), "f03.bin")
    data = {p for p, kind in mine.packs.items() if kind == fmt.PACK_KIND_DATA}
    all_data = {p for p, kind in everything.packs.items() if kind == fmt.PACK_KIND_DATA}
    assert 0 < len(data) < len(all_data)
    # The local copy is gone: only the cold copy remains.
    app.catalog.set_copy(point, home_location_id(app.repo.store_id), "deleted")

    runner = JobRunner(app, clock=lambda: START)
    runner.start()
    target = Path(app.restore_rules().areas[0]) / "one"
    try:
        job = runner.submit("restore", {"point": point, "target": str(target), "path": "f03.bin"})
        _until(lambda: app.catalog.get_job(job.id).state == "waiting")
    finally:
        runner.shutdown()
    waiting = app.catalog.get_job(job.id)
    assert waiting.wait_reason is not None and waiting.wait_reason.startswith(
        f"recalling {len(data)} of {len(data)} pack(s)"
    ), waiting.wait_reason
    assert "from cold (tier Expedited, typically 1-5 minutes)" in waiting.wait_reason
    assert waiting.checkpoint["recall"]["packs"] == len(data)
    copy = {c.location_id: c for c in app.catalog.copies_of(point)}[cold_site["location"].id]
    assert copy.state == "recalling"

    # Exactly those packs were asked for: the others are still plainly archived.
    client = cold_site["s3"].client()
    asked = set()
    for item in client.list_objects_v2(Bucket=cold_site["bucket"], Prefix="site-a/data/")[
        "Contents"
    ]:
        if client.head_object(Bucket=cold_site["bucket"], Key=item["Key"]).get("Restore"):
            asked.add(item["Key"].rsplit("/", 1)[1])
    assert asked == {pack.hex() for pack in data}

    # The runner restarts; the thaw completes (2 s on the server); the job is woken and restores.
    time.sleep(2.5)
    runner = JobRunner(app, clock=lambda: START)
    runner.start()
    try:
        assert runner.wake(job.id) is not None
        done = runner.wait(job.id, 60)
        assert done.state == "succeeded", done.error
    finally:
        runner.shutdown()
    assert (target / "f03.bin").read_bytes() == (cold_site["tree"] / "f03.bin").read_bytes()
    log = [line.message for line in app.catalog.job_log(job.id)]
    assert f"recalled {len(data)} pack(s) from cold" in log, log
    copy = {c.location_id: c for c in app.catalog.copies_of(point)}[cold_site["location"].id]
    assert copy.state == "archived"


def test_a_fresh_appliance_rebuilds_its_catalog_from_the_bucket_alone(
    cold_site: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``appliance catalog rebuild --from s3://...`` on a fresh data directory, with the
    passphrase and the bucket's credentials in the environment: nothing else of the first
    appliance is used, and nothing cold is read."""
    app: Appliance = cold_site["app"]
    app.copy_point(cold_site["point"], "cold")
    s3 = cold_site["s3"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret_access_key"])
    fresh = tmp_path / "fresh"
    out = run_cli(
        "--json",
        "catalog",
        "rebuild",
        "--from",
        cold_site["location"].address,
        "--endpoint",
        s3.endpoint,
        "--region",
        "us-east-1",
        "--cold",
        "--lock-mode",
        "COMPLIANCE",
        data_dir=fresh,
    )
    result = json.loads(out.stdout)
    assert result["copies"] == 1 and result["points_added"] == 1, result
    rebuilt = Appliance.open(str(fresh), passphrase=PASSPHRASE)
    try:
        assert [p.id for p in rebuilt.catalog.list_points()] == [cold_site["point"]]
        states = {c.location_id: c.state for c in rebuilt.catalog.copies_of(cold_site["point"])}
        assert states[cold_site["location"].id] == "archived"
        assert states[home_location_id(rebuilt.repo.store_id)] == "deleted"
        location = rebuilt.catalog.get_location(cold_site["location"].id)
        assert location.access == "cold" and "secret_access_key" not in location.details["options"]
    finally:
        rebuilt.close()


def test_a_recall_job_makes_a_whole_image_point_readable_then_it_restores(
    cold_site: dict, tmp_path: Path
) -> None:
    app: Appliance = cold_site["app"]
    disk = tmp_path / "disk.raw"
    disk.write_bytes(os.urandom(1 << 20) + bytes(1 << 20) + os.urandom(300_000))
    point = app.backup_image([str(disk)], "vm").point.id
    app.copy_point(point, "cold")
    app.catalog.set_copy(point, home_location_id(app.repo.store_id), "deleted")
    runner = JobRunner(app, clock=lambda: START)
    runner.start()
    try:
        job = runner.submit("recall", {"point": point})
        _until(lambda: app.catalog.get_job(job.id).state == "waiting")
        reason = app.catalog.get_job(job.id).wait_reason or ""
        assert reason.startswith("recalling ") and "the point is readable when they are" in reason
        time.sleep(2.5)  # the server's thaw
        runner.wake(job.id)
        done = runner.wait(job.id, 30)
        assert done.state == "succeeded", done.error
        assert done.result["location"] == "cold" and done.result["pending"] == 0
    finally:
        runner.shutdown()
    out = tmp_path / "restored.raw"
    app.restore(point, str(out))
    assert out.read_bytes() == disk.read_bytes()


def test_verifying_a_cold_copy_checks_what_it_can_without_a_thaw(cold_site: dict) -> None:
    app: Appliance = cold_site["app"]
    s3 = cold_site["s3"]
    bucket = s3.bucket()
    app.add_location(
        f"s3://{bucket}/v", kind="s3_bucket", label="cold2", options=s3.options(cold=True)
    )
    point = cold_site["point"]
    app.copy_point(point, "cold2")
    result = app.verify_copy(point, "cold2")
    assert result["ok"] and result["mode"].startswith("cold:") and result["packs_checked"] > 0
    copy = {c.location_id: c for c in app.catalog.copies_of(point)}[app.find_location("cold2").id]
    assert copy.state == "archived"  # still archived: nothing was thawed
    # A data pack goes missing behind the appliance's back: the copy is lost, in words.
    client = s3.client()
    key = client.list_objects_v2(Bucket=bucket, Prefix="v/data/")["Contents"][0]["Key"]
    client.delete_object(Bucket=bucket, Key=key)
    result = app.verify_copy(point, "cold2")
    assert not result["ok"]
    assert any("is missing" in p for p in result["affected_points"][point])
    copy = {c.location_id: c for c in app.catalog.copies_of(point)}[app.find_location("cold2").id]
    assert copy.state == "lost"


def test_failing_over_a_cold_only_point_asks_for_its_recall_first(
    cold_site: dict, tmp_path: Path
) -> None:
    from image.failover import FailoverManager, PointNotLocal

    app: Appliance = cold_site["app"]
    disk = tmp_path / "vm.raw"
    disk.write_bytes(os.urandom(1 << 20))
    point = app.backup_image([str(disk)], "vm").point.id
    app.copy_point(point, "cold")
    app.catalog.set_copy(point, home_location_id(app.repo.store_id), "deleted")
    manager = FailoverManager(app, accel="tcg")
    try:
        with pytest.raises(PointNotLocal, match="a boot test does not recall it"):
            manager.start("vm", point, purpose="boot_test")
        states = {c.location_id: c.state for c in app.catalog.copies_of(point)}
        assert states[cold_site["location"].id] == "archived"  # nothing was asked
        with pytest.raises(PointNotLocal, match="its recall was asked") as info:
            manager.start("vm", point)
        assert info.value.details["recall"]["pending"] > 0
        assert app.catalog.list_failover_sessions("vm") == []  # nothing was started
        time.sleep(2.5)  # the thaw
        manager._check_recalled("vm", point, None, "failover")  # now it may boot
    finally:
        manager.shutdown()
