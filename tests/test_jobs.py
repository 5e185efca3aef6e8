"""The job runner: states, resource locking with visible waiting reasons, cancel, interruption."""

from __future__ import annotations

import os
import threading
import time

import pytest

from appliance.engine import Appliance
from appliance.jobs import JOB_KINDS, JobKind, JobRunner, register_job_kind


@pytest.fixture()
def app(tmp_path, monkeypatch):
    monkeypatch.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
    appliance, _ = Appliance.init(str(tmp_path / "data"), "pw")
    yield appliance
    appliance.close()


@pytest.fixture()
def tree(tmp_path):
    root = tmp_path / "src"
    (root / "d").mkdir(parents=True)
    for i in range(20):
        (root / "d" / f"f{i}").write_bytes(os.urandom(20_000))
    return root


def _gate_kind(name: str, gate: threading.Event, resources: list[tuple[str, bool]]) -> None:
    def work(app, params, ctx):
        ctx.progress({"bytes_done": 1, "bytes_total": 2})
        while not gate.wait(0.02):
            if ctx.cancel.is_set():
                from appliance.errors import BackupCancelled

                raise BackupCancelled()
        return {"ok": True}

    register_job_kind(name, JobKind(work, lambda p: resources, True))


def test_backup_job_succeeds_and_records_point(app, tree):
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.submit("backup_files", {"source": str(tree), "asset": "docs"})
        done = runner.wait(job.id, timeout=60)
        assert done.state == "succeeded", done.error
        assert done.result["point"] == app.catalog.list_points(asset="docs")[0].id
        assert done.started_at is not None and done.finished_at is not None
        messages = [line.message for line in app.catalog.job_log(job.id)]
        assert any("backing up" in m for m in messages) and messages[-1] == "finished"
    finally:
        runner.shutdown()


def test_conflicting_jobs_wait_with_a_reason_then_run(app):
    gate = threading.Event()
    _gate_kind("test_hold_store", gate, [("store", True)])
    try:
        runner = JobRunner(app)
        runner.start()
        first = runner.submit("test_hold_store", {})
        second = runner.submit("verify", {})
        deadline = time.monotonic() + 10
        while app.catalog.get_job(second.id).progress.get("waiting") is None:
            assert time.monotonic() < deadline, "no waiting reason shown"
            time.sleep(0.05)
        assert app.catalog.get_job(second.id).state == "queued"
        assert "store is busy" in app.catalog.get_job(second.id).progress["waiting"]
        assert app.catalog.get_job(first.id).state == "running"
        gate.set()
        assert runner.wait(first.id, 10).state == "succeeded"
        assert runner.wait(second.id, 30).state == "succeeded"
    finally:
        runner.shutdown()
        JOB_KINDS.pop("test_hold_store", None)


def test_cancel_running_and_queued(app):
    gate = threading.Event()
    _gate_kind("test_hold_asset", gate, [("asset:x", True)])
    try:
        runner = JobRunner(app)
        runner.start()
        running = runner.submit("test_hold_asset", {})
        queued = runner.submit("test_hold_asset", {})
        while app.catalog.get_job(running.id).state != "running":
            time.sleep(0.02)
        assert runner.cancel(queued.id).state == "cancelled"
        runner.cancel(running.id)
        assert runner.wait(running.id, 10).state == "cancelled"
    finally:
        runner.shutdown()
        JOB_KINDS.pop("test_hold_asset", None)


def test_shutdown_interrupts_and_start_resumes(app):
    gate = threading.Event()
    _gate_kind("test_resumable", gate, [("asset:y", True)])
    try:
        runner = JobRunner(app)
        runner.start()
        job = runner.submit("test_resumable", {})
        while app.catalog.get_job(job.id).state != "running":
            time.sleep(0.02)
        runner.shutdown()
        assert app.catalog.get_job(job.id).state == "interrupted"
        again = JobRunner(app)
        assert job.id in again.start()
        gate.set()
        assert again.wait(job.id, 10).state == "succeeded"
        assert any("re-queued" in line.message for line in app.catalog.job_log(job.id))
        again.shutdown()
    finally:
        JOB_KINDS.pop("test_resumable", None)


def test_crash_left_running_job_is_marked_interrupted_and_requeued(app, tree):
    job = app.catalog.create_job("backup_files", {"source": str(tree), "asset": "docs"})
    app.catalog.update_job(job.id, state="running")  # as a crashed service leaves it
    runner = JobRunner(app)
    assert job.id in runner.start()
    try:
        assert runner.wait(job.id, 60).state == "succeeded"
    finally:
        runner.shutdown()


def test_failed_job_keeps_the_error_code(app):
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.submit("restore", {"point": "ffff0000", "target": "/tmp/nowhere"})
        done = runner.wait(job.id, 30)
        assert done.state == "failed"
        assert done.error["code"] == "not_found"
        retried = runner.retry(job.id)
        assert retried.id != job.id
    finally:
        runner.shutdown()
