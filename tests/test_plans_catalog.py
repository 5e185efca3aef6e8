"""Recovery plans in the catalog (revision 0010) and their scheduled test runs (no QEMU).

The real catalog (the data directory's SQLite), the real job kinds (registered with a failover
manager that boots nothing here) and the real scheduler hook, ticked with explicit times.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from engine_support import PASSPHRASE, set_engine_env

from appliance.engine import Appliance
from appliance.errors import Conflict, NotFound
from appliance.jobs import JOB_KINDS
from image.failover import FailoverManager, register_failover_jobs
from image.failover.plan_schedule import plan_test_tick

GROUPS = [
    {
        "vms": [{"asset": "dc", "network": None, "point": None}],
        "after": "proof",
        "delay_seconds": 0,
    },
    {
        "vms": [{"asset": "app", "network": None, "point": None}],
        "after": "proof",
        "delay_seconds": 0,
    },
]


@pytest.fixture()
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Appliance]:
    set_engine_env(monkeypatch)
    appliance, _ = Appliance.init(str(tmp_path / "data"), PASSPHRASE)
    for name in ("dc", "app"):
        appliance.catalog.add_asset(name, "vm", f"/vms/{name}.raw")
    yield appliance
    appliance.close()


@pytest.fixture()
def plan_kinds(app: Appliance, tmp_path: Path) -> Iterator[None]:
    saved = {k: JOB_KINDS.get(k) for k in ("plan_test", "plan_failover")}
    manager = FailoverManager(app, state_dir=str(tmp_path / "failover"))
    register_failover_jobs(manager)
    yield
    manager.shutdown()
    for name, kind in saved.items():
        if kind is None:
            JOB_KINDS.pop(name, None)
        else:
            JOB_KINDS[name] = kind


def test_plans_are_stored_listed_updated_and_deleted(app: Appliance) -> None:
    catalog = app.catalog
    plan = catalog.add_plan("site", GROUPS)
    assert plan.assets == ["dc", "app"] and plan.test_cron is None
    assert plan.test_last_slot is None
    assert [p.name for p in catalog.list_plans()] == ["site"]
    with pytest.raises(Conflict, match="already exists"):
        catalog.add_plan("site", GROUPS)
    with pytest.raises(NotFound, match="asset ghost"):
        catalog.add_plan("other", [{"vms": [{"asset": "ghost"}]}])
    changed = catalog.update_plan(plan.id, name="site b", groups=GROUPS[:1], test_cron="0 4 * * *")
    assert changed.name == "site b" and changed.assets == ["dc"]
    assert changed.test_cron == "0 4 * * *" and changed.test_last_slot is not None
    run = catalog.add_plan_run(changed, "test", datetime(2026, 12, 5, tzinfo=UTC), job_id="j1")
    assert run.state == "running" and run.finished_at is None
    done = catalog.update_plan_run(run.id, result={"total_rto_seconds": 9.5}, state="succeeded")
    assert done.finished_at is not None and done.result == {"total_rto_seconds": 9.5}
    catalog.delete_plan(plan.id)
    assert catalog.list_plans() == []
    with pytest.raises(NotFound):
        catalog.get_plan(plan.id)
    # Runs are history: they outlive the plan, with its name.
    kept = catalog.list_plan_runs(plan.id)
    assert [(r.id, r.plan_name, r.state) for r in kept] == [(run.id, "site b", "succeeded")]


def test_a_scheduled_test_fires_once_per_slot(app: Appliance, plan_kinds: None) -> None:
    catalog = app.catalog
    plan = catalog.add_plan("site", GROUPS, test_cron="0 * * * *")
    start = plan.test_last_slot
    assert start is not None
    tick = plan_test_tick(app)
    later = start.replace(minute=0, second=0, microsecond=0) + timedelta(hours=2, minutes=5)
    first = tick(later)
    assert len(first) == 1
    job = catalog.get_job(first[0])
    assert job.kind == "plan_test"
    assert job.params["plan"] == plan.id and job.params["assets"] == ["dc", "app"]
    assert job.params["slot"] == (later - timedelta(minutes=5)).isoformat()
    assert job.resource == "plan:" + plan.id + ",asset:app,asset:dc,store"
    # The same slot again (a second tick, a restart): no second job.
    assert tick(later) == []
    assert tick(later + timedelta(minutes=10)) == []
    # The next slot while the first test is still queued: covered by it, no second job...
    assert tick(later + timedelta(hours=1)) == []
    assert catalog.get_plan(plan.id).test_last_slot == later + timedelta(hours=1, minutes=-5)
    # ...and once it ended, the next slot runs.
    catalog.update_job(job.id, state="cancelled")
    assert len(tick(later + timedelta(hours=2))) == 1


def test_two_ticks_racing_for_one_slot_make_one_job(app: Appliance, plan_kinds: None) -> None:
    catalog = app.catalog
    plan = catalog.add_plan("site", GROUPS, test_cron="0 * * * *")
    last = plan.test_last_slot
    assert last is not None
    slot = last.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    made = catalog.fire_plan_test(
        plan.id, last, slot, job_kind="plan_test", params={"plan": plan.id}, resource=None
    )
    # The other tick read the same old slot: it must do nothing.
    again = catalog.fire_plan_test(
        plan.id, last, slot, job_kind="plan_test", params={"plan": plan.id}, resource=None
    )
    assert made is not None and again is None
    assert [j.id for j in catalog.list_jobs() if j.kind == "plan_test"] == [made.id]
