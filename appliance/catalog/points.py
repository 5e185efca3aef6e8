"""Recovery points, and the catalog half of `catalog rebuild`.

A point is a complete, independently restorable snapshot; ``parent_id`` and ``base_full_id``
are informational and carry no foreign key. A point is recorded with its first copy, at the home
location of the store that took the backup (``locations``); further copies are the copies
repository's business. Deleting a point deletes its copy rows (the stores' data is not
touched).

:meth:`PointRepository.replace_store_points` makes the catalog's view of one store exactly the
points its manifests name: the store is the truth, the catalog an index that can be rebuilt.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from appliance.catalog.assets import ensure_asset_row
from appliance.catalog.database import Database, check_choice, check_name, utc
from appliance.catalog.locations import home_location_row, store_row
from appliance.catalog.models import (
    CopyRow,
    PointRow,
)
from appliance.catalog.records import (
    HELD_COPY_STATES,
    POINT_KINDS,
    POINT_MODES,
    REVIEW_VERDICTS,
    PointRecord,
)
from appliance.errors import Conflict, InvalidInput, NotFound

#: A point can be named by a unique prefix of its ID no shorter than this.
MIN_POINT_PREFIX = 4


def check_point(point: PointRecord) -> PointRecord:
    """``point`` validated, with its datetimes normalised to UTC."""
    check_name(point.id, "recovery point ID")
    check_name(point.asset, "asset name")
    check_choice(point.kind, POINT_KINDS, "recovery point kind")
    check_choice(point.mode, POINT_MODES, "backup mode")
    check_name(point.status, "recovery point status")
    optional = {
        "parent_id": point.parent_id,
        "base_full_id": point.base_full_id,
        "verify_status": point.verify_status,
    }
    for what, value in optional.items():
        if value is not None:
            check_name(value, what)
    verified_at = None
    if point.verified_at is not None:
        verified_at = utc(point.verified_at, "verified_at")
    return replace(point, created_at=utc(point.created_at, "created_at"), verified_at=verified_at)


class PointRepository:
    """Recovery points: add, find, list, verify, delete, rebuild."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add_point(self, point: PointRecord, store_id: str) -> None:
        """Record a new point with its first copy, ``present`` at the home location of
        ``store_id``.

        The asset is created if new (a ``vm`` asset for an image point, else ``files``). A point
        ID already recorded is a :class:`Conflict`; an unknown store is :class:`NotFound`.
        """
        point = check_point(point)
        conflict = f"recovery point {point.id} is already in the catalog"
        with self._db.session(write=True, conflict=conflict) as session:
            home = home_location_row(self._db, session, store_row(session, store_id))
            if session.get(PointRow, point.id) is not None:
                raise Conflict(conflict, point_id=point.id)
            self._insert_point(session, point)
            session.add(
                CopyRow(
                    point_id=point.id,
                    location_id=home.id,
                    store_id=store_id,
                    state="present",
                    added_at=self._db.now(),
                )
            )

    def _insert_point(self, session: Session, point: PointRecord) -> None:
        asset_kind = "vm" if point.kind == "image" else "files"
        ensure_asset_row(self._db, session, point.asset, asset_kind, point.source)
        row = PointRow()
        row.assign(point)
        session.add(row)
        # Flushed now so that the copy rows added next are inserted after their point.
        session.flush()

    def get_point(self, id_or_prefix: str) -> PointRecord:
        """The point with this exact ID, else the only point whose ID starts with it.

        A prefix must have at least :data:`MIN_POINT_PREFIX` characters; one that matches
        several points is :class:`InvalidInput` listing them (``details["candidates"]``).
        """
        with self._db.session(write=False) as session:
            row = session.get(PointRow, id_or_prefix)
            if row is not None:
                return row.to_record()
            if len(id_or_prefix) < MIN_POINT_PREFIX:
                raise InvalidInput(
                    f"no recovery point has ID {id_or_prefix!r}, and a prefix needs at least "
                    f"{MIN_POINT_PREFIX} characters"
                )
            # substr, not LIKE: SQLite's LIKE ignores case and treats "%" and "_" as wildcards.
            prefix_of_id = func.substr(PointRow.id, 1, len(id_or_prefix))
            rows = list(
                session.scalars(
                    select(PointRow).where(prefix_of_id == id_or_prefix).order_by(PointRow.id)
                )
            )
            if not rows:
                raise NotFound(f"no recovery point matches {id_or_prefix!r}", point=id_or_prefix)
            if len(rows) > 1:
                candidates = [row.id for row in rows]
                raise InvalidInput(
                    f"recovery point prefix {id_or_prefix!r} is ambiguous: it matches "
                    + ", ".join(candidates),
                    candidates=candidates,
                )
            return rows[0].to_record()

    def list_points(
        self, asset: str | None = None, store_id: str | None = None
    ) -> list[PointRecord]:
        """Points, oldest first; of one asset and/or with a ``present`` copy in one store."""
        query = select(PointRow).order_by(PointRow.created_at, PointRow.id)
        if asset is not None:
            query = query.where(PointRow.asset == asset)
        if store_id is not None:
            in_store = select(CopyRow.point_id).where(
                CopyRow.store_id == store_id, CopyRow.state == "present"
            )
            query = query.where(PointRow.id.in_(in_store))
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    def newest_points(self, limit: int, asset: str | None = None) -> list[PointRecord]:
        """The ``limit`` newest points (of one asset, if given), newest first: one indexed
        query, however many points the catalog holds."""
        query = select(PointRow).order_by(PointRow.created_at.desc(), PointRow.id.desc())
        if asset is not None:
            query = query.where(PointRow.asset == asset)
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query.limit(limit))]

    def latest_point(
        self, asset: str, kind: str | None = None, mode: str | None = None
    ) -> PointRecord | None:
        """The newest point of ``asset`` (of that kind and mode, if given), or None."""
        query = select(PointRow).where(PointRow.asset == asset)
        if kind is not None:
            query = query.where(PointRow.kind == kind)
        if mode is not None:
            query = query.where(PointRow.mode == mode)
        query = query.order_by(PointRow.created_at.desc(), PointRow.id.desc()).limit(1)
        with self._db.session(write=False) as session:
            row = session.scalars(query).first()
            return None if row is None else row.to_record()

    def delete_point(self, point_id: str) -> None:
        """Forget the point and every copy row of it (the stores' data is not touched)."""
        with self._db.session(write=True) as session:
            row = session.get(PointRow, point_id)
            if row is None:
                raise NotFound(f"recovery point {point_id} is not in the catalog", point=point_id)
            session.execute(delete(CopyRow).where(CopyRow.point_id == point_id))
            session.delete(row)

    def mark_verified(self, point_id: str, at: datetime, status: str) -> None:
        at = utc(at, "verification time")
        check_name(status, "verify status")
        with self._db.session(write=True) as session:
            row = session.get(PointRow, point_id, with_for_update=True)
            if row is None:
                raise NotFound(f"recovery point {point_id} is not in the catalog", point=point_id)
            row.verified_at = at
            row.verify_status = status

    def record_signals(
        self, point_id: str, signals: dict[str, Any], suspicion: list[str]
    ) -> PointRecord:
        """Store what the backup measured and, when the point looks like an attack, why
        (``suspicion``: reasons in words; [] for a clean point). A new judgement drops an
        earlier review."""
        with self._db.session(write=True) as session:
            row = self._row(session, point_id)
            row.signals = dict(signals) or None
            row.suspicion = [str(reason) for reason in suspicion] or None
            row.review = None
            return row.to_record()

    def review_point(self, point_id: str, by: str, at: datetime, verdict: str) -> PointRecord:
        """Record that ``by`` looked at the suspicious point: ``expected`` clears the suspicion
        (retention goes on), ``attack`` confirms it (the hold on retention stays)."""
        check_choice(verdict, REVIEW_VERDICTS, "review verdict")
        check_name(by, "reviewer")
        at = utc(at, "review time")
        with self._db.session(write=True) as session:
            row = self._row(session, point_id)
            if not row.suspicion:
                raise Conflict(
                    f"recovery point {point_id} is not suspicious: there is nothing to review",
                    point=point_id,
                )
            row.review = {"by": by, "at": at.isoformat(), "verdict": verdict}
            return row.to_record()

    @staticmethod
    def _row(session: Session, point_id: str) -> PointRow:
        row = session.get(PointRow, point_id, with_for_update=True)
        if row is None:
            raise NotFound(f"recovery point {point_id} is not in the catalog", point=point_id)
        return row

    def replace_store_points(self, store_id: str, points: list[PointRecord]) -> tuple[int, int]:
        """Make the catalog's points of ``store_id`` exactly ``points`` (for `catalog rebuild`).

        The store is the truth, as read at its home location (the copies at the store's other
        locations are left alone); afterwards ``list_points(store_id=store_id)`` lists
        ``points`` (and any point present only at another location of the store):

        - a point not in the catalog is inserted (its asset created if new);
        - a point already in the catalog gets the store's fields; verification fields are kept
          when the store's record has none (verification is recorded by the catalog, and a
          store's manifest need not carry it);
        - each point gets a ``present`` copy row at the store's home location;
        - a ``present`` copy row there whose point is not in ``points`` is removed, and the
          point with it unless another copy holding data (``records.HELD_COPY_STATES``)
          remains elsewhere. ``copying`` rows are left to the job that is copying.

        Returns ``(added, removed)``: how many points the store's listing gained and lost.
        """
        points = [check_point(point) for point in points]
        wanted = {point.id for point in points}
        if len(wanted) != len(points):
            raise InvalidInput(f"the points given for store {store_id} repeat an ID")
        with self._db.session(write=True) as session:
            home = home_location_row(self._db, session, store_row(session, store_id))
            copies = {
                row.point_id: row
                for row in session.scalars(
                    select(CopyRow).where(CopyRow.location_id == home.id).with_for_update()
                )
            }
            now = self._db.now()
            added = 0
            for point in points:
                row = session.get(PointRow, point.id, with_for_update=True)
                if row is None:
                    self._insert_point(session, point)
                else:
                    if point.verified_at is None:
                        point = replace(
                            point, verified_at=row.verified_at, verify_status=row.verify_status
                        )
                    if not point.signals:  # measured and judged by the catalog, like a verify
                        kept = row.to_record()
                        point = replace(
                            point,
                            signals=kept.signals,
                            suspicion=kept.suspicion,
                            review=kept.review,
                        )
                    if row.to_record() != point:
                        if row.asset != point.asset:
                            asset_kind = "vm" if point.kind == "image" else "files"
                            ensure_asset_row(
                                self._db, session, point.asset, asset_kind, point.source
                            )
                        row.assign(point)
                copy = copies.get(point.id)
                if copy is None:
                    session.add(
                        CopyRow(
                            point_id=point.id,
                            location_id=home.id,
                            store_id=store_id,
                            state="present",
                            added_at=now,
                        )
                    )
                    added += 1
                elif copy.state != "present":
                    copy.state = "present"
                    added += 1
            removed = 0
            for point_id, copy in copies.items():
                if point_id in wanted or copy.state != "present":
                    continue
                session.delete(copy)
                removed += 1
                session.flush()
                elsewhere = session.scalar(
                    select(func.count())
                    .select_from(CopyRow)
                    .where(
                        CopyRow.point_id == point_id,
                        CopyRow.state.in_(sorted(HELD_COPY_STATES)),
                    )
                )
                if not elsewhere:
                    session.execute(delete(CopyRow).where(CopyRow.point_id == point_id))
                    session.execute(delete(PointRow).where(PointRow.id == point_id))
            return added, removed
