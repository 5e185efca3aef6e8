"""Scheduled boot verification end to end: a policy's boot-test entry fires through the real
scheduler, the ``boot_test`` job boots the VM's newest point under real QEMU (TCG), proves it,
records the RTO and screenshot against the point, shuts it down and discards the overlay.

One boot (~10-15 s under TCG); the guest is the cached busybox test guest.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_support import PASSPHRASE, set_engine_env
from guest_support import PROOF, VM, guest_image_path

from appliance.boot_verification import boot_test_result
from appliance.catalog.records import PolicyRecord
from appliance.engine import Appliance
from appliance.jobs import JobRunner
from appliance.schedule import Scheduler, parse_schedule
from image.boot_proof import png_file_is_blank
from image.failover import FailoverManager, register_failover_jobs
from image.testguest import copy_sparse

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture
def protected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The test guest backed up as VM asset ``web``; a failover manager with its boot proof."""
    set_engine_env(monkeypatch)
    image = guest_image_path()
    disk = str(tmp_path / "web.raw")
    copy_sparse(image, disk)
    # The real clock: the RTO counts from the job's creation time in the catalog.
    app, _ = Appliance.init(str(tmp_path / "app"), PASSPHRASE)
    point = app.backup_image([disk], "web", vm_spec=VM).point
    manager = FailoverManager(app, accel="tcg")
    manager.set_asset_settings("web", proof=PROOF)
    register_failover_jobs(manager)
    runner = JobRunner(app)
    runner.start()
    try:
        yield {"app": app, "manager": manager, "runner": runner, "point": point.id}
    finally:
        runner.shutdown()
        manager.shutdown(grace=2)
        app.close()


def test_a_scheduled_boot_test_boots_proves_and_records_against_the_point(
    protected: dict[str, Any],
) -> None:
    app: Appliance = protected["app"]
    runner: JobRunner = protected["runner"]
    manager: FailoverManager = protected["manager"]
    policy = PolicyRecord(
        name="web-verify",
        assets=["web"],
        schedule={"entries": [{"cron": "* * * * *", "mode": "boot_test"}]},
        mode="incremental",
        retention={},
        rpo_seconds=0,
    )
    app.catalog.add_policy(policy)
    now = datetime.now(UTC)
    keys = [e.key for e in parse_schedule(policy.schedule).entries]
    app.catalog.reset_schedule_state(policy.name, keys, now - timedelta(minutes=3))

    scheduler = Scheduler(app, runner)
    [job_id] = scheduler.tick(now)
    assert scheduler.tick(now) == []  # the slot fired once
    job = app.catalog.get_job(job_id)
    assert job.kind == "boot_test"
    assert job.params["trigger"] == "schedule" and job.params["policy"] == "web-verify"
    done = runner.wait(job_id, timeout=240)
    assert done.state == "succeeded", (done.state, done.error)
    result = done.result or {}
    assert result["ok"] and result["point"] == protected["point"]
    assert 0 < result["rto_seconds"] < 200

    # Recorded against the point and the asset: proven, the RTO, a real screenshot.
    [session] = app.catalog.last_boot_tests(per="point").values()
    assert session.id == result["session"] and session.point_id == protected["point"]
    proof = boot_test_result(session)
    assert proof.state == "proven" and proof.rto_seconds == result["rto_seconds"]
    assert proof.has_screenshot
    shot = session.details["screenshot"]
    assert os.path.isfile(shot) and not png_file_is_blank(shot)
    assert app.catalog.last_boot_tests(per="asset", proven_only=True)["web"].id == session.id
    # Shut down and discarded: nothing of the session's overlay is left.
    assert session.state == "stopped"
    assert not os.path.exists(os.path.join(manager.state_dir, "sessions", session.id))
    log = [line.message for line in app.catalog.job_log(job_id)]
    assert log[0] == "scheduled boot test of policy web-verify"
    assert any("booted in" in line for line in log), log
