"""Scheduled tape backups: a media pool's schedule submits ``tape_backup`` jobs; which points.

**Which points** (a pool's ``points_rule``, also a ``tape_backup`` job's ``points``):

* ``{"rule": "newest"}``: the newest complete point of each asset;
* ``{"rule": "gfs", "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 12, "keep_yearly": 0}``:
  the points those grandfather-father-son rules keep, per asset -- computed by the very function
  retention uses (:func:`appliance.retention.apply_retention`), so "the points GFS keeps" means
  the same thing on disk and on tape;
* either with ``"assets": [names]`` to take only those assets (none: every asset).

Only points with a present copy in the home pool are candidates (a tape session reads them from
there). :func:`points_by_rule` is pure; the points already on the set being written are skipped by
the backup itself (:func:`hardware.tape.jobs.backup_to_tape`), so a schedule that fires twice
with nothing new writes nothing twice.

**When**: :func:`tape_backup_tick` is one of the scheduler's ``extra_ticks``, exactly as
:mod:`image.failover.plan_schedule` is for plan tests. For each pool with a schedule the newest
slot in ``(last slot, now]`` (:func:`appliance.verify_schedule.due_slot`) fires: the pool's last
slot moves and the job is created in one catalog transaction
(:meth:`~appliance.catalog.tape.TapeRepository.fire_tape_backup`), which does nothing when another
tick moved the slot first -- a slot runs at most once, and a restart loses none. Missed slots are
not run one by one: after downtime the newest runs once. A backup of the pool still queued,
running or waiting covers the slot (recorded as fired, no second job); so does a slot with
nothing new to write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, tzinfo
from typing import TYPE_CHECKING, Any, Protocol

from appliance.catalog.records import home_location_id
from appliance.errors import InvalidInput
from appliance.jobs import JOB_KINDS
from appliance.retention import RetentionRules, apply_retention
from appliance.verify_schedule import due_slot

if TYPE_CHECKING:
    from appliance.engine import Appliance

log = logging.getLogger(__name__)

BACKUP_KIND = "tape_backup"
RULES = ("newest", "gfs")
GFS_KEYS = ("keep_daily", "keep_weekly", "keep_monthly", "keep_yearly")
_ACTIVE = ("queued", "running", "waiting")
_MAX_KEEP = 1000


class PointFacts(Protocol):
    @property
    def id(self) -> str: ...

    @property
    def asset(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...


def check_rule(document: Any) -> dict[str, Any]:
    """The rule ``document`` normalised (``"newest"`` is ``{"rule": "newest"}``); a clear
    :class:`InvalidInput` for anything else."""
    if document == "newest" or document == ["newest"]:
        return {"rule": "newest"}
    if not isinstance(document, dict):
        raise InvalidInput('which points: "newest", or a rule {"rule": "newest"|"gfs", ...}')
    unknown = set(document) - {"rule", "assets", *GFS_KEYS}
    if unknown:
        raise InvalidInput(f"unknown field(s) in the points rule: {', '.join(sorted(unknown))}")
    rule = document.get("rule", "newest")
    if rule not in RULES:
        raise InvalidInput(f"the points rule is newest or gfs, not {rule!r}")
    assets = document.get("assets") or []
    if not isinstance(assets, list) or not all(isinstance(a, str) and a for a in assets):
        raise InvalidInput("the rule's assets are a list of asset names")
    out: dict[str, Any] = {"rule": rule}
    if assets:
        out["assets"] = sorted(set(assets))
    if rule == "gfs":
        for key in GFS_KEYS:
            value = document.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_KEEP:
                raise InvalidInput(f"{key} is a whole number from 0 to {_MAX_KEEP}")
            out[key] = value
        if not any(out[k] for k in GFS_KEYS):
            raise InvalidInput(
                "a GFS rule keeps at least one daily, weekly, monthly or yearly point"
            )
    elif any(k in document for k in GFS_KEYS):
        raise InvalidInput("keep_daily and the like belong to a gfs rule, not to newest")
    return out


def rule_words(rule: dict[str, Any]) -> str:
    """The rule in words ("the newest point of each asset", "GFS: 7 daily, 4 weekly")."""
    if rule.get("rule") == "gfs":
        kept = [f"{rule[k]} {k.removeprefix('keep_')}" for k in GFS_KEYS if rule.get(k)]
        words = "the points GFS keeps: " + ", ".join(kept)
    else:
        words = "the newest point of each asset"
    assets = rule.get("assets")
    return words + (f" (assets {', '.join(assets)})" if assets else "")


def points_by_rule(points: Iterable[PointFacts], rule: dict[str, Any]) -> list[str]:
    """The ids of ``points`` the rule picks, oldest first (pure; see the module doc). Per asset
    the retention function decides: ``newest`` is ``keep_last=1``, ``gfs`` its keep_* rules."""
    rule = check_rule(rule)
    if rule["rule"] == "gfs":
        rules = RetentionRules(**{k: rule[k] for k in GFS_KEYS})
    else:
        rules = RetentionRules(keep_last=1)
    only = set(rule.get("assets", []))
    by_asset: dict[str, list[PointFacts]] = {}
    for point in points:
        if not only or point.asset in only:
            by_asset.setdefault(point.asset, []).append(point)
    chosen: list[PointFacts] = []
    for group in by_asset.values():
        kept = apply_retention(group, rules).keep
        chosen.extend(p for p in group if p.id in kept)
    return [p.id for p in sorted(chosen, key=lambda p: (p.created_at, p.asset, p.id))]


def home_points(app: Appliance) -> list[Any]:
    """The candidate points: complete, with a present copy in the home pool."""
    home = home_location_id(app.repo.store_id)
    at_home = {c.point_id for c in app.catalog.copies_at(home, "present")}
    return [
        p
        for p in app.catalog.list_points(store_id=app.repo.store_id)
        if p.id in at_home and p.status == "complete"
    ]


def on_current_set(app: Appliance, pool: str) -> set[str]:
    """Point ids the pool's open set already holds (a ``new_set`` pool starts a new set at every
    session, so for it nothing is "already there")."""
    record = app.catalog.get_tape_pool(pool)
    if record.allocation == "new_set":
        return set()
    open_sets = [s for s in app.catalog.list_tape_sets(pool) if s.closed_at is None]
    if not open_sets:
        return set()
    return set((open_sets[-1].catalog or {}).get("points", {}))


def tape_backup_tick(app: Appliance, tz: tzinfo = UTC) -> Callable[[datetime], list[str]]:
    """The scheduler hook: submit every pool's due tape backup; returns the new jobs' IDs."""

    def tick(now: datetime) -> list[str]:
        catalog = app.catalog
        due = []
        for pool in catalog.list_tape_pools():
            last = pool.schedule_last_slot
            if pool.schedule is None or last is None:
                continue
            slot = due_slot(pool.schedule, last, now, tz)
            if slot is not None:
                due.append((pool, last, slot))
        if not due:  # the common tick: no job list read
            return []
        busy = {
            str(job.params.get("pool"))
            for state in _ACTIVE
            for job in catalog.list_jobs(state=state, limit=1000)
            if job.kind == BACKUP_KIND
        }
        candidates = home_points(app)
        created: list[str] = []
        for pool, last, slot in due:
            rule = check_rule(pool.points_rule or "newest")
            there = on_current_set(app, pool.name)
            todo = [p for p in points_by_rule(candidates, rule) if p not in there]
            params = {
                "pool": pool.name,
                "points": rule,
                "drive": pool.schedule_drive,
                "trigger": "schedule",
                "slot": slot.isoformat(),
            }
            runnable = BACKUP_KIND in JOB_KINDS and pool.name not in busy and bool(todo)
            if BACKUP_KIND not in JOB_KINDS:
                log.warning("tape pool %s: scheduled backup not run (no tape jobs)", pool.name)
            resources = JOB_KINDS[BACKUP_KIND].resources(params) if runnable else []
            job = catalog.fire_tape_backup(
                pool.name,
                last,
                slot,
                job_kind=BACKUP_KIND if runnable else None,
                params=params,
                resource=",".join(name for name, _ in resources) or None,
                log=[
                    (
                        "info",
                        f"scheduled tape backup to pool {pool.name}, slot {slot.isoformat()}: "
                        f"{len(todo)} point(s) to write ({rule_words(rule)})",
                    )
                ],
            )
            if job is not None:
                created.append(job.id)
        return created

    return tick
