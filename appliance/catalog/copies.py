"""Copies: a recovery point present (or on its way, archived, lost, ...) at a location.

A copy is keyed by (point, location) and carries a state (:data:`records.COPY_STATES`), a
storage class, a retain-until and a verified-at; its ``store_id`` is the location's store.
3-2-1 and the choice of the copy to read are computed from these rows by the code above the
catalog.

Two families of methods:

- location-keyed (``set_copy``, ``copies_of``, ``copies_at``, ``mark_copy_verified``): what
  tiering, replication, removable media and verification use;
- store-keyed (``add_copy``, ``set_copy_state``, ``point_copies``), kept from before locations
  existed: they act on the store's *home location* (``locations``), which is where migration
  0004 put every copy recorded until then.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from appliance.catalog.database import Database, check_choice, check_name, utc
from appliance.catalog.locations import home_location_row, location_row, store_row
from appliance.catalog.models import (
    CopyRow,
    PointRow,
)
from appliance.catalog.records import (
    COPY_STATES,
    CopyRecord,
    home_location_id,
)
from appliance.errors import Conflict, NotFound


class CopyRepository:
    """Copies of points at locations."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def copies_of(self, point_id: str) -> list[CopyRecord]:
        """Every copy of the point (in any state, at any location), oldest first."""
        with self._db.session(write=False) as session:
            if session.get(PointRow, point_id) is None:
                raise NotFound(f"recovery point {point_id} is not in the catalog", point=point_id)
            rows = session.scalars(
                select(CopyRow)
                .where(CopyRow.point_id == point_id)
                .order_by(CopyRow.added_at, CopyRow.store_id, CopyRow.location_id)
            )
            return [row.to_record() for row in rows]

    def point_copies(self, point_id: str) -> list[CopyRecord]:
        """Every copy row of the point (in any state), oldest first (same as :meth:`copies_of`)."""
        return self.copies_of(point_id)

    def copies_at(self, location_id: str, state: str | None = None) -> list[CopyRecord]:
        """The copies at a location (in one state, if given), oldest first."""
        query = (
            select(CopyRow)
            .where(CopyRow.location_id == location_id)
            .order_by(CopyRow.added_at, CopyRow.point_id)
        )
        if state is not None:
            check_choice(state, COPY_STATES, "copy state")
            query = query.where(CopyRow.state == state)
        with self._db.session(write=False) as session:
            location_row(session, location_id)
            return [row.to_record() for row in session.scalars(query)]

    def set_copy(
        self,
        point_id: str,
        location_id: str,
        state: str,
        storage_class: str | None = None,
        retain_until: datetime | None = None,
        verified_at: datetime | None = None,
    ) -> CopyRecord:
        """Record the copy of ``point_id`` at ``location_id`` in ``state`` (insert or update).

        A new copy is stamped ``added_at`` now. On an existing one, ``storage_class``,
        ``retain_until`` and ``verified_at`` replace the recorded values when given (None leaves
        them). An unknown point or location is :class:`NotFound`.
        """
        check_choice(state, COPY_STATES, "copy state")
        if storage_class is not None:
            check_name(storage_class, "storage class")
        if retain_until is not None:
            retain_until = utc(retain_until, "retain_until")
        if verified_at is not None:
            verified_at = utc(verified_at, "verified_at")
        with self._db.session(write=True) as session:
            location = location_row(session, location_id)
            if session.get(PointRow, point_id) is None:
                raise NotFound(f"recovery point {point_id} is not in the catalog", point=point_id)
            row = session.get(CopyRow, (point_id, location_id), with_for_update=True)
            if row is None:
                row = CopyRow(
                    point_id=point_id,
                    location_id=location_id,
                    store_id=location.store_id,
                    state=state,
                    added_at=self._db.now(),
                    storage_class=storage_class,
                    retain_until=retain_until,
                    verified_at=verified_at,
                )
                session.add(row)
                return row.to_record()
            row.state = state
            if storage_class is not None:
                row.storage_class = storage_class
            if retain_until is not None:
                row.retain_until = retain_until
            if verified_at is not None:
                row.verified_at = verified_at
            return row.to_record()

    def mark_copy_verified(self, point_id: str, location_id: str, at: datetime) -> CopyRecord:
        """Record that the copy at ``location_id`` was read back and checked at ``at``."""
        at = utc(at, "verification time")
        with self._db.session(write=True) as session:
            row = session.get(CopyRow, (point_id, location_id), with_for_update=True)
            if row is None:
                raise NotFound(
                    f"recovery point {point_id} has no copy at location {location_id}",
                    point_id=point_id,
                    location_id=location_id,
                )
            row.verified_at = at
            return row.to_record()

    # --- store-keyed copies (the store's home location) ------------------------------------------

    def add_copy(self, point_id: str, store_id: str, state: str = "copying") -> CopyRecord:
        """Record another copy of an existing point at the home location of ``store_id``, e.g.
        when tiering starts copying it. A point with a copy anywhere in that store already is a
        :class:`Conflict`."""
        check_choice(state, COPY_STATES, "copy state")
        conflict = f"recovery point {point_id} already has a copy in store {store_id}"
        with self._db.session(write=True, conflict=conflict) as session:
            home = home_location_row(self._db, session, store_row(session, store_id))
            if session.get(PointRow, point_id) is None:
                raise NotFound(f"recovery point {point_id} is not in the catalog", point=point_id)
            existing = session.scalars(
                select(CopyRow).where(CopyRow.point_id == point_id, CopyRow.store_id == store_id)
            ).first()
            if existing is not None:
                raise Conflict(conflict, point_id=point_id, store_id=store_id)
            row = CopyRow(
                point_id=point_id,
                location_id=home.id,
                store_id=store_id,
                state=state,
                added_at=self._db.now(),
            )
            session.add(row)
            return row.to_record()

    def set_copy_state(self, point_id: str, store_id: str, state: str) -> CopyRecord:
        """Set the state of the point's copy at the home location of ``store_id``."""
        check_choice(state, COPY_STATES, "copy state")
        with self._db.session(write=True) as session:
            row = session.get(CopyRow, (point_id, home_location_id(store_id)), with_for_update=True)
            if row is None:
                raise NotFound(
                    f"recovery point {point_id} has no copy in store {store_id}",
                    point_id=point_id,
                    store_id=store_id,
                )
            row.state = state
            return row.to_record()
