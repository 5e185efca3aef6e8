"""What must be true before a failover runs anything: pure decisions, tested directly.

- Which point: the one asked for, else the asset's newest image point when it verified ok, else
  the newest one that did, with the reason in words (:func:`choose_point`, :func:`choice_reason`;
  :func:`pick_point` is the point alone). New image points are checked right after their backup
  (:mod:`appliance.point_check`), so "newest" and "newest verified" agree unless something is
  wrong, and then the reason says what.
- Memory: the VM's RAM plus QEMU's own overhead must fit in ``MemAvailable`` minus a reserve for
  the appliance minus what running failovers were promised and have not yet touched
  (:func:`check_memory`); otherwise the failover is refused with the numbers, before QEMU runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Literal

from appliance.catalog.records import PointRecord

#: Memory kept free for the appliance itself, by default.
MEMORY_RESERVE_MIB = 512
#: What QEMU needs beyond the guest's RAM (device models, TCG translation cache, buffers).
QEMU_OVERHEAD_MIB = 160


def check_memory(
    requested_mib: int, available_mib: int, reserve_mib: int, committed_mib: int
) -> str | None:
    """None when a VM of ``requested_mib`` fits, else the reason (for an InsufficientMemory)."""
    need = requested_mib + QEMU_OVERHEAD_MIB
    free = available_mib - reserve_mib - committed_mib
    if need <= free:
        return None
    return (
        f"the VM needs {requested_mib} MiB (+{QEMU_OVERHEAD_MIB} MiB for QEMU) but only "
        f"{max(free, 0)} MiB can be given: {available_mib} MiB available, {reserve_mib} MiB "
        f"reserved for the appliance, {committed_mib} MiB promised to running failovers"
    )


#: Why a point was chosen (see :class:`PointChoice`).
ChoiceWhy = Literal[
    "newest_ok", "newest_failed", "newest_unverified", "none_verified", "all_failed", "no_point"
]


@dataclass(frozen=True)
class PointChoice:
    """The point a failover or boot test boots when none is asked for, and why."""

    #: The point to boot (None: the asset has no image point).
    point: PointRecord | None
    #: The asset's newest image point.
    newest: PointRecord | None
    #: ``newest_ok``; ``newest_failed`` / ``newest_unverified`` (an older, verified point is
    #: booted); ``none_verified`` (no point verified ok: the newest one not known damaged);
    #: ``all_failed`` (every point failed verification: the newest is tried); ``no_point``.
    why: ChoiceWhy


def choose_point(points: Iterable[PointRecord]) -> PointChoice:
    """The newest image point when it verified ok; else the newest that verified ok; else the
    newest not known to be damaged; else the newest. Pure: records in, choice out."""
    images = sorted((p for p in points if p.kind == "image"), key=lambda p: (p.created_at, p.id))
    if not images:
        return PointChoice(None, None, "no_point")
    newest = images[-1]
    if newest.verify_status == "ok":
        return PointChoice(newest, newest, "newest_ok")
    verified = [p for p in images if p.verify_status == "ok"]
    if verified:
        if newest.verify_status == "damaged":
            return PointChoice(verified[-1], newest, "newest_failed")
        return PointChoice(verified[-1], newest, "newest_unverified")
    whole = [p for p in images if p.verify_status != "damaged"]
    if whole:
        return PointChoice(whole[-1], newest, "none_verified")
    return PointChoice(newest, newest, "all_failed")


def pick_point(points: Iterable[PointRecord]) -> PointRecord | None:
    """The point :func:`choose_point` boots."""
    return choose_point(points).point


def when_text(at: datetime, now: datetime, tz: tzinfo = UTC) -> str:
    """A point's time as a person says it: "today 10:02", "yesterday 22:15", "3 Mar 08:00"."""
    local, today = at.astimezone(tz), now.astimezone(tz).date()
    clock = local.strftime("%H:%M")
    if local.date() == today:
        return f"today {clock}"
    if local.date() == today - timedelta(days=1):
        return f"yesterday {clock}"
    return (
        f"{local.day} {local.strftime('%b')}"
        + (f" {local.year}" if local.year != today.year else "")
        + f" {clock}"
    )


def choice_reason(
    choice: PointChoice,
    *,
    now: datetime,
    problems: Mapping[str, str] | None = None,
    tz: tzinfo = UTC,
) -> str | None:
    """Why the chosen point is not simply the newest, verified one, in one sentence (None when
    it is). ``problems``: what a failed verification found, by point id
    (:func:`appliance.point_check.recorded_problems`)."""
    point, newest = choice.point, choice.newest
    if point is None or newest is None or choice.why == "newest_ok":
        return None
    newest_at = when_text(newest.created_at, now, tz)
    chosen_at = when_text(point.created_at, now, tz)
    problem = (problems or {}).get(newest.id)
    failed = f"failed verification: {problem}" if problem else "failed verification"
    if choice.why == "newest_failed":
        return f"the newest point ({newest_at}) {failed}; booting the one of {chosen_at} instead"
    if choice.why == "newest_unverified":
        return (
            f"the newest point ({newest_at}) is not verified yet; booting the newest verified "
            f"one, of {chosen_at}, instead"
        )
    if choice.why == "none_verified":
        if point.id == newest.id:
            return f"no point has verified ok yet; booting the newest one, of {chosen_at}"
        return (
            f"no point has verified ok yet and the newest one ({newest_at}) {failed}; booting "
            f"the one of {chosen_at} instead"
        )
    return f"every point failed verification; trying the newest one, of {chosen_at}"
