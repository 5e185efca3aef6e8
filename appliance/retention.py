"""Retention: which recovery points to keep, as a pure function of the points and the rules.

Semantics (the ones restic and borg users know): ``keep_last`` keeps the N newest points; each
``keep_<period>`` keeps the newest point of each of the last N periods (hour, day, ISO week,
month, year) that have a point. A point kept by any rule is kept. With no rule at all nothing is
removed (a retention run never empties an asset by accident). Periods are taken in UTC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol


class HasCreated(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...


@dataclass(frozen=True)
class RetentionRules:
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0

    def empty(self) -> bool:
        return not any(vars(self).values())


_PERIODS: list[tuple[str, Callable[[datetime], tuple[int, ...]]]] = [
    ("keep_hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("keep_daily", lambda t: (t.year, t.month, t.day)),
    ("keep_weekly", lambda t: tuple(t.isocalendar()[:2])),
    ("keep_monthly", lambda t: (t.year, t.month)),
    ("keep_yearly", lambda t: (t.year,)),
]


@dataclass(frozen=True)
class RetentionDecision:
    keep: dict[str, list[str]]  # point id -> reasons
    remove: list[str]


def apply_retention(points: Sequence[HasCreated], rules: RetentionRules) -> RetentionDecision:
    newest_first = sorted(points, key=lambda p: (p.created_at, p.id), reverse=True)
    if rules.empty():
        return RetentionDecision({p.id: ["no rules"] for p in newest_first}, [])
    reasons: dict[str, list[str]] = {}
    for point in newest_first[: rules.keep_last]:
        reasons.setdefault(point.id, []).append("last")
    for attr, bucket in _PERIODS:
        wanted = getattr(rules, attr)
        seen: set[tuple[int, ...]] = set()
        for point in newest_first:
            if len(seen) >= wanted:
                break
            key = bucket(point.created_at.astimezone(UTC))
            if key not in seen:
                seen.add(key)
                reasons.setdefault(point.id, []).append(attr.removeprefix("keep_"))
    remove = [p.id for p in newest_first if p.id not in reasons]
    return RetentionDecision(reasons, remove)
