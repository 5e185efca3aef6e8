"""The ``boot_test`` job kind's resources, with the real job runner (no QEMU).

The work functions are stand-ins that record when they ran; the resource functions are the real
ones: ``image.failover.boot_test_resources`` (what ``register_failover_jobs`` registers) and the
backup kinds' ``asset:<name>`` declaration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from appliance.engine import Appliance
from appliance.jobs import JOB_KINDS, JobContext, JobKind, JobRunner, register_job_kind
from appliance.policies import POLICY_JOB_KIND, register_policy_jobs
from image.failover import FailoverManager, boot_test_resources, register_failover_jobs

SLOW_BACKUP = "test_slow_backup"
FAKE_BOOT_TEST = "test_fake_boot_test"


@pytest.fixture()
def app(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Appliance]:
    monkeypatch.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
    appliance, _ = Appliance.init(str(tmp_path / "data"), "pw")
    yield appliance
    appliance.close()


class Timeline:
    """When each stand-in job started and ended (monotonic seconds), and gates to hold them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: dict[str, list[float]] = {}
        self.gates: dict[str, threading.Event] = {}

    def work(self, app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        with self.lock:
            self.spans[p["label"]] = [time.monotonic()]
            gate = self.gates.setdefault(p["label"], threading.Event())
        gate.wait(10)
        with self.lock:
            self.spans[p["label"]].append(time.monotonic())
        return {"label": p["label"]}

    def started(self, label: str) -> bool:
        with self.lock:
            return label in self.spans

    def release(self, label: str) -> None:
        with self.lock:
            self.gates.setdefault(label, threading.Event()).set()


@pytest.fixture()
def timeline() -> Iterator[Timeline]:
    line = Timeline()
    register_policy_jobs()
    # The backup stand-in declares what a policy backup of the asset declares.
    register_job_kind(SLOW_BACKUP, JobKind(line.work, JOB_KINDS[POLICY_JOB_KIND].resources, True))
    register_job_kind(FAKE_BOOT_TEST, JobKind(line.work, boot_test_resources, True))
    yield line
    for label in list(line.gates):
        line.release(label)
    JOB_KINDS.pop(SLOW_BACKUP, None)
    JOB_KINDS.pop(FAKE_BOOT_TEST, None)


def _wait_for(condition: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_boot_test_resources_hold_the_asset_and_share_the_store() -> None:
    assert boot_test_resources({"asset": "web"}) == [("asset:web", True), ("store", False)]
    assert JOB_KINDS["backup_image"].resources({"asset": "web"})[0] == ("asset:web", True)


def test_a_boot_test_queued_after_a_backup_of_its_asset_starts_after_it(
    app: Appliance, timeline: Timeline
) -> None:
    runner = JobRunner(app, max_parallel=4)
    runner.start()
    try:
        backup = runner.submit(SLOW_BACKUP, {"asset": "web", "policy": "p", "label": "backup"})
        test = runner.submit(FAKE_BOOT_TEST, {"asset": "web", "label": "test"})
        _wait_for(lambda: timeline.started("backup"), "the backup to start")
        _wait_for(
            lambda: app.catalog.get_job(test.id).progress.get("waiting") is not None,
            "the boot test to say why it waits",
        )
        waiting = app.catalog.get_job(test.id)
        assert waiting.state == "queued" and "asset:web is busy" in waiting.progress["waiting"]
        time.sleep(0.3)  # several dispatcher passes: it must still not start
        assert not timeline.started("test")
        timeline.release("backup")
        timeline.release("test")
        assert runner.wait(backup.id, 10).state == "succeeded"
        assert runner.wait(test.id, 10).state == "succeeded"
        assert timeline.spans["test"][0] >= timeline.spans["backup"][1]
    finally:
        runner.shutdown()


def test_boot_tests_of_different_assets_run_side_by_side(
    app: Appliance, timeline: Timeline
) -> None:
    runner = JobRunner(app, max_parallel=4)
    runner.start()
    try:
        web = runner.submit(FAKE_BOOT_TEST, {"asset": "web", "label": "web"})
        db = runner.submit(FAKE_BOOT_TEST, {"asset": "db", "label": "db"})
        # A backup of a third asset is not held up by either.
        other = runner.submit(SLOW_BACKUP, {"asset": "mail", "policy": "p", "label": "mail"})
        _wait_for(
            lambda: all(timeline.started(x) for x in ("web", "db", "mail")),
            "both boot tests and the other asset's backup to run at once",
        )
        for label in ("web", "db", "mail"):
            timeline.release(label)
        for job in (web, db, other):
            assert runner.wait(job.id, 10).state == "succeeded"
    finally:
        runner.shutdown()


def test_registered_kinds_a_failover_never_waits_for_its_asset(
    app: Appliance, tmp_path: Any
) -> None:
    names = ("failover_start", "failover_stop", "failover_migrate", "failover_failback")
    saved = {name: JOB_KINDS.get(name) for name in (*names, "boot_test")}
    manager = FailoverManager(app, state_dir=str(tmp_path / "failover"))
    try:
        register_failover_jobs(manager)
        assert JOB_KINDS["boot_test"].resources is boot_test_resources
        # A failover holds no asset: a running backup or boot test of the VM does not delay it.
        assert JOB_KINDS["failover_start"].resources({"asset": "web"}) == [("store", False)]
    finally:
        manager.shutdown()
        for name, kind in saved.items():
            if kind is None:
                JOB_KINDS.pop(name, None)
            else:
                JOB_KINDS[name] = kind
