"""Retention: which recovery points to keep, as a pure function of the points and the rules.

Semantics (the ones restic and borg users know): ``keep_last`` keeps the N newest points; each
``keep_<period>`` keeps the newest point of each of the last N periods (hour, day, ISO week,
month, year) that have a point. A point kept by any rule is kept. With no rule at all nothing is
removed (a retention run never empties an asset by accident). Periods are taken in UTC.

A ransomware hold (:func:`ransomware_holds`) overrides the rules: while a point is suspicious and
no person has found it expected (``appliance.ransomware.needs_hold``), that point and the newest
clean point before it are kept, whatever the rules say, and the decision names them in ``held``.
Pruning the clean past is exactly what an attacker who encrypted the source would want.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from appliance.ransomware import needs_hold


class HasCreated(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...


class HasSuspicion(HasCreated, Protocol):
    @property
    def suspicion(self) -> list[str]: ...

    @property
    def review(self) -> dict[str, Any] | None: ...


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
    #: Points kept by a ransomware hold, whatever the rules: point id -> why, in words.
    held: dict[str, str] = field(default_factory=dict)


HELD_SUSPICIOUS = "suspicious: kept until a person looks at it"
HELD_CLEAN = "the last clean point before a suspicious one: kept until a person looks"


def ransomware_holds(points: Sequence[HasSuspicion]) -> dict[str, str]:
    """The points a ransomware hold keeps: each point that needs a hold, and the newest clean
    point created before each of them (point id -> why)."""
    oldest_first = sorted(points, key=lambda p: (p.created_at, p.id))
    held: dict[str, str] = {}
    last_clean: str | None = None
    for point in oldest_first:
        if needs_hold(point.suspicion, point.review):
            held[point.id] = HELD_SUSPICIOUS
            if last_clean is not None:
                held.setdefault(last_clean, HELD_CLEAN)
        else:
            last_clean = point.id
    return held


def apply_retention(
    points: Sequence[HasCreated],
    rules: RetentionRules,
    holds: Mapping[str, str] | None = None,
) -> RetentionDecision:
    """Which points the rules keep and which they remove; ``holds`` (from
    :func:`ransomware_holds`) are kept whatever the rules say."""
    newest_first = sorted(points, key=lambda p: (p.created_at, p.id), reverse=True)
    held = {p.id: holds[p.id] for p in newest_first if holds and p.id in holds}
    if rules.empty():
        return RetentionDecision({p.id: ["no rules"] for p in newest_first}, [], held)
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
    for point_id in held:
        reasons.setdefault(point_id, []).append("held")
    remove = [p.id for p in newest_first if p.id not in reasons]
    return RetentionDecision(reasons, remove, held)
