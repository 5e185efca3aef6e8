"""Bucket locations through the HTTP API, against a live uvicorn on 127.0.0.1 and a real S3
server (moto's, on 127.0.0.1; the session fixture ``s3``).

An administrator adds a cold bucket with Object Lock: 201, and its secret is in no answer, no
audit entry and not in the catalog (a 0600 file holds it). A missing bucket, refused
credentials (a second S3 server that authenticates every request) and an unreachable endpoint
answer 400 ``location_refused`` in words, and nothing is added; inconsistent options are 422.
A point copied there by the API is ``archived`` (GLACIER, locked until its retain-until); with
the local copy gone, the recall estimate says what a restore would recall without asking for
anything, and the restore then waits, saying why, until the packs are thawed. The check route
marks a location available or unavailable with the reason in words.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server, wait_job
from s3_support import CREDENTIALS, S3Server, free_port, s3_server

from appliance.catalog.records import home_location_id

SECRET = CREDENTIALS["secret_access_key"]
KEY_ID = CREDENTIALS["access_key_id"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("s3-api")) as live:
        yield live


@pytest.fixture(scope="module")
def refusing_s3() -> Iterator[S3Server]:
    """An S3 server that authenticates every request and knows no key: it refuses any
    credentials."""
    with s3_server(authenticate=True) as server:
        yield server


def _bucket_body(s3: S3Server, bucket: str, label: str, **extra: Any) -> dict[str, Any]:
    options = {"endpoint_url": s3.endpoint, "region": "us-east-1", **CREDENTIALS, **extra}
    return {
        "kind": "s3_bucket",
        "address": f"s3://{bucket}/site",
        "label": label,
        "bucket": options,
    }


@pytest.fixture(scope="module")
def files_point(
    admin: httpx.Client, operator: httpx.Client, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    source = tmp_path_factory.mktemp("tree") / "src"
    source.mkdir()
    for i in range(8):
        (source / f"f{i}.bin").write_bytes(os.urandom(200_000))
    r = admin.post("/api/assets", json={"name": "docs", "kind": "files", "path": str(source)})
    assert r.status_code == 201, r.text
    job = wait_job(
        operator, operator.post("/api/assets/docs/backup", json={"mode": "full"}).json()["id"]
    )
    assert job["state"] == "succeeded", job
    return {"source": source, "point": job["result"]["point"]}


@pytest.fixture(scope="module")
def cold_location(admin: httpx.Client, s3: S3Server) -> dict[str, Any]:
    """A cold bucket with Object Lock (COMPLIANCE, 2 days), recalled with the Expedited tier."""
    bucket = s3.bucket(lock=True)
    body = _bucket_body(
        s3,
        bucket,
        "cold-site",
        cold=True,
        lock_mode="COMPLIANCE",
        lock_days=2,
        restore_tier="Expedited",
    )
    r = admin.post("/api/locations", json=body)
    assert r.status_code == 201, r.text
    assert SECRET not in r.text and KEY_ID not in r.text
    return {"bucket": bucket, "location": r.json()}


def test_a_cold_locked_bucket_is_added_and_its_secret_is_never_shown(
    server: LiveServer,
    admin: httpx.Client,
    viewer: httpx.Client,
    cold_location: dict[str, Any],
) -> None:
    location = cold_location["location"]
    assert location["kind"] == "s3_bucket"
    assert location["address"] == f"s3://{cold_location['bucket']}/site"
    assert (location["access"], location["immutable"], location["offsite"]) == ("cold", True, True)
    assert (location["lock_mode"], location["lock_days"]) == ("COMPLIANCE", 2)
    assert (location["data_class"], location["restore_tier"]) == ("GLACIER", "Expedited")
    assert location["region"] == "us-east-1" and location["endpoint_url"].startswith("http://127.")
    assert location["online"] and location["copies"] == 0 and not location["home"]
    assert "secret_access_key" not in location and "access_key_id" not in location

    listed = viewer.get("/api/locations")
    assert listed.status_code == 200
    assert SECRET not in listed.text and KEY_ID not in listed.text
    assert "cold-site" in {loc["label"] for loc in listed.json()}
    audit = admin.get("/api/audit", params={"limit": 50})
    assert SECRET not in audit.text and KEY_ID not in audit.text
    added = next(e for e in audit.json() if e["action"] == "location.add")
    assert added["target"] == location["id"] and added["details"]["kind"] == "s3_bucket"
    assert added["details"]["lock_mode"] == "COMPLIANCE" and added["details"]["cold"] is True

    # The credentials live in a 0600 file of the data directory, not in the catalog.
    record = server.service.app.catalog.get_location(location["id"])
    assert SECRET not in repr(record) and KEY_ID not in repr(record)
    secrets = Path(server.settings.data_dir) / "secrets" / f"{location['id']}.json"
    assert secrets.stat().st_mode & 0o777 == 0o600 and SECRET in secrets.read_text()


def test_only_an_admin_adds_a_bucket(
    operator: httpx.Client, viewer: httpx.Client, s3: S3Server
) -> None:
    body = _bucket_body(s3, s3.bucket(), "not-mine")
    for client in (viewer, operator):
        r = client.post("/api/locations", json=body)
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
    assert "not-mine" not in {loc["label"] for loc in viewer.get("/api/locations").json()}


def test_a_bucket_that_cannot_be_used_is_refused_in_words(
    admin: httpx.Client, s3: S3Server, refusing_s3: S3Server
) -> None:
    before = {loc["id"] for loc in admin.get("/api/locations").json()}
    missing = admin.post("/api/locations", json=_bucket_body(s3, "no-such-bucket-here", "x1"))
    assert missing.status_code == 400, missing.text
    assert missing.json()["code"] == "location_refused"
    assert "bucket no-such-bucket-here does not exist" in missing.json()["message"]

    refused = admin.post("/api/locations", json=_bucket_body(refusing_s3, "some-bucket", "x2"))
    assert refused.status_code == 400, refused.text
    assert "refuses these credentials" in refused.json()["message"]
    assert SECRET not in refused.text and KEY_ID not in refused.text

    closed = f"http://127.0.0.1:{free_port()}"
    unreachable = _bucket_body(s3, s3.bucket(), "x3", endpoint_url=closed)
    r = admin.post("/api/locations", json=unreachable)
    assert r.status_code == 400, r.text
    assert "cannot be reached" in r.json()["message"]
    assert r.json()["message"].endswith("the location was not added")

    # Options that do not fit together, or that are not options at all: 422 in words.
    wrong: list[tuple[dict[str, Any], str]] = [
        ({"cold": True, "lock_mode": "COMPLIANCE"}, "number of days"),
        ({"lock_days": 3}, "needs an Object Lock mode"),
        ({"data_class": "GLACIER"}, "cold storage"),
        ({"cold": True, "data_class": "STANDARD_IA"}, "GLACIER or DEEP_ARCHIVE"),
        ({"restore_tier": "Bulk"}, "cold bucket only"),
        ({"lock_mode": "FOREVER", "lock_days": 1}, "lock_mode"),
        ({"data_class": "COLD_AS_ICE", "cold": True}, "data_class"),
        ({"endpoint_url": "http://user:pw@127.0.0.1:9"}, "endpoint_url"),
        ({"secret_access_key": None}, "both the access key and its secret"),
        ({"no_such_option": 1}, "no_such_option"),
    ]
    for extra, words in wrong:
        r = admin.post("/api/locations", json=_bucket_body(s3, s3.bucket(), "x4", **extra))
        assert r.status_code == 422, (extra, r.text)
        assert r.json()["code"] == "validation_error"
        assert words in r.text, (extra, r.text)
        assert SECRET not in r.text
    for body in (
        {"kind": "s3_bucket", "path": "/srv"},
        {"kind": "s3_bucket", "address": "http://bucket"},
        {"address": "s3://bucket-name"},
    ):
        assert admin.post("/api/locations", json=body).status_code == 422, body
    after = {loc["id"] for loc in admin.get("/api/locations").json()}
    assert after == before  # nothing was added


def test_a_copy_to_the_cold_bucket_is_archived_locked_and_a_restore_waits_for_its_recall(
    server: LiveServer,
    operator: httpx.Client,
    viewer: httpx.Client,
    files_point: dict[str, Any],
    cold_location: dict[str, Any],
    s3: S3Server,
) -> None:
    pid = files_point["point"]
    app = server.service.app
    location = cold_location["location"]
    r = operator.post(f"/api/points/{pid}/copy", json={"location": "cold-site"})
    assert r.status_code == 202, r.text
    job = wait_job(operator, r.json()["id"])
    assert job["state"] == "succeeded", job
    assert (job["result"]["state"], job["result"]["storage_class"]) == ("archived", "GLACIER")

    copies = {c["location"]: c for c in viewer.get(f"/api/points/{pid}").json()["copies"]}
    cold = copies["cold-site"]
    assert (cold["state"], cold["storage_class"], cold["location_kind"]) == (
        "archived",
        "GLACIER",
        "s3_bucket",
    )
    assert cold["verified_at"] is not None
    until = datetime.fromisoformat(cold["retain_until"])
    assert timedelta(days=1) < until - datetime.now(UTC) <= timedelta(days=2, minutes=5)
    listed = {loc["label"]: loc for loc in viewer.get("/api/locations").json()}
    assert listed["cold-site"]["copies"] == 1

    # With the local copy there, nothing needs a recall.
    estimate = viewer.get(f"/api/points/{pid}/recall").json()
    assert estimate["needed"] is False and estimate["packs"] == 0, estimate

    # The local copy is gone: a restore reads from the cold bucket alone.
    app.catalog.set_copy(pid, home_location_id(app.repo.store_id), "deleted")
    try:
        r = viewer.get(f"/api/points/{pid}/recall")
        assert r.status_code == 200, r.text
        whole = r.json()
        assert whole["needed"] is True and whole["reason"] is None, whole
        assert (whole["location"], whole["location_id"]) == ("cold-site", location["id"])
        assert (whole["tier"], whole["typical_wait"]) == ("Expedited", "1-5 minutes")
        assert whole["copy_state"] == "archived"
        assert whole["packs"] > 0 and whole["bytes"] > 0
        assert whole["message"].startswith(f"{whole['packs']} pack(s) (")
        assert "from cold-site (tier Expedited, typically 1-5 minutes)" in whole["message"]
        one = viewer.get(f"/api/points/{pid}/recall", params={"path": "f3.bin"}).json()
        assert one["needed"] and one["path"] == "f3.bin"
        assert 0 < one["packs"] <= whole["packs"] and 0 < one["bytes"] <= whole["bytes"]
        assert viewer.get(f"/api/points/{pid}/recall", params={"path": "nope"}).status_code == 404
        named = viewer.get(f"/api/points/{pid}/recall", params={"location": "nowhere"})
        assert named.status_code == 404

        # The estimate asked the bucket for nothing: no restore request, the copy still archived.
        client = s3.client()
        prefix = "site/data/"
        for item in client.list_objects_v2(Bucket=cold_location["bucket"], Prefix=prefix)[
            "Contents"
        ]:
            head = client.head_object(Bucket=cold_location["bucket"], Key=item["Key"])
            assert head["StorageClass"] == "GLACIER" and not head.get("Restore"), item["Key"]
            assert head["ObjectLockMode"] == "COMPLIANCE"
        states = {c.location_id: c.state for c in app.catalog.copies_of(pid)}
        assert states[location["id"]] == "archived"

        # The restore itself waits, saying why, and goes on once the packs are thawed (2 s).
        target = Path(server.settings.data_dir) / "restores" / "from-cold"
        r = operator.post(
            f"/api/points/{pid}/restore", json={"target": str(target), "path": "f3.bin"}
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 60
        while (job := viewer.get(f"/api/jobs/{job_id}").json())["state"] != "waiting":
            assert job["state"] in ("queued", "running"), job
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert job["wait_reason"].startswith(f"recalling {one['packs']} of {one['packs']} pack(s)")
        assert "from cold-site (tier Expedited" in job["wait_reason"], job["wait_reason"]
        assert job["wake_at"] is not None
        time.sleep(2.5)
        assert server.service.jobs.wake(job_id) is not None
        done = wait_job(viewer, job_id)
        assert done["state"] == "succeeded", done
        assert (target / "f3.bin").read_bytes() == (files_point["source"] / "f3.bin").read_bytes()
    finally:
        app.catalog.set_copy(pid, home_location_id(app.repo.store_id), "present")


def test_check_says_whether_a_location_answers_and_why_not(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    viewer: httpx.Client,
    s3: S3Server,
) -> None:
    bucket = s3.bucket()
    r = admin.post("/api/locations", json=_bucket_body(s3, bucket, "hot-site"))
    assert r.status_code == 201, r.text
    hot = r.json()
    assert (hot["access"], hot["immutable"], hot["lock_mode"]) == ("random", False, None)
    assert (hot["data_class"], hot["restore_tier"]) == (None, None)

    checked = operator.post(f"/api/locations/{hot['id']}/check")
    assert checked.status_code == 200, checked.text
    assert checked.json()["online"] is True and checked.json()["reason"] is None
    assert SECRET not in checked.text
    home = operator.post(
        f"/api/locations/{home_location_id(server.service.app.repo.store_id)}/check"
    )
    assert home.status_code == 200 and home.json()["home"] and home.json()["online"]

    # Someone empties the bucket's prefix: the location no longer says it holds this store.
    client = s3.client()
    identity = client.get_object(Bucket=bucket, Key="site/location.json")["Body"].read()
    client.delete_object(Bucket=bucket, Key="site/location.json")
    gone = operator.post(f"/api/locations/{hot['id']}/check")
    assert gone.status_code == 200, gone.text
    assert gone.json()["online"] is False
    assert "holds no location identity" in gone.json()["reason"], gone.json()
    listed = {loc["label"]: loc for loc in viewer.get("/api/locations").json()}
    assert listed["hot-site"]["online"] is False

    # Put back, it answers again.
    client.put_object(Bucket=bucket, Key="site/location.json", Body=identity)
    again = operator.post("/api/locations/hot-site/check").json()
    assert again["online"] is True and again["reason"] is None

    assert viewer.post(f"/api/locations/{hot['id']}/check").status_code == 403
    assert operator.post("/api/locations/nowhere/check").status_code == 404
    audit = admin.get("/api/audit", params={"limit": 20})
    assert "location.check" in {e["action"] for e in audit.json()}
    assert SECRET not in audit.text
    assert admin.delete(f"/api/locations/{hot['id']}").status_code == 204


def test_the_api_offers_exactly_the_bucket_backends_choices() -> None:
    """The API's enums (for the OpenAPI schema and 422s) list what the s3 backend accepts."""
    from typing import get_args

    from api.schemas_locations import COLD_STORAGE_CLASSES, LockMode, RestoreTier, StorageClass
    from tiering import s3

    assert set(get_args(StorageClass)) == set(s3.STORAGE_CLASSES)
    assert set(COLD_STORAGE_CLASSES) == set(s3.COLD_CLASSES)
    assert get_args(LockMode) == s3.LOCK_MODES
    assert get_args(RestoreTier) == s3.RESTORE_TIERS


def test_an_admin_cannot_make_a_locked_copy_go_away(
    server: LiveServer,
    admin: httpx.Client,
    operator: httpx.Client,
    viewer: httpx.Client,
    cold_location: dict[str, Any],
    s3: S3Server,
    tmp_path: Path,
) -> None:
    """Deleting a point removes its home copy only: a point held in a locked bucket stays listed
    with that copy; once the bucket holds its only copy, a delete is refused until the lock ends,
    and the bucket refuses the appliance's own credentials a delete of the locked objects."""
    source = tmp_path / "ledger"
    source.mkdir()
    (source / "ledger.db").write_bytes(os.urandom(300_000))
    r = admin.post("/api/assets", json={"name": "ledger", "kind": "files", "path": str(source)})
    assert r.status_code == 201, r.text
    job = wait_job(operator, operator.post("/api/assets/ledger/backup", json={}).json()["id"])
    older = job["result"]["point"]
    job = wait_job(operator, operator.post("/api/assets/ledger/backup", json={}).json()["id"])
    assert job["state"] == "succeeded", job
    r = operator.post(f"/api/points/{older}/copy", json={"location": "cold-site"})
    assert wait_job(operator, r.json()["id"])["state"] == "succeeded"

    # The delete takes the home copy; the locked one stays, and the point with it.
    assert admin.delete(f"/api/points/{older}").status_code == 204
    copies = {c["location"]: c for c in viewer.get(f"/api/points/{older}").json()["copies"]}
    assert copies["cold-site"]["state"] == "archived", copies
    assert copies["default"]["state"] == "deleted", copies
    # Its folders are read from the bucket's hot metadata, without a recall.
    listing = viewer.get(f"/api/points/{older}/files")
    assert listing.status_code == 200, listing.text
    assert [e["name"] for e in listing.json()["entries"]] == ["ledger.db"]

    # Now the bucket holds its only copy: refused, saying until when it is locked.
    r = admin.delete(f"/api/points/{older}")
    assert r.status_code == 409, r.text
    assert "locked until" in r.json()["message"] and "cold-site" in r.json()["message"]
    assert viewer.get(f"/api/points/{older}").status_code == 200

    # The appliance's credentials cannot delete the locked objects either (COMPLIANCE).
    app = server.service.app
    location = app.find_location("cold-site")
    from appliance.errors import ObjectLocked
    from appliance.locations.work import location_backend

    backend = location_backend(app, location)
    try:
        with pytest.raises(ObjectLocked):
            backend.delete(f"manifests/{older}")
    finally:
        backend.close()
    client = s3.client()
    head = client.head_object(Bucket=cold_location["bucket"], Key=f"site/manifests/{older}")
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert head["ObjectLockRetainUntilDate"] > datetime.now(UTC) + timedelta(days=1)
