"""Conditions checked periodically: each a pure function of plain records and ``now``.

Each evaluator returns the events that hold *now* (one per subject). The caller raises them and
resolves the open alerts of the evaluated kinds whose key is no longer among them
(:func:`to_resolve`), so a condition that ends closes its alert by itself.

Missed schedule (``backup_missed``): the scheduler records, per policy and schedule entry, the
last slot it fired (or when it first saw the entry). The entry's next slot after that is due;
when it is more than ``grace`` in the past and no backup of the policy's asset ran since (a job
of the policy, or a manual backup of the asset, started at or after the slot; or one that was
still running at the slot), the slot was missed: the scheduler was stopped or paused, or the
appliance was off. A job that was started and failed is a ``backup_failed``, not a miss. An entry
the scheduler never saw is not judged (the policy may be seconds old).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo

from appliance.alerts.events import BACKUP_JOB_KINDS, AlertEvent
from appliance.catalog.records import (
    CopyRecord,
    JobRecord,
    LocationRecord,
    PointRecord,
    PolicyRecord,
)
from appliance.errors import InvalidInput
from appliance.protection import RPO_MISSED, last_good_point, rpo_status, rpo_target
from appliance.schedule import next_slot, parse_schedule

#: How long after its slot a scheduled backup may start before it counts as missed.
MISSED_GRACE = timedelta(minutes=30)
#: How long a location that is not removable may be unreachable before it is a lost leg.
UNAVAILABLE_AFTER = timedelta(hours=24)
#: A pool that fills within this many days raises ``pool_filling``.
POOL_FILLING_DAYS = 14.0
#: A certificate or credential expiring within this is raised.
EXPIRY_WARNING = timedelta(days=30)


def _words(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else (many or one + 's')}"


def _age(delta: timedelta) -> str:
    hours = int(delta.total_seconds() // 3600)
    if hours < 48:
        return _words(max(hours, 0), "hour")
    return _words(hours // 24, "day")


# --- backup_missed -----------------------------------------------------------------------------


def _ran_since(jobs: Iterable[JobRecord], policy: PolicyRecord, slot: datetime) -> bool:
    for job in jobs:
        if job.kind not in BACKUP_JOB_KINDS or job.started_at is None:
            continue
        mine = job.params.get("policy") == policy.name or (
            job.kind != "policy_backup" and job.params.get("asset") in policy.assets
        )
        if not mine:
            continue
        still_running_at_slot = job.finished_at is None or job.finished_at >= slot
        if job.started_at >= slot or still_running_at_slot:
            return True
    return False


def missed_backups(
    policies: Sequence[PolicyRecord],
    states: Mapping[str, Mapping[str, datetime]],
    jobs: Sequence[JobRecord],
    now: datetime,
    *,
    grace: timedelta = MISSED_GRACE,
    tz: tzinfo = UTC,
) -> list[AlertEvent]:
    """A ``backup_missed`` event per policy with a backup slot missed (see the module doc)."""
    events = []
    for policy in policies:
        try:
            schedule = parse_schedule(policy.schedule)
        except InvalidInput:
            continue  # the scheduler logs an unusable schedule; it has no due times to judge
        state = states.get(policy.name, {})
        missed: list[datetime] = []
        for entry in schedule.entries:
            last = state.get(entry.key)
            if entry.is_boot_test or last is None:
                continue
            slot = next_slot(entry, last, tz)
            if slot is not None and slot + grace <= now:
                missed.append(slot)
        if not missed:
            continue
        slot = min(missed)
        if _ran_since(jobs, policy, slot):
            continue
        when = slot.astimezone(tz).strftime("%Y-%m-%d %H:%M")
        assets = ", ".join(policy.assets)
        events.append(
            AlertEvent(
                "backup_missed",
                policy.name,
                f"The backup of {assets} due at {when} (policy {policy.name}) did not "
                f"run; nothing has run for {_age(now - slot)}.",
                now,
                details={
                    "policy": policy.name,
                    "assets": list(policy.assets),
                    "slot": slot.isoformat(),
                },
            )
        )
    return events


# --- rpo_missed --------------------------------------------------------------------------------


def rpo_misses(
    policies: Sequence[PolicyRecord], points: Sequence[PointRecord], now: datetime
) -> list[AlertEvent]:
    """An ``rpo_missed`` event per asset whose newest good point is older than its target."""
    by_asset: dict[str, list[PolicyRecord]] = defaultdict(list)
    for policy in policies:
        for asset in policy.assets:
            by_asset[asset].append(policy)
    points_of: dict[str, list[PointRecord]] = defaultdict(list)
    for point in points:
        points_of[point.asset].append(point)
    events = []
    for asset in sorted(by_asset):
        target = rpo_target(by_asset[asset])
        good = last_good_point(points_of[asset])
        if target is None or rpo_status(good, target, now) != RPO_MISSED:
            continue
        goal = _age(timedelta(seconds=target))
        if good is None:
            message = f"{asset} has no good backup yet; its target is one at most {goal} old."
        else:
            message = (
                f"The newest good backup of {asset} is {_age(now - good.created_at)} old; "
                f"the target is at most {goal}."
            )
        events.append(
            AlertEvent(
                "rpo_missed",
                asset,
                message,
                now,
                details={
                    "rpo_seconds": target,
                    "last_good_point": good.id if good else None,
                    "last_good_at": good.created_at.isoformat() if good else None,
                },
            )
        )
    return events


# --- copy_leg_lost -----------------------------------------------------------------------------


def copy_legs_lost(
    locations: Sequence[LocationRecord],
    copies: Sequence[CopyRecord],
    now: datetime,
    *,
    unavailable_after: timedelta = UNAVAILABLE_AFTER,
) -> list[AlertEvent]:
    """A ``copy_leg_lost`` event per location holding lost copies, or (not removable: a USB disk
    is meant to be away) unreachable for longer than ``unavailable_after``."""
    lost: dict[str, list[str]] = defaultdict(list)
    for copy in copies:
        if copy.state == "lost" and copy.location_id:
            lost[copy.location_id].append(copy.point_id)
    events = []
    for location in locations:
        name = location.label or location.id
        points = sorted(lost.get(location.id, []))
        seen = location.last_seen_at or location.created_at
        away = not location.online and not location.removable and now - seen > unavailable_after
        if not points and not away:
            continue
        parts = []
        if points:
            verb = "is" if len(points) == 1 else "are"
            parts.append(f"{_words(len(points), 'copy', 'copies')} at {name} {verb} lost")
        if away:
            parts.append(f"{name} has not been reachable for {_age(now - seen)}")
        message = "; ".join(parts)
        events.append(
            AlertEvent(
                "copy_leg_lost",
                location.id,
                message[0].upper() + message[1:] + ".",
                now,
                details={"location": location.id, "lost_points": points[:50], "unreachable": away},
            )
        )
    return events


# --- pools, USB rotation, certificates ------------------------------------------------------------


@dataclass(frozen=True)
class PoolSnapshot:
    """What the evaluation needs of a pool (``hardware`` gives it; the core cannot import it)."""

    name: str
    health: str  # ok, warning, degraded, damaged, unavailable
    reasons: tuple[str, ...] = ()
    days_until_full: float | None = None


def pool_events(
    pools: Sequence[PoolSnapshot], now: datetime, *, filling_days: float = POOL_FILLING_DAYS
) -> list[AlertEvent]:
    events = []
    for pool in pools:
        if pool.health in ("degraded", "damaged", "unavailable"):
            why = "; ".join(pool.reasons) or f"its state is {pool.health}"
            events.append(
                AlertEvent(
                    "pool_degraded",
                    pool.name,
                    f"Disk pool {pool.name} is {pool.health}: {why}.",
                    now,
                    details={"health": pool.health, "reasons": list(pool.reasons)},
                )
            )
        days = pool.days_until_full
        if days is not None and days <= filling_days:
            whole = max(int(days), 0)
            events.append(
                AlertEvent(
                    "pool_filling",
                    pool.name,
                    f"Disk pool {pool.name} will be full in about {_words(whole, 'day')} "
                    "at the current rate.",
                    now,
                    details={"days_until_full": round(days, 1)},
                )
            )
    return events


@dataclass(frozen=True)
class OverdueMedium:
    set_name: str
    label: str
    overdue_days: int


def usb_overdue(media: Sequence[OverdueMedium], now: datetime) -> list[AlertEvent]:
    return [
        AlertEvent(
            "usb_overdue",
            f"{m.set_name}/{m.label}",
            f"USB disk {m.label} of rotation set {m.set_name} is "
            f"{_words(m.overdue_days, 'day')} overdue: plug it in so it gets the newest backups.",
            now,
            details={"set": m.set_name, "label": m.label, "overdue_days": m.overdue_days},
        )
        for m in media
        if m.overdue_days > 0
    ]


@dataclass(frozen=True)
class Expiring:
    """A certificate or credential (``subject``: a stable key; ``what``: its name in words)."""

    subject: str
    what: str
    expires_at: datetime


def expiring(
    kind: str, items: Sequence[Expiring], now: datetime, *, within: timedelta = EXPIRY_WARNING
) -> list[AlertEvent]:
    """``certificate_expiring`` or ``credentials_expiring`` events for what expires soon."""
    events = []
    for item in items:
        left = item.expires_at - now
        if left > within:
            continue
        when = item.expires_at.strftime("%Y-%m-%d")
        message = (
            f"{item.what} expired on {when}."
            if left.total_seconds() <= 0
            else f"{item.what} expires on {when}, in {_age(left)}."
        )
        events.append(
            AlertEvent(
                kind,
                item.subject,
                message[0].upper() + message[1:],
                now,
                details={"expires_at": item.expires_at.isoformat()},
            )
        )
    return events


def to_resolve(
    open_keys: Iterable[tuple[str, str]],
    current: Iterable[AlertEvent],
    evaluated_kinds: Iterable[str],
) -> list[tuple[str, str]]:
    """The open (kind, subject) keys of the evaluated kinds whose condition no longer holds."""
    kinds = set(evaluated_kinds)
    holding = {(e.kind, e.subject) for e in current}
    return sorted(k for k in open_keys if k[0] in kinds and k not in holding)
