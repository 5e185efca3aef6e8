"""Schedules: the pure decision (explicit timestamps) and the scheduler thread's bookkeeping,
for backup entries and boot-test entries."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from appliance.catalog.records import PolicyRecord
from appliance.engine import Appliance
from appliance.errors import InvalidInput
from appliance.jobs import JOB_KINDS, JobRunner
from appliance.schedule import (
    MAX_COUNTED,
    ScheduleEntry,
    Scheduler,
    check_schedule_for_asset,
    due_runs,
    next_slot,
    parse_schedule,
)
from appliance.vmspec import vm_source
from image.failover import FailoverManager, register_failover_jobs

HOURLY = ScheduleEntry("0 * * * *", "incremental")
WEEKLY_FULL = ScheduleEntry("0 3 * * 0", "full")


def policy(*entries: ScheduleEntry, catch_up: str = "once", name: str = "p") -> PolicyRecord:
    return PolicyRecord(
        name=name,
        assets=["docs"],
        schedule={
            "entries": [{"cron": e.cron, "mode": e.mode} for e in entries],
            "catch_up": catch_up,
        },
        mode="incremental",
        retention={},
        rpo_seconds=0,
    )


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    # March 2024: the 3rd, 10th, 17th, 24th and 31st are Sundays.
    return datetime(2024, 3, day, hour, minute, second, tzinfo=UTC)


# --- the pure decision ----------------------------------------------------------------------------


def test_an_entry_fires_once_at_its_slot() -> None:
    p = policy(HOURLY)
    state = {HOURLY.key: at(4, 10)}
    assert due_runs(p, state, at(4, 10, 59, 59)).run_mode is None
    decision = due_runs(p, state, at(4, 11, 0, 20))
    assert decision.run_mode == "incremental"
    assert decision.fired == {HOURLY.key: at(4, 11)}
    assert decision.missed == 0 and decision.due[0].on_time
    # The state moved to the slot: the same slot never fires again.
    assert due_runs(p, decision.fired, at(4, 11, 0, 50)).fired == {}


def test_a_slot_exactly_now_is_due() -> None:
    decision = due_runs(policy(HOURLY), {HOURLY.key: at(4, 10)}, at(4, 11))
    assert decision.fired == {HOURLY.key: at(4, 11)} and decision.run_mode == "incremental"


def test_several_entries_due_together_make_one_run_of_the_strongest_mode() -> None:
    p = policy(HOURLY, WEEKLY_FULL)
    state = {HOURLY.key: at(10, 2), WEEKLY_FULL.key: at(3, 3)}
    decision = due_runs(p, state, at(10, 3, 0, 5))
    assert decision.run_mode == "full"
    assert decision.fired == {HOURLY.key: at(10, 3), WEEKLY_FULL.key: at(10, 3)}
    assert len(decision.due) == 2
    # An ordinary hour: only the incremental entry.
    later = due_runs(p, decision.fired, at(10, 4, 0, 5))
    assert later.run_mode == "incremental" and set(later.fired) == {HOURLY.key}


def test_catch_up_once_runs_one_job_for_all_missed_slots() -> None:
    p = policy(HOURLY, catch_up="once")
    decision = due_runs(p, {HOURLY.key: at(4, 10)}, at(4, 15, 30))
    assert decision.run_mode == "incremental"
    assert decision.due[0].occurrences == 5 and not decision.due[0].on_time
    assert decision.missed == 5  # 11:00 ... 15:00, none run at its time
    assert decision.fired == {HOURLY.key: at(4, 15)}
    lines = [message for _, message in decision.log_lines()]
    assert any("5 slot(s) were missed" in line for line in lines)
    assert any("catch-up (once)" in line for line in lines)


def test_catch_up_skip_does_not_run_missed_slots_but_says_so() -> None:
    p = policy(HOURLY, catch_up="skip")
    decision = due_runs(p, {HOURLY.key: at(4, 10)}, at(4, 15, 30))
    assert decision.run_mode is None
    assert [d.entry for d in decision.skipped] == [HOURLY]
    assert decision.skipped[0].missed == 5
    assert decision.fired == {HOURLY.key: at(4, 15)}  # skipped for good, never run later
    # Back just in time for a slot: that slot runs, the older ones are reported missed.
    on_time = due_runs(p, {HOURLY.key: at(4, 10)}, at(4, 15, 1))
    assert on_time.run_mode == "incremental" and on_time.skipped == ()
    assert on_time.missed == 4


def test_a_new_entry_starts_now_and_never_fires_for_the_past() -> None:
    p = policy(HOURLY, WEEKLY_FULL)
    decision = due_runs(p, {HOURLY.key: at(10, 2)}, at(10, 3, 0, 5))
    assert decision.fired[WEEKLY_FULL.key] == at(10, 3, 0, 5)  # initialised, not run
    assert decision.run_mode == "incremental"


def test_missed_slots_are_counted_up_to_a_cap() -> None:
    every_minute = ScheduleEntry("* * * * *", "incremental")
    now = at(31, 12)
    decision = due_runs(policy(every_minute), {every_minute.key: now - timedelta(days=30)}, now)
    assert decision.due[0].occurrences == MAX_COUNTED
    assert decision.fired == {every_minute.key: now}
    assert "at least" in decision.due[0].describe()


def test_schedules_follow_the_configured_time_zone() -> None:
    nightly = ScheduleEntry("0 3 * * *", "incremental")
    berlin = ZoneInfo("Europe/Berlin")
    p = policy(nightly)
    # 03:00 in Berlin is 02:00 UTC in winter (CET) and 01:00 UTC in summer (CEST).
    winter = due_runs(p, {nightly.key: at(4, 3)}, at(5, 2, 0, 10), tz=berlin)
    assert winter.fired == {nightly.key: at(5, 2)}
    summer = due_runs(
        p, {nightly.key: at(31, 12)}, datetime(2024, 4, 1, 1, 0, 10, tzinfo=UTC), tz=berlin
    )
    assert summer.fired == {nightly.key: datetime(2024, 4, 1, 1, tzinfo=UTC)}
    assert next_slot(nightly, at(5, 2), berlin) == at(6, 2)


def test_naive_time_is_refused() -> None:
    with pytest.raises(InvalidInput):
        due_runs(policy(HOURLY), {}, datetime(2024, 3, 4, 10))


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"entries": "0 * * * *"},
        {"entries": [{"cron": "0 * * *"}]},
        {"entries": [{"cron": "0 25 * * *"}]},
        {"entries": [{"cron": "0 0 30 2 *"}]},
        {"entries": [{"cron": "0 * * * *", "mode": "sometimes"}]},
        {"entries": [{"cron": "0 * * * *"}, {"cron": "0  * * * *"}]},
        {"entries": [], "catch_up": "always"},
        {"entries": [], "extra": 1},
        {"entries": [{"cron": 5}]},
    ],
)
def test_invalid_schedules_are_refused(document: object) -> None:
    with pytest.raises(InvalidInput):
        parse_schedule(document)


def test_a_valid_schedule_round_trips() -> None:
    schedule = parse_schedule(
        {"entries": [{"cron": "0  * * * *"}, {"cron": "0 3 * * 0", "mode": "full"}]}
    )
    assert schedule.entries == (HOURLY, WEEKLY_FULL) and schedule.catch_up == "once"
    assert parse_schedule(schedule.document()) == schedule


# --- the scheduler against a real catalog ----------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def appliance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Appliance]:
    monkeypatch.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
    monkeypatch.delenv("APPLIANCE_CATALOG_URL", raising=False)
    source = tmp_path / "src"
    source.mkdir()
    (source / "file.txt").write_text("data")
    app, _ = Appliance.init(str(tmp_path / "data"), "passphrase", clock=Clock(at(4, 9)))
    app.catalog.ensure_asset("docs", "files", str(source))
    yield app
    app.close()


def _add_policy(app: Appliance, p: PolicyRecord, since: datetime) -> None:
    app.catalog.add_policy(p)
    app.catalog.reset_schedule_state(
        p.name, [e.key for e in parse_schedule(p.schedule).entries], since
    )


def _jobs(app: Appliance) -> list[str]:
    return [j.id for j in app.catalog.list_jobs(limit=1000) if j.kind == "policy_backup"]


def test_no_double_run_and_no_silent_skip_across_restarts(appliance: Appliance) -> None:
    _add_policy(appliance, policy(HOURLY), at(4, 9, 30))
    runner = JobRunner(appliance, max_parallel=0)  # jobs stay queued: only their creation counts
    first = Scheduler(appliance, runner)
    assert first.tick(at(4, 9, 59)) == []
    created = first.tick(at(4, 10, 0, 30))
    assert len(created) == 1
    job = appliance.catalog.get_job(created[0])
    assert job.params["mode"] == "incremental" and job.params["trigger"] == "schedule"
    # The service restarts (a new scheduler on the same catalog) within the same slot.
    second = Scheduler(appliance, runner)
    assert second.tick(at(4, 10, 0, 40)) == []
    assert len(_jobs(appliance)) == 1
    # Down from 10:01 to 13:30: one catch-up run for the 11:00, 12:00 and 13:00 slots ...
    appliance.catalog.update_job(created[0], state="running")
    appliance.catalog.update_job(created[0], state="succeeded")
    third = Scheduler(appliance, runner)
    caught_up = third.tick(at(4, 13, 30))
    assert len(caught_up) == 1 and len(_jobs(appliance)) == 2
    log = [line.message for line in appliance.catalog.job_log(caught_up[0])]
    assert any("3 slot(s) were missed" in line for line in log), log
    assert appliance.catalog.get_job(caught_up[0]).params["missed"] == 3
    # ... and nothing more until the next slot.
    assert third.tick(at(4, 13, 59)) == []
    assert appliance.catalog.schedule_state("p") == {"p": {HOURLY.key: at(4, 13)}}


def test_a_queued_run_absorbs_the_next_slot(appliance: Appliance) -> None:
    _add_policy(appliance, policy(HOURLY), at(4, 9, 30))
    scheduler = Scheduler(appliance, JobRunner(appliance, max_parallel=0))
    [queued] = scheduler.tick(at(4, 10, 0, 10))
    assert scheduler.tick(at(4, 11, 0, 10)) == []  # still queued: no second run piles up
    assert _jobs(appliance) == [queued]
    log = [line.message for line in appliance.catalog.job_log(queued)]
    assert any("also covers" in line for line in log)
    assert appliance.catalog.schedule_state("p")["p"][HOURLY.key] == at(4, 11)


def test_skipped_catch_up_is_audited(appliance: Appliance) -> None:
    _add_policy(appliance, policy(HOURLY, catch_up="skip"), at(4, 9, 30))
    scheduler = Scheduler(appliance, JobRunner(appliance, max_parallel=0))
    assert scheduler.tick(at(4, 14, 30)) == []
    [entry] = appliance.catalog.list_audit(1)
    assert (entry.actor, entry.action, entry.target) == ("scheduler", "schedule.skip", "p")
    assert "5 missed" in entry.details["skipped"][0]


def test_a_paused_scheduler_fires_nothing(appliance: Appliance) -> None:
    _add_policy(appliance, policy(HOURLY), at(4, 9, 30))
    scheduler = Scheduler(appliance, JobRunner(appliance, max_parallel=0))
    scheduler.paused = True
    assert scheduler.tick(at(4, 10, 0, 10)) == []
    assert appliance.catalog.schedule_state("p")["p"][HOURLY.key] == at(4, 9, 30)


def test_a_scheduled_backup_runs_and_then_prunes_by_the_policy(appliance: Appliance) -> None:
    p = PolicyRecord(
        name="nightly",
        assets=["docs"],
        schedule={"entries": [{"cron": "0 1 * * *", "mode": "incremental"}]},
        mode="incremental",
        retention={"keep_last": 1},
        rpo_seconds=86400,
    )
    _add_policy(appliance, p, at(4, 0))
    runner = JobRunner(appliance, max_parallel=2)
    runner.start()
    try:
        scheduler = Scheduler(appliance, runner)
        results = []
        for day in (4, 5):
            appliance.clock.now = at(day, 1, 0, 5)  # type: ignore[attr-defined]
            [job_id] = scheduler.tick(at(day, 1, 0, 5))
            job = runner.wait(job_id, timeout=60)
            assert job.state == "succeeded", job
            prune = runner.wait(job.result["prune_job"], timeout=60)  # type: ignore[index]
            assert prune.state == "succeeded" and prune.params["rules"] == {"keep_last": 1}
            results.append(job.result["point"])  # type: ignore[index]
        assert [pt.id for pt in appliance.catalog.list_points(asset="docs")] == [results[-1]]
    finally:
        runner.shutdown()


def test_scheduler_thread_ticks_at_start(appliance: Appliance) -> None:
    _add_policy(appliance, policy(HOURLY), at(4, 8))
    clock = Clock(at(4, 10, 30))
    scheduler = Scheduler(appliance, JobRunner(appliance, max_parallel=0), interval=60, clock=clock)
    scheduler.start()
    try:
        deadline = time.monotonic() + 10
        while not _jobs(appliance) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        scheduler.stop()
    assert len(_jobs(appliance)) == 1


# --- boot-test entries ------------------------------------------------------------------------------

DAILY_BOOT_TEST = ScheduleEntry("0 5 * * *", "boot_test")


def vm_policy(*entries: ScheduleEntry, catch_up: str = "once", name: str = "vmp") -> PolicyRecord:
    return replace(policy(*entries, catch_up=catch_up, name=name), assets=["vm1"])


def test_boot_test_entries_parse_and_round_trip_beside_backups() -> None:
    schedule = parse_schedule(
        {"entries": [{"cron": "0 * * * *"}, {"cron": "0  5 * * *", "mode": "boot_test"}]}
    )
    assert schedule.entries == (HOURLY, DAILY_BOOT_TEST)
    assert DAILY_BOOT_TEST.is_boot_test and not HOURLY.is_boot_test
    assert DAILY_BOOT_TEST.key == "boot_test 0 5 * * *"
    assert parse_schedule(schedule.document()) == schedule
    # An old document (no boot tests) is read as before.
    assert parse_schedule({"entries": [{"cron": "0 * * * *", "mode": "incremental"}]}).entries == (
        HOURLY,
    )
    with pytest.raises(InvalidInput, match="boot_test"):
        parse_schedule({"entries": [{"cron": "0 5 * * *", "mode": "boot-test"}]})


def test_boot_test_entries_are_for_vm_assets_only() -> None:
    schedule = parse_schedule(
        {"entries": [{"cron": "0 * * * *"}, {"cron": "0 5 * * *", "mode": "boot_test"}]}
    )
    check_schedule_for_asset(schedule, "vm1", "vm")
    check_schedule_for_asset(parse_schedule({"entries": [{"cron": "0 * * * *"}]}), "docs", "files")
    with pytest.raises(InvalidInput, match="docs is a folder asset") as info:
        check_schedule_for_asset(schedule, "docs", "files")
    assert info.value.details["entry"] == 1


def test_a_boot_test_due_with_a_backup_runs_beside_it_not_instead() -> None:
    p = vm_policy(HOURLY, DAILY_BOOT_TEST)
    state = {HOURLY.key: at(4, 4), DAILY_BOOT_TEST.key: at(3, 5)}
    decision = due_runs(p, state, at(4, 5, 0, 10))
    # The backup keeps its own mode (a boot test is not a "stronger" backup) ...
    assert decision.run_mode == "incremental" and decision.run_boot_test
    assert decision.fired == {HOURLY.key: at(4, 5), DAILY_BOOT_TEST.key: at(4, 5)}
    # ... and each part moves only its own entries' state.
    assert decision.fired_part(boot_test=False) == {HOURLY.key: at(4, 5)}
    assert decision.fired_part(boot_test=True) == {DAILY_BOOT_TEST.key: at(4, 5)}
    assert decision.missed == 0 and decision.boot_test_missed == 0
    assert decision.boot_test_log_lines()[0] == ("info", "scheduled boot test of policy vmp")
    assert "(boot test)" in decision.boot_test_log_lines()[1][1]
    # The next hour: only the backup.
    later = due_runs(p, decision.fired, at(4, 6, 0, 10))
    assert later.run_mode == "incremental" and not later.run_boot_test


def test_a_boot_test_alone_runs_no_backup() -> None:
    p = vm_policy(HOURLY, DAILY_BOOT_TEST)
    decision = due_runs(p, {HOURLY.key: at(4, 5), DAILY_BOOT_TEST.key: at(3, 5)}, at(4, 5, 0, 10))
    assert decision.run_mode is None and decision.run_boot_test


def test_boot_tests_follow_the_catch_up_rule() -> None:
    state = {DAILY_BOOT_TEST.key: at(1, 5)}
    once = due_runs(vm_policy(DAILY_BOOT_TEST), state, at(4, 12))
    assert once.run_boot_test and once.boot_test_missed == 3  # the 2nd, 3rd and 4th at 05:00
    assert once.fired == {DAILY_BOOT_TEST.key: at(4, 5)}
    assert any("3 slot(s) were missed" in m for _, m in once.boot_test_log_lines())
    skip = due_runs(vm_policy(DAILY_BOOT_TEST, catch_up="skip"), state, at(4, 12))
    assert not skip.run_boot_test and skip.skipped[0].entry == DAILY_BOOT_TEST
    assert skip.fired == {DAILY_BOOT_TEST.key: at(4, 5)}  # skipped for good, stated


@pytest.fixture
def boot_tests(appliance: Appliance) -> Iterator[Appliance]:
    """The appliance with a VM asset and the real boot_test job kind (no VM is booted: the
    runners below never start a job)."""
    appliance.catalog.ensure_asset("vm1", "vm", vm_source(["/nonexistent/vm1.raw"], None))
    manager = FailoverManager(appliance, accel="tcg")
    register_failover_jobs(manager)
    yield appliance
    manager.shutdown(grace=0)


def _kinds(app: Appliance) -> list[tuple[str, dict[str, Any]]]:
    jobs = sorted(app.catalog.list_jobs(limit=1000), key=lambda j: j.created_at)
    return [(j.kind, j.params) for j in jobs]


def test_scheduler_submits_a_boot_test_job_beside_the_backup(boot_tests: Appliance) -> None:
    app = boot_tests
    _add_policy(app, vm_policy(HOURLY, DAILY_BOOT_TEST), at(4, 4, 30))
    scheduler = Scheduler(app, JobRunner(app, max_parallel=0))
    created = scheduler.tick(at(4, 5, 0, 10))
    assert len(created) == 2
    (backup_kind, backup), (test_kind, test) = _kinds(app)
    assert backup_kind == "policy_backup" and backup["mode"] == "incremental"
    assert test_kind == "boot_test"
    assert test == {"asset": "vm1", "policy": "vmp", "trigger": "schedule", "missed": 0}
    boot_job = app.catalog.get_job(created[1])
    assert boot_job.resource == "asset:vm1,store"
    log = [line.message for line in app.catalog.job_log(boot_job.id)]
    assert log[0] == "scheduled boot test of policy vmp"
    # A restart within the slot fires nothing again.
    assert Scheduler(app, JobRunner(app, max_parallel=0)).tick(at(4, 5, 0, 40)) == []
    # The next day, the boot test still queued absorbs its next slot; the backups go on.
    app.catalog.update_job(created[0], state="running")
    app.catalog.update_job(created[0], state="succeeded")
    again = scheduler.tick(at(5, 5, 0, 10))
    assert [app.catalog.get_job(j).kind for j in again] == ["policy_backup"]
    assert [k for k, _ in _kinds(app)].count("boot_test") == 1
    assert any("also covers" in line.message for line in app.catalog.job_log(boot_job.id))
    assert app.catalog.schedule_state("vmp")["vmp"][DAILY_BOOT_TEST.key] == at(5, 5)


def test_missed_boot_tests_catch_up_once_after_downtime(boot_tests: Appliance) -> None:
    app = boot_tests
    _add_policy(app, vm_policy(DAILY_BOOT_TEST), at(1, 6))
    [job_id] = Scheduler(app, JobRunner(app, max_parallel=0)).tick(at(4, 9))
    job = app.catalog.get_job(job_id)
    assert job.kind == "boot_test" and job.params["missed"] == 3
    log = [line.message for line in app.catalog.job_log(job_id)]
    assert any("3 slot(s) were missed" in line for line in log), log


def test_without_the_boot_test_kind_the_scheduler_says_so(
    appliance: Appliance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delitem(JOB_KINDS, "boot_test", raising=False)
    appliance.catalog.ensure_asset("vm1", "vm", vm_source(["/nonexistent/vm1.raw"], None))
    _add_policy(appliance, vm_policy(HOURLY, DAILY_BOOT_TEST), at(4, 4, 30))
    scheduler = Scheduler(appliance, JobRunner(appliance, max_parallel=0))
    created = scheduler.tick(at(4, 5, 0, 10))
    # The backup still runs; the boot test is stated, not crashed on, and not retried.
    assert [appliance.catalog.get_job(j).kind for j in created] == ["policy_backup"]
    [entry] = [a for a in appliance.catalog.list_audit(10) if a.action.startswith("schedule.")]
    assert entry.action == "schedule.boot_test_unavailable" and entry.target == "vmp"
    assert "boot_test job kind is not registered" in entry.details["message"]
    assert "slot 2024-03-04T05:00:00+00:00" in entry.details["slots"][0]
    assert scheduler.tick(at(4, 5, 0, 40)) == []
    assert len(appliance.catalog.list_audit(10)) == 1
