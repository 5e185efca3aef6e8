"""Tiering rules: which recovery points go to which bucket, in which class, locked how long, and
when the local copy may go. A plain document, validated here (pure functions, no I/O).

The settings document (catalog settings key ``tiering``)::

    {"rules": [
        {"name": "monthly-to-glacier", "location": "cold", "classes": ["monthly"],
         "min_age_days": 30, "storage_class": "GLACIER", "keep_days": 365,
         "keep_local_days": 7},
        {"name": "yearly-deep", "location": "cold", "classes": ["yearly"], "min_age_days": 30,
         "storage_class": "DEEP_ARCHIVE", "keep_days": 2555}],
     "schedule": {"cron": "0 1 * * *", "window_hours": 6},
     "bandwidth_mib_s": 50}

A rule matches a point when the point is complete, at least ``min_age_days`` old, of one of
``assets`` (empty: any), and the newest point of its asset in one of the periods ``classes``
names (``daily``, ``weekly``, ``monthly``, ``yearly``; empty: any point). A matching point gets a
copy at ``location`` with its data packs in ``storage_class``, locked (where the bucket locks
objects) until ``keep_days`` after the point was made. ``keep_local_days``: the local copy is
dropped that many days after the cold copy was verified (never the asset's newest point, which
the next backup compares against; never without a verified copy elsewhere). When several rules
match one point at one location, the one keeping it longest wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.errors import InvalidInput

PERIOD_CLASSES = ("daily", "weekly", "monthly", "yearly")
#: The storage classes a rule may ask for (S3's names).
RULE_STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "GLACIER_IR", "GLACIER", "DEEP_ARCHIVE")
MAX_DAYS = 36_500


@dataclass(frozen=True)
class TierRule:
    name: str
    location: str
    min_age_days: int = 0
    classes: tuple[str, ...] = ()
    assets: tuple[str, ...] = ()
    storage_class: str = "GLACIER"
    keep_days: int | None = None
    keep_local_days: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "location": self.location,
            "min_age_days": self.min_age_days,
            "classes": list(self.classes),
            "assets": list(self.assets),
            "storage_class": self.storage_class,
            "keep_days": self.keep_days,
            "keep_local_days": self.keep_local_days,
        }


@dataclass(frozen=True)
class TierSchedule:
    #: When a tiering run starts (five-field cron, UTC); None: only when asked.
    cron: str | None = None
    #: How long a run may move data after it starts; then it waits for the next window.
    window_hours: float | None = None


@dataclass(frozen=True)
class TieringSettings:
    rules: tuple[TierRule, ...] = ()
    schedule: TierSchedule = field(default_factory=TierSchedule)
    #: Upload bandwidth limit of a run (MiB/s); None: no limit.
    bandwidth_mib_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rules": [rule.to_dict() for rule in self.rules],
            "schedule": {"cron": self.schedule.cron, "window_hours": self.schedule.window_hours},
            "bandwidth_mib_s": self.bandwidth_mib_s,
        }


def _days(value: object, what: str, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DAYS:
        raise InvalidInput(f"{what} is a whole number of days from 0 to {MAX_DAYS}")
    return value


def _names(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidInput(f"{what} is a list of names")
    return tuple(value)


def parse_rule(document: object) -> TierRule:
    if not isinstance(document, dict):
        raise InvalidInput("a tiering rule is an object")
    unknown = sorted(set(document) - set(TierRule.__dataclass_fields__))
    if unknown:
        raise InvalidInput(f"unknown field(s) in a tiering rule: {', '.join(unknown)}")
    name = document.get("name")
    location = document.get("location")
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise InvalidInput("a tiering rule has a name (1-100 characters)")
    if not isinstance(location, str) or not location:
        raise InvalidInput(f"rule {name}: name the bucket location it copies to")
    classes = _names(document.get("classes"), f"rule {name}: classes")
    for cls in classes:
        if cls not in PERIOD_CLASSES:
            raise InvalidInput(
                f"rule {name}: {cls!r} is not a point class ({', '.join(PERIOD_CLASSES)})"
            )
    storage_class = document.get("storage_class", "GLACIER")
    if storage_class not in RULE_STORAGE_CLASSES:
        raise InvalidInput(
            f"rule {name}: storage class is one of {', '.join(RULE_STORAGE_CLASSES)}"
        )
    min_age = _days(document.get("min_age_days", 0), f"rule {name}: min_age_days", allow_none=False)
    return TierRule(
        name=name.strip(),
        location=location,
        min_age_days=min_age or 0,
        classes=classes,
        assets=_names(document.get("assets"), f"rule {name}: assets"),
        storage_class=str(storage_class),
        keep_days=_days(document.get("keep_days"), f"rule {name}: keep_days"),
        keep_local_days=_days(document.get("keep_local_days"), f"rule {name}: keep_local_days"),
    )


def parse_settings(document: object) -> TieringSettings:
    """The tiering settings from their JSON document (InvalidInput naming what is wrong)."""
    if document is None or document == {}:
        return TieringSettings()
    if not isinstance(document, dict):
        raise InvalidInput("the tiering settings are an object")
    unknown = sorted(set(document) - {"rules", "schedule", "bandwidth_mib_s"})
    if unknown:
        raise InvalidInput(f"unknown tiering setting(s): {', '.join(unknown)}")
    raw_rules = document.get("rules") or []
    if not isinstance(raw_rules, list):
        raise InvalidInput("rules is a list")
    rules = tuple(parse_rule(r) for r in raw_rules)
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise InvalidInput("two tiering rules have the same name")
    schedule_doc = document.get("schedule") or {}
    if not isinstance(schedule_doc, dict):
        raise InvalidInput("schedule is an object")
    cron = schedule_doc.get("cron")
    if cron is not None:
        from appliance.schedule import check_cron

        cron = check_cron(cron)
    window = schedule_doc.get("window_hours")
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int | float) or not 0 < window <= 24
    ):
        raise InvalidInput("window_hours is more than 0 and at most 24")
    bandwidth = document.get("bandwidth_mib_s")
    if bandwidth is not None and (
        isinstance(bandwidth, bool) or not isinstance(bandwidth, int | float) or bandwidth <= 0
    ):
        raise InvalidInput("bandwidth_mib_s is a positive number (MiB/s) or null")
    return TieringSettings(
        rules=rules,
        schedule=TierSchedule(cron=cron, window_hours=float(window) if window else None),
        bandwidth_mib_s=float(bandwidth) if bandwidth else None,
    )
