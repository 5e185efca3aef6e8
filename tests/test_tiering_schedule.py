"""When tiering runs by itself: slots of the settings' cron, windows, and the scheduler's tick."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.engine import Appliance
from appliance.jobs import JobRunner
from appliance.schedule import Scheduler
from tiering.schedule import STATE_KEY, tiering_tick
from tiering.windows import current_window, due_slot, window_of
from tiering.work import register_tiering_jobs, save_settings

T0 = datetime(2026, 3, 2, 0, 30, tzinfo=UTC)
NIGHTLY = "0 1 * * *"


def test_due_slot_is_the_newest_slot_since_the_last() -> None:
    assert due_slot(NIGHTLY, T0, T0 + timedelta(minutes=20)) is None
    assert due_slot(NIGHTLY, T0, T0 + timedelta(minutes=30)) == datetime(
        2026, 3, 2, 1, 0, tzinfo=UTC
    )
    # After three days down: the newest slot, once.
    assert due_slot(NIGHTLY, T0, T0 + timedelta(days=3)) == datetime(2026, 3, 4, 1, 0, tzinfo=UTC)
    slot = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
    assert due_slot(NIGHTLY, slot, slot + timedelta(hours=5)) is None


def test_a_window_ends_after_its_hours_and_the_next_one_starts_at_the_next_slot() -> None:
    slot = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
    assert window_of(NIGHTLY, slot, 6) == (
        datetime(2026, 3, 2, 7, 0, tzinfo=UTC),
        datetime(2026, 3, 3, 1, 0, tzinfo=UTC),
    )
    assert window_of(NIGHTLY, slot, None) == (None, None)
    # A run woken later finds the window it is in (or that it is outside one).
    inside = current_window(NIGHTLY, 6, slot + timedelta(days=1, hours=2))
    assert inside == (
        datetime(2026, 3, 3, 7, 0, tzinfo=UTC),
        datetime(2026, 3, 4, 1, 0, tzinfo=UTC),
        True,
    )
    assert current_window(NIGHTLY, 6, slot + timedelta(hours=8))[2] is False


@pytest.fixture()
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Appliance]:
    monkeypatch.setenv("APPLIANCE_TEST_WEAK_KDF", "1")
    monkeypatch.delenv("APPLIANCE_CATALOG_URL", raising=False)
    appliance, _ = Appliance.init(str(tmp_path / "data"), "pw")
    yield appliance
    appliance.close()


def test_the_scheduler_submits_one_tier_job_per_due_slot(app: Appliance) -> None:
    register_tiering_jobs()
    save_settings(
        app,
        {
            "rules": [{"name": "m", "location": "cold", "classes": ["monthly"]}],
            "schedule": {"cron": NIGHTLY, "window_hours": 4},
        },
    )
    runner = JobRunner(app)  # not started: the jobs stay queued for the test to read
    scheduler = Scheduler(app, runner, clock=lambda: T0)
    scheduler.extra_ticks.append(tiering_tick(app, runner))
    assert scheduler.tick(T0) == []  # the first tick only starts the clock
    assert app.catalog.get_settings(STATE_KEY) == {"last_slot": T0.isoformat()}
    assert scheduler.tick(T0 + timedelta(minutes=10)) == []
    created = scheduler.tick(T0 + timedelta(hours=1))
    assert len(created) == 1
    job = app.catalog.get_job(created[0])
    assert job.kind == "tier" and job.params["trigger"] == "schedule"
    assert (job.params["cron"], job.params["window_hours"]) == (NIGHTLY, 4)
    # The next night's slot passes while that run is still queued: no second run.
    assert scheduler.tick(T0 + timedelta(days=1, hours=1)) == []
    assert app.catalog.get_settings(STATE_KEY)["last_slot"] == "2026-03-03T01:00:00+00:00"
    # Paused: nothing at all.
    scheduler.paused = True
    assert scheduler.tick(T0 + timedelta(days=5)) == []
