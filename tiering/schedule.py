"""When tiering runs by itself: the settings' cron and time window, decided by pure functions.

The scheduler (:class:`appliance.schedule.Scheduler`) calls :func:`tiering_tick` in each tick.
A slot of the settings' cron that passed since the last one fired submits one ``tier`` job whose
window ends ``window_hours`` after the slot (the job then waits for the next slot). Missed slots
are never run one by one: after downtime the newest missed slot runs once. No second run is
queued while one is queued, running or waiting. The state (the last slot fired) is a catalog
setting, so a restart neither repeats nor loses a slot.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from appliance.engine import Appliance
from appliance.jobs import JobRunner
from tiering.windows import due_slot, window_of
from tiering.work import load_settings

STATE_KEY = "tiering_state"
_ACTIVE = ("queued", "running", "waiting")


def tiering_tick(app: Appliance, runner: JobRunner) -> Callable[[datetime], list[str]]:
    """The scheduler's hook: submit a ``tier`` job when a slot of the settings' cron is due."""

    def tick(now: datetime) -> list[str]:
        settings = load_settings(app)
        cron = settings.schedule.cron
        if cron is None or not settings.rules:
            return []
        state = app.catalog.get_settings(STATE_KEY)
        if "last_slot" not in state:  # a schedule never fires for time before it existed
            app.catalog.put_settings(STATE_KEY, {"last_slot": now.isoformat()})
            return []
        slot = due_slot(cron, datetime.fromisoformat(state["last_slot"]), now)
        if slot is None:
            return []
        app.catalog.put_settings(STATE_KEY, {"last_slot": slot.isoformat()})
        if any(job.kind == "tier" for s in _ACTIVE for job in app.catalog.list_jobs(state=s)):
            return []
        until, next_window = window_of(cron, slot, settings.schedule.window_hours)
        params: dict[str, object] = {"trigger": "schedule", "slot": slot.isoformat()}
        if until is not None and next_window is not None:
            params |= {"cron": cron, "window_hours": settings.schedule.window_hours}
        return [runner.submit("tier", params).id]

    return tick
