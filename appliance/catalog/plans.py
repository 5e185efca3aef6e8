"""Recovery plans and their runs (revision 0010).

A plan is stored as given: its boot groups are validated before they reach the catalog
(:mod:`image.failover.plan_rules`, which knows networks and asset kinds); the repository keeps
the name unique and the assets' existence true at the time of writing. Runs are history: a run is
created when its job starts, updated as each VM boots, and kept after the plan is deleted.

The scheduled test of a plan fires at most once per slot: :meth:`PlanRepository.fire_plan_test`
moves the plan's ``test_last_slot`` and creates the job in one transaction, and does neither when
another scheduler tick already moved it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from appliance.catalog.database import Database, check_choice, check_name, utc
from appliance.catalog.jobs import add_job_row
from appliance.catalog.models import AssetRow
from appliance.catalog.models_plans import PlanRunRow, RecoveryPlanRow
from appliance.catalog.records import JobRecord
from appliance.catalog.records_plans import (
    PLAN_RUN_KINDS,
    PLAN_RUN_STATES,
    PlanRecord,
    PlanRunRecord,
)
from appliance.errors import InvalidInput, NotFound


def _plan_row(session: Session, plan_id: str, *, lock: bool = False) -> RecoveryPlanRow:
    row = session.get(RecoveryPlanRow, plan_id, with_for_update=lock)
    if row is None:
        raise NotFound(f"recovery plan {plan_id} does not exist", plan=plan_id)
    return row


def _assets_must_exist(session: Session, groups: list[dict[str, Any]]) -> None:
    names = sorted({str(vm["asset"]) for g in groups for vm in g.get("vms", [])})
    known = set(session.scalars(select(AssetRow.name).where(AssetRow.name.in_(names))))
    missing = [n for n in names if n not in known]
    if missing:
        raise NotFound(f"asset {missing[0]} does not exist", asset=missing[0])


class PlanRepository:
    """Recovery plans and their runs."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # --- plans ------------------------------------------------------------------------------

    def add_plan(
        self, name: str, groups: list[dict[str, Any]], *, test_cron: str | None = None
    ) -> PlanRecord:
        """A new plan; a second plan of the same name is a :class:`Conflict`."""
        check_name(name, "plan name")
        conflict = f"a recovery plan named {name!r} already exists"
        with self._db.session(write=True, conflict=conflict) as session:
            _assets_must_exist(session, groups)
            now = self._db.now()
            row = RecoveryPlanRow(
                id=uuid.uuid4().hex[:12],
                name=name,
                groups=[dict(g) for g in groups],
                test_cron=test_cron,
                test_last_slot=now if test_cron else None,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            return row.to_record()

    def update_plan(
        self,
        plan_id: str,
        *,
        name: str,
        groups: list[dict[str, Any]],
        test_cron: str | None,
    ) -> PlanRecord:
        """Replace a plan's name, groups and schedule; a changed schedule starts now (it never
        fires for time before it was set)."""
        check_name(name, "plan name")
        conflict = f"a recovery plan named {name!r} already exists"
        with self._db.session(write=True, conflict=conflict) as session:
            row = _plan_row(session, plan_id, lock=True)
            _assets_must_exist(session, groups)
            now = self._db.now()
            if test_cron != row.test_cron:
                row.test_last_slot = now if test_cron else None
            row.name = name
            row.groups = [dict(g) for g in groups]
            row.test_cron = test_cron
            row.updated_at = now
            session.flush()
            return row.to_record()

    def get_plan(self, plan_id: str) -> PlanRecord:
        with self._db.session(write=False) as session:
            return _plan_row(session, plan_id).to_record()

    def list_plans(self) -> list[PlanRecord]:
        with self._db.session(write=False) as session:
            rows = session.scalars(select(RecoveryPlanRow).order_by(RecoveryPlanRow.name))
            return [row.to_record() for row in rows]

    def delete_plan(self, plan_id: str) -> PlanRecord:
        """Delete a plan (its runs stay, as history); returns what was deleted."""
        with self._db.session(write=True) as session:
            row = _plan_row(session, plan_id, lock=True)
            record = row.to_record()
            session.delete(row)
            return record

    def fire_plan_test(
        self,
        plan_id: str,
        last_slot: datetime | None,
        slot: datetime,
        *,
        job_kind: str | None,
        params: dict[str, Any],
        resource: str | None,
        log: Sequence[tuple[str, str]] = (),
    ) -> JobRecord | None:
        """Record ``slot`` as the plan's last test slot and, with ``job_kind``, create its job,
        in one transaction; None (and nothing changed) when the plan's stored slot is no longer
        ``last_slot`` (another tick fired it) or the plan is gone."""
        slot = utc(slot, "schedule slot")
        with self._db.session(write=True) as session:
            row = session.get(RecoveryPlanRow, plan_id, with_for_update=True)
            if row is None or row.test_last_slot != last_slot:
                return None
            row.test_last_slot = slot
            if job_kind is None:
                return None
            return add_job_row(self._db, session, job_kind, params, resource, log)

    # --- runs -------------------------------------------------------------------------------

    def add_plan_run(
        self,
        plan: PlanRecord,
        kind: str,
        requested_at: datetime,
        *,
        job_id: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> PlanRunRecord:
        check_choice(kind, PLAN_RUN_KINDS, "plan run kind")
        with self._db.session(write=True) as session:
            row = PlanRunRow(
                id=uuid.uuid4().hex[:12],
                plan_id=plan.id,
                plan_name=plan.name,
                kind=kind,
                state="running",
                job_id=job_id,
                requested_at=utc(requested_at, "the run's request time"),
                finished_at=None,
                result=dict(result or {}),
            )
            session.add(row)
            session.flush()
            return row.to_record()

    def update_plan_run(
        self, run_id: str, *, result: dict[str, Any], state: str | None = None
    ) -> PlanRunRecord:
        """Replace the run's result; a final ``state`` also records when it ended."""
        if state is not None:
            check_choice(state, PLAN_RUN_STATES, "plan run state")
        with self._db.session(write=True) as session:
            row = session.get(PlanRunRow, run_id, with_for_update=True)
            if row is None:
                raise NotFound(f"plan run {run_id} does not exist", run=run_id)
            row.result = dict(result)
            if state is not None:
                row.state = state
                if state != "running":
                    row.finished_at = self._db.now()
            session.flush()
            return row.to_record()

    def get_plan_run(self, run_id: str) -> PlanRunRecord:
        with self._db.session(write=False) as session:
            row = session.get(PlanRunRow, run_id)
            if row is None:
                raise NotFound(f"plan run {run_id} does not exist", run=run_id)
            return row.to_record()

    def list_plan_runs(
        self, plan_id: str | None = None, *, kind: str | None = None, limit: int = 20
    ) -> list[PlanRunRecord]:
        """Runs, newest first; of one plan and/or of one kind."""
        if limit < 1:
            raise InvalidInput("limit must be at least 1")
        query = select(PlanRunRow).order_by(PlanRunRow.requested_at.desc(), PlanRunRow.id)
        if plan_id is not None:
            query = query.where(PlanRunRow.plan_id == plan_id)
        if kind is not None:
            check_choice(kind, PLAN_RUN_KINDS, "plan run kind")
            query = query.where(PlanRunRow.kind == kind)
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query.limit(limit))]
