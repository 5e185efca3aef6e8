"""Small packs bundled before they go cold, against a real S3 server (moto's, on 127.0.0.1).

A store of 1 MiB packs (small packs: under 256 KiB) backs up fourteen times, each backup adding
one file of ~120 KB, so the newest point needs fourteen small data packs. Its cold copy makes two
bundles (and their two directories) instead of fourteen objects; a rerun sends nothing; a
one-file restore from the cold copy alone thaws only the bundle holding that file; verify finds
a truncated or deleted bundle; the location's GC keeps a bundle while one pack in it is needed
and reports one still locked; a fresh appliance rebuilt from the bucket alone restores a file. A
hot bucket, a disk, and a cold copy with a single small pack get plain pack objects.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_support import PASSPHRASE, new_appliance, run_cli, set_engine_env
from s3_support import CREDENTIALS

from appliance.catalog.records import home_location_id
from appliance.engine import Appliance
from appliance.errors import IntegrityError, ObjectMissing, StoreError
from appliance.locations.bundles import (
    BundledBackend,
    BundleMap,
    bundled,
    parse_directory,
    plan_bundles,
    small_pack_limit,
)
from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.backend import MemoryBackend

PACK_SIZE = 1 << 20
FILES = 14


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture
def small_packs(tmp_path: Path) -> dict[str, Any]:
    """An appliance whose newest point needs FILES small data packs (one per backup)."""
    app, _ = new_appliance(tmp_path / "app", pack_size=PACK_SIZE)
    app.clock = lambda: datetime.now(UTC)  # object locks are real dates on the server
    tree = tmp_path / "tree"
    tree.mkdir()
    points = []
    for i in range(FILES):
        (tree / f"f{i:02d}.bin").write_bytes(os.urandom(120_000 + 1000 * i))
        points.append(app.backup_files(str(tree), "docs").point.id)
    return {"app": app, "tree": tree, "points": points, "newest": points[-1]}


def _keys(client: Any, bucket: str, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}


def _data_packs(app: Appliance, point: str, subpath: str | None = None) -> set[str]:
    needs = point_packs(app.repo, app.manifest(point), subpath)
    return {p.hex() for p, kind in needs.packs.items() if kind == fmt.PACK_KIND_DATA}


def _cold_location(app: Appliance, s3: Any, label: str, *, lock: bool = False) -> str:
    bucket = s3.bucket(lock=lock)
    extra = {"lock_mode": "GOVERNANCE", "lock_days": 1} if lock else {}
    app.add_location(
        f"s3://{bucket}/{label}",
        kind="s3_bucket",
        label=label,
        options=s3.options(
            cold=True,
            restore_tier="Expedited",
            recall_poll_seconds=1,
            poll_seconds=0.2,
            **extra,
        ),
    )
    return bucket


def _wait_recall(app: Appliance, point: str, subpath: str) -> Any:
    deadline = time.monotonic() + 30
    status = app.prepare_read(point, subpath=subpath)
    while not status.done:
        assert time.monotonic() < deadline, "the recall did not complete"
        time.sleep(0.3)
        status = app.prepare_read(point, subpath=subpath)
    return status


# --- the pure parts --------------------------------------------------------------------------------


def test_packs_are_grouped_into_bundles_of_about_one_pack() -> None:
    assert small_pack_limit(16 << 20) == 4 << 20
    assert small_pack_limit(256 << 10) == 128 << 10  # never under the 128 KiB minimum
    sizes = [("a", 400), ("b", 400), ("c", 400), ("d", 100)]
    assert plan_bundles(sizes, 1000) == [["a", "b", "c", "d"]]  # a lone last pack joins
    assert plan_bundles(sizes, 800) == [["a", "b"], ["c", "d"]]
    assert plan_bundles([("a", 10)], 1000) == []  # one small pack: put on its own


def test_a_bundled_pack_reads_as_the_pack_object_it_is() -> None:
    inner = MemoryBackend()
    packs = [(f"data/{h[:2]}/{h}", os.urandom(n)) for h, n in (("aa" * 32, 300), ("bb" * 32, 50))]
    body, directory = bundled(packs)
    inner.put(directory.bundle, body)
    inner.put(directory.name, directory.encode())
    assert parse_directory(directory.name, directory.encode()) == directory
    backend = BundledBackend(inner)
    (a, a_bytes), (b, b_bytes) = packs
    assert backend.get(b) == b_bytes and backend.get(a, 10, 20) == a_bytes[10:30]
    assert backend.get(b, 50) == b"" and backend.stat(a).size == 300
    with pytest.raises(IntegrityError):
        backend.get(b, 40, 20)  # past the pack's end, though not past the bundle's
    assert {i.name for i in backend.list("data/")} == {a, b}
    assert {i.name for i in backend.list("data/aa/")} == {a}
    with pytest.raises(StoreError, match="deleted whole"):
        backend.delete(a)
    with pytest.raises(IntegrityError, match="damaged"):
        parse_directory(directory.name, directory.encode().replace(b'"size":350', b'"size":9'))
    # A truncated bundle: its packs are not there (and the error says why).
    inner.put(directory.bundle, body[:100])
    truncated = BundledBackend(inner)
    with pytest.raises(ObjectMissing, match="truncated"):
        truncated.stat(a)
    assert isinstance(truncated.bundles(), BundleMap) and not truncated.bundles().present(
        directory.bundle
    )


# --- against the S3 server ------------------------------------------------------------------------


def test_a_cold_copy_of_many_small_packs_makes_few_bundles_and_a_rerun_sends_nothing(
    s3: Any, small_packs: dict[str, Any]
) -> None:
    app: Appliance = small_packs["app"]
    point = small_packs["newest"]
    data = _data_packs(app, point)
    assert len(data) == FILES
    bucket = _cold_location(app, s3, "cold", lock=True)
    result = app.copy_point(point, "cold")
    assert result["state"] == "archived"
    assert (result["bundles"], result["packs_bundled"]) == (2, FILES), result
    client = s3.client()
    assert _keys(client, bucket, "cold/data/") == {}  # no small pack on its own
    objects = _keys(client, bucket, "cold/bundles/")
    bundles = sorted(k for k in objects if not k.endswith(".json"))
    assert len(bundles) == 2 and len(objects) == 4
    assert sum(objects[k] for k in bundles) == sum(
        app.repo.backend.stat(f"data/{h[:2]}/{h}").size for h in data
    )
    listed: set[str] = set()
    for key in bundles:
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["StorageClass"] == "GLACIER" and head["ObjectLockMode"] == "GOVERNANCE"
        directory = client.head_object(Bucket=bucket, Key=key + ".json")
        assert directory.get("StorageClass", "STANDARD") == "STANDARD"
        assert directory["ObjectLockRetainUntilDate"] == head["ObjectLockRetainUntilDate"]
        document = json.loads(client.get_object(Bucket=bucket, Key=key + ".json")["Body"].read())
        assert document["bundle"] == key.split("/", 1)[1] and document["size"] == objects[key]
        listed.update(pack.rsplit("/", 1)[1] for pack, _offset, _length in document["packs"])
    assert listed == data
    # Metadata packs stay hot and on their own.
    assert _keys(client, bucket, "cold/meta/")

    versions = len(client.list_object_versions(Bucket=bucket, Prefix="cold/")["Versions"])
    again = app.copy_point(point, "cold")
    assert again["packs_copied"] == 0 and again["bundles"] == 0, again
    assert again["packs_present"] == again["packs_needed"]
    assert len(client.list_object_versions(Bucket=bucket, Prefix="cold/")["Versions"]) == versions
    app.close()


def test_a_file_restore_from_the_cold_copy_alone_thaws_only_its_bundle(
    s3: Any, small_packs: dict[str, Any], tmp_path: Path
) -> None:
    app: Appliance = small_packs["app"]
    point = small_packs["newest"]
    bucket = _cold_location(app, s3, "cold")
    app.copy_point(point, "cold")
    app.catalog.set_copy(point, home_location_id(app.repo.store_id), "deleted")

    estimate = app.recall_estimate(point, subpath="f00.bin")
    assert (estimate["packs"], estimate["objects"], estimate["bundles"]) == (1, 1, 1), estimate
    assert "bundles of small packs" in estimate["message"]
    status = app.prepare_read(point, subpath="f00.bin")
    assert (status.packs, status.objects, status.bundles, status.pending) == (1, 1, 1, 1)
    assert "1 bundle(s) of small packs" in status.describe()
    client = s3.client()
    bundles = sorted(k for k in _keys(client, bucket, "cold/bundles/") if not k.endswith(".json"))
    asked = [k for k in bundles if client.head_object(Bucket=bucket, Key=k).get("Restore")]
    assert len(asked) == 1 and status.bytes == _keys(client, bucket, asked[0])[asked[0]]

    time.sleep(2.5)  # the server's thaw
    assert _wait_recall(app, point, "f00.bin").pending == 0
    out = tmp_path / "restored"
    app.restore(point, str(out), subpath="f00.bin")
    assert (out / "f00.bin").read_bytes() == (small_packs["tree"] / "f00.bin").read_bytes()
    # The other bundle was never asked for.
    assert [k for k in bundles if client.head_object(Bucket=bucket, Key=k).get("Restore")] == asked
    app.close()


def test_verifying_a_cold_copy_finds_a_bundle_truncated_or_gone(
    s3: Any, small_packs: dict[str, Any]
) -> None:
    app: Appliance = small_packs["app"]
    point = small_packs["newest"]
    bucket = _cold_location(app, s3, "cold")
    app.copy_point(point, "cold")
    result = app.verify_copy(point, "cold")
    assert result["ok"] and result["packs_checked"] >= FILES, result

    client = s3.client()
    bundles = sorted(k for k in _keys(client, bucket, "cold/bundles/") if not k.endswith(".json"))
    # Cut short behind the appliance's back: every pack in it is reported, with the sizes.
    client.put_object(Bucket=bucket, Key=bundles[0], Body=b"short", StorageClass="GLACIER")
    result = app.verify_copy(point, "cold")
    assert not result["ok"]
    reasons = result["affected_points"][point]
    assert reasons and all("truncated" in r for r in reasons), reasons
    assert "has 5 bytes, not the" in reasons[0]
    state = {c.location_id: c.state for c in app.catalog.copies_of(point)}
    assert state[app.find_location("cold").id] == "lost"

    client.delete_object(Bucket=bucket, Key=bundles[0])
    result = app.verify_copy(point, "cold")
    reasons = result["affected_points"][point]
    assert not result["ok"] and all(f"its bundle {bundles[0][5:]} is gone" in r for r in reasons)
    assert all(" is missing" in r for r in reasons)
    app.close()


def test_gc_keeps_a_bundle_while_one_of_its_packs_is_needed_then_reports_its_lock(
    s3: Any, small_packs: dict[str, Any]
) -> None:
    app: Appliance = small_packs["app"]
    tree: Path = small_packs["tree"]
    newest = small_packs["newest"]
    bucket = _cold_location(app, s3, "cold", lock=True)
    app.copy_point(newest, "cold", retain_until=datetime.now(UTC) + timedelta(seconds=3))
    # A later point needs one pack of the first bundle only (f00.bin).
    for path in tree.iterdir():
        if path.name != "f00.bin":
            path.unlink()
    later = app.backup_files(str(tree), "docs").point.id
    assert len(_data_packs(app, later)) == 1
    kept = app.copy_point(later, "cold", retain_until=datetime.now(UTC) + timedelta(days=1))
    # f00's pack is there, in a bundle: nothing is bundled again, its bundle is locked longer.
    assert kept["bundles"] == 0 and kept["packs_present"] >= 1, kept
    client = s3.client()
    bundles = {
        k.rsplit("/", 1)[1]: v
        for k, v in _keys(client, bucket, "cold/bundles/").items()
        if not k.endswith(".json")
    }
    assert len(bundles) == 2
    f00 = _data_packs(app, later).pop()
    for name in bundles:  # the bundle holding f00's pack, and its directory, are locked longer
        key = f"cold/bundles/{name}"
        document = json.loads(client.get_object(Bucket=bucket, Key=key + ".json")["Body"].read())
        holds = any(pack.endswith(f00) for pack, _offset, _length in document["packs"])
        for locked in (key, key + ".json"):
            until = client.head_object(Bucket=bucket, Key=locked)["ObjectLockRetainUntilDate"]
            assert (until > datetime.now(UTC) + timedelta(hours=12)) == holds, (locked, until)

    report = app.collect_location_garbage("cold", grace_seconds=0)
    assert report.bundles_deleted == [] and report.bundles_kept == 2  # both points need them

    time.sleep(3.5)  # the newest point's copy may now go
    app.expire_copy(newest, "cold")
    preview = app.collect_location_garbage("cold", dry_run=True, grace_seconds=0)
    assert len(preview.bundles_deleted) == 1 and preview.bundles_kept == 1
    assert len(_keys(client, bucket, "cold/bundles/")) == 4  # a dry run deletes nothing
    report = app.collect_location_garbage("cold", grace_seconds=0)
    assert report.bundles_deleted == preview.bundles_deleted and report.bundles_kept == 1
    assert report.bytes_freed >= bundles[report.bundles_deleted[0].rsplit("/", 1)[1]]
    left = _keys(client, bucket, "cold/bundles/")
    assert len(left) == 2 and f"cold/{report.bundles_deleted[0]}" not in left
    # What is left still verifies: the later point's pack is in the bundle kept.
    assert app.verify_copy(later, "cold")["ok"]

    # The later point's manifest goes behind the appliance's back (an admin bypassing
    # governance): its bundle is unneeded now, but locked for a day, and said so.
    versions = client.list_object_versions(Bucket=bucket, Prefix=f"cold/manifests/{later}")
    for version in versions["Versions"]:
        client.delete_object(
            Bucket=bucket,
            Key=version["Key"],
            VersionId=version["VersionId"],
            BypassGovernanceRetention=True,
        )
    report = app.collect_location_garbage("cold", grace_seconds=0)
    assert report.bundles_deleted == [] and len(report.bundles_locked) == 1, report
    assert report.bundles_locked[0]["until"]
    assert len(_keys(client, bucket, "cold/bundles/")) == 2
    app.close()


def test_a_fresh_appliance_rebuilt_from_the_bucket_restores_a_bundled_file(
    s3: Any, small_packs: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app: Appliance = small_packs["app"]
    point = small_packs["newest"]
    _cold_location(app, s3, "cold")
    app.copy_point(point, "cold")
    address = app.find_location("cold").address
    app.close()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["secret_access_key"])
    fresh = tmp_path / "fresh"
    out = run_cli(
        "--json",
        "catalog",
        "rebuild",
        "--from",
        address,
        "--endpoint",
        s3.endpoint,
        "--region",
        "us-east-1",
        "--cold",
        "--restore-tier",
        "Expedited",
        data_dir=fresh,
    )
    result = json.loads(out.stdout)
    assert result["copies"] == 1 and result["points_added"] == 1, result
    assert result["bundles"] == 2 and result["bundled_packs"] == FILES, result
    rebuilt = Appliance.open(str(fresh), passphrase=PASSPHRASE)
    try:
        rebuilt.prepare_read(point, subpath="f05.bin")
        time.sleep(2.5)
        _wait_recall(rebuilt, point, "f05.bin")
        target = tmp_path / "restored"
        rebuilt.restore(point, str(target), subpath="f05.bin")
        expected = (small_packs["tree"] / "f05.bin").read_bytes()
        assert (target / "f05.bin").read_bytes() == expected
    finally:
        rebuilt.close()


def test_hot_locations_and_a_lone_small_pack_get_pack_objects(
    s3: Any, small_packs: dict[str, Any], tmp_path: Path
) -> None:
    app: Appliance = small_packs["app"]
    point = small_packs["newest"]
    client = s3.client()
    hot = s3.bucket()
    app.add_location(f"s3://{hot}/h", kind="s3_bucket", label="hot", options=s3.options())
    result = app.copy_point(point, "hot")
    assert result["bundles"] == 0 and result["state"] == "present"
    assert len(_keys(client, hot, "h/data/")) == FILES and not _keys(client, hot, "h/bundles/")

    disk = tmp_path / "disk"
    disk.mkdir()
    app.add_location(str(disk), label="disk")
    assert app.copy_point(point, "disk")["bundles"] == 0
    assert len(list((disk / "data").rglob("*"))) >= FILES and not (disk / "bundles").exists()

    # A cold copy of the first point has one small pack: on its own, a bundle would save nothing.
    cold = _cold_location(app, s3, "cold")
    first = small_packs["points"][0]
    assert app.copy_point(first, "cold")["bundles"] == 0
    assert len(_keys(client, cold, "cold/data/")) == 1 and not _keys(client, cold, "cold/bundles/")
    # The newest point then bundles the thirteen others; the first stays where it is.
    result = app.copy_point(point, "cold")
    assert result["packs_bundled"] == FILES - 1 and result["packs_present"] >= 1
    app.close()
