"""Jobs: list, detail, log, cancel, retry, and live updates as server-sent events.

The event streams poll the catalog (every :data:`POLL_SECONDS`), where job state lives, and take
running jobs' progress from the runner, which has it fresher. Events:

- ``job``: the job (JobPublic JSON) whenever its state or progress changed;
- ``log``: one log line (JobLogLine JSON; the SSE ``id`` is its ``seq``, so a reconnecting
  client's ``Last-Event-ID`` resumes the log where it stopped);
- ``end``: the job stopped (succeeded, failed, cancelled, interrupted); the stream closes.

A comment line is sent every 15 s so proxies keep the connection open.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from anyio import to_thread
from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from api.deps import Operator, ServiceDep, StoreService, Viewer
from api.schemas import SQL_INT_MAX, JobLogLine, JobPublic
from api.service import Service
from api.views import job_public, log_line
from appliance.catalog.records import STOPPED_JOB_STATES

router = APIRouter(tags=["jobs"])

POLL_SECONDS = 0.5
HEARTBEAT_SECONDS = 15.0
#: A log line's ``seq`` (a 64-bit integer in the catalog).
Seq = Annotated[int, Query(ge=0, le=SQL_INT_MAX)]
JobState = Literal[
    "queued", "running", "waiting", "succeeded", "failed", "cancelled", "interrupted"
]
SSE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "event stream"}
}


def _event(kind: str, data: str, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {data}\n\n"


@router.get("/jobs", response_model=list[JobPublic])
def list_jobs(
    principal: Viewer,
    service: StoreService,
    state: JobState | None = None,
    kind: Annotated[str | None, Query(max_length=255)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[JobPublic]:
    """Jobs, newest first (``limit`` applies before the ``kind`` filter)."""
    jobs = service.app.catalog.list_jobs(state=state, limit=limit)
    return [job_public(j, service.runner) for j in jobs if kind is None or j.kind == kind]


def _job_answer(service: Service, job_id: str) -> bytes:
    job = service.app.catalog.get_job(job_id)
    return job_public(job, service.runner).model_dump_json().encode()


@router.get("/jobs/{job_id}", response_model=JobPublic)
async def get_job(job_id: str, principal: Viewer, service: StoreService) -> Response:
    """One job. The page polls this: the answer is shared by all callers for up to
    ``JOB_ANSWER_TTL`` seconds (see ``api.cache``)."""
    key = (job_id, service.jobs_finished)  # a job ending shows at once
    body = await service.job_answers.get_or_compute(key, lambda: _job_answer(service, job_id))
    return Response(body, media_type="application/json")


@router.get("/jobs/{job_id}/log", response_model=list[JobLogLine])
def job_log(
    job_id: str,
    principal: Viewer,
    service: StoreService,
    after_seq: Seq = 0,
) -> list[JobLogLine]:
    """The job's log lines after ``after_seq`` (poll with the last seq seen)."""
    return [log_line(line) for line in service.app.catalog.job_log(job_id, after_seq)]


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, principal: Operator, service: StoreService) -> JobPublic:
    """Cancel a queued or running job (a running one stops at its next check)."""
    job = service.jobs.cancel(job_id)
    service.app.catalog.audit(principal.name, "job.cancel", job_id, principal.audit_details)
    return job_public(job, service.runner)


@router.post("/jobs/{job_id}/retry", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED)
def retry_job(
    job_id: str, principal: Operator, service: StoreService, response: Response
) -> JobPublic:
    """Resume an interrupted job, or run a failed/cancelled one again as a new job."""
    job = service.jobs.retry(job_id)
    service.app.catalog.audit(
        principal.name, "job.retry", job_id, {"job": job.id, **principal.audit_details}
    )
    response.headers["Location"] = f"/api/jobs/{job.id}"
    return job_public(job, service.runner)


def _last_seq(last_event_id: str | None) -> int | None:
    """The ``seq`` of a reconnecting client's ``Last-Event-ID``; None unless it is one (ASCII
    digits only: ``str.isdigit`` also accepts "²", which ``int`` refuses)."""
    if not last_event_id or len(last_event_id) > 19 or not last_event_id.isascii():
        return None
    if not last_event_id.isdigit() or int(last_event_id) > SQL_INT_MAX:
        return None
    return int(last_event_id)


def _stream(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse, responses=SSE_RESPONSE)
async def job_events(
    job_id: str,
    principal: Viewer,
    service: StoreService,
    request: Request,
    after_seq: Seq = 0,
    max_seconds: Annotated[float, Query(gt=0, le=86400)] = 3600.0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Live state, progress and log lines of one job (server-sent events) until it stops."""
    catalog = service.app.catalog
    await to_thread.run_sync(catalog.get_job, job_id)  # 404 before the stream starts
    resume = _last_seq(last_event_id)
    if resume is not None:
        after_seq = max(after_seq, resume)
    runner = service.runner

    async def events() -> AsyncIterator[str]:
        seq = after_seq
        last = ""
        deadline = time.monotonic() + max_seconds
        beat = time.monotonic()
        while True:
            job = await to_thread.run_sync(catalog.get_job, job_id)
            data = job_public(job, runner).model_dump_json()
            if data != last:
                last = data
                yield _event("job", data)
            for line in await to_thread.run_sync(catalog.job_log, job_id, seq):
                seq = line.seq
                yield _event("log", log_line(line).model_dump_json(), line.seq)
            if job.state in STOPPED_JOB_STATES:
                yield _event("end", json.dumps({"id": job.id, "state": job.state}))
                return
            now = time.monotonic()
            if now > deadline or await request.is_disconnected():
                return
            if now - beat >= HEARTBEAT_SECONDS:
                beat = now
                yield ": keep-alive\n\n"
            await asyncio.sleep(POLL_SECONDS)

    return _stream(events())


@router.get("/events", response_class=StreamingResponse, responses=SSE_RESPONSE)
async def all_events(
    principal: Viewer,
    service: ServiceDep,
    request: Request,
    max_seconds: Annotated[float, Query(gt=0, le=86400)] = 3600.0,
) -> StreamingResponse:
    """Every change of any recent job (``job`` events, server-sent), for the jobs page and the
    dashboard. The first event per job comes when it changes after the client connected."""
    catalog = service.app.catalog
    runner = service.runner

    def recent() -> dict[str, str]:
        return {j.id: job_public(j, runner).model_dump_json() for j in catalog.list_jobs(limit=50)}

    async def events() -> AsyncIterator[str]:
        yield ": connected\n\n"
        seen: dict[str, str] | None = None
        deadline = time.monotonic() + max_seconds
        beat = time.monotonic()
        while True:
            # One query and serialisation a tick, however many pages listen.
            current = await service.recent_jobs.get_or_compute(service.jobs_finished, recent)
            if seen is not None:
                for job_id, data in current.items():
                    if seen.get(job_id) != data:
                        yield _event("job", data)
            seen = current
            now = time.monotonic()
            if now > deadline or await request.is_disconnected():
                return
            if now - beat >= HEARTBEAT_SECONDS:
                beat = now
                yield ": keep-alive\n\n"
            await asyncio.sleep(POLL_SECONDS)

    return _stream(events())
