"""Tape media pools, cartridges and media sets (revision 0012).

A *pool* says how tapes are allocated (``continue``: append to the pool's open set until it is
closed; ``new_set``: every write session starts a new set) and how long what is written stays
(``retention_days``). A *medium* is one cartridge, keyed by its barcode; it belongs to a pool
and a set once labelled. A *media set* is a location of kind ``tape_set`` (same id); its newest
set catalog (the document the tapes carry) says where each object lies. The rules that decide
which tape to write or overwrite are pure functions in :mod:`hardware.tape.media`; this
repository only keeps the facts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select

from appliance.catalog.database import Database, check_choice, check_name, utc
from appliance.catalog.jobs import add_job_row
from appliance.catalog.models import CopyRow
from appliance.catalog.models_tape import TapeMediaSetRow, TapeMediumRow, TapePoolRow
from appliance.catalog.records import HELD_COPY_STATES, JobRecord
from appliance.errors import Conflict, InvalidInput, NotFound

TAPE_ALLOCATIONS = frozenset({"continue", "new_set"})
#: ``blank``: never labelled by us; ``writable``: labelled, room left; ``full``: early warning
#: reached; ``expired``: every point on it expired or kept elsewhere (may be overwritten);
#: ``retired``: never written again.
TAPE_MEDIUM_STATES = frozenset({"blank", "writable", "full", "expired", "retired"})
TAPE_PLACES = frozenset({"library", "shelf", "offsite"})


@dataclass(frozen=True)
class TapePoolRecord:
    name: str
    allocation: str
    retention_days: int
    created_at: datetime
    updated_at: datetime
    #: Cron expression of the scheduled ``tape_backup`` jobs; None: only when asked.
    schedule: str | None = None
    #: The drive the scheduled jobs use (an identity, as jobs name drives).
    schedule_drive: str | None = None
    #: Which points a scheduled job writes (:func:`hardware.tape.schedule.check_rule`).
    points_rule: dict[str, Any] = field(default_factory=dict)
    #: The last slot of ``schedule`` that fired (set to the moment the schedule was set).
    schedule_last_slot: datetime | None = None


@dataclass(frozen=True)
class TapeMediumRecord:
    barcode: str
    label_id: str | None
    pool: str | None
    media_set_id: str | None
    sequence: int | None
    state: str
    place: str
    slot: int | None
    bytes_written: int
    write_protected: bool
    point_count: int
    created_at: datetime
    last_written_at: datetime | None

    @property
    def id(self) -> str:
        """The medium's id: its barcode (unique in a library, and printed on the cartridge)."""
        return self.barcode


@dataclass(frozen=True)
class TapeSetRecord:
    id: str
    pool: str
    store_id: str
    created_at: datetime
    closed_at: datetime | None
    #: The newest set catalog (``hardware.tape.layout.SetCatalog.to_document``); {} before any.
    catalog: dict[str, Any]


def _pool(row: TapePoolRow) -> TapePoolRecord:
    return TapePoolRecord(
        row.name,
        row.allocation,
        row.retention_days,
        row.created_at,
        row.updated_at,
        row.schedule,
        row.schedule_drive,
        dict(row.points_rule or {}),
        row.schedule_last_slot,
    )


def _medium(row: TapeMediumRow) -> TapeMediumRecord:
    return TapeMediumRecord(
        barcode=row.barcode,
        label_id=row.label_id,
        pool=row.pool,
        media_set_id=row.media_set_id,
        sequence=row.sequence,
        state=row.state,
        place=row.place,
        slot=row.slot,
        bytes_written=row.bytes_written,
        write_protected=row.write_protected,
        point_count=row.point_count,
        created_at=row.created_at,
        last_written_at=row.last_written_at,
    )


def _set(row: TapeMediaSetRow) -> TapeSetRecord:
    return TapeSetRecord(
        row.id, row.pool, row.store_id, row.created_at, row.closed_at, dict(row.catalog)
    )


#: The medium fields :meth:`TapeRepository.put_tape_medium` may set.
_MEDIUM_FIELDS = frozenset(
    {
        "label_id",
        "pool",
        "media_set_id",
        "sequence",
        "state",
        "place",
        "slot",
        "bytes_written",
        "write_protected",
        "point_count",
        "last_written_at",
    }
)


class TapeRepository:
    """Tape pools, media and media sets."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # --- pools ------------------------------------------------------------------------------

    def list_tape_pools(self) -> list[TapePoolRecord]:
        with self._db.session(write=False) as session:
            return [_pool(r) for r in session.scalars(select(TapePoolRow).order_by("name"))]

    def get_tape_pool(self, name: str) -> TapePoolRecord:
        with self._db.session(write=False) as session:
            row = session.get(TapePoolRow, name)
            if row is None:
                raise NotFound(f"tape pool {name!r} does not exist", pool=name)
            return _pool(row)

    def put_tape_pool(
        self, name: str, *, allocation: str = "continue", retention_days: int = 365
    ) -> TapePoolRecord:
        """Create the pool or change it (what is on tape keeps the retention it was written
        under only as far as the new value says: retention is evaluated when a tape is reused)."""
        check_name(name, "tape pool name")
        check_choice(allocation, TAPE_ALLOCATIONS, "tape pool allocation")
        if retention_days < 0:
            raise InvalidInput("a tape pool's retention is zero days or more")
        with self._db.session(write=True) as session:
            now = self._db.now()
            row = session.get(TapePoolRow, name, with_for_update=True)
            if row is None:
                row = TapePoolRow(name=name, created_at=now, points_rule={})
                session.add(row)
            row.allocation = allocation
            row.retention_days = retention_days
            row.updated_at = now
            session.flush()
            return _pool(row)

    def set_tape_pool_schedule(
        self, name: str, *, schedule: str | None, drive: str | None, points_rule: dict[str, Any]
    ) -> TapePoolRecord:
        """Set the pool's schedule, drive and points rule (checked by the caller). A schedule
        starts now: it never fires for a slot before it was set."""
        if schedule is not None and not drive:
            raise InvalidInput("a scheduled tape backup needs the drive it writes with")
        with self._db.session(write=True) as session:
            row = session.get(TapePoolRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"tape pool {name!r} does not exist", pool=name)
            now = self._db.now()
            if schedule != row.schedule or row.schedule_last_slot is None:
                row.schedule_last_slot = now if schedule is not None else None
            row.schedule = schedule
            row.schedule_drive = drive
            row.points_rule = dict(points_rule)
            row.updated_at = now
            session.flush()
            return _pool(row)

    def delete_tape_pool(self, name: str) -> None:
        """Delete the pool (its schedule with it) once nothing is left in it: a tape that
        belongs to it, or a media set of it still holding a copy (one not ``lost`` or
        ``deleted``), is a :class:`Conflict` in words. The pool's emptied sets (every copy lost
        or deleted) go with it, so a new pool of the same name starts without them; their
        locations stay, with the lost copies as history."""
        with self._db.session(write=True) as session:
            row = session.get(TapePoolRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"tape pool {name!r} does not exist", pool=name)
            tapes = session.scalar(
                select(func.count()).select_from(TapeMediumRow).where(TapeMediumRow.pool == name)
            )
            if tapes:
                raise Conflict(
                    f"pool {name} still has {tapes} tape(s): erase them or move them to "
                    "another pool first",
                    pool=name,
                    tapes=tapes,
                )
            set_ids = list(
                session.scalars(select(TapeMediaSetRow.id).where(TapeMediaSetRow.pool == name))
            )
            held = (
                session.scalar(
                    select(func.count(func.distinct(CopyRow.location_id))).where(
                        CopyRow.location_id.in_(set_ids),
                        CopyRow.state.in_(sorted(HELD_COPY_STATES)),
                    )
                )
                if set_ids
                else 0
            )
            if held:
                raise Conflict(
                    f"pool {name} still has {held} media set(s) holding copies: erase their "
                    "tapes first",
                    pool=name,
                    sets=held,
                )
            if set_ids:
                session.execute(delete(TapeMediaSetRow).where(TapeMediaSetRow.id.in_(set_ids)))
            session.delete(row)

    def fire_tape_backup(
        self,
        pool: str,
        last_slot: datetime | None,
        slot: datetime,
        *,
        job_kind: str | None,
        params: dict[str, Any],
        resource: str | None,
        log: Sequence[tuple[str, str]] = (),
    ) -> JobRecord | None:
        """Record ``slot`` as the pool's last fired slot and, with ``job_kind``, create its job,
        in one transaction; None (and nothing changed) when the stored slot is no longer
        ``last_slot`` (another tick fired it) or the pool is gone."""
        slot = utc(slot, "schedule slot")
        with self._db.session(write=True) as session:
            row = session.get(TapePoolRow, pool, with_for_update=True)
            if row is None or row.schedule_last_slot != last_slot:
                return None
            row.schedule_last_slot = slot
            if job_kind is None:
                return None
            return add_job_row(self._db, session, job_kind, params, resource, log)

    # --- media ------------------------------------------------------------------------------

    def list_tape_media(
        self, *, pool: str | None = None, media_set_id: str | None = None
    ) -> list[TapeMediumRecord]:
        """Cartridges (of one pool or set, if given), by set and sequence, then barcode."""
        query = select(TapeMediumRow).order_by(
            TapeMediumRow.media_set_id, TapeMediumRow.sequence, TapeMediumRow.barcode
        )
        if pool is not None:
            query = query.where(TapeMediumRow.pool == pool)
        if media_set_id is not None:
            query = query.where(TapeMediumRow.media_set_id == media_set_id)
        with self._db.session(write=False) as session:
            return [_medium(r) for r in session.scalars(query)]

    def get_tape_medium(self, barcode: str) -> TapeMediumRecord:
        with self._db.session(write=False) as session:
            row = session.get(TapeMediumRow, barcode)
            if row is None:
                raise NotFound(f"tape {barcode} is not known to this appliance", barcode=barcode)
            return _medium(row)

    def put_tape_medium(self, barcode: str, **fields: Any) -> TapeMediumRecord:
        """Record a cartridge (``blank`` in the ``library`` when new) or change its fields."""
        check_name(barcode, "tape barcode")
        unknown = set(fields) - _MEDIUM_FIELDS
        if unknown:
            raise InvalidInput(f"unknown tape medium field(s): {', '.join(sorted(unknown))}")
        if "state" in fields:
            check_choice(fields["state"], TAPE_MEDIUM_STATES, "tape state")
        if "place" in fields:
            check_choice(fields["place"], TAPE_PLACES, "tape place")
        if fields.get("last_written_at") is not None:
            fields["last_written_at"] = utc(fields["last_written_at"], "last written time")
        with self._db.session(write=True) as session:
            row = session.get(TapeMediumRow, barcode, with_for_update=True)
            if row is None:
                row = TapeMediumRow(
                    barcode=barcode,
                    state="blank",
                    place="library",
                    bytes_written=0,
                    write_protected=False,
                    point_count=0,
                    created_at=self._db.now(),
                )
                session.add(row)
            for key, value in fields.items():
                setattr(row, key, value)
            session.flush()
            return _medium(row)

    def set_tape_medium_place(
        self, barcode: str, place: str, slot: int | None = None
    ) -> TapeMediumRecord:
        """Where a known cartridge is now (``library`` with its slot, ``shelf``, ``offsite``)."""
        self.get_tape_medium(barcode)  # NotFound in words for an unknown barcode
        return self.put_tape_medium(barcode, place=place, slot=slot if place == "library" else None)

    # --- media sets -------------------------------------------------------------------------

    def list_tape_sets(self, pool: str | None = None) -> list[TapeSetRecord]:
        query = select(TapeMediaSetRow).order_by(TapeMediaSetRow.created_at, TapeMediaSetRow.id)
        if pool is not None:
            query = query.where(TapeMediaSetRow.pool == pool)
        with self._db.session(write=False) as session:
            return [_set(r) for r in session.scalars(query)]

    def get_tape_set(self, set_id: str) -> TapeSetRecord:
        with self._db.session(write=False) as session:
            row = session.get(TapeMediaSetRow, set_id)
            if row is None:
                raise NotFound(f"media set {set_id} is not known to this appliance", set=set_id)
            return _set(row)

    def put_tape_set(
        self,
        set_id: str,
        *,
        pool: str,
        store_id: str,
        catalog: dict[str, Any] | None = None,
        closed_at: datetime | None = None,
        created_at: datetime | None = None,
    ) -> TapeSetRecord:
        """Record a media set, or its newer catalog (an older generation never replaces a newer
        one: a scan that finds an old tape first leaves the newest catalog in place)."""
        check_name(set_id, "media set id")
        with self._db.session(write=True) as session:
            row = session.get(TapeMediaSetRow, set_id, with_for_update=True)
            if row is None:
                row = TapeMediaSetRow(
                    id=set_id,
                    pool=pool,
                    store_id=store_id,
                    created_at=utc(created_at, "set creation") if created_at else self._db.now(),
                    catalog={},
                )
                session.add(row)
            if catalog is not None and int(catalog.get("generation", 0)) >= int(
                row.catalog.get("generation", -1) if row.catalog else -1
            ):
                row.catalog = dict(catalog)
            if closed_at is not None:
                row.closed_at = utc(closed_at, "set closing time")
            session.flush()
            return _set(row)
