"""The S3 bucket backend against a real S3 server on 127.0.0.1 (moto's, over HTTP).

What the conformance suite cannot see: storage classes per object, cold objects that refuse reads
until a restore that takes time, Object Lock refusing an early delete (read back with
``head_object``, never trusting the server's own word), multipart uploads and the sweep of those
left behind, the bucket being unavailable, and lock settings changed behind the appliance's back.

moto's server dates every multipart upload 2010-11-10 (``Initiated``): the sweep's tests set its
clock relative to what the bucket says, never patching boto3.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from s3_support import free_port

import tiering.s3 as s3mod
import tiering.s3_checks as checks
from appliance.errors import (
    LocationUnavailable,
    ObjectArchived,
    ObjectLocked,
    ObjectMissing,
    TransientBackendError,
)
from appliance.store.backend import PutOptions
from appliance.store.registry import open_backend
from tiering.s3 import S3Backend

#: Retries at open kept short: an unreachable endpoint is retried before it is unavailable.
QUICK = {"attempts": 2, "base_delay": 0.01, "max_delay": 0.01}


def _bucket(s3: Any, *, lock: bool = False, **options: Any) -> S3Backend:
    return _open(s3, s3.bucket(lock=lock), **options)


def _open(s3: Any, bucket: str, **options: Any) -> S3Backend:
    address = f"s3://{bucket}/store"
    backend = open_backend("s3_bucket", address, **s3.options(poll_seconds=0.2, **options))
    assert isinstance(backend, S3Backend)
    return backend


def test_each_object_goes_to_the_class_it_is_given(s3: Any) -> None:
    backend = _bucket(s3, cold=True)
    backend.put("data/ab/pack", b"cold pack", PutOptions(storage_class="DEEP_ARCHIVE"))
    backend.put("index/ab", b"index")  # metadata: always the default class
    backend.put("meta/ab/pack", b"tree", PutOptions(storage_class="GLACIER_IR"))
    backend.put("keys/k", b"key", PutOptions(storage_class="archive"))  # not an S3 class
    assert backend.storage_class("data/ab/pack") == "DEEP_ARCHIVE"
    assert backend.storage_class("index/ab") == "STANDARD"
    assert backend.storage_class("meta/ab/pack") == "GLACIER_IR"
    assert backend.storage_class("keys/k") == "STANDARD"
    assert backend.capabilities.cold_objects and backend.capabilities.listing_cost == "expensive"
    # Everything is listed and sized without a thaw.
    assert {i.name: i.size for i in backend.list()} == {
        "data/ab/pack": 9,
        "index/ab": 5,
        "meta/ab/pack": 4,
        "keys/k": 3,
    }
    assert backend.get("meta/ab/pack") == b"tree"  # GLACIER_IR reads at once


def test_a_cold_object_is_read_only_after_a_restore_that_takes_time(s3: Any) -> None:
    backend = _bucket(s3, cold=True, restore_tier="Bulk")
    backend.put("data/cd/pack", b"x" * 1000, PutOptions(storage_class="GLACIER"))
    with pytest.raises(ObjectArchived, match="recall it"):
        backend.get("data/cd/pack")
    assert backend.thaw_state("data/cd/pack") == "archived"
    started = time.monotonic()
    status = backend.warm_up(["data/cd/pack"])
    assert status.pending == {"data/cd/pack"} and not status.done
    assert backend.thaw_state("data/cd/pack") == "thawing"  # the server's restore takes 2 s
    with pytest.raises(ObjectArchived):
        backend.get("data/cd/pack", 0, 10)
    with pytest.raises(ObjectArchived, match="still being restored"):
        backend.wait_warm(["data/cd/pack"], timeout=0)
    backend.wait_warm(["data/cd/pack"], timeout=30)
    assert time.monotonic() - started >= 1.5  # polled, not answered at once
    assert backend.get("data/cd/pack", 10, 5) == b"x" * 5
    assert backend.warm_up(["data/cd/pack"]).done


def test_object_lock_refuses_an_early_delete(s3: Any) -> None:
    backend = _bucket(s3, lock=True, lock_mode="COMPLIANCE")
    until = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    backend.put("data/ef/pack", b"locked", PutOptions(retain_until=until))
    mode, retain = backend.retention("data/ef/pack")  # read back from the bucket itself
    assert (
        mode == "COMPLIANCE" and retain is not None and abs(retain - until) < timedelta(seconds=1)
    )
    assert backend.capabilities.immutable_objects
    with pytest.raises(ObjectLocked, match="locked"):
        backend.delete("data/ef/pack")
    assert backend.get("data/ef/pack") == b"locked"
    # An unlocked object in the same bucket is deleted with every version.
    backend.put("index/ef", b"one")
    backend.put("index/ef", b"two")
    backend.delete("index/ef")
    versions = backend.client.list_object_versions(Bucket=backend.bucket, Prefix="store/index/")
    assert not versions.get("Versions") and not versions.get("DeleteMarkers")


def test_large_objects_go_up_in_parts(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 6 << 20)
    monkeypatch.setattr(s3mod, "PART_SIZE", 5 << 20)
    backend = _bucket(s3)
    data = os.urandom(12 << 20)
    backend.put("data/aa/big", data)
    assert backend.stat("data/aa/big").size == len(data)
    assert backend.get("data/aa/big") == data
    assert backend.get("data/aa/big", (5 << 20) - 3, 10) == data[(5 << 20) - 3 : (5 << 20) + 7]
    uploads = backend.client.list_multipart_uploads(Bucket=backend.bucket)
    assert not uploads.get("Uploads")  # none left open


def test_a_missing_bucket_or_unreachable_endpoint_is_unavailable(s3: Any) -> None:
    with pytest.raises(LocationUnavailable, match="does not exist"):
        open_backend("s3_bucket", "s3://no-such-bucket-here", **s3.options())
    closed = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(LocationUnavailable, match="cannot be reached") as caught:
        open_backend(
            "s3_bucket",
            f"s3://{s3.bucket()}",
            **s3.options(endpoint_url=closed, open_retries=QUICK),
        )
    assert "HeadBucket was tried 2 time(s)" in caught.value.message
    backend = _bucket(s3)
    backend.client.close()
    backend.client = s3mod.make_client(endpoint_url=closed, region="us-east-1")
    with pytest.raises(TransientBackendError, match="could not be reached"):
        backend.get("config")


@pytest.mark.parametrize(
    "address", ["bucket", "s3://", "s3://ab", "s3://Bad_Name", "s3://good-bucket/../up"]
)
def test_bad_addresses_are_refused(address: str) -> None:
    from appliance.errors import InvalidInput, InvalidName

    with pytest.raises((InvalidInput, InvalidName)):
        s3mod.BucketAddress.parse(address)


def test_retain_extends_a_lock_and_never_shortens_it(s3: Any) -> None:
    backend = _bucket(s3, lock=True, lock_mode="COMPLIANCE")
    first = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0)
    backend.put("data/ab/shared", b"shared pack", PutOptions(retain_until=first))
    later = first + timedelta(days=30)
    backend.retain("data/ab/shared", later)
    assert backend.retention("data/ab/shared") == ("COMPLIANCE", later)  # read back
    backend.retain("data/ab/shared", first)  # shorter: left alone
    assert backend.retention("data/ab/shared")[1] == later
    backend.put("index/ab", b"unlocked")
    backend.retain("index/ab", first)  # an object without a lock gets one
    assert backend.retention("index/ab") == ("COMPLIANCE", first)
    with pytest.raises(ObjectMissing):
        backend.retain("data/ab/missing", later)


def test_a_locking_location_needs_a_bucket_with_object_lock(s3: Any) -> None:
    plain = s3.bucket()  # no Object Lock (and no versioning)
    with pytest.raises(LocationUnavailable, match="does not have Object Lock enabled"):
        open_backend("s3_bucket", f"s3://{plain}", **s3.options(lock_mode="COMPLIANCE"))
    # Versioning alone is not enough.
    client = s3.client()
    client.put_bucket_versioning(Bucket=plain, VersioningConfiguration={"Status": "Enabled"})
    with pytest.raises(LocationUnavailable, match="does not have Object Lock enabled"):
        open_backend("s3_bucket", f"s3://{plain}", **s3.options(lock_mode="COMPLIANCE"))
    locked = s3.bucket(lock=True)
    assert open_backend("s3_bucket", f"s3://{locked}", **s3.options(lock_mode="COMPLIANCE"))
    assert open_backend("s3_bucket", f"s3://{plain}", **s3.options())  # no lock asked


def test_clock_skew_is_read_from_the_bucket_answer() -> None:
    from email.utils import format_datetime

    ahead = datetime.now(UTC) + timedelta(minutes=20)
    answer = {"ResponseMetadata": {"HTTPHeaders": {"date": format_datetime(ahead, usegmt=True)}}}
    skew = checks.clock_skew(answer)
    assert skew is not None and 1190 < skew < 1210 and skew > checks.MAX_CLOCK_SKEW
    assert checks.clock_skew({}) is None
    assert checks.clock_skew({"ResponseMetadata": {"HTTPHeaders": {"date": "nonsense"}}}) is None


def test_lock_settings_changed_behind_the_appliances_back(s3: Any) -> None:
    bucket = s3.bucket(lock=True)
    locking = {"lock_mode": "COMPLIANCE"}
    assert _open(s3, bucket, **locking)  # the location is added, the bucket still empty
    client = s3.client()
    try:
        # A default retention set on the bucket (moto: only while it is empty) changes nothing
        # the appliance relies on: each object carries its own lock, read back from the bucket.
        client.put_object_lock_configuration(
            Bucket=bucket,
            ObjectLockConfiguration={
                "ObjectLockEnabled": "Enabled",
                "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}},
            },
        )
        reopened = _open(s3, bucket, **locking)
        until = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
        reopened.put("data/ab/pack", b"locked", PutOptions(retain_until=until))
        assert reopened.retention("data/ab/pack") == ("COMPLIANCE", until)

        # Versioning suspended (S3 refuses it on an Object Lock bucket; other stores may not):
        # the open says what changed.
        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
        with pytest.raises(LocationUnavailable) as caught:
            _open(s3, bucket, **locking)
        message = caught.value.message
        assert f"bucket {bucket} has Object Lock but its versioning is Suspended" in message
        assert "Enable versioning" in message
        assert _open(s3, bucket)  # a location that does not lock does not care

        client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        assert _open(s3, bucket, **locking).get("data/ab/pack") == b"locked"
    finally:
        client.close()


def test_lock_problems_in_words() -> None:
    assert checks.lock_problem("b", checks.LockSettings("Enabled", True)) is None
    never = checks.lock_problem("b", checks.LockSettings(None, False))
    assert never is not None and "does not have Object Lock enabled (versioning: off)" in never
    off = checks.lock_problem("b", checks.LockSettings(None, True))
    assert off is not None and "its versioning is off, not Enabled" in off


def _uploads(client: Any, bucket: str) -> dict[str, str]:
    """The bucket's incomplete multipart uploads, asked of the server itself: id -> key."""
    listed = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return {u["UploadId"]: u["Key"] for u in listed}


def _left_behind(client: Any, bucket: str, key: str) -> tuple[str, datetime]:
    """An upload begun and never finished nor aborted (a lost reply, a writer killed mid-way),
    and when the bucket says it began."""
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    client.upload_part(
        Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=os.urandom(1000)
    )
    listed = client.list_multipart_uploads(Bucket=bucket, Prefix=key)["Uploads"]
    return upload_id, next(u["Initiated"] for u in listed if u["UploadId"] == upload_id)


def test_the_sweep_aborts_uploads_older_than_a_day_and_spares_fresh_ones(s3: Any) -> None:
    backend = _bucket(s3)
    client = s3.client()
    try:
        left, began = _left_behind(client, backend.bucket, "store/data/aa/left")
        elsewhere, _ = _left_behind(client, backend.bucket, "other/data/aa/left")  # not ours
        # An hour after it began: fresh, and left alone.
        assert backend.abort_abandoned_uploads(now=began + timedelta(hours=1)) == ()
        # A threshold longer than its age (injectable, like the clock): left alone too.
        age = datetime.now(UTC) - began
        assert backend.abort_abandoned_uploads(older_than=age + timedelta(hours=1)) == ()
        assert left in _uploads(client, backend.bucket)
        # A day and a minute after: abandoned, aborted, and said.
        aborted = backend.abort_abandoned_uploads(now=began + timedelta(hours=24, minutes=1))
        assert [(u.name, u.upload_id) for u in aborted] == [("data/aa/left", left)]
        assert _uploads(client, backend.bucket) == {elsewhere: "other/data/aa/left"}
        assert backend.abort_abandoned_uploads(now=began + timedelta(days=2)) == ()
    finally:
        client.close()


def test_the_first_write_sweeps_once_per_interval(
    s3: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = s3.bucket()
    client = s3.client()
    try:
        first, _ = _left_behind(client, bucket, "store/data/aa/first")
        backend = _open(s3, bucket)
        assert first in _uploads(client, bucket)  # opening, or reading, sweeps nothing
        with caplog.at_level(logging.WARNING, logger="tiering.s3_checks"):
            backend.put("index/aa", b"index")  # moto's 2010 date: older than a day
        assert _uploads(client, bucket) == {}
        assert "aborted a multipart upload of data/aa/first" in caplog.text

        second, _ = _left_behind(client, bucket, "store/data/aa/second")
        backend.put("index/bb", b"index")
        _open(s3, bucket).put("index/cc", b"index")  # a new backend: swept less than 1 h ago
        assert second in _uploads(client, bucket)
        monkeypatch.setattr(checks, "SWEEP_INTERVAL", 0.0)
        _open(s3, bucket).put("index/dd", b"index")
        assert _uploads(client, bucket) == {}
    finally:
        client.close()
