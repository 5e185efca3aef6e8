"""How protection went over time, per asset: pure functions of records and an explicit ``now``.

- **RPO achieved** (:func:`rpo_series`): the age of the newest good point at every moment of the
  window. It grows by one second a second and drops to zero when a good point is made, so it is a
  sawtooth; its vertices are enough to draw it (the page joins them with straight lines). Before
  the asset's first good point the age is unknown (``None``), which the chart leaves blank.
- **RTO measured** (:func:`rto_series`): the seconds from request to boot proof of each proven
  boot test or failover of the window.
- **Bytes added** (:func:`bytes_added`): what each point of the window added to its store.
- **The week** (:func:`week_summary`): the worst RPO age, the RTOs and the failed jobs of the
  last seven days, for the printable report.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from appliance.boot_verification import PURPOSE as BOOT_TEST_PURPOSE
from appliance.boot_verification import boot_test_result
from appliance.catalog.records import FailoverSessionRecord, JobRecord, PointRecord
from appliance.protection import is_good


@dataclass(frozen=True)
class AgeSample:
    at: datetime
    #: Age in seconds of the newest good point at ``at`` (None: there was none yet).
    age_seconds: float | None


@dataclass(frozen=True)
class RtoSample:
    at: datetime
    rto_seconds: float
    #: ``boot_test`` or ``failover``.
    purpose: str
    session: str


@dataclass(frozen=True)
class BytesSample:
    at: datetime
    point: str
    stored_bytes: int
    logical_bytes: int


def rpo_series(points: Iterable[PointRecord], now: datetime, days: int = 30) -> list[AgeSample]:
    """The sawtooth's vertices from ``now - days`` to ``now``, oldest first."""
    start = now - timedelta(days=days)
    made = sorted(p.created_at for p in points if is_good(p) and p.created_at <= now)
    before = [t for t in made if t <= start]
    newest = before[-1] if before else None

    def age(at: datetime) -> float | None:
        return (at - newest).total_seconds() if newest is not None else None

    samples = [AgeSample(start, age(start))]
    for created in (t for t in made if t > start):
        samples.append(AgeSample(created, age(created)))
        newest = created
        samples.append(AgeSample(created, 0.0))
    samples.append(AgeSample(now, age(now)))
    return samples


def rto_series(
    sessions: Iterable[FailoverSessionRecord], now: datetime, days: int = 30
) -> list[RtoSample]:
    """Each proven boot test or failover of the window with its measured RTO, oldest first."""
    start = now - timedelta(days=days)
    out = []
    for record in sessions:
        result = boot_test_result(record)
        if result.state != "proven" or result.rto_seconds is None:
            continue
        if start <= result.at <= now:
            purpose = record.details.get("purpose")
            out.append(
                RtoSample(
                    at=result.at,
                    rto_seconds=result.rto_seconds,
                    purpose=BOOT_TEST_PURPOSE if purpose == BOOT_TEST_PURPOSE else "failover",
                    session=record.id,
                )
            )
    return sorted(out, key=lambda s: s.at)


def bytes_added(points: Iterable[PointRecord], now: datetime, days: int = 30) -> list[BytesSample]:
    start = now - timedelta(days=days)
    return [
        BytesSample(p.created_at, p.id, p.stored_bytes, p.logical_bytes)
        for p in sorted(points, key=lambda p: (p.created_at, p.id))
        if start <= p.created_at <= now and p.status == "complete"
    ]


@dataclass(frozen=True)
class WeekSummary:
    #: The oldest the newest good point got during the week (None: no good point all week).
    worst_age_seconds: float | None
    rto_seconds: list[float]
    points_made: int
    bytes_added: int
    failed_jobs: list[JobRecord]


def job_asset(job: JobRecord) -> str | None:
    """The asset a job worked on, when its parameters name one."""
    value = job.params.get("asset")
    return value if isinstance(value, str) else None


def week_summary(
    points: Sequence[PointRecord],
    sessions: Iterable[FailoverSessionRecord],
    jobs: Iterable[JobRecord],
    now: datetime,
    days: int = 7,
) -> WeekSummary:
    """One asset's week: ``jobs`` are the asset's jobs (see :func:`job_asset`)."""
    start = now - timedelta(days=days)
    ages = [s.age_seconds for s in rpo_series(points, now, days)]
    known = [a for a in ages if a is not None]
    added = bytes_added(points, now, days)
    return WeekSummary(
        worst_age_seconds=max(known) if known else None,
        rto_seconds=[s.rto_seconds for s in rto_series(sessions, now, days)],
        points_made=len(added),
        bytes_added=sum(s.stored_bytes for s in added),
        failed_jobs=sorted(
            (j for j in jobs if j.state == "failed" and (j.finished_at or j.created_at) >= start),
            key=lambda j: j.created_at,
        ),
    )
