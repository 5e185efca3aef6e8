"""Jobs run in a clean child process (JobRunner(isolate=True)), as the service runs them."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.engine import Appliance
from appliance.jobs import JobRunner


@pytest.fixture
def appliance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Appliance]:
    monkeypatch.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
    monkeypatch.delenv("APPLIANCE_CATALOG_URL", raising=False)
    app, _ = Appliance.init(str(tmp_path / "data"), "passphrase")
    yield app
    app.close()


@pytest.fixture
def runner(appliance: Appliance) -> Iterator[JobRunner]:
    runner = JobRunner(appliance, max_parallel=2, isolate=True)
    runner.start()
    yield runner
    runner.shutdown()


def _tree(root: Path, files: int, size: int) -> Path:
    root.mkdir()
    for i in range(files):
        (root / f"f{i:04d}").write_bytes(os.urandom(size))
    return root


def test_isolated_backup_and_restore_behave_like_inline_ones(
    appliance: Appliance, runner: JobRunner, tmp_path: Path
) -> None:
    source = _tree(tmp_path / "src", 20, 100_000)
    job = runner.wait(
        runner.submit("backup_files", {"source": str(source), "asset": "a", "mode": "full"}).id
    )
    assert job.state == "succeeded", job
    assert job.progress["percent"] == 100.0 and job.progress["files"] == 20
    point = job.result["point"]  # type: ignore[index]
    assert [p.id for p in appliance.catalog.list_points()] == [point]
    log = [line.message for line in appliance.catalog.job_log(job.id)]
    assert log[0].startswith("backing up") and log[-1] == "finished"
    # A restore job writes only into a restore area (checked again when the job runs).
    target = Path(appliance.restore_rules().areas[0]) / "out"
    restore = runner.wait(runner.submit("restore", {"point": point, "target": str(target)}).id)
    assert restore.state == "succeeded", restore
    for path in source.iterdir():
        assert (target / path.name).read_bytes() == path.read_bytes()


def test_errors_keep_their_code(runner: JobRunner, tmp_path: Path) -> None:
    job = runner.wait(
        runner.submit("backup_files", {"source": str(tmp_path / "missing"), "asset": "a"}).id
    )
    assert job.state == "failed" and job.error is not None
    assert job.error["code"] == "source_error", job.error


def test_cancel_reaches_the_child(appliance: Appliance, runner: JobRunner, tmp_path: Path) -> None:
    source = _tree(tmp_path / "src", 3000, 64 * 1024)
    job = runner.submit("backup_files", {"source": str(source), "asset": "a", "mode": "full"})
    deadline = time.monotonic() + 60
    while appliance.catalog.get_job(job.id).progress.get("files", 0) < 50:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    runner.cancel(job.id)
    assert runner.wait(job.id, timeout=60).state == "cancelled"
    assert appliance.catalog.list_points() == []


def test_a_child_that_dies_fails_its_job(
    appliance: Appliance, runner: JobRunner, tmp_path: Path
) -> None:
    source = _tree(tmp_path / "src", 3000, 64 * 1024)
    job = runner.submit("backup_files", {"source": str(source), "asset": "a", "mode": "full"})
    deadline = time.monotonic() + 60
    while appliance.catalog.get_job(job.id).progress.get("files", 0) < 50:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    lock = os.path.join(appliance.data_dir.lock_path, f"{appliance.repo.store_id}.asset.a.lock")
    # The job's child leads a process group of its own (it and its workers hold the lock).
    victims = [pid for pid in _holders(lock) if os.getpgid(pid) == pid]
    assert victims, "the job's child process was not found"
    os.kill(victims[0], signal.SIGKILL)
    done = runner.wait(job.id, timeout=60)
    assert done.state == "failed" and done.error is not None
    assert done.error["code"] == "job_process_died"
    assert _holders(lock) == []  # its workers went with it: no lock is left held


def _holders(path: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in fds):
                pids.append(int(pid))
        except OSError:
            continue
    return pids


def _first_work(app: Appliance, p: dict[str, object], ctx: object) -> dict[str, object]:
    return {"which": "first"}


def _second_work(app: Appliance, p: dict[str, object], ctx: object) -> dict[str, object]:
    return {"which": "second"}


def _wrapped(work: Any, app: Appliance, p: dict[str, object], ctx: object) -> Any:
    return work(app, p, ctx)


def test_a_child_finds_the_services_kinds_as_they_are_registered_now() -> None:
    """An isolated job's process started before the service registered some kinds; it gets
    them by reference. Re-registering a kind hands over the new work, never a stale one: the
    service re-wraps kinds (replication) at each start, and a cache keyed by id() once handed a
    policy's SSH backup the libvirt work when a freed wrapper's id came back."""
    import functools
    import pickle

    from appliance import job_context, jobs

    name = "test_handover_kind"
    try:
        for work in (_first_work, _second_work):
            jobs.JOB_KINDS.pop(name, None)  # the old wrapper is freed: its id may come back
            wrapper = functools.partial(_wrapped, work)
            jobs.register_job_kind(name, jobs.JobKind(wrapper, lambda p: []))
            del wrapper
            handed = pickle.loads(jobs.shareable_works()[name])
            assert handed(None, {}, None) == {"which": work.__name__.split("_")[1]}
        shared = jobs.shareable_works()[name]
        del jobs.JOB_KINDS[name]  # as in a child, which never registered it
        with pytest.raises(KeyError, match="no job kind"):
            jobs.work_of(name)
        job_context.inherit_work({name: shared})
        assert jobs.work_of(name)(None, {}, None) == {"which": "second"}  # type: ignore[arg-type]
    finally:
        jobs.JOB_KINDS.pop(name, None)
        job_context._INHERITED_WORK.pop(name, None)
