"""The recovery plan tables (revision 0010), kept apart from ``models`` so that module stays small.

Imported by the plan repository (so by :class:`~appliance.catalog.Catalog`) and by the migration
environment, which puts these tables in the same metadata as every other model.

- ``recovery_plans``: one row per plan; ``groups`` is the plan's boot groups as JSON (see
  :mod:`appliance.catalog.records_plans`), ``test_cron`` its test schedule and
  ``test_last_slot`` the slot that schedule last fired for.
- ``plan_runs``: one row per failover or test run; runs are history and outlive their plan (no
  foreign key; the plan's name is kept on the run).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from appliance.catalog.models import NAME, STATE, Base, UTCDateTime
from appliance.catalog.records_plans import PlanRecord, PlanRunRecord


class RecoveryPlanRow(Base):
    __tablename__ = "recovery_plans"

    id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME), unique=True)
    groups: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    test_cron: Mapped[str | None] = mapped_column(String(NAME), nullable=True)
    test_last_slot: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def to_record(self) -> PlanRecord:
        return PlanRecord(
            id=self.id,
            name=self.name,
            groups=[dict(g) for g in self.groups],
            test_cron=self.test_cron,
            created_at=self.created_at,
            updated_at=self.updated_at,
            test_last_slot=self.test_last_slot,
        )


class PlanRunRow(Base):
    __tablename__ = "plan_runs"
    __table_args__ = (Index(None, "plan_id", "requested_at"),)

    id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    plan_id: Mapped[str] = mapped_column(String(NAME))
    plan_name: Mapped[str] = mapped_column(String(NAME))
    kind: Mapped[str] = mapped_column(String(STATE))
    state: Mapped[str] = mapped_column(String(STATE))
    job_id: Mapped[str | None] = mapped_column(String(NAME), nullable=True)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)

    def to_record(self) -> PlanRunRecord:
        return PlanRunRecord(
            id=self.id,
            plan_id=self.plan_id,
            plan_name=self.plan_name,
            kind=self.kind,
            state=self.state,
            job_id=self.job_id,
            requested_at=self.requested_at,
            finished_at=self.finished_at,
            result=dict(self.result),
        )
