"""Failover sessions: a VM asset booted from one of its points (``image.failover`` owns the
state machine), and the boot tests of scheduled boot verification.

An asset has at most one session in an active state (:data:`records.ACTIVE_FAILOVER_STATES`):
a VM runs at most once. Sessions are history: they outlive the point they booted.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select

from appliance.catalog.assets import asset_must_exist
from appliance.catalog.database import Database, check_choice, check_name
from appliance.catalog.models import (
    FailoverSessionRow,
)
from appliance.catalog.records import (
    ACTIVE_FAILOVER_STATES,
    FAILOVER_STATES,
    FailoverSessionRecord,
)
from appliance.errors import Conflict, InvalidInput, NotFound


class FailoverRepository:
    """Failover sessions and boot tests."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add_failover_session(
        self,
        asset: str,
        point_id: str,
        details: dict[str, Any],
        *,
        state: str = "starting",
        session_id: str | None = None,
    ) -> FailoverSessionRecord:
        """Record a new failover session of ``asset``.

        An asset with a session in an active state (``ACTIVE_FAILOVER_STATES``) is a
        :class:`Conflict`: a VM runs at most once. An unknown asset is :class:`NotFound`.
        """
        check_name(asset, "asset name")
        check_name(point_id, "recovery point ID")
        check_choice(state, FAILOVER_STATES, "failover state")
        session_id = session_id or uuid.uuid4().hex[:12]
        conflict = f"failover session {session_id} already exists"
        with self._db.session(write=True, conflict=conflict) as session:
            asset_must_exist(session, asset)
            active = session.scalars(
                select(FailoverSessionRow)
                .where(
                    FailoverSessionRow.asset == asset,
                    FailoverSessionRow.state.in_(sorted(ACTIVE_FAILOVER_STATES)),
                )
                .with_for_update()
            ).first()
            if active is not None:
                raise Conflict(
                    f"VM {asset} is already failed over (session {active.id}, {active.state}); "
                    "stop that session first",
                    asset=asset,
                    session=active.id,
                )
            row = FailoverSessionRow(
                id=session_id,
                asset=asset,
                point_id=point_id,
                state=state,
                started_at=self._db.now(),
                details=dict(details),
            )
            session.add(row)
            return row.to_record()

    def update_failover_session(
        self,
        session_id: str,
        *,
        state: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> FailoverSessionRecord:
        """Set the state and merge ``details`` into the recorded ones (keys given replace)."""
        if state is not None:
            check_choice(state, FAILOVER_STATES, "failover state")
        with self._db.session(write=True) as session:
            row = session.get(FailoverSessionRow, session_id, with_for_update=True)
            if row is None:
                raise NotFound(f"failover session {session_id} does not exist", session=session_id)
            if state is not None:
                row.state = state
            if details:
                row.details = {**row.details, **details}
            return row.to_record()

    def get_failover_session(self, session_id: str) -> FailoverSessionRecord:
        with self._db.session(write=False) as session:
            row = session.get(FailoverSessionRow, session_id)
            if row is None:
                raise NotFound(f"failover session {session_id} does not exist", session=session_id)
            return row.to_record()

    def list_failover_sessions(
        self, asset: str | None = None, states: frozenset[str] | None = None, limit: int = 100
    ) -> list[FailoverSessionRecord]:
        """Sessions, newest first; of one asset and/or in some states."""
        if limit < 1:
            raise InvalidInput("limit must be at least 1")
        query = select(FailoverSessionRow).order_by(
            FailoverSessionRow.started_at.desc(), FailoverSessionRow.id
        )
        if asset is not None:
            query = query.where(FailoverSessionRow.asset == asset)
        if states is not None:
            query = query.where(FailoverSessionRow.state.in_(sorted(states)))
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query.limit(limit))]

    def last_boot_tests(
        self, *, per: str = "asset", asset: str | None = None, proven_only: bool = False
    ) -> dict[str, FailoverSessionRecord]:
        """The newest *decided* boot test per asset (``per="asset"``) or per point
        (``per="point"``): ``{asset name or point ID: session}``.

        A boot test is a failover session whose ``details["purpose"]`` is ``"boot_test"``. It is
        decided once its boot was proven (``details["proven_at"]`` set) or it ended without a
        proof (any state but the active ones); one still booting is left out, so it does not hide
        the previous result. ``proven_only`` keeps proven ones only (the last *proven* boot).
        One query with a window function, on SQLite and PostgreSQL alike.
        """
        if per not in ("asset", "point"):
            raise InvalidInput("per must be 'asset' or 'point'")
        column = FailoverSessionRow.asset if per == "asset" else FailoverSessionRow.point_id
        proven = FailoverSessionRow.details["proven_at"].as_string().is_not(None)
        decided = (
            proven
            if proven_only
            else (proven | FailoverSessionRow.state.not_in(sorted(ACTIVE_FAILOVER_STATES)))
        )
        ranked = select(
            FailoverSessionRow.id.label("id"),
            func.row_number()
            .over(
                partition_by=column,
                order_by=(FailoverSessionRow.started_at.desc(), FailoverSessionRow.id.desc()),
            )
            .label("rank"),
        ).where(FailoverSessionRow.details["purpose"].as_string() == "boot_test", decided)
        if asset is not None:
            ranked = ranked.where(FailoverSessionRow.asset == asset)
        newest = ranked.subquery()
        query = select(FailoverSessionRow).join(newest, newest.c.id == FailoverSessionRow.id)
        query = query.where(newest.c.rank == 1)
        with self._db.session(write=False) as session:
            out: dict[str, FailoverSessionRecord] = {}
            for row in session.scalars(query):
                record = row.to_record()
                out[record.asset if per == "asset" else record.point_id] = record
            return out
