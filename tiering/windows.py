"""Time windows of tiering runs: pure functions of a cron expression, the window's length and
the time (UTC)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from croniter import croniter


def due_slot(cron: str, last: datetime, now: datetime) -> datetime | None:
    """The newest slot of ``cron`` in ``(last, now]``, or None."""
    slot: datetime = croniter(cron, now.astimezone(UTC) + timedelta(microseconds=1)).get_prev(
        datetime
    )
    return slot if slot > last else None


def next_slot(cron: str, after: datetime) -> datetime:
    found: datetime = croniter(cron, after.astimezone(UTC)).get_next(datetime)
    return found


def window_of(
    cron: str, slot: datetime, hours: float | None
) -> tuple[datetime | None, datetime | None]:
    """``(until, next window)`` of a run started at ``slot``: no window, no limit."""
    if hours is None:
        return None, None
    return slot + timedelta(hours=hours), next_slot(cron, slot)


def current_window(cron: str, hours: float, now: datetime) -> tuple[datetime, datetime, bool]:
    """``(until, next window, open now)``: the window of the newest slot at or before ``now``,
    whether ``now`` is inside it, and when the next one opens."""
    slot: datetime = croniter(cron, now.astimezone(UTC) + timedelta(microseconds=1)).get_prev(
        datetime
    )
    until = slot + timedelta(hours=hours)
    return until, next_slot(cron, now), now < until
