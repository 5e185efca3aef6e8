"""The tiering plan: a pure function of the catalog's points, copies and locations, the rules
and the time. Previewed on the page, then carried out by the ``tier`` job (:mod:`tiering.work`),
which computes it afresh at each run, so an interrupted run resumes by planning again.

Actions, in the order a run carries them out:

- **copy**: a point a rule matches that has no copy at the rule's location yet (or one left
  ``copying`` by an interrupted run) is copied there, its data packs in the rule's class and
  locked until ``keep_days`` after the point was made;
- **drop local**: the home pool's copy of a point goes once a rule with ``keep_local_days``
  matches it and its copy at the rule's location was verified at least that many days ago --
  never the newest point of an asset (the next backup compares against it), never a point
  whose only other copy is unverified, lost or being copied;
- **expire**: a copy at a location some rule copies to, whose retain-until date has passed and
  that no rule keeps longer now, leaves that location (its manifest is deleted there; the
  location's GC then frees the packs no other copy needs, never a locked one). Copies at
  locations no rule names, and copies kept without a date, are never expired by tiering.

Problems (a rule naming an unknown location, a location offline) are reported in words and the
rest of the plan goes on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from appliance.catalog.records import CopyRecord, LocationRecord, PointRecord
from tiering.rules import TieringSettings, TierRule

_PERIOD_KEYS = {
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": lambda t: tuple(t.isocalendar()[:2]),
    "monthly": lambda t: (t.year, t.month),
    "yearly": lambda t: (t.year,),
}
#: Copy states that mean "this location has (or is getting) the point": no new copy is planned.
_HELD = ("present", "archived", "recalling")


@dataclass(frozen=True)
class CopyAction:
    point_id: str
    asset: str
    location_id: str
    location: str
    storage_class: str
    retain_until: datetime | None
    rule: str
    #: The point's size (bytes it added to its store): what the copy moves at most.
    bytes: int
    resume: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "point": self.point_id,
            "asset": self.asset,
            "location_id": self.location_id,
            "location": self.location,
            "storage_class": self.storage_class,
            "retain_until": self.retain_until.isoformat() if self.retain_until else None,
            "rule": self.rule,
            "bytes": self.bytes,
            "resume": self.resume,
        }


@dataclass(frozen=True)
class DropAction:
    point_id: str
    asset: str
    rule: str
    #: Where the verified copy that makes the local one unnecessary is.
    kept_at: str
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "point": self.point_id,
            "asset": self.asset,
            "rule": self.rule,
            "kept_at": self.kept_at,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class ExpireAction:
    point_id: str
    asset: str
    location_id: str
    location: str
    retain_until: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "point": self.point_id,
            "asset": self.asset,
            "location_id": self.location_id,
            "location": self.location,
            "retain_until": self.retain_until.isoformat(),
        }


@dataclass(frozen=True)
class TierPlan:
    at: datetime
    copies: tuple[CopyAction, ...] = ()
    drops: tuple[DropAction, ...] = ()
    problems: tuple[str, ...] = ()
    expiries: tuple[ExpireAction, ...] = ()
    #: Bytes to move per storage class.
    bytes_by_class: Mapping[str, int] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.copies and not self.drops and not self.expiries

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "copies": [c.to_dict() for c in self.copies],
            "drops": [d.to_dict() for d in self.drops],
            "expiries": [e.to_dict() for e in self.expiries],
            "problems": list(self.problems),
            "bytes_by_class": dict(self.bytes_by_class),
        }


def period_classes(points: Sequence[PointRecord]) -> dict[str, frozenset[str]]:
    """For each point, the periods (daily, weekly, monthly, yearly) of which it is its asset's
    newest complete point, by UTC calendar."""
    out: dict[str, set[str]] = {p.id: set() for p in points}
    by_asset: dict[str, list[PointRecord]] = {}
    for point in points:
        if point.status == "complete":
            by_asset.setdefault(point.asset, []).append(point)
    for asset_points in by_asset.values():
        newest_first = sorted(asset_points, key=lambda p: (p.created_at, p.id), reverse=True)
        for name, key in _PERIOD_KEYS.items():
            seen: set[tuple[int, ...]] = set()
            for point in newest_first:
                period = key(point.created_at)
                if period not in seen:
                    seen.add(period)
                    out[point.id].add(name)
    return {pid: frozenset(classes) for pid, classes in out.items()}


def matches(rule: TierRule, point: PointRecord, classes: frozenset[str], now: datetime) -> bool:
    if point.status != "complete":
        return False
    if rule.assets and point.asset not in rule.assets:
        return False
    if rule.classes and not classes.intersection(rule.classes):
        return False
    return now - point.created_at >= timedelta(days=rule.min_age_days)


def _location_of(rule: TierRule, locations: Sequence[LocationRecord]) -> LocationRecord | None:
    found = [loc for loc in locations if rule.location in (loc.id, loc.label)]
    return found[0] if len(found) == 1 else None


def plan_tiering(
    points: Sequence[PointRecord],
    copies: Mapping[str, Sequence[CopyRecord]],
    locations: Sequence[LocationRecord],
    settings: TieringSettings,
    now: datetime,
    home_id: str,
) -> TierPlan:
    """What a tiering run does now (see the module docstring). ``copies``: each point's copies;
    ``home_id``: the home location of the store the points are in."""
    problems: list[str] = []
    targets: dict[str, LocationRecord] = {}
    for rule in settings.rules:
        location = _location_of(rule, locations)
        if location is None:
            problems.append(f"rule {rule.name}: no location {rule.location!r} of this store")
        elif location.id == home_id:
            problems.append(f"rule {rule.name}: the home pool is where points are made")
        else:
            if not location.online:
                problems.append(
                    f"rule {rule.name}: location {location.label} did not answer when last "
                    "opened; the run will try it again"
                )
            targets[rule.name] = location
    classes = period_classes(points)
    newest: dict[str, str] = {}
    for point in sorted(points, key=lambda p: (p.created_at, p.id)):
        if point.status == "complete":
            newest[point.asset] = point.id

    planned: dict[tuple[str, str], CopyAction] = {}
    drops: dict[str, DropAction] = {}
    expiries: list[ExpireAction] = []
    ruled = {location.id: location for location in targets.values()}
    for point in sorted(points, key=lambda p: (p.created_at, p.id)):
        held = {c.location_id: c for c in copies.get(point.id, ())}
        for kept in held.values():
            location = ruled.get(kept.location_id or "")
            if location is None or kept.state not in ("present", "archived"):
                continue
            if kept.retain_until is None or kept.retain_until > now:
                continue
            wanted = [
                point.created_at + timedelta(days=rule.keep_days)
                for rule in settings.rules
                if rule.keep_days is not None
                and targets.get(rule.name) is location
                and matches(rule, point, classes[point.id], now)
            ]
            if not any(until > now for until in wanted):  # no rule keeps it longer now
                expiries.append(
                    ExpireAction(
                        point.id, point.asset, location.id, location.label, kept.retain_until
                    )
                )
        for rule in settings.rules:
            location = targets.get(rule.name)
            if location is None or not matches(rule, point, classes[point.id], now):
                continue
            retain = point.created_at + timedelta(days=rule.keep_days) if rule.keep_days else None
            copy = held.get(location.id)
            if copy is None or copy.state not in _HELD:
                action = CopyAction(
                    point.id,
                    point.asset,
                    location.id,
                    location.label,
                    rule.storage_class,
                    retain if retain is not None and retain > now else None,
                    rule.name,
                    point.stored_bytes,
                    resume=copy is not None and copy.state == "copying",
                )
                key = (point.id, location.id)
                if key not in planned or _longer(action, planned[key]):
                    planned[key] = action
                continue
            if rule.keep_local_days is None or point.id == newest.get(point.asset):
                continue
            home = held.get(home_id)
            if home is None or home.state != "present" or copy.verified_at is None:
                continue
            if now - copy.verified_at >= timedelta(days=rule.keep_local_days):
                drops.setdefault(
                    point.id,
                    DropAction(
                        point.id, point.asset, rule.name, location.label, point.stored_bytes
                    ),
                )
    by_class: dict[str, int] = {}
    for action in planned.values():
        by_class[action.storage_class] = by_class.get(action.storage_class, 0) + action.bytes
    return TierPlan(
        at=now,
        copies=tuple(planned.values()),
        drops=tuple(drops.values()),
        problems=tuple(problems),
        expiries=tuple(expiries),
        bytes_by_class=by_class,
    )


def _longer(new: CopyAction, old: CopyAction) -> bool:
    if old.retain_until is None:
        return new.retain_until is not None
    return new.retain_until is not None and new.retain_until > old.retain_until
