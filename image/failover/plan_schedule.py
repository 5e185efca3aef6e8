"""Scheduled test runs of recovery plans: a plan's ``test_cron`` submits ``plan_test`` jobs.

:func:`plan_test_tick` is one of the scheduler's ``extra_ticks`` (:class:`appliance.schedule.
Scheduler`). Each tick, for each plan with a schedule, the newest slot in ``(last slot, now]``
(:func:`appliance.verify_schedule.due_slot`, pure) fires: the plan's last slot moves and the job
is created in one catalog transaction (:meth:`Catalog.fire_plan_test`), which does nothing when
another tick moved the slot first, so a slot runs at most once and a restart loses none. Missed
slots are never run one by one: after downtime the newest one runs once. A test of the plan
still queued or running covers the slot (recorded as fired, no second job). A schedule never
fires for time before it was set (the catalog starts it at the moment it is set).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo

from appliance.engine import Appliance
from appliance.jobs import JOB_KINDS
from appliance.verify_schedule import due_slot

log = logging.getLogger(__name__)

PLAN_TEST_KIND = "plan_test"
_ACTIVE = ("queued", "running", "waiting")


def plan_test_tick(app: Appliance, tz: tzinfo = UTC) -> Callable[[datetime], list[str]]:
    """The scheduler hook: submit every plan's due test run; returns the new jobs' IDs."""

    def tick(now: datetime) -> list[str]:
        catalog = app.catalog
        due = []
        for plan in catalog.list_plans():
            last = plan.test_last_slot
            if plan.test_cron is None or last is None:
                continue
            slot = due_slot(plan.test_cron, last, now, tz)
            if slot is not None:
                due.append((plan, last, slot))
        if not due:  # the common tick: no job list read
            return []
        busy = {
            str(job.params.get("plan"))
            for state in _ACTIVE
            for job in catalog.list_jobs(state=state, limit=1000)
            if job.kind == PLAN_TEST_KIND
        }
        created: list[str] = []
        for plan, last, slot in due:
            params = {
                "plan": plan.id,
                "name": plan.name,
                "assets": plan.assets,
                "trigger": "schedule",
                "slot": slot.isoformat(),
            }
            runnable = PLAN_TEST_KIND in JOB_KINDS and plan.id not in busy
            if PLAN_TEST_KIND not in JOB_KINDS:
                log.warning("plan %s: scheduled test not run (no failover manager)", plan.name)
            resources = JOB_KINDS[PLAN_TEST_KIND].resources(params) if runnable else []
            job = catalog.fire_plan_test(
                plan.id,
                last,
                slot,
                job_kind=PLAN_TEST_KIND if runnable else None,
                params=params,
                resource=",".join(name for name, _ in resources) or None,
                log=[("info", f"scheduled test run of plan {plan.name}, slot {slot.isoformat()}")],
            )
            if job is not None:
                created.append(job.id)
        return created

    return tick
