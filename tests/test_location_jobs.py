"""Copy jobs and their locations, for real: a location on a loop-mounted ext4 that is pulled.

A copy to a location that is not there waits (it neither fails nor writes into the bare
mountpoint), keeps its checkpoint across a restart of the appliance, and is woken by the
location's return (what the hardware layer's udev add does), then completes and verifies.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from engine_support import PASSPHRASE, new_appliance, set_engine_env
from loop_support import mounted_disk

from appliance.engine import Appliance
from appliance.jobs import LOCATION_RETRY, JobRunner

pytestmark = pytest.mark.root

START = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


def _until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_a_copy_to_a_pulled_location_waits_survives_a_restart_and_resumes(tmp_path: Path) -> None:
    app, _ = new_appliance(tmp_path / "appliance")
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(20):
        (tree / f"f{i}.bin").write_bytes(os.urandom(50_000))
    point = app.backup_files(str(tree), "docs").point.id
    usb = tmp_path / "usb"
    with mounted_disk(tmp_path / "usb.img", usb, 64 << 20) as device:
        location = app.add_location(str(usb), label="usb", require_mount=True)
        subprocess.run(["umount", str(usb)], check=True)  # pulled before the copy starts

        # The runner's own clock stands still, so the wait's retry time never passes here.
        runner = JobRunner(app, clock=lambda: START)
        runner.start()
        try:
            job = runner.submit("copy", {"point": point, "location": location.id})
            _until(lambda: app.catalog.get_job(job.id).state == "waiting")
        finally:
            runner.shutdown()
        waiting = app.catalog.get_job(job.id)
        assert waiting.wait_reason is not None
        assert waiting.wait_reason.startswith("location ") and "unavailable" in waiting.wait_reason
        assert waiting.wake_at is not None and waiting.wake_at - START >= LOCATION_RETRY
        assert waiting.checkpoint == {"packs_copied": 0}
        assert not app.catalog.get_location(location.id).online
        assert os.listdir(usb) == []  # nothing was written into the bare mountpoint
        app.close()

        # The disk comes back and the appliance restarts: the job still waits until woken.
        subprocess.run(["mount", device, str(usb)], check=True)
        app = Appliance.open(str(tmp_path / "appliance"), passphrase=PASSPHRASE)
        runner = JobRunner(app, clock=lambda: START)
        runner.start()
        try:
            time.sleep(1.2)
            assert app.catalog.get_job(job.id).state == "waiting"
            assert runner.wake_matching(f"location:{location.id}") == [job.id]  # a udev add
            done = runner.wait(job.id, 60)
            assert done.state == "succeeded", done.error
            assert done.result["packs_copied"] == done.result["packs_needed"] > 0
        finally:
            runner.shutdown()
        log = [line.message for line in app.catalog.job_log(job.id)]
        assert any(line.startswith(f"resuming the copy of point {point}") for line in log), log
        copy = {c.location_id: c for c in app.catalog.copies_of(point)}[location.id]
        assert copy.state == "present" and copy.verified_at is not None
        assert app.catalog.get_location(location.id).online
        assert app.verify_copy(point, "usb")["ok"]
        app.close()
