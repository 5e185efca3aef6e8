"""Jobs: long operations, their state machine and their logs.

A job moves along :data:`records.JOB_TRANSITIONS`; staying in a state is a no-op, any other move
is a :class:`Conflict`. Log lines get per-job sequence numbers from a counter on the job row,
bumped with an ``UPDATE ... RETURNING`` that takes the row's lock, so the lines of one job commit
in ``seq`` order and a reader following ``job_log(job_id, after_seq=...)`` never skips one.

:func:`new_job_row` and :func:`append_log_line` work inside a caller's transaction: the
schedules repository creates a fired schedule's job with them in the same transaction that
advances the schedule.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from appliance.catalog.database import Database, check_choice, check_name, utc
from appliance.catalog.models import (
    JobLogRow,
    JobRow,
)
from appliance.catalog.records import (
    JOB_STATES,
    JOB_TRANSITIONS,
    LOG_LEVELS,
    STOPPED_JOB_STATES,
    JobLogRecord,
    JobRecord,
)
from appliance.errors import Conflict, InvalidInput, NotFound


def new_job_row(db: Database, kind: str, params: dict[str, Any], resource: str | None) -> JobRow:
    """A new ``queued`` job row with a random 32-hex-digit ID (not yet added to a session)."""
    return JobRow(
        id=uuid.uuid4().hex,
        kind=kind,
        state="queued",
        params=dict(params),
        progress={},
        result=None,
        error=None,
        created_at=db.now(),
        started_at=None,
        finished_at=None,
        resource=resource,
        log_seq=0,
        wait_reason=None,
        wake_at=None,
        checkpoint=None,
        attempts=0,
    )


def add_job_row(
    db: Database,
    session: Session,
    kind: str,
    params: dict[str, Any],
    resource: str | None,
    log: Iterable[tuple[str, str]] = (),
) -> JobRecord:
    """Create a queued job with its first log lines inside the caller's transaction (a
    scheduler fires its slot and makes the slot's job at once, or not at all)."""
    job = new_job_row(db, kind, params, resource)
    session.add(job)
    session.flush()
    for level, message in log:
        append_log_line(db, session, job.id, level, message)
    return job.to_record()


def job_row(session: Session, job_id: str, *, lock: bool = False) -> JobRow:
    row = session.get(JobRow, job_id, with_for_update=lock)
    if row is None:
        raise NotFound(f"job {job_id} does not exist", job_id=job_id)
    return row


def append_log_line(db: Database, session: Session, job_id: str, level: str, message: str) -> None:
    """Add a log line to the job, numbered by the job row's counter (see the module doc)."""
    seq = session.scalar(
        update(JobRow)
        .where(JobRow.id == job_id)
        .values(log_seq=JobRow.log_seq + 1)
        .returning(JobRow.log_seq)
        .execution_options(synchronize_session=False)
    )
    if seq is None:
        raise NotFound(f"job {job_id} does not exist", job_id=job_id)
    session.add(JobLogRow(job_id=job_id, seq=seq, at=db.now(), level=level, message=message))


class JobRepository:
    """Jobs and their log lines."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create_job(
        self, kind: str, params: dict[str, Any], resource: str | None = None
    ) -> JobRecord:
        """A new ``queued`` job with a random 32-hex-digit ID."""
        check_name(kind, "job kind")
        if resource is not None:
            check_name(resource, "job resource")
        with self._db.session(write=True) as session:
            row = new_job_row(self._db, kind, params, resource)
            session.add(row)
            return row.to_record()

    def count_jobs(self) -> dict[str, int]:
        """How many jobs are in each state (states without jobs are left out)."""
        with self._db.session(write=False) as session:
            rows = session.execute(select(JobRow.state, func.count()).group_by(JobRow.state))
            return {state: int(count) for state, count in rows}

    def update_job(
        self,
        job_id: str,
        *,
        state: str | None = None,
        progress: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> JobRecord:
        """Move a job along :data:`records.JOB_TRANSITIONS` and/or replace its JSON fields.

        Entering ``running`` stamps ``started_at`` (again, when an interrupted job resumes) and
        clears ``finished_at``; entering a state of :data:`records.STOPPED_JOB_STATES` stamps
        ``finished_at``. A transition the state machine forbids is a :class:`Conflict`; staying
        in the same state changes nothing. ``progress``, ``result`` and ``error`` replace the
        stored values when given (None leaves them unchanged).
        """
        if state is not None:
            check_choice(state, JOB_STATES, "job state")
        with self._db.session(write=True) as session:
            row = job_row(session, job_id, lock=True)
            if state is not None and state != row.state:
                if state not in JOB_TRANSITIONS[row.state]:
                    raise Conflict(
                        f"job {job_id} is {row.state}; it cannot become {state}",
                        job_id=job_id,
                        state=row.state,
                    )
                now = self._db.now()
                if row.state == "waiting":  # woken (or cancelled): it waits no more
                    row.wait_reason = None
                    row.wake_at = None
                row.state = state
                if state == "running":
                    row.started_at = now
                    row.finished_at = None
                    row.attempts = (row.attempts or 0) + 1
                elif state in STOPPED_JOB_STATES:
                    row.finished_at = now
                else:
                    row.finished_at = None
            if progress is not None:
                row.progress = dict(progress)
            if result is not None:
                row.result = dict(result)
            if error is not None:
                row.error = dict(error)
            return row.to_record()

    def set_waiting(
        self,
        job_id: str,
        reason: str,
        wake_at: datetime | None,
        checkpoint: dict[str, Any] | None,
    ) -> JobRecord:
        """Move a ``running`` job to ``waiting``: why, when it wakes by itself (None: only
        :meth:`wake_job` does), and the checkpoint it resumes from (None keeps the saved one).
        """
        if not reason:
            raise InvalidInput("a waiting job needs a reason")
        when = None if wake_at is None else utc(wake_at, "wake_at")
        with self._db.session(write=True) as session:
            row = job_row(session, job_id, lock=True)
            if row.state != "waiting" and "waiting" not in JOB_TRANSITIONS[row.state]:
                raise Conflict(
                    f"job {job_id} is {row.state}; it cannot become waiting",
                    job_id=job_id,
                    state=row.state,
                )
            row.state = "waiting"
            row.finished_at = None
            row.wait_reason = reason
            row.wake_at = when
            row.progress = {"waiting": reason}
            if checkpoint is not None:
                row.checkpoint = dict(checkpoint)
            return row.to_record()

    def due_waiting(self, now: datetime) -> list[JobRecord]:
        """``waiting`` jobs whose ``wake_at`` is at or before ``now``, soonest first."""
        when = utc(now, "now")
        query = (
            select(JobRow)
            .where(JobRow.state == "waiting", JobRow.wake_at.is_not(None), JobRow.wake_at <= when)
            .order_by(JobRow.wake_at, JobRow.created_at)
        )
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    def wake_job(self, job_id: str) -> JobRecord | None:
        """Queue a ``waiting`` job again (its checkpoint stays); None if it was not waiting."""
        with self._db.session(write=True) as session:
            row = job_row(session, job_id, lock=True)
            if row.state != "waiting":
                return None
            row.state = "queued"
            row.wait_reason = None
            row.wake_at = None
            row.finished_at = None
            return row.to_record()

    def save_checkpoint(self, job_id: str, checkpoint: dict[str, Any]) -> None:
        """Replace the job's checkpoint (a JSON document): a resumed run starts from it."""
        with self._db.session(write=True) as session:
            job_row(session, job_id, lock=True).checkpoint = dict(checkpoint)

    def get_job(self, job_id: str) -> JobRecord:
        with self._db.session(write=False) as session:
            return job_row(session, job_id).to_record()

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        """Jobs, newest first, at most ``limit`` of them."""
        if limit < 1:
            raise InvalidInput("limit must be at least 1")
        query = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit)
        if state is not None:
            check_choice(state, JOB_STATES, "job state")
            query = query.where(JobRow.state == state)
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    def append_job_log(self, job_id: str, level: str, message: str) -> None:
        check_choice(level, LOG_LEVELS, "log level")
        with self._db.session(write=True) as session:
            append_log_line(self._db, session, job_id, level, message)

    def job_log(self, job_id: str, after_seq: int = 0) -> list[JobLogRecord]:
        """The job's log lines with ``seq`` greater than ``after_seq``, in order."""
        with self._db.session(write=False) as session:
            job_row(session, job_id)
            rows = session.scalars(
                select(JobLogRow)
                .where(JobLogRow.job_id == job_id, JobLogRow.seq > after_seq)
                .order_by(JobLogRow.seq)
            )
            return [row.to_record() for row in rows]

    def mark_running_jobs_interrupted(self) -> int:
        """Mark every ``running`` job ``interrupted`` (at start-up: nothing runs yet).

        Each gets ``finished_at`` and a warning in its log, so the user reading it sees why it
        stopped. Returns how many jobs were marked.
        """
        with self._db.session(write=True) as session:
            rows = list(
                session.scalars(select(JobRow).where(JobRow.state == "running").with_for_update())
            )
            now = self._db.now()
            for row in rows:
                row.state = "interrupted"
                row.finished_at = now
            session.flush()
            for row in rows:
                append_log_line(
                    self._db,
                    session,
                    row.id,
                    "warning",
                    "interrupted: the appliance stopped while this job was running",
                )
            return len(rows)
