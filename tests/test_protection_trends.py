"""Trends of protection on crafted records with explicit times: the RPO sawtooth, the RTOs of
proven boots, the bytes each backup added, and one asset's week for the printed report."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from appliance.catalog.records import FailoverSessionRecord, JobRecord, PointRecord
from appliance.protection import MIN_TREND_DAYS, growth
from appliance.protection_trends import (
    AgeSample,
    bytes_added,
    job_asset,
    rpo_series,
    rto_series,
    week_summary,
)

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
D = timedelta(days=1)


def point(pid: str, at: datetime, **kw: Any) -> PointRecord:
    return PointRecord(id=pid, asset="web", kind="files", mode="full", created_at=at, **kw)


def session(
    sid: str, at: datetime, purpose: str, rto: float | None, state: str = "stopped"
) -> FailoverSessionRecord:
    details: dict[str, Any] = {"purpose": purpose}
    if rto is not None:
        details |= {"proven_at": (at + timedelta(seconds=rto)).isoformat(), "rto_seconds": rto}
    return FailoverSessionRecord(id=sid, asset="web", point_id="p", state=state, started_at=at, details=details)  # fmt: skip


def job(jid: str, state: str, at: datetime, asset: str = "web") -> JobRecord:
    return JobRecord(
        id=jid, kind="backup", state=state, params={"asset": asset}, progress={}, result=None,
        error=None, created_at=at, started_at=at, finished_at=at + H, resource=None,
    )  # fmt: skip


def test_rpo_is_a_sawtooth_against_time() -> None:
    points = [
        point("a", NOW - 3 * D),  # before the window: the age at its start counts from here
        point("b", NOW - 1 * D),
        point("c", NOW - 12 * H, status="failed"),  # not good: no drop
        point("d", NOW - 6 * H, verify_status="damaged"),  # not good either
        point("e", NOW - 2 * H),
    ]
    series = rpo_series(points, NOW, days=2)
    assert series == [
        AgeSample(NOW - 2 * D, D.total_seconds()),
        AgeSample(NOW - D, 2 * D.total_seconds()),
        AgeSample(NOW - D, 0.0),
        AgeSample(NOW - 2 * H, (D - 2 * H).total_seconds()),
        AgeSample(NOW - 2 * H, 0.0),
        AgeSample(NOW, 2 * H.total_seconds()),
    ]


def test_rpo_before_the_first_point_is_unknown() -> None:
    assert rpo_series([], NOW, 30) == [AgeSample(NOW - 30 * D, None), AgeSample(NOW, None)]
    series = rpo_series([point("a", NOW - 5 * D)], NOW, 30)
    assert [s.age_seconds for s in series] == [None, None, 0.0, 5 * D.total_seconds()]
    # A point "made" after now (a clock set back) is not counted yet.
    assert rpo_series([point("z", NOW + H)], NOW, 1)[-1].age_seconds is None


def test_rto_of_proven_boots_in_the_window() -> None:
    sessions = [
        session("old", NOW - 40 * D, "boot_test", 10.0),
        session("t1", NOW - 5 * D, "boot_test", 31.5),
        session("f1", NOW - 2 * D, "failover", 48.0),
        session("bad", NOW - D, "boot_test", None, state="failed"),
        session("run", NOW - H, "boot_test", None, state="booting"),
    ]
    series = rto_series(sessions, NOW, 30)
    assert [(s.session, s.rto_seconds, s.purpose) for s in series] == [
        ("t1", 31.5, "boot_test"),
        ("f1", 48.0, "failover"),
    ]
    assert series[0].at == NOW - 5 * D + timedelta(seconds=31.5)


def test_bytes_added_per_backup() -> None:
    points = [
        point("b", NOW - D, stored_bytes=500, logical_bytes=9000),
        point("a", NOW - 3 * D, stored_bytes=100),
        point("x", NOW - 40 * D, stored_bytes=7),
        point("f", NOW - H, stored_bytes=99, status="failed"),
    ]
    assert [(s.point, s.stored_bytes) for s in bytes_added(points, NOW, 30)] == [
        ("a", 100),
        ("b", 500),
    ]


def test_week_summary() -> None:
    points = [point("a", NOW - 10 * D, stored_bytes=5), point("b", NOW - 2 * D, stored_bytes=70)]
    jobs = [
        job("j1", "failed", NOW - 3 * D),
        job("j2", "succeeded", NOW - 2 * D),
        job("j0", "failed", NOW - 9 * D),  # last week's
    ]
    week = week_summary(points, [session("t", NOW - D, "boot_test", 12.0)], jobs, NOW)
    assert week.worst_age_seconds == 8 * D.total_seconds()  # a's age just before b
    assert week.rto_seconds == [12.0] and week.points_made == 1 and week.bytes_added == 70
    assert [j.id for j in week.failed_jobs] == ["j1"]
    empty = week_summary([], [], [], NOW)
    assert empty.worst_age_seconds is None and empty.failed_jobs == []
    assert job_asset(jobs[0]) == "web" and job_asset(job("j", "failed", NOW, asset=3)) is None  # type: ignore[arg-type]


def test_capacity_growth_is_no_trend_until_a_week_of_backups() -> None:
    """A new appliance's first backup is not a rate: no growth (and no "years left") is
    claimed from fewer than MIN_TREND_DAYS days, and the days before the first backup are not
    fitted as days of no growth."""
    first = growth([point("a", NOW - 2 * H, stored_bytes=10 << 20)], NOW)
    assert (first.bytes_per_day, first.history_days) == (0.0, 1)
    assert first.days_until_full(1 << 40) is None
    assert first.series[-1][1] == 10 << 20  # the chart still shows what was stored
    assert growth([], NOW).history_days == 0
    week = [point(f"p{i}", NOW - i * D, stored_bytes=1 << 20) for i in range(MIN_TREND_DAYS)]
    steady = growth(week, NOW)
    # One MiB a day since the first backup, not spread over the empty weeks before it.
    assert steady.history_days == MIN_TREND_DAYS
    assert abs(steady.bytes_per_day - (1 << 20)) < 1
    old = [
        point("old", NOW - 90 * D, stored_bytes=1 << 30),
        point("new", NOW, stored_bytes=30 << 20),
    ]
    quiet = growth(old, NOW)
    # A store older than the window: all 30 days count, the quiet ones included.
    assert quiet.history_days == 30 and 0 < quiet.bytes_per_day < 2 << 20
