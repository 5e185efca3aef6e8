"""The store's verify on a schedule: a slice of the store each night, the whole over many.

A verify with a budget (the settings' ``verify_max_bytes``) reads the least recently verified
data first and records what it covered, so slices run on a schedule cover the whole store in
turn (:mod:`appliance.maintenance`). This module decides when such a slice runs.

- The schedule is a catalog settings document ``verify_schedule``: ``{"cron": "0 2 * * *"}``
  (a five-field cron expression read in the scheduler's time zone) or ``{"cron": null}``: not
  scheduled, which is also what an appliance that never set one has.
- :func:`due_slot` is the pure decision: the newest slot of the cron in ``(last, now]``, or None.
  Missed slots are never run one by one: after downtime, the newest one runs once.
- :func:`verify_tick` acts on it in each scheduler tick (:class:`appliance.schedule.Scheduler`):
  it records the slot (``verify_schedule_state``) and submits one ``verify`` job
  ``{"max_bytes": budget, "trigger": "schedule"}``, unless a verify is already queued, running
  or waiting (the slot is then recorded as covered by it). A schedule never fires for time before
  it was set: the first tick after a change only records ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from croniter import CroniterBadDateError, croniter

from appliance.cron import check_cron
from appliance.engine import Appliance
from appliance.errors import InvalidInput
from appliance.jobs import JobRunner

SETTINGS_KEY = "verify_schedule"
STATE_KEY = "verify_schedule_state"
#: Where the budget of a verify lives: the service's settings document (the same budget
#: "Verify now" uses).
BUDGET_DOCUMENT, BUDGET_FIELD = "appliance", "verify_max_bytes"
VERIFY_KIND = "verify"
_ACTIVE = ("queued", "running", "waiting")


@dataclass(frozen=True)
class VerifySchedule:
    cron: str | None

    def document(self) -> dict[str, Any]:
        return {"cron": self.cron}


def load_schedule(app: Appliance) -> VerifySchedule:
    """The stored schedule; a stored cron that no longer parses counts as none."""
    raw = app.catalog.get_settings(SETTINGS_KEY).get("cron")
    if raw is None:
        return VerifySchedule(None)
    try:
        return VerifySchedule(check_cron(raw))
    except InvalidInput:
        return VerifySchedule(None)


def due_slot(cron: str, last: datetime, now: datetime, tz: tzinfo = UTC) -> datetime | None:
    """The newest slot of ``cron`` in ``(last, now]`` (UTC), or None when none lies there."""
    if last.tzinfo is None or now.tzinfo is None:
        raise InvalidInput("schedule times must be timezone-aware")
    if now <= last:
        return None
    try:
        # The microsecond makes a slot exactly at ``now`` count.
        prev = croniter(cron, now.astimezone(tz) + timedelta(microseconds=1)).get_prev(datetime)
    except CroniterBadDateError:
        return None
    slot = prev.astimezone(UTC)
    return slot if last < slot <= now else None


def next_slot(cron: str | None, after: datetime, tz: tzinfo = UTC) -> datetime | None:
    """The first slot of ``cron`` after ``after`` (UTC), or None."""
    if cron is None:
        return None
    try:
        return croniter(cron, after.astimezone(tz)).get_next(datetime).astimezone(UTC)
    except CroniterBadDateError:
        return None


def set_schedule(app: Appliance, cron: str | None, now: datetime) -> VerifySchedule:
    """Store a new schedule (``cron`` checked; None: not scheduled); it starts at ``now``."""
    schedule = VerifySchedule(None if cron is None else check_cron(cron))
    app.catalog.put_settings(SETTINGS_KEY, schedule.document())
    app.catalog.put_settings(STATE_KEY, {"last_slot": now.astimezone(UTC).isoformat()})
    return schedule


def last_slot(app: Appliance) -> datetime | None:
    """The slot the schedule last fired for (or when it was set), None when never."""
    raw = app.catalog.get_settings(STATE_KEY).get("last_slot")
    return datetime.fromisoformat(raw) if isinstance(raw, str) else None


def verify_tick(app: Appliance, runner: JobRunner, now: datetime, tz: tzinfo = UTC) -> list[str]:
    """Submit the scheduled verify when a slot is due; returns the new job's ID (or none)."""
    schedule = load_schedule(app)
    if schedule.cron is None:
        return []
    last = last_slot(app)
    if last is None:
        app.catalog.put_settings(STATE_KEY, {"last_slot": now.astimezone(UTC).isoformat()})
        return []
    slot = due_slot(schedule.cron, last, now, tz)
    if slot is None:
        return []
    app.catalog.put_settings(STATE_KEY, {"last_slot": slot.isoformat()})
    if any(job.kind == VERIFY_KIND for s in _ACTIVE for job in app.catalog.list_jobs(state=s)):
        return []
    budget = app.catalog.get_settings(BUDGET_DOCUMENT).get(BUDGET_FIELD)
    params = {"max_bytes": budget, "trigger": "schedule", "slot": slot.isoformat()}
    return [runner.submit(VERIFY_KIND, params).id]
