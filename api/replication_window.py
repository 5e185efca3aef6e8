"""When replication may run: a peer's time window, as a pure decision.

A peer location's option ``window`` is null (any time) or ``{"start": "HH:MM", "end": "HH:MM"}``
in the appliance's local time zone (the ``timezone`` of the service settings). The window is
``start <= time < end``; an ``end`` before ``start`` wraps midnight (22:00 to 06:00 is open from 22:00
to 06:00 the next morning); ``start == end`` is refused, since it could mean "always" or "never".

:func:`window_state` is the one decision, taking the time explicitly so that tests need no
clock: whether the window is open at ``now`` and, when it is not, when it opens next (in UTC).
The replicate job asks it before each point (a job running when the window closes finishes the
point it is copying, then waits until the next opening); the scheduler's replication tick asks it
to wake jobs that wait for the window and to hold back catch-up runs outside it.

Local opening times are built from the local date and the window's start with the zone's rules,
so a window keeps its wall-clock hours across daylight-saving changes; a start that falls in the
hour a spring change skips opens at the zone's reading of that time (an hour later, in UTC terms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo
from typing import Any

from appliance.engine import Appliance
from appliance.errors import InvalidInput
from appliance.schedule import timezone_named

#: The service's settings document and its time-zone field (``api.service.SETTINGS_KEY``; read
#: here by name because ``api.service`` imports the replication modules at start).
APPLIANCE_SETTINGS_KEY = "appliance"
TIMEZONE_FIELD = "timezone"
#: The words a job waiting for its window starts with (the tick tells window waits apart).
WINDOW_WAIT = "outside the replication window"

_HH_MM = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])$")


@dataclass(frozen=True)
class Window:
    """Replication is allowed from ``start`` (inclusive) to ``end`` (exclusive), local time."""

    start: time
    end: time

    @property
    def wraps(self) -> bool:
        """Whether the window runs over midnight (22:00 to 06:00)."""
        return self.end < self.start

    def words(self) -> str:
        return f"{self.start:%H:%M}\N{EN DASH}{self.end:%H:%M}"

    def to_option(self) -> dict[str, str]:
        return {"start": f"{self.start:%H:%M}", "end": f"{self.end:%H:%M}"}


@dataclass(frozen=True)
class WindowState:
    open: bool
    #: When the window opens next (UTC); None while it is open.
    next_open: datetime | None


def _clock_time(text: Any, field: str) -> time:
    match = _HH_MM.match(text) if isinstance(text, str) else None
    if match is None:
        raise InvalidInput(f"window.{field} must be a time HH:MM (00:00 to 23:59), not {text!r}")
    return time(int(match.group(1)), int(match.group(2)))


def parse_window(value: Any) -> Window | None:
    """A window option (``None`` or ``{"start": "HH:MM", "end": "HH:MM"}``) checked; InvalidInput
    otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"start", "end"}:
        raise InvalidInput('a replication window is {"start": "HH:MM", "end": "HH:MM"} or null')
    window = Window(_clock_time(value["start"], "start"), _clock_time(value["end"], "end"))
    if window.start == window.end:
        raise InvalidInput(
            "a replication window's start and end must differ (null allows any time)",
            window=window.to_option(),
        )
    return window


def _opening(day: datetime, window: Window, tz: tzinfo) -> datetime:
    return datetime.combine(day.date(), window.start, tzinfo=tz).astimezone(UTC)


def window_state(now: datetime, window: Window | None, tz: tzinfo = UTC) -> WindowState:
    """Whether replication may run at ``now`` (timezone-aware) under ``window`` in zone ``tz``,
    and when the window opens next if not (see the module docstring)."""
    if now.tzinfo is None:
        raise InvalidInput("the time a window is checked at must be timezone-aware")
    if window is None:
        return WindowState(True, None)
    local = now.astimezone(tz)
    moment = local.time()
    if window.wraps:
        is_open = moment >= window.start or moment < window.end
    else:
        is_open = window.start <= moment < window.end
    if is_open:
        return WindowState(True, None)
    # Closed: the window opens today at its start if that is still ahead, else tomorrow. (A
    # wrapping window closed now always opens later today: it is closed from end to start.)
    opening = _opening(local, window, tz)
    if opening <= now:
        opening = _opening(local + timedelta(days=1), window, tz)
    return WindowState(False, opening)


def wait_words(window: Window, next_open: datetime, tz: tzinfo) -> str:
    """The reason a job waits: "outside the replication window 22:00 to 06:00; starts at 22:00"
    (the opening in local time: it is always within a day)."""
    local = next_open.astimezone(tz)
    return f"{WINDOW_WAIT} {window.words()}; starts at {local:%H:%M}"


def local_timezone(app: Appliance) -> tzinfo:
    """The appliance's time zone (its settings' ``timezone``; UTC when unset or unknown)."""
    name = app.catalog.get_settings(APPLIANCE_SETTINGS_KEY).get(TIMEZONE_FIELD) or "UTC"
    try:
        return timezone_named(str(name))
    except InvalidInput:
        return UTC
