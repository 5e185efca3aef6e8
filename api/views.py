"""Catalog records as public schemas (the conversions several routers share)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from api.schemas import CopyPublic, JobLogLine, JobPublic, PointPublic
from appliance.catalog import Catalog
from appliance.catalog.records import JobLogRecord, JobRecord, PointRecord
from appliance.jobs import JOB_KINDS, JobRunner


def describe_job(job: JobRecord) -> str:
    kind = JOB_KINDS.get(job.kind)
    try:
        text = kind.describe(job.params) if kind is not None else ""
    except (KeyError, TypeError):
        text = ""
    return text or job.kind.replace("_", " ")


def job_public(job: JobRecord, runner: JobRunner | None = None) -> JobPublic:
    progress = dict(job.progress)
    if runner is not None and job.state == "running":
        # The runner holds progress fresher than the catalog (which it updates twice a second).
        live = runner.live_progress(job.id)
        if live:
            progress = live
    return JobPublic(
        id=job.id,
        kind=job.kind,
        description=describe_job(job),
        state=job.state,
        params=job.params,
        progress=progress,
        result=job.result,
        error=job.error,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        resource=job.resource,
        wait_reason=job.wait_reason,
        wake_at=job.wake_at,
    )


def log_line(line: JobLogRecord) -> JobLogLine:
    return JobLogLine(seq=line.seq, at=line.at, level=line.level, message=line.message)


def point_public(point: PointRecord) -> PointPublic:
    fields: dict[str, Any] = asdict(point)
    fields.pop("labels", None)
    return PointPublic(**fields)


def copies_public(catalog: Catalog, point_id: str) -> list[CopyPublic]:
    """A point's copies with where they live (the location's label and kind)."""
    locations = {loc.id: loc for loc in catalog.list_locations()}
    out = []
    for copy in catalog.copies_of(point_id):
        location = locations.get(copy.location_id or "")
        out.append(
            CopyPublic(
                store_id=copy.store_id,
                location_kind=location.kind if location else "unknown",
                location=location.label if location else "",
                state=copy.state,
                added_at=copy.added_at,
                location_id=copy.location_id,
                online=location.online if location else False,
                verified_at=copy.verified_at,
                storage_class=copy.storage_class,
                retain_until=copy.retain_until,
            )
        )
    return out
