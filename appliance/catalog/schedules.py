"""Policies, the state of their schedules, and the service's settings documents.

A policy covers one or more assets, kept in ``policy_assets`` in the order given; every read of
a policy returns them in that order.

``fire_schedule`` advances a policy's schedule state and creates the job it fired, with its
first log lines, in ONE transaction: a crash can neither run a slot twice nor skip one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from appliance.catalog.assets import asset_must_exist
from appliance.catalog.database import Database, check_choice, check_name, utc
from appliance.catalog.jobs import add_job_row
from appliance.catalog.models import (
    PolicyRow,
    ScheduleStateRow,
    SettingRow,
)
from appliance.catalog.models_policies import PolicyAssetRow
from appliance.catalog.records import (
    LOG_LEVELS,
    POINT_MODES,
    JobRecord,
    PolicyRecord,
)
from appliance.errors import Conflict, InvalidInput, NotFound


def check_policy(policy: PolicyRecord) -> None:
    check_name(policy.name, "policy name")
    check_choice(policy.mode, POINT_MODES, "backup mode")
    if policy.rpo_seconds < 0:
        raise InvalidInput("rpo_seconds must not be negative")
    if not policy.assets:
        raise InvalidInput("a policy covers at least one asset", policy=policy.name)
    for asset in policy.assets:
        check_name(asset, "asset name")
    if len(set(policy.assets)) != len(policy.assets):
        raise InvalidInput("a policy names each asset once", policy=policy.name)


def assign_policy(session: Session, row: PolicyRow, policy: PolicyRecord) -> None:
    """Write ``policy`` into ``row`` (added to the session if new) and its asset rows."""
    for asset in policy.assets:
        asset_must_exist(session, asset)
    row.schedule = dict(policy.schedule)
    row.mode = policy.mode
    row.retention = dict(policy.retention)
    row.rpo_seconds = policy.rpo_seconds
    session.add(row)
    session.execute(delete(PolicyAssetRow).where(PolicyAssetRow.policy == policy.name))
    for position, asset in enumerate(policy.assets):
        session.add(PolicyAssetRow(policy=policy.name, asset=asset, position=position))


def assets_of(session: Session, names: list[str] | None = None) -> dict[str, list[str]]:
    """``{policy: [asset, ...]}`` in each policy's order (of ``names``, or of every policy)."""
    query = select(PolicyAssetRow).order_by(PolicyAssetRow.policy, PolicyAssetRow.position)
    if names is not None:
        query = query.where(PolicyAssetRow.policy.in_(names))
    out: dict[str, list[str]] = {}
    for row in session.scalars(query):
        out.setdefault(row.policy, []).append(row.asset)
    return out


def policy_record(session: Session, row: PolicyRow) -> PolicyRecord:
    return row.to_record(assets_of(session, [row.name]).get(row.name, []))


def policy_row(session: Session, name: str, *, lock: bool = False) -> PolicyRow:
    row = session.get(PolicyRow, name, with_for_update=lock)
    if row is None:
        raise NotFound(f"policy {name} does not exist", policy=name)
    return row


class ScheduleRepository:
    """Policies, schedule state and settings."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add_policy(self, policy: PolicyRecord) -> PolicyRecord:
        check_policy(policy)
        conflict = f"policy {policy.name} already exists"
        with self._db.session(write=True, conflict=conflict) as session:
            if session.get(PolicyRow, policy.name) is not None:
                raise Conflict(conflict, policy=policy.name)
            row = PolicyRow(name=policy.name)
            assign_policy(session, row, policy)
            session.flush()
            return policy_record(session, row)

    def update_policy(self, policy: PolicyRecord) -> PolicyRecord:
        """Replace every field of the policy named ``policy.name`` (its assets too)."""
        check_policy(policy)
        with self._db.session(write=True) as session:
            row = policy_row(session, policy.name, lock=True)
            assign_policy(session, row, policy)
            session.flush()
            return policy_record(session, row)

    def get_policy(self, name: str) -> PolicyRecord:
        with self._db.session(write=False) as session:
            return policy_record(session, policy_row(session, name))

    def list_policies(self, asset: str | None = None) -> list[PolicyRecord]:
        """Every policy by name, or those covering ``asset``."""
        query = select(PolicyRow).order_by(PolicyRow.name)
        if asset is not None:
            covering = select(PolicyAssetRow.policy).where(PolicyAssetRow.asset == asset)
            query = query.where(PolicyRow.name.in_(covering))
        with self._db.session(write=False) as session:
            rows = list(session.scalars(query))
            assets = assets_of(session, None if asset is None else [r.name for r in rows])
            return [row.to_record(assets.get(row.name, [])) for row in rows]

    def delete_policy(self, name: str) -> None:
        with self._db.session(write=True) as session:
            row = policy_row(session, name, lock=True)
            session.execute(delete(ScheduleStateRow).where(ScheduleStateRow.policy == name))
            session.execute(delete(PolicyAssetRow).where(PolicyAssetRow.policy == name))
            session.delete(row)

    def schedule_state(self, policy: str | None = None) -> dict[str, dict[str, datetime]]:
        """When each schedule entry last fired: ``{policy: {entry key: time}}``."""
        query = select(ScheduleStateRow)
        if policy is not None:
            query = query.where(ScheduleStateRow.policy == policy)
        out: dict[str, dict[str, datetime]] = {}
        with self._db.session(write=False) as session:
            for row in session.scalars(query):
                out.setdefault(row.policy, {})[row.entry] = row.last_fired_at
        return out

    def reset_schedule_state(self, policy: str, entries: list[str], at: datetime) -> None:
        """Keep the state of ``entries``, start the new ones at ``at`` and forget the others.

        Called when a policy is created or its schedule changed: a new entry's first slot is the
        first one after ``at`` (a schedule never fires for the time before it existed).
        """
        at = utc(at, "schedule time")
        for entry in entries:
            check_name(entry, "schedule entry")
        with self._db.session(write=True) as session:
            policy_row(session, policy, lock=True)
            rows = {
                row.entry: row
                for row in session.scalars(
                    select(ScheduleStateRow).where(ScheduleStateRow.policy == policy)
                )
            }
            for key, row in rows.items():
                if key not in entries:
                    session.delete(row)
            for key in entries:
                if key not in rows:
                    session.add(ScheduleStateRow(policy=policy, entry=key, last_fired_at=at))

    def fire_schedule(
        self,
        policy: str,
        fired: dict[str, datetime],
        *,
        job_kind: str | None = None,
        job_params: dict[str, Any] | None = None,
        job_resource: str | None = None,
        log: list[tuple[str, str]] | None = None,
    ) -> JobRecord | None:
        """Record that entries of ``policy`` fired, and create their job, in ONE transaction.

        Both or neither: a crash can neither leave a job whose slot would fire again after the
        restart (a double run) nor a slot marked fired without its job (a silent skip). ``log``
        lines (level, message) go to the new job's log.
        """
        jobs = [] if job_kind is None else [(job_params or {}, job_resource)]
        created = self.fire_schedule_jobs(policy, fired, job_kind=job_kind, jobs=jobs, log=log)
        return created[0] if created else None

    def fire_schedule_jobs(
        self,
        policy: str,
        fired: dict[str, datetime],
        *,
        job_kind: str | None = None,
        jobs: Sequence[tuple[dict[str, Any], str | None]] = (),
        log: list[tuple[str, str]] | None = None,
    ) -> list[JobRecord]:
        """:meth:`fire_schedule` for a policy of several assets: one job of ``job_kind`` per
        (params, resource) of ``jobs`` (each with the ``log`` lines), all in the transaction
        that records the slots."""
        fired = {key: utc(at, "schedule time") for key, at in fired.items()}
        for key in fired:
            check_name(key, "schedule entry")
        if job_kind is not None:
            check_name(job_kind, "job kind")
        for level, _message in log or []:
            check_choice(level, LOG_LEVELS, "log level")
        with self._db.session(write=True) as session:
            policy_row(session, policy, lock=True)
            for key, at in fired.items():
                state = session.get(ScheduleStateRow, (policy, key), with_for_update=True)
                if state is None:
                    session.add(ScheduleStateRow(policy=policy, entry=key, last_fired_at=at))
                else:
                    state.last_fired_at = at
            if job_kind is None:
                return []
            created = []
            for params, resource in jobs:
                created.append(
                    add_job_row(self._db, session, job_kind, params, resource, log or ())
                )
            return created

    # --- settings ------------------------------------------------------------------------------

    def get_settings(self, key: str) -> dict[str, Any]:
        """The settings document stored under ``key`` (empty if none was stored)."""
        with self._db.session(write=False) as session:
            row = session.get(SettingRow, key)
            return {} if row is None else dict(row.value)

    def put_settings(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        check_name(key, "settings key")
        with self._db.session(write=True) as session:
            row = session.get(SettingRow, key, with_for_update=True)
            if row is None:
                row = SettingRow(key=key, value=dict(value))
                session.add(row)
            else:
                row.value = dict(value)
            return dict(row.value)
