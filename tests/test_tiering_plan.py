"""The tiering plan and rules: pure functions of points, copies, locations, rules and the time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from appliance.catalog.records import CopyRecord, LocationRecord, PointRecord
from appliance.errors import InvalidInput
from tiering.plan import period_classes, plan_tiering
from tiering.pricing import default_prices, recall_cost, storage_cost
from tiering.rules import parse_settings

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
HOME = "home"
GIB = 1 << 30


def point(pid: str, days_ago: float, asset: str = "web", size: int = GIB) -> PointRecord:
    return PointRecord(
        id=pid,
        asset=asset,
        kind="files",
        mode="incremental",
        created_at=NOW - timedelta(days=days_ago),
        stored_bytes=size,
    )


def location(lid: str, label: str, *, online: bool = True) -> LocationRecord:
    return LocationRecord(
        id=lid,
        store_id="s",
        kind="pool_dir" if lid == HOME else "s3_bucket",
        address=label,
        access="random" if lid == HOME else "cold",
        immutable=lid != HOME,
        removable=False,
        offsite=lid != HOME,
        online=online,
        label=label,
        created_at=NOW - timedelta(days=400),
    )


def copy(
    pid: str, lid: str, state: str = "present", verified_days_ago: float | None = None
) -> CopyRecord:
    verified = NOW - timedelta(days=verified_days_ago) if verified_days_ago is not None else None
    return CopyRecord(pid, "s", state, NOW - timedelta(days=1), lid, verified_at=verified)


LOCATIONS = [location(HOME, "local"), location("b1", "cold")]


def settings(**rule: object) -> object:
    base = {"name": "monthly", "location": "cold", "classes": ["monthly"], "min_age_days": 30}
    return parse_settings({"rules": [{**base, **rule}]})


def test_period_classes_are_the_newest_point_of_each_period_per_asset() -> None:
    points = [
        point("a", 0.1),  # 2026-06-15: newest of its day, week, month, year
        point("b", 1),  # 2026-06-14 (Sunday): newest of its day and its ISO week
        point("c", 20),  # 2026-05-26: newest of May
        point("d", 25),  # 2026-05-21: only a daily
        point("e", 0.2, asset="db"),  # another asset has its own periods
    ]
    classes = period_classes(points)
    assert classes["a"] == {"daily", "weekly", "monthly", "yearly"}
    assert classes["b"] == {"daily", "weekly"}
    assert classes["c"] == {"daily", "weekly", "monthly"}
    assert classes["d"] == {"daily", "weekly"}
    assert classes["e"] == {"daily", "weekly", "monthly", "yearly"}


def test_old_monthly_points_are_copied_locked_from_their_creation() -> None:
    points = [point("new", 0.1), point("may", 20), point("april", 50), point("april-2", 55)]
    plan = plan_tiering(
        points,
        {p.id: [copy(p.id, HOME)] for p in points},
        LOCATIONS,
        settings(storage_class="DEEP_ARCHIVE", keep_days=365),
        NOW,
        HOME,
    )
    assert [c.point_id for c in plan.copies] == ["april"]  # old enough and a monthly
    action = plan.copies[0]
    assert (action.location_id, action.storage_class, action.rule) == (
        "b1",
        "DEEP_ARCHIVE",
        "monthly",
    )
    assert action.retain_until == NOW - timedelta(days=50) + timedelta(days=365)
    assert plan.bytes_by_class == {"DEEP_ARCHIVE": GIB}
    assert not plan.drops and not plan.problems


def test_a_point_already_at_the_location_is_not_copied_again_and_an_interrupted_copy_resumes() -> (
    None
):
    points = [point("new", 0.1), point("april", 50), point("march", 80)]
    copies = {
        "new": [copy("new", HOME)],
        "april": [copy("april", HOME), copy("april", "b1", "archived", 3)],
        "march": [copy("march", HOME), copy("march", "b1", "copying")],
    }
    plan = plan_tiering(points, copies, LOCATIONS, settings(), NOW, HOME)
    assert [(c.point_id, c.resume) for c in plan.copies] == [("march", True)]


def test_the_local_copy_goes_only_after_the_cold_copy_was_verified_long_enough() -> None:
    points = [point("new", 0.1), point("april", 50), point("march", 80), point("feb", 110)]
    copies = {
        "new": [copy("new", HOME)],
        "april": [copy("april", HOME), copy("april", "b1", "archived", verified_days_ago=3)],
        "march": [copy("march", HOME), copy("march", "b1", "archived", verified_days_ago=8)],
        "feb": [copy("feb", HOME), copy("feb", "b1", "archived", verified_days_ago=None)],
    }
    plan = plan_tiering(points, copies, LOCATIONS, settings(keep_local_days=7), NOW, HOME)
    assert [d.point_id for d in plan.drops] == ["march"]  # april: 3 days; feb: never verified
    assert plan.drops[0].kept_at == "cold"
    # The newest point of an asset is never dropped, however old and tiered.
    only = [point("old-but-newest", 90)]
    plan = plan_tiering(
        only,
        {
            "old-but-newest": [
                copy("old-but-newest", HOME),
                copy("old-but-newest", "b1", "archived", 30),
            ]
        },
        LOCATIONS,
        settings(keep_local_days=1),
        NOW,
        HOME,
    )
    assert plan.drops == ()


def test_problems_are_said_in_words_and_the_rest_goes_on() -> None:
    doc = {
        "rules": [
            {"name": "gone", "location": "nowhere"},
            {"name": "home", "location": "local"},
            {"name": "ok", "location": "cold", "min_age_days": 1},
        ]
    }
    points = [point("p", 5), point("q", 0.1)]
    plan = plan_tiering(
        points,
        {p.id: [copy(p.id, HOME)] for p in points},
        LOCATIONS,
        parse_settings(doc),
        NOW,
        HOME,
    )
    assert plan.problems == (
        "rule gone: no location 'nowhere' of this store",
        "rule home: the home pool is where points are made",
    )
    assert [c.point_id for c in plan.copies] == ["p"]
    offline = [location(HOME, "local"), location("b1", "cold", online=False)]
    plan = plan_tiering(points, {}, offline, parse_settings(doc), NOW, HOME)
    assert any("did not answer" in p for p in plan.problems)


def test_the_longest_keeping_rule_wins_for_one_point_and_location() -> None:
    doc = {
        "rules": [
            {"name": "monthly", "location": "cold", "classes": ["monthly"], "keep_days": 365},
            {
                "name": "yearly",
                "location": "cold",
                "classes": ["yearly"],
                "keep_days": 2555,
                "storage_class": "DEEP_ARCHIVE",
            },
        ]
    }
    points = [point("dec", 200)]  # 2025-11-27: newest of its month and of 2025
    plan = plan_tiering(
        points, {"dec": [copy("dec", HOME)]}, LOCATIONS, parse_settings(doc), NOW, HOME
    )
    assert [(c.rule, c.storage_class) for c in plan.copies] == [("yearly", "DEEP_ARCHIVE")]


@pytest.mark.parametrize(
    "doc",
    [
        {"rules": [{"location": "cold"}]},
        {"rules": [{"name": "x"}]},
        {"rules": [{"name": "x", "location": "cold", "classes": ["hourly"]}]},
        {"rules": [{"name": "x", "location": "cold", "storage_class": "TAPE"}]},
        {"rules": [{"name": "x", "location": "cold", "keep_days": -1}]},
        {"rules": [{"name": "x", "location": "cold", "surprise": 1}]},
        {"rules": [{"name": "x", "location": "c"}, {"name": "x", "location": "c"}]},
        {"schedule": {"cron": "not cron"}},
        {"schedule": {"window_hours": 0}},
        {"bandwidth_mib_s": -5},
        {"other": 1},
    ],
)
def test_bad_settings_are_refused_in_words(doc: dict) -> None:
    with pytest.raises(InvalidInput):
        parse_settings(doc)


def test_cost_estimates_come_from_the_dated_price_file() -> None:
    prices = default_prices()
    assert prices["as_of"] and prices["currency"] == "USD"
    cost = storage_cost({"GLACIER": 10 * GIB, "DEEP_ARCHIVE": 10 * GIB}, prices)
    # 10 GiB of GLACIER at 0.0036/GB-month plus 40 KiB of index per 16 MiB object.
    glacier = (10 * GIB + 640 * 40 * 1024) / GIB * 0.0036
    assert cost.monthly["GLACIER"] == pytest.approx(glacier)
    assert cost.monthly["DEEP_ARCHIVE"] < cost.monthly["GLACIER"]
    assert cost.uploads == pytest.approx(640 / 1000 * 0.03 + 640 / 1000 * 0.05)
    assert recall_cost("GLACIER", "Bulk", GIB, 64, prices) == 0.0
    assert recall_cost("GLACIER", "Expedited", GIB, 1000, prices) == pytest.approx(0.03 + 10.0)
    assert recall_cost("DEEP_ARCHIVE", "Expedited", GIB, 1, prices) is None
