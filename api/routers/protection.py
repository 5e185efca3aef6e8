"""Protection over time: an asset's trends (RPO achieved, RTO measured, bytes added) and the
weekly protection report. Numbers come from :mod:`appliance.protection_trends` and verdicts from
:mod:`appliance.protection_status`, with the service's clock, so tests pin "now"."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import ServiceDep, Viewer
from api.protection_views import legs_public, reason_public, summary_public
from api.schemas_protection import (
    AgeSamplePublic,
    BytesSamplePublic,
    FailedJobPublic,
    ReportAssetPublic,
    ReportPublic,
    RtoSamplePublic,
    TrendsPublic,
)
from api.views import copies_public, describe_job
from appliance.catalog.records import FailoverSessionRecord, JobRecord
from appliance.protection_facts import gather_facts
from appliance.protection_status import asset_status, policies_of, worst_first
from appliance.protection_trends import (
    bytes_added,
    job_asset,
    rpo_series,
    rto_series,
    week_summary,
)

router = APIRouter(tags=["protection"])

#: Sessions and jobs read for a report: more than a busy week holds.
_HISTORY_LIMIT = 5000


@router.get("/assets/{name}/trends", response_model=TrendsPublic)
def trends(
    name: str,
    principal: Viewer,
    service: ServiceDep,
    days: Annotated[int, Query(ge=1, le=365)] = 30,
) -> TrendsPublic:
    """The RPO achieved (age of the newest good point: the vertices of a sawtooth), the RTO of
    each proven boot test or failover, and the bytes each backup added, over ``days`` days."""
    catalog = service.app.catalog
    asset = catalog.get_asset(name)  # NotFound (404) for an unknown name
    now = service.now()
    points = catalog.list_points(asset=asset.name)
    sessions = catalog.list_failover_sessions(asset=asset.name, limit=_HISTORY_LIMIT)
    targets = [p.rpo_seconds for p in policies_of(asset.name, catalog.list_policies())]
    return TrendsPublic(
        asset=asset.name,
        days=days,
        generated_at=now,
        rpo_seconds=min((t for t in targets if t > 0), default=None),
        rpo=[
            AgeSamplePublic(at=s.at, age_seconds=s.age_seconds)
            for s in rpo_series(points, now, days)
        ],
        rto=[
            RtoSamplePublic(
                at=s.at, rto_seconds=s.rto_seconds, purpose=s.purpose, session=s.session
            )
            for s in rto_series(sessions, now, days)
        ],
        bytes_added=[
            BytesSamplePublic(
                at=s.at, point=s.point, stored_bytes=s.stored_bytes, logical_bytes=s.logical_bytes
            )
            for s in bytes_added(points, now, days)
        ],
    )


def _failed_job(job: JobRecord) -> FailedJobPublic:
    error = job.error or {}
    return FailedJobPublic(
        id=job.id,
        kind=job.kind,
        description=describe_job(job),
        at=job.finished_at or job.created_at,
        error=str(error.get("message")) if error.get("message") else None,
    )


@router.get("/protection/report", response_model=ReportPublic)
def report(
    principal: Viewer,
    service: ServiceDep,
    days: Annotated[int, Query(ge=1, le=31)] = 7,
) -> ReportPublic:
    """The protection report of the last ``days`` days (a week by default): per asset its
    state and reasons, copies and 3-2-1 legs, the worst RPO age and the RTOs of the period, the
    points made and their bytes, its failed jobs; worst asset first."""
    catalog = service.app.catalog
    now = service.now()
    since = now - timedelta(days=days)
    statuses = worst_first(asset_status(f, now) for f in gather_facts(catalog))
    points = defaultdict(list)
    for point in catalog.list_points():
        points[point.asset].append(point)
    sessions: dict[str, list[FailoverSessionRecord]] = defaultdict(list)
    for session in catalog.list_failover_sessions(limit=_HISTORY_LIMIT):
        sessions[session.asset].append(session)
    failed: dict[str | None, list[JobRecord]] = defaultdict(list)
    for job in catalog.list_jobs(state="failed", limit=_HISTORY_LIMIT):
        if (job.finished_at or job.created_at) >= since:
            failed[job_asset(job)].append(job)
    known = {s.asset for s in statuses}
    assets = []
    for s in statuses:
        week = week_summary(points[s.asset], sessions[s.asset], failed[s.asset], now, days)
        assets.append(
            ReportAssetPublic(
                asset=s.asset,
                kind=s.kind,
                state=s.state,  # type: ignore[arg-type]
                reasons=[reason_public(r) for r in s.reasons],
                policies=s.policies,
                legs=legs_public(s.legs),
                copies=copies_public(catalog, s.last_good.id) if s.last_good else [],
                rpo_seconds=s.rpo_seconds,
                worst_age_seconds=week.worst_age_seconds,
                rto_seconds=week.rto_seconds,
                points_made=week.points_made,
                bytes_added=week.bytes_added,
                failed_jobs=[_failed_job(j) for j in week.failed_jobs],
            )
        )
    others = [j for asset, jobs in failed.items() if asset not in known for j in jobs]
    return ReportPublic(
        generated_at=now,
        since=since,
        days=days,
        appliance_name=str(service.settings_document()["appliance_name"]),
        summary=summary_public(statuses),
        assets=assets,
        other_failed_jobs=[_failed_job(j) for j in sorted(others, key=lambda j: j.created_at)],
    )
