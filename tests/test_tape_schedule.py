"""Scheduled tape backups: which points a rule picks (pure, explicit times, the retention
function's answer), the scheduler tick (a slot fires once, never while a backup of the pool is
queued, running or waiting, not when nothing is new, and survives a restart), and the pool API
(operator, audited, refusals in words that change nothing) against a live uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server
from engine_support import PASSPHRASE, set_engine_env

from appliance.engine import Appliance
from appliance.errors import InvalidInput
from appliance.retention import RetentionRules, apply_retention
from hardware.tape.deck import open_deck
from hardware.tape.jobs import backup_to_tape, register_tape_jobs
from hardware.tape.library import create_virtual_library, register_library
from hardware.tape.schedule import check_rule, points_by_rule, rule_words, tape_backup_tick

MiB = 1024 * 1024


@dataclass(frozen=True)
class P:
    id: str
    asset: str
    created_at: datetime


def _t(day: int, hour: int = 12) -> datetime:
    return datetime(2026, 3, 1, hour, tzinfo=UTC) + timedelta(days=day - 1)


# --- which points ---------------------------------------------------------------------------------


def test_newest_takes_the_newest_point_of_each_asset() -> None:
    points = [
        P("a1", "a", _t(1)),
        P("a2", "a", _t(2)),
        P("b1", "b", _t(1, 9)),
        P("b0", "b", _t(1, 8)),
    ]
    assert points_by_rule(points, {"rule": "newest"}) == ["b1", "a2"]
    assert points_by_rule(points, check_rule("newest")) == ["b1", "a2"]
    assert points_by_rule(points, {"rule": "newest", "assets": ["a"]}) == ["a2"]
    assert points_by_rule([], {"rule": "newest"}) == []


def test_gfs_picks_what_retention_keeps() -> None:
    # Two points a day for 60 days (March and April 2026), one asset; another asset beside it.
    points = [P(f"p{d}-{h}", "vm", _t(d, h)) for d in range(1, 61) for h in (6, 18)]
    other = [P(f"o{d}", "files", _t(d)) for d in range(1, 61)]
    rule = {"rule": "gfs", "keep_daily": 3, "keep_weekly": 2, "keep_monthly": 2}
    chosen = points_by_rule(points + other, {**rule, "assets": ["vm"]})
    kept = apply_retention(points, RetentionRules(keep_daily=3, keep_weekly=2, keep_monthly=2))
    assert set(chosen) == set(kept.keep)
    # The newest of the last 3 days (Apr 27-29), of the last 2 ISO weeks (Sunday Apr 26, and
    # Wednesday Apr 29), of March (31st) and of April.
    assert chosen == ["p31-18", "p57-18", "p58-18", "p59-18", "p60-18"]
    both = points_by_rule(points + other, rule)
    assert {"o60", "o59", "o58", "o57", "o31"} <= set(both) and len(both) == 10
    assert rule_words(check_rule(rule)) == "the points GFS keeps: 3 daily, 2 weekly, 2 monthly"


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        ({"rule": "gfs"}, "at least one daily"),
        ({"rule": "gfs", "keep_daily": -1}, "keep_daily is a whole number"),
        ({"rule": "weekly"}, "newest or gfs"),
        ({"rule": "newest", "keep_daily": 3}, "belong to a gfs rule"),
        ({"rule": "newest", "assets": "vm"}, "list of asset names"),
        ({"rule": "newest", "when": 1}, "unknown field(s) in the points rule: when"),
        (["p1"], "which points"),
    ],
)
def test_bad_rules_are_refused_in_words(rule: object, words: str) -> None:
    with pytest.raises(InvalidInput, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_rule(rule)


# --- the tick -------------------------------------------------------------------------------------


def _app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Appliance, str, str]:
    set_engine_env(monkeypatch)
    register_tape_jobs()
    app, _ = Appliance.init(str(tmp_path / "data"), PASSPHRASE, pack_size=256 * 1024)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("to tape on a schedule")
    point = app.backup_files(str(src), "docs").point.id
    library = create_virtual_library(
        tmp_path / "lib", slots=3, cartridges=[("SCH001", 4 * MiB), ("SCH002", 4 * MiB)]
    )
    register_library(app.catalog, library.root)
    app.catalog.put_tape_pool("nightly", allocation="continue", retention_days=7)
    return app, library.drive_identity(0), point


def _jobs(app: Appliance) -> list[str]:
    return [j.id for j in app.catalog.list_jobs(limit=100) if j.kind == "tape_backup"]


def test_the_tick_fires_each_slot_once_and_never_beside_a_running_backup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, drive, point = _app(tmp_path, monkeypatch)
    try:
        tick = tape_backup_tick(app)
        start = app.catalog.set_tape_pool_schedule(
            "nightly", schedule="0 3 * * *", drive=drive, points_rule={"rule": "newest"}
        ).schedule_last_slot
        assert start is not None
        assert tick(start) == []  # a schedule never fires for time before it was set
        day1 = start + timedelta(days=1)
        (first,) = tick(day1)
        job = app.catalog.get_job(first)
        assert job.params["pool"] == "nightly" and job.params["drive"] == drive
        assert job.params["points"] == {"rule": "newest"} and job.params["trigger"] == "schedule"
        assert job.state == "queued"
        assert tick(day1) == []  # the same slot, a second tick (or a second scheduler)
        # A restart: a new tick function finds the slot fired in the catalog, not in memory.
        assert tape_backup_tick(app)(day1) == []
        # The next slot comes while the first backup is still queued: recorded, no second job.
        assert tick(day1 + timedelta(days=1)) == []
        assert _jobs(app) == [first]
        assert app.catalog.get_tape_pool("nightly").schedule_last_slot > day1 - timedelta(hours=1)
        # The backup runs (the work function the job calls): then nothing is new on the set.
        app.catalog.update_job(first, state="running")
        result = backup_to_tape(app, open_deck(app.catalog, drive), "nightly", {"rule": "newest"})
        assert result["points_written"] == [point]
        app.catalog.update_job(first, state="succeeded")
        assert tick(day1 + timedelta(days=2)) == []  # the slot fires, with nothing to write
        # A new point: the next slot writes it.
        (tmp_path / "src" / "b.txt").write_text("new")
        app.backup_files(str(tmp_path / "src"), "docs")
        (second,) = tick(day1 + timedelta(days=3))
        assert set(_jobs(app)) == {first, second}
        # A pool whose schedule is removed fires no more.
        app.catalog.update_job(second, state="cancelled")
        app.catalog.set_tape_pool_schedule("nightly", schedule=None, drive=None, points_rule={})
        assert tick(day1 + timedelta(days=9)) == []
    finally:
        app.close()


def test_a_stale_slot_fires_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app, drive, _point = _app(tmp_path, monkeypatch)
    try:
        pool = app.catalog.set_tape_pool_schedule(
            "nightly", schedule="0 3 * * *", drive=drive, points_rule={"rule": "newest"}
        )
        assert pool.schedule_last_slot is not None
        slot = pool.schedule_last_slot + timedelta(days=1)
        stale = pool.schedule_last_slot - timedelta(days=1)
        params = {"pool": "nightly", "points": {"rule": "newest"}, "drive": drive}
        fired = app.catalog.fire_tape_backup(
            "nightly", stale, slot, job_kind="tape_backup", params=params, resource=None
        )
        assert fired is None and _jobs(app) == []
        assert app.catalog.get_tape_pool("nightly").schedule_last_slot == pool.schedule_last_slot
    finally:
        app.close()


# --- the API --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("tape-schedule-api")
    with bootstrapped_server(root, device_monitor=False, max_parallel_jobs=0) as live:
        library = create_virtual_library(root / "lib", slots=2, name="sched")
        register_library(live.service.app.catalog, library.root)
        yield live


def test_pools_are_set_by_operators_checked_and_audited(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client, viewer: httpx.Client
) -> None:
    body = {
        "allocation": "new_set",
        "retention_days": 30,
        "schedule": "30 2 * * 6",
        "drive": "virtual:sched-drive0",
        "points": {"rule": "gfs", "keep_weekly": 4, "keep_monthly": 3},
    }
    assert viewer.put("/api/tape/pools/offsite", json=body).status_code == 403
    refused = [
        ({**body, "drive": None}, 400, "needs the drive"),
        ({**body, "drive": "virtual:sched-drive9"}, 404, "no tape drive virtual:sched-drive9"),
        ({**body, "schedule": "every saturday"}, 422, ""),
        ({**body, "points": {"rule": "gfs"}}, 400, "at least one daily"),
        ({**body, "points": {"rule": "newest", "assets": ["nope"]}}, 404, "nope"),
    ]
    for bad, code, words in refused:
        r = operator.put("/api/tape/pools/offsite", json=bad)
        assert r.status_code == code, (bad, r.text)
        assert words in r.json()["message"], r.text
    assert viewer.get("/api/tape/pools").json() == []  # nothing was made by a refusal

    r = operator.put("/api/tape/pools/offsite", json=body)
    assert r.status_code == 200, r.text
    pool = r.json()
    assert pool["schedule"] == "30 2 * * 6" and pool["drive"] == "virtual:sched-drive0"
    assert pool["points"] == {
        "rule": "gfs",
        "keep_daily": 0,
        "keep_weekly": 4,
        "keep_monthly": 3,
        "keep_yearly": 0,
    }
    assert pool["points_words"] == "the points GFS keeps: 4 weekly, 3 monthly"
    next_run = datetime.fromisoformat(pool["next_run"])
    assert next_run.weekday() == 5 and (next_run.hour, next_run.minute) == (2, 30)
    (listed,) = viewer.get("/api/tape/pools").json()
    assert listed["name"] == "offsite" and listed["allocation"] == "new_set"
    catalog = server.service.app.catalog
    assert catalog.get_tape_pool("offsite").retention_days == 30

    # Unscheduled again: only when asked.
    r = operator.put("/api/tape/pools/offsite", json={"retention_days": 30})
    assert r.status_code == 200 and r.json()["schedule"] is None and r.json()["next_run"] is None
    assert catalog.get_tape_pool("offsite").schedule_last_slot is None
    actions = [a for a in admin.get("/api/audit").json() if a["action"] == "tape.pool.put"]
    assert len(actions) == 2 and actions[-1]["actor"] == "operator"
    assert {a["details"]["schedule"] for a in actions} == {"30 2 * * 6", None}
