"""The store's verify schedule: the pure decision with explicit times, the scheduler's tick
against a real appliance, and the settings API.

- A slot fires once, at or after its time; after downtime the newest missed slot runs once.
- The tick submits one ``verify`` job with the settings' budget (the nightly slice), none while
  a verify is still queued, and none for time before the schedule was set.
- ``PUT /api/settings/verify`` checks the cron (422 in words) and says when the next run is.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server

from appliance.engine import Appliance
from appliance.errors import InvalidInput
from appliance.jobs import JobRunner
from appliance.schedule import Scheduler
from appliance.verify_schedule import due_slot, load_schedule, set_schedule, verify_tick

NIGHTLY = "0 2 * * *"


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


def test_a_slot_is_due_once_at_or_after_its_time() -> None:
    assert due_slot(NIGHTLY, at(1, 12), at(2, 1, 59)) is None
    assert due_slot(NIGHTLY, at(1, 12), at(2, 2)) == at(2, 2)
    assert due_slot(NIGHTLY, at(2, 2), at(2, 9)) is None
    # After three nights off, the newest slot runs once.
    assert due_slot(NIGHTLY, at(2, 2), at(5, 7)) == at(5, 2)


def test_the_slot_is_read_in_the_appliances_time_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")  # UTC+1 in March before the change
    assert due_slot(NIGHTLY, at(1, 12), at(2, 0, 59), berlin) is None
    assert due_slot(NIGHTLY, at(1, 12), at(2, 1, 0), berlin) == at(2, 1)


def test_naive_times_are_refused() -> None:
    with pytest.raises(InvalidInput):
        due_slot(NIGHTLY, datetime(2026, 3, 1), at(2, 2))


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def appliance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Appliance]:
    monkeypatch.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
    monkeypatch.delenv("APPLIANCE_CATALOG_URL", raising=False)
    app, _ = Appliance.init(str(tmp_path / "data"), "passphrase", clock=Clock(at(1, 12)))
    yield app
    app.close()


def test_the_tick_submits_the_nightly_slice_with_its_budget(appliance: Appliance) -> None:
    runner = JobRunner(appliance, max_parallel=0)  # jobs stay queued: the test looks at them
    scheduler = Scheduler(appliance, runner)
    assert scheduler.tick(at(2, 2)) == []  # nothing scheduled: an appliance never set one
    appliance.catalog.put_settings("appliance", {"verify_max_bytes": 5_000_000})
    set_schedule(appliance, "0  2 * * *", at(1, 12))
    assert load_schedule(appliance).cron == NIGHTLY
    assert scheduler.tick(at(2, 1, 59)) == []
    [job_id] = scheduler.tick(at(2, 2, 0))
    job = appliance.catalog.get_job(job_id)
    assert (job.kind, job.params["max_bytes"], job.params["trigger"]) == (
        "verify",
        5_000_000,
        "schedule",
    )
    assert scheduler.tick(at(2, 2, 1)) == []  # the slot fired once
    # The next night's slot passes while last night's verify is still queued: no second one.
    assert scheduler.tick(at(3, 2, 0)) == []
    appliance.catalog.update_job(job_id, state="cancelled")
    [again] = scheduler.tick(at(4, 2, 0))
    assert appliance.catalog.get_job(again).params["slot"] == at(4, 2).isoformat()


def test_a_schedule_never_fires_for_time_before_it_was_set(appliance: Appliance) -> None:
    runner = JobRunner(appliance, max_parallel=0)
    set_schedule(appliance, NIGHTLY, at(5, 9))
    assert verify_tick(appliance, runner, at(5, 10)) == []
    set_schedule(appliance, None, at(5, 10))
    assert verify_tick(appliance, runner, at(9, 10)) == []


def test_a_bad_cron_is_refused(appliance: Appliance) -> None:
    with pytest.raises(InvalidInput, match="five fields"):
        set_schedule(appliance, "every night", at(1, 12))
    assert load_schedule(appliance).cron is None


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("verify-schedule")) as live:
        yield live


def test_the_api_shows_and_changes_the_verify_schedule(
    admin: httpx.Client, operator: httpx.Client
) -> None:
    shown = operator.get("/api/settings/verify").json()
    assert shown["cron"] is None and shown["next_at"] is None
    assert operator.put("/api/settings/verify", json={"cron": NIGHTLY}).status_code == 403
    r = admin.put("/api/settings/verify", json={"cron": "30 1 * * *"})
    assert r.status_code == 200, r.text
    saved = r.json()
    assert saved["cron"] == "30 1 * * *" and saved["timezone"] == "UTC"
    next_at = datetime.fromisoformat(saved["next_at"])
    assert (next_at.hour, next_at.minute) == (1, 30)
    r = admin.put("/api/settings/verify", json={"cron": "61 1 * * *"})
    assert r.status_code == 422 and "not a valid cron expression" in r.text
    assert admin.get("/api/settings/verify").json()["cron"] == "30 1 * * *"
    audit = admin.get("/api/audit", params={"limit": 5}).json()
    assert any(a["action"] == "settings.verify_schedule" for a in audit)
