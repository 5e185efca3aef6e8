"""The summary mail: when it is due and what it says (pure).

Settings (catalog setting ``alert_summary``): ``frequency`` ``daily`` (the default), ``weekly``
(Mondays) or ``off``, and ``hour`` (0-23, default 8) in the appliance's time zone. A summary is
due once per day (or week) at or after that hour, and only when there is something to say: an
alert still unresolved, or one raised since the last summary. A quiet appliance sends nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from typing import Any

from appliance.alerts.events import SEVERITIES
from appliance.alerts.records import AlertRecord
from appliance.errors import InvalidInput

FREQUENCIES = ("off", "daily", "weekly")


@dataclass(frozen=True)
class SummarySettings:
    frequency: str = "daily"
    hour: int = 8

    def to_dict(self) -> dict[str, Any]:
        return {"frequency": self.frequency, "hour": self.hour}


def parse_summary(document: Mapping[str, Any]) -> SummarySettings:
    frequency = document.get("frequency", "daily")
    if frequency not in FREQUENCIES:
        raise InvalidInput(f"the summary frequency is one of {', '.join(FREQUENCIES)}")
    hour = document.get("hour", 8)
    if not isinstance(hour, int) or isinstance(hour, bool) or not 0 <= hour <= 23:
        raise InvalidInput("the summary hour is a whole number from 0 to 23")
    return SummarySettings(frequency, hour)


def last_due(settings: SummarySettings, now: datetime, tz: tzinfo) -> datetime | None:
    """The newest time at or before ``now`` a summary was due; None when summaries are off."""
    if settings.frequency == "off":
        return None
    local = now.astimezone(tz)
    due = local.replace(hour=settings.hour, minute=0, second=0, microsecond=0)
    if due > local:
        due -= timedelta(days=1)
    if settings.frequency == "weekly":
        due -= timedelta(days=due.weekday())  # Monday
    return due


def summary_due(
    settings: SummarySettings,
    last_sent: datetime | None,
    alerts: Sequence[AlertRecord],
    now: datetime,
    tz: tzinfo,
) -> bool:
    due = last_due(settings, now, tz)
    if due is None or (last_sent is not None and last_sent >= due):
        return False
    return any(
        a.resolved_at is None or last_sent is None or a.last_seen > last_sent for a in alerts
    )


def _plural(count: int, one: str) -> str:
    return f"{count} {one}" + ("" if count == 1 else "s")


def summary_text(
    alerts: Sequence[AlertRecord], last_sent: datetime | None, appliance_name: str
) -> tuple[str, str]:
    """(title, body) of the summary of ``alerts`` (the unresolved ones and those since the
    last summary)."""
    unresolved = [a for a in alerts if a.resolved_at is None]
    order = {s: i for i, s in enumerate(SEVERITIES)}
    unresolved.sort(key=lambda a: (order.get(a.severity, 9), a.first_seen))
    resolved = [
        a
        for a in alerts
        if a.resolved_at is not None and (last_sent is None or a.last_seen > last_sent)
    ]
    verb = "needs" if len(unresolved) == 1 else "need"
    title = f"{appliance_name}: {_plural(len(unresolved), 'alert')} {verb} attention"
    if not unresolved:
        title = f"{appliance_name}: all clear"
    lines = []
    if unresolved:
        lines.append("Still unresolved:")
        for a in unresolved:
            seen = "acknowledged" if a.acknowledged_at else "not acknowledged"
            lines.append(f"- [{a.severity}] {a.message} ({seen})")
    else:
        lines.append("Nothing needs attention.")
    if resolved:
        lines += ["", "Resolved since the last summary:"]
        lines += [f"- {a.message}" for a in resolved]
    return title, "\n".join(lines)
