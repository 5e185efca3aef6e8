"""Jobs that wait (JobWaiting), checkpoints, wake-ups, restarts and retries with backoff."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.catalog.records import JobRecord
from appliance.engine import Appliance
from appliance.errors import BackupCancelled, JobWaiting, TransientBackendError
from appliance.jobs import JOB_KINDS, JobKind, JobRunner, register_job_kind


@pytest.fixture()
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Appliance]:
    monkeypatch.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
    monkeypatch.delenv("APPLIANCE_CATALOG_URL", raising=False)
    appliance, _ = Appliance.init(str(tmp_path / "data"), "pw")
    yield appliance
    appliance.close()


@pytest.fixture()
def kinds() -> Iterator[Callable[[str, JobKind], None]]:
    names: list[str] = []

    def add(name: str, kind: JobKind) -> None:
        names.append(name)
        register_job_kind(name, kind)

    yield add
    for name in names:
        JOB_KINDS.pop(name, None)


def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _state(app: Appliance, job_id: str) -> str:
    return app.catalog.get_job(job_id).state


def _waits_once(reason: str, wake_at: Callable[[], datetime | None]) -> Any:
    """A work function that waits on its first run and returns its checkpoint on the next."""

    def work(app: Appliance, params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        if not ctx.checkpoint:
            raise JobWaiting(reason, wake_at(), {"step": 2, "done": ["a", "b"]})
        return {"resumed_from": ctx.checkpoint}

    return work


def _resources(*names: tuple[str, bool]) -> Callable[[dict[str, Any]], list[tuple[str, bool]]]:
    held = list(names) or [("test:none", False)]  # a job names at least one resource
    return lambda p: held


def test_waiting_job_is_woken_and_resumes_from_its_checkpoint(
    app: Appliance, kinds: Callable[[str, JobKind], None]
) -> None:
    kinds("test_wait_disk", JobKind(_waits_once("insert disk", lambda: None), _resources()))
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.submit("test_wait_disk", {})
        _until(lambda: _state(app, job.id) == "waiting")
        waiting = app.catalog.get_job(job.id)
        assert waiting.wait_reason == "insert disk" and waiting.wake_at is None
        assert waiting.checkpoint == {"step": 2, "done": ["a", "b"]}
        assert waiting.progress == {"waiting": "insert disk"} and waiting.attempts == 1
        assert runner.live_progress(job.id) is None  # no thread, no slot
        time.sleep(1.2)  # nothing wakes it by itself
        assert _state(app, job.id) == "waiting"
        woken = runner.wake(job.id)
        assert woken is not None and woken.state == "queued" and woken.wait_reason is None
        done = runner.wait(job.id, 10)
        assert done.state == "succeeded", done.error
        assert done.result == {"resumed_from": {"step": 2, "done": ["a", "b"]}}
        assert done.attempts == 2 and done.wake_at is None
        assert runner.wake(job.id) is None  # not waiting any more
        log = [line.message for line in app.catalog.job_log(job.id)]
        assert "waiting: insert disk" in log and log[-1] == "finished"
    finally:
        runner.shutdown()


def test_waiting_job_wakes_when_its_wake_time_passes(
    app: Appliance, kinds: Callable[[str, JobKind], None]
) -> None:
    kinds(
        "test_wait_thaw",
        JobKind(
            _waits_once("bucket thaw", lambda: datetime.now(UTC) + timedelta(seconds=0.3)),
            _resources(),
        ),
    )
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.submit("test_wait_thaw", {})
        _until(lambda: app.catalog.get_job(job.id).attempts >= 1)
        done = runner.wait(job.id, 10)
        assert done.state == "succeeded", done.error
        assert done.result == {"resumed_from": {"step": 2, "done": ["a", "b"]}}
        log = [line.message for line in app.catalog.job_log(job.id)]
        assert "wake time reached: queued again" in log
    finally:
        runner.shutdown()


def test_due_waiting_uses_the_given_time(
    app: Appliance, kinds: Callable[[str, JobKind], None]
) -> None:
    later = datetime.now(UTC) + timedelta(hours=3)
    kinds("test_wait_tape", JobKind(_waits_once("load tape", lambda: later), _resources()))
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.submit("test_wait_tape", {})
        _until(lambda: _state(app, job.id) == "waiting")
        assert app.catalog.get_job(job.id).wake_at == later
        assert app.catalog.due_waiting(datetime.now(UTC)) == []
        due = app.catalog.due_waiting(later + timedelta(seconds=1))
        assert [j.id for j in due] == [job.id]
    finally:
        runner.shutdown()


def test_a_waiting_job_holds_no_resource(
    app: Appliance, kinds: Callable[[str, JobKind], None]
) -> None:
    kinds(
        "test_wait_store",
        JobKind(_waits_once("insert disk", lambda: None), _resources(("store", True))),
    )
    kinds("test_use_store", JobKind(lambda a, p, c: {"ran": True}, _resources(("store", True))))
    runner = JobRunner(app, max_parallel=1)
    runner.start()
    try:
        waiting = runner.submit("test_wait_store", {})
        _until(lambda: _state(app, waiting.id) == "waiting")
        other = runner.submit("test_use_store", {})
        assert runner.wait(other.id, 10).state == "succeeded"  # store and the only slot free
        assert _state(app, waiting.id) == "waiting"
        runner.wake(waiting.id)
        assert runner.wait(waiting.id, 10).state == "succeeded"
    finally:
        runner.shutdown()


def test_a_waiting_job_survives_a_restart(
    app: Appliance, kinds: Callable[[str, JobKind], None]
) -> None:
    kinds(
        "test_wait_usb",
        JobKind(_waits_once("insert disk usb1", lambda: None), _resources(("location:usb1", True))),
    )
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.submit("test_wait_usb", {})
        _until(lambda: _state(app, job.id) == "waiting")
    finally:
        runner.shutdown()
    assert _state(app, job.id) == "waiting"
    runner = JobRunner(app)
    assert runner.start() == []  # not re-queued: it still waits
    try:
        time.sleep(1.2)
        assert _state(app, job.id) == "waiting"
        assert runner.wake_matching("location:other") == []
        assert runner.wake_matching("location:usb1") == [job.id]  # the udev add
        done = runner.wait(job.id, 10)
        assert done.state == "succeeded", done.error
        assert done.result == {"resumed_from": {"step": 2, "done": ["a", "b"]}}
    finally:
        runner.shutdown()


def test_wake_times_are_picked_up_after_a_restart(
    app: Appliance, kinds: Callable[[str, JobKind], None]
) -> None:
    now = [datetime.now(UTC)]
    kinds(
        "test_wait_clock",
        JobKind(_waits_once("thaw", lambda: now[0] + timedelta(hours=4)), _resources()),
    )
    runner = JobRunner(app, clock=lambda: now[0])
    runner.start()
    try:
        job = runner.submit("test_wait_clock", {})
        _until(lambda: _state(app, job.id) == "waiting")
    finally:
        runner.shutdown()
    runner = JobRunner(app, clock=lambda: now[0])
    runner.start()
    try:
        time.sleep(1.2)
        assert _state(app, job.id) == "waiting"
        now[0] += timedelta(hours=5)  # the runner's clock passes the wake time
        assert runner.wait(job.id, 10).state == "succeeded"
    finally:
        runner.shutdown()


def test_wake_matching_takes_a_predicate(
    app: Appliance, kinds: Callable[[str, JobKind], None]
) -> None:
    kinds("test_wait_any", JobKind(_waits_once("thaw of bucket b1", lambda: None), _resources()))
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.submit("test_wait_any", {})
        _until(lambda: _state(app, job.id) == "waiting")

        def thawed(j: JobRecord) -> bool:
            return "b1" in (j.wait_reason or "")

        assert runner.wake_matching(thawed) == [job.id]
        assert runner.wait(job.id, 10).state == "succeeded"
    finally:
        runner.shutdown()


def test_a_saved_checkpoint_survives_an_interruption(
    app: Appliance, kinds: Callable[[str, JobKind], None]
) -> None:
    saved = threading.Event()
    runs: list[dict[str, Any]] = []

    def work(app: Appliance, params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        runs.append(dict(ctx.checkpoint))
        if ctx.checkpoint.get("files_done") == 500:
            return {"finished_from": ctx.checkpoint}
        ctx.save_checkpoint({"files_done": 500})
        saved.set()
        while not ctx.cancel.wait(0.02):
            pass
        raise BackupCancelled()

    kinds("test_long_copy", JobKind(work, _resources(("store", False)), True))
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.submit("test_long_copy", {})
        assert saved.wait(10)
        assert app.catalog.get_job(job.id).checkpoint == {"files_done": 500}
    finally:
        runner.shutdown()
    interrupted = app.catalog.get_job(job.id)
    assert interrupted.state == "interrupted" and interrupted.checkpoint == {"files_done": 500}
    runner = JobRunner(app)
    assert runner.start() == [job.id]
    try:
        done = runner.wait(job.id, 10)
        assert done.state == "succeeded", done.error
        assert done.result == {"finished_from": {"files_done": 500}}
        assert runs == [{}, {"files_done": 500}] and done.attempts == 2
    finally:
        runner.shutdown()


def test_cancelling_a_waiting_job(app: Appliance, kinds: Callable[[str, JobKind], None]) -> None:
    kinds("test_wait_cancel", JobKind(_waits_once("load tape", lambda: None), _resources()))
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.submit("test_wait_cancel", {})
        _until(lambda: _state(app, job.id) == "waiting")
        cancelled = runner.cancel(job.id)
        assert cancelled.state == "cancelled" and cancelled.wait_reason is None
        assert cancelled.finished_at is not None
        assert runner.wake(job.id) is None
        time.sleep(0.3)
        assert _state(app, job.id) == "cancelled"
    finally:
        runner.shutdown()


def test_transient_errors_retry_with_backoff_until_attempts_are_used_up(
    app: Appliance, kinds: Callable[[str, JobKind], None]
) -> None:
    calls: list[int] = []

    def flaky(app: Appliance, params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        calls.append(1)
        if len(calls) < params["succeed_on"]:
            raise TransientBackendError("throttled")
        return {"calls": len(calls)}

    kinds("test_flaky", JobKind(flaky, _resources(), max_attempts=3, backoff=0.05))
    runner = JobRunner(app)
    runner.start()
    try:
        ok = runner.submit("test_flaky", {"succeed_on": 3})
        done = runner.wait(ok.id, 20)
        assert done.state == "succeeded" and done.result == {"calls": 3}
        assert done.attempts == 3
        log = [line.message for line in app.catalog.job_log(ok.id)]
        assert sum("retrying after a transient error" in m for m in log) == 2

        calls.clear()
        bad = runner.submit("test_flaky", {"succeed_on": 99})
        failed = runner.wait(bad.id, 20)
        assert failed.state == "failed" and failed.attempts == 3 and len(calls) == 3
        assert failed.error is not None and failed.error["code"] == "backend_transient"
    finally:
        runner.shutdown()


def test_without_max_attempts_a_transient_error_fails_at_once(
    app: Appliance, kinds: Callable[[str, JobKind], None]
) -> None:
    def fails(app: Appliance, params: dict[str, Any], ctx: Any) -> dict[str, Any]:
        raise TransientBackendError("timeout")

    kinds("test_fails", JobKind(fails, _resources()))
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.wait(runner.submit("test_fails", {}).id, 10)
        assert job.state == "failed" and job.attempts == 1
    finally:
        runner.shutdown()


def test_backoff_grows_per_attempt() -> None:
    kind = JobKind(lambda a, p, c: {}, _resources(), backoff=10.0)
    assert [kind.retry_delay(n) for n in (1, 2, 3)] == [10.0, 20.0, 40.0]
    custom = JobKind(lambda a, p, c: {}, _resources(), backoff=lambda n: 5.0 * n)
    assert custom.retry_delay(3) == 15.0


# --- isolated (a clean child process, as the service runs jobs) -----------------------------------


def _isolated_waits(app: Appliance, params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    if not ctx.checkpoint:
        ctx.save_checkpoint({"step": 1})
        raise JobWaiting("insert disk", None, {"step": 2})
    return {"resumed_from": ctx.checkpoint}


def test_an_isolated_job_waits_and_resumes(
    app: Appliance, kinds: Callable[[str, JobKind], None]
) -> None:
    kinds("test_isolated_wait", JobKind(_isolated_waits, _resources(), isolated=True))
    runner = JobRunner(app, isolate=True)
    runner.start()
    try:
        job = runner.submit("test_isolated_wait", {})
        _until(lambda: _state(app, job.id) in ("waiting", "failed"), 30)
        waiting = app.catalog.get_job(job.id)
        assert waiting.state == "waiting", waiting.error
        assert waiting.wait_reason == "insert disk" and waiting.checkpoint == {"step": 2}
        runner.wake(job.id)
        done = runner.wait(job.id, 30)
        assert done.state == "succeeded", done.error
        assert done.result == {"resumed_from": {"step": 2}}
    finally:
        runner.shutdown()
