"""How well each asset is protected, and how fast the pool fills: pure functions of records.

The dashboard, ``/metrics`` and (later) alerts all ask the same questions, so the answers are
computed here from catalog records and an explicit ``now``:

- **last good point**: the newest point of the asset that is complete and whose last
  verification (if any) did not find damage;
- **RPO status**: ``met`` when that point is no older than the asset's RPO target (the tightest
  ``rpo_seconds`` among its policies; 0 means "no target"), ``missed`` when it is older or there
  is none, ``none`` when no policy sets a target;
- **growth**: bytes the pool gained per day, as the slope of a least-squares line through the
  cumulative ``stored_bytes`` of the points made in the last ``days`` days (one sample per day,
  empty days included), and the days left until the free space is used up at that rate. The
  line starts at the window's start or at the day of the oldest point, whichever is later (the
  days before the first backup say nothing about the rate), and with fewer than
  :data:`MIN_TREND_DAYS` days of history there is no trend at all: a new appliance's first
  backup is not a rate to forecast from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from appliance.catalog.records import PointRecord, PolicyRecord

RPO_MET = "met"
RPO_MISSED = "missed"
RPO_NONE = "none"
#: Days of history a growth trend needs (see the module docstring).
MIN_TREND_DAYS = 7


def is_good(point: PointRecord) -> bool:
    return point.status == "complete" and point.verify_status != "damaged"


def last_good_point(points: Iterable[PointRecord]) -> PointRecord | None:
    good = [p for p in points if is_good(p)]
    return max(good, key=lambda p: (p.created_at, p.id)) if good else None


def rpo_target(policies: Iterable[PolicyRecord]) -> int | None:
    """The tightest RPO (seconds) among the policies; None when none sets one."""
    targets = [p.rpo_seconds for p in policies if p.rpo_seconds > 0]
    return min(targets) if targets else None


def rpo_status(last_good: PointRecord | None, target: int | None, now: datetime) -> str:
    if target is None:
        return RPO_NONE
    if last_good is None:
        return RPO_MISSED
    age = (now - last_good.created_at).total_seconds()
    return RPO_MET if age <= target else RPO_MISSED


@dataclass(frozen=True)
class Growth:
    bytes_per_day: float
    #: (day start, cumulative bytes stored since the window began) per day, oldest first.
    series: list[tuple[datetime, int]]
    #: Days of history the trend looked at (from the oldest point, at most the window); below
    #: :data:`MIN_TREND_DAYS` ``bytes_per_day`` is 0: too early to tell.
    history_days: int = 0

    def days_until_full(self, free_bytes: int) -> float | None:
        if self.bytes_per_day <= 0:
            return None
        return free_bytes / self.bytes_per_day


def growth(points: Sequence[PointRecord], now: datetime, days: int = 30) -> Growth:
    """Linear growth trend of stored bytes over the last ``days`` days."""
    start = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    per_day = [0] * days
    for point in points:
        index = (point.created_at - start).days
        if 0 <= index < days:
            per_day[index] += point.stored_bytes
    series: list[tuple[datetime, int]] = []
    total = 0
    for i, added in enumerate(per_day):
        total += added
        series.append((start + timedelta(days=i), total))
    oldest = min((p.created_at for p in points), default=None)
    first = days if oldest is None else min(days, max(0, (oldest - start).days))
    history = days - first
    if history < MIN_TREND_DAYS:
        return Growth(0.0, series, history)
    fitted = [y for _, y in series[first:]]
    n = len(fitted)
    mean_x = (n - 1) / 2
    mean_y = sum(fitted) / n
    var_x = sum((i - mean_x) ** 2 for i in range(n))
    cov = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(fitted))
    return Growth(cov / var_x if var_x else 0.0, series, history)


@dataclass(frozen=True)
class FilesystemUsage:
    total_bytes: int
    free_bytes: int  # available to the appliance (statvfs f_bavail)
    used_bytes: int


def filesystem_usage(path: str) -> FilesystemUsage:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return FilesystemUsage(total, st.f_bavail * st.f_frsize, total - st.f_bfree * st.f_frsize)


def directory_bytes(path: str) -> int:
    """Bytes allocated by the files under ``path`` (a store: few, large pack files)."""
    total = 0
    stack = [path]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue  # a file GC removed meanwhile
    return total
