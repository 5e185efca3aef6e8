"""Faults between the appliance and a real S3 server (moto's), injected on the wire by the fault
proxy (``servers/s3_fault_proxy.py``; see tests/test_s3_faults.py for the backend's own faults):
a copy of a point survives intermittent throttling, at open too, and verifies; a location refusing
credentials is unavailable until it accepts them; a copy killed (SIGKILL) mid-way resumes and
copies only what is missing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from engine_support import CLI, PASSPHRASE, new_appliance, run_cli, set_engine_env
from s3_support import CREDENTIALS, random_tree
from servers.s3_fault_proxy import FaultProxy

from appliance.engine import Appliance
from appliance.errors import (
    LocationUnavailable,
)
from appliance.store.backend import LocalDirectoryBackend


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


# --- the appliance: a copy of a point -------------------------------------------------------------


def _objects(method: str, target: str) -> bool:
    """Requests on objects (not the bucket's own HEAD, which opening the location asks)."""
    return target.split("?")[0].count("/") >= 2 or "list-type=2" in target


def test_a_copy_survives_intermittent_throttling_and_verifies(
    s3: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    app, _ = new_appliance(tmp_path / "app", pack_size=256 << 10)
    try:
        point = app.backup_files(str(random_tree(tmp_path / "tree", 6, 300_000)), "docs").point.id
        bucket = s3.bucket()
        app.add_location(
            f"s3://{bucket}/p",
            kind="s3_bucket",
            label="b",
            options=s3.options(endpoint_url=proxy.url),
        )
        rule = proxy.fail(6, status=503, code="SlowDown", match=_objects, every=3)
        result = app.copy_point(point, "b")
        assert result["packs_copied"] == result["packs_needed"] > 4
        assert rule.fired == 6
        # Every throttled request was asked again and answered.
        seen = proxy.requests
        for i, struck in enumerate(seen):
            if struck.fault is not None:
                again = [
                    s for s in seen[i + 1 :] if (s.method, s.path) == (struck.method, struck.path)
                ]
                # Asked again until answered (with packs in flight, a retry may be struck too).
                assert any(s.fault is None and s.status in (200, 206, 404) for s in again)
        report = app.verify_copy(point, "b")
        assert report["ok"] and report["blobs_checked"] > 0
        states = {c.location_id: c.state for c in app.catalog.copies_of(point)}
        assert states[app.find_location("b").id] == "present"
    finally:
        app.close()


def test_a_location_refusing_credentials_is_unavailable_until_it_accepts_them(
    s3: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    app, _ = new_appliance(tmp_path / "app", pack_size=256 << 10)
    try:
        point = app.backup_files(str(random_tree(tmp_path / "tree", 2, 100_000)), "docs").point.id
        app.add_location(
            f"s3://{s3.bucket()}/p",
            kind="s3_bucket",
            label="b",
            options=s3.options(endpoint_url=proxy.url),
        )
        proxy.fail(None, status=403, code="InvalidAccessKeyId")
        with pytest.raises(LocationUnavailable, match="refuses these credentials"):
            app.copy_point(point, "b")
        assert not app.find_location("b").online
        proxy.clear()
        assert app.copy_point(point, "b")["packs_copied"] > 0
        assert app.find_location("b").online
        assert app.verify_copy(point, "b")["ok"]
    finally:
        app.close()


def _cli_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("APPLIANCE_PASSPHRASE", "APPLIANCE_RECOVERY_KEY", "APPLIANCE_CATALOG_URL")
    }
    env.update(
        APPLIANCE_TEST_WEAK_KDF="1",
        APPLIANCE_PASSPHRASE=PASSPHRASE,
        AWS_ACCESS_KEY_ID=CREDENTIALS["access_key_id"],
        AWS_SECRET_ACCESS_KEY=CREDENTIALS["secret_access_key"],
    )
    return env


def test_a_copy_killed_mid_way_resumes_with_only_the_missing_packs(
    s3: Any, proxy: FaultProxy, tmp_path: Path
) -> None:
    data_dir = tmp_path / "app"
    app, _ = new_appliance(data_dir, pack_size=256 << 10)
    try:
        point = app.backup_files(str(random_tree(tmp_path / "tree", 10, 300_000)), "docs").point.id
    finally:
        app.close()
    bucket = s3.bucket()
    env = _cli_env()
    run_cli(
        "locations",
        "add",
        f"s3://{bucket}/p",
        "--endpoint",
        proxy.url,
        "--region",
        "us-east-1",
        "--label",
        "b",
        data_dir=data_dir,
        env=env,
    )

    def data_put(method: str, target: str) -> bool:
        return method == "PUT" and target.startswith(f"/{bucket}/p/data/")

    def stored() -> int:
        return sum(1 for s in proxy.requests if data_put(s.method, s.path) and s.status == 200)

    proxy.delay(0.3, match=data_put)  # slow uploads: the copy is caught mid-way
    process = subprocess.Popen(
        [CLI, "--data-dir", str(data_dir), "--json", "copy", point, "--to", "b"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while stored() < 2:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the copy never stored two packs"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    proxy.clear()
    proxy.wait_idle()  # a delayed upload of the killed copy may still be in hand

    # What the killed copy left: whole packs only, fewer than the point needs, and no copy.
    home = LocalDirectoryBackend(str(data_dir / "pools" / "default" / "store"))
    direct = s3.client()
    try:
        listed = direct.list_objects_v2(Bucket=bucket, Prefix="p/data/").get("Contents", [])
        assert not direct.list_multipart_uploads(Bucket=bucket).get("Uploads")
    finally:
        direct.close()
    assert len(listed) >= 2
    for item in listed:
        assert item["Size"] == home.stat(item["Key"][len("p/") :]).size, item["Key"]
    killed = Appliance.open(str(data_dir), passphrase=PASSPHRASE)
    try:
        location = killed.find_location("b").id
        assert {c.location_id: c.state for c in killed.catalog.copies_of(point)}[location] == (
            "copying"
        )
    finally:
        killed.close()

    start = len(proxy.requests)
    result = json.loads(
        run_cli("--json", "copy", point, "--to", "b", data_dir=data_dir, env=env).stdout
    )
    assert result["packs_present"] >= len(listed) > 0
    assert result["packs_copied"] > 0
    assert result["packs_present"] + result["packs_copied"] == result["packs_needed"]
    # Only the missing packs went up the second time: none of those already there.
    again = {s.path.split("?")[0] for s in proxy.requests[start:] if s.method == "PUT"}
    assert again and not again & {f"/{bucket}/{item['Key']}" for item in listed}
    assert len([p for p in again if p.startswith(f"/{bucket}/p/data/")]) + len(listed) == (
        sum(1 for _ in home.list("data/"))
    )
    reopened = Appliance.open(str(data_dir), passphrase=PASSPHRASE)
    try:
        report = reopened.verify_copy(point, "b")
        assert report["ok"] and report["blobs_checked"] > 0
    finally:
        reopened.close()
