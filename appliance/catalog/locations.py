"""Stores and the places that hold them: locations, pools and removable media.

A *store* is the logical content under one store ID and key; a *location* is one place that
holds (part of) it -- a pool directory, a block-device pool, a removable disk, a tape media
set, an S3 bucket or a peer -- with its access mode (random, cold, sequential) and flags
(immutable, removable, off-site, online). Copies of points are recorded per location
(``copies``).

Every store has a *home location* whose ID is derived from the store ID
(:func:`records.home_location_id`): :meth:`LocationRepository.ensure_store` creates it with the
store and keeps it at the store's location when the store moves, and the store-keyed methods
of the points and copies repositories put copies there. Migration 0004 created the home
locations of stores recorded before locations existed and attached every copy to them.

A location still holding copies (:data:`records.HELD_COPY_STATES`) is never removed.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from appliance.catalog.database import Database, check_choice, check_name, utc
from appliance.catalog.models import (
    CopyRow,
    LocationRow,
    MediaRow,
    PoolRow,
    PoolUsageRow,
    StoreRow,
)
from appliance.catalog.records import (
    HELD_COPY_STATES,
    LOCATION_ACCESS,
    LOCATION_KINDS,
    MEDIA_KINDS,
    POOL_FS_TYPES,
    POOL_PROFILES,
    STORE_HOME_LOCATIONS,
    STORE_LOCATION_KINDS,
    LocationRecord,
    MediaRecord,
    PoolRecord,
    PoolUsageRecord,
    StoreRecord,
    home_location_id,
)
from appliance.errors import Conflict, InvalidInput, NotFound

#: Location kinds that are removable unless said otherwise.
REMOVABLE_KINDS = frozenset({"removable", "tape_set"})


def store_row(session: Session, store_id: str) -> StoreRow:
    row = session.get(StoreRow, store_id)
    if row is None:
        raise NotFound(f"store {store_id} is not in the catalog", store_id=store_id)
    return row


def location_row(session: Session, location_id: str, *, lock: bool = False) -> LocationRow:
    row = session.get(LocationRow, location_id, with_for_update=lock)
    if row is None:
        raise NotFound(f"location {location_id} is not in the catalog", location_id=location_id)
    return row


def assign_home(row: LocationRow, store: StoreRow) -> None:
    """Make ``row`` describe the store's own location (kind, access, address, label)."""
    kind, access, removable = STORE_HOME_LOCATIONS[store.location_kind]
    row.kind = kind
    row.access = access
    row.removable = removable
    row.address = store.location
    row.label = store.location


def home_location_row(db: Database, session: Session, store: StoreRow) -> LocationRow:
    """The store's home location (:func:`records.home_location_id`), created if missing.

    It is made from the store row: kind and access from the store's ``location_kind``
    (:data:`records.STORE_HOME_LOCATIONS`), address and label from its location; removable
    kinds start offline, the others online.
    """
    row = session.get(LocationRow, home_location_id(store.store_id))
    if row is None:
        row = LocationRow(
            id=home_location_id(store.store_id),
            store_id=store.store_id,
            immutable=False,
            offsite=False,
            created_at=db.now(),
            last_seen_at=None,
            details={},
        )
        assign_home(row, store)
        row.online = not row.removable
        session.add(row)
        session.flush()
    return row


class LocationRepository:
    """Stores, locations, pools and media."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def ensure_store(self, store_id: str, location_kind: str, location: str) -> StoreRecord:
        """The store ``store_id``, created if new; its location is updated if it moved
        (a USB disk mounted elsewhere, a pool renamed).

        The store's home location (:func:`home_location_row`) is created with it and follows
        the store when it moves.
        """
        check_name(store_id, "store ID")
        check_choice(location_kind, STORE_LOCATION_KINDS, "store location kind")
        with self._db.session(write=True, conflict=f"store {store_id} already exists") as session:
            row = session.get(StoreRow, store_id, with_for_update=True)
            if row is None:
                row = StoreRow(
                    store_id=store_id,
                    location_kind=location_kind,
                    location=location,
                    created_at=self._db.now(),
                )
                session.add(row)
                session.flush()
            elif (row.location_kind, row.location) != (location_kind, location):
                row.location_kind = location_kind
                row.location = location
                home = session.get(LocationRow, home_location_id(store_id), with_for_update=True)
                if home is not None:
                    assign_home(home, row)
            home_location_row(self._db, session, row)
            return row.to_record()

    def get_store(self, store_id: str) -> StoreRecord:
        with self._db.session(write=False) as session:
            return store_row(session, store_id).to_record()

    def forget_store(self, store_id: str) -> None:
        """Forget a store that holds no copy any more (an empty one that another store
        replaced in its folder: docs/tape.md, "Recover a lost appliance"), with its locations.

        A copy in a state of :data:`records.HELD_COPY_STATES` is a :class:`Conflict`.
        """
        with self._db.session(write=True) as session:
            row = session.get(StoreRow, store_id, with_for_update=True)
            if row is None:
                raise NotFound(f"store {store_id} is not in the catalog", store_id=store_id)
            held = session.scalar(
                select(func.count())
                .select_from(CopyRow)
                .where(CopyRow.store_id == store_id, CopyRow.state.in_(sorted(HELD_COPY_STATES)))
            )
            if held:
                raise Conflict(
                    f"store {store_id} still holds {held} copy(ies)", store_id=store_id, copies=held
                )
            ids = list(
                session.scalars(select(LocationRow.id).where(LocationRow.store_id == store_id))
            )
            session.execute(delete(CopyRow).where(CopyRow.store_id == store_id))
            session.execute(
                update(MediaRow).where(MediaRow.location_id.in_(ids)).values(location_id=None)
            )
            session.execute(delete(LocationRow).where(LocationRow.store_id == store_id))
            session.delete(row)

    def list_stores(self) -> list[StoreRecord]:
        with self._db.session(write=False) as session:
            rows = session.scalars(select(StoreRow).order_by(StoreRow.store_id))
            return [row.to_record() for row in rows]

    # --- locations -------------------------------------------------------------------------------

    def add_location(
        self,
        store_id: str,
        kind: str,
        address: str,
        *,
        access: str | None = None,
        immutable: bool = False,
        removable: bool | None = None,
        offsite: bool = False,
        online: bool = True,
        label: str = "",
        details: dict[str, Any] | None = None,
        location_id: str | None = None,
    ) -> LocationRecord:
        """A new location of the store ``store_id`` (an unknown store is :class:`NotFound`).

        ``access`` defaults to ``sequential`` for a tape set and ``random`` otherwise;
        ``removable`` to whether the kind is ``removable`` or ``tape_set``; ``label`` to the
        address; the ID to a random 32-hex-digit one (a taken ID is a :class:`Conflict`).
        """
        check_name(store_id, "store ID")
        check_choice(kind, LOCATION_KINDS, "location kind")
        if access is None:
            access = "sequential" if kind == "tape_set" else "random"
        check_choice(access, LOCATION_ACCESS, "location access")
        location_id = location_id or uuid.uuid4().hex
        check_name(location_id, "location ID")
        conflict = f"location {location_id} already exists"
        with self._db.session(write=True, conflict=conflict) as session:
            store_row(session, store_id)
            if session.get(LocationRow, location_id) is not None:
                raise Conflict(conflict, location_id=location_id)
            row = LocationRow(
                id=location_id,
                store_id=store_id,
                kind=kind,
                address=address,
                access=access,
                immutable=immutable,
                removable=kind in REMOVABLE_KINDS if removable is None else removable,
                offsite=offsite,
                online=online,
                label=label or address,
                created_at=self._db.now(),
                last_seen_at=None,
                details=dict(details or {}),
            )
            session.add(row)
            return row.to_record()

    def get_location(self, location_id: str) -> LocationRecord:
        with self._db.session(write=False) as session:
            return location_row(session, location_id).to_record()

    def list_locations(self, store_id: str | None = None) -> list[LocationRecord]:
        """Locations (of one store, if given), by store, then oldest first."""
        query = select(LocationRow).order_by(
            LocationRow.store_id, LocationRow.created_at, LocationRow.id
        )
        if store_id is not None:
            query = query.where(LocationRow.store_id == store_id)
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    def update_location(
        self,
        location_id: str,
        *,
        online: bool | None = None,
        last_seen_at: datetime | None = None,
        label: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> LocationRecord:
        """Record whether the location answers, and when it was last seen.

        ``online=True`` without ``last_seen_at`` stamps ``last_seen_at`` now. ``details`` are
        merged into the recorded ones (keys given replace). None leaves a field unchanged.
        """
        if last_seen_at is not None:
            last_seen_at = utc(last_seen_at, "last_seen_at")
        with self._db.session(write=True) as session:
            row = location_row(session, location_id, lock=True)
            if online is not None:
                row.online = online
                if online and last_seen_at is None:
                    row.last_seen_at = self._db.now()
            if last_seen_at is not None:
                row.last_seen_at = last_seen_at
            if label is not None:
                row.label = label
            if details:
                row.details = {**row.details, **details}
            return row.to_record()

    def remove_location(self, location_id: str) -> None:
        """Forget a location that holds no copy any more.

        A copy in a state of :data:`records.HELD_COPY_STATES` (copying, present, archived,
        recalling) is a :class:`Conflict`; ``lost`` and ``deleted`` copy rows go with the
        location, and media attached to it are detached.
        """
        with self._db.session(write=True) as session:
            row = location_row(session, location_id, lock=True)
            held = session.scalar(
                select(func.count())
                .select_from(CopyRow)
                .where(
                    CopyRow.location_id == location_id,
                    CopyRow.state.in_(sorted(HELD_COPY_STATES)),
                )
            )
            if held:
                raise Conflict(
                    f"location {location_id} still holds {held} copy(ies); "
                    "move or delete them first",
                    location_id=location_id,
                    copies=held,
                )
            session.execute(delete(CopyRow).where(CopyRow.location_id == location_id))
            session.execute(
                update(MediaRow).where(MediaRow.location_id == location_id).values(location_id=None)
            )
            session.delete(row)

    # --- pools and media -------------------------------------------------------------------------

    def add_pool(
        self,
        name: str,
        path: str,
        store_id: str,
        *,
        fs_uuid: str | None = None,
        fs_type: str | None = None,
        profile: str | None = None,
        members: list[str] | None = None,
        location_id: str | None = None,
        mountpoint: str | None = None,
    ) -> PoolRecord:
        """Record a pool: a directory pool (``path`` only), or a block pool with its
        filesystem (``fs_uuid`` and the rest; see :class:`records.PoolRecord`). A taken name or
        a filesystem already recorded as another pool is a :class:`Conflict`."""
        check_name(name, "pool name")
        check_name(store_id, "store ID")
        if fs_uuid is not None:
            check_name(fs_uuid, "filesystem UUID")
        if fs_type is not None:
            check_choice(fs_type, POOL_FS_TYPES, "pool filesystem")
        if profile is not None:
            check_choice(profile, POOL_PROFILES, "pool profile")
        conflict = f"pool {name} already exists"
        with self._db.session(write=True, conflict=conflict) as session:
            if session.get(PoolRow, name) is not None:
                raise Conflict(conflict, pool=name)
            if fs_uuid is not None:
                other = session.scalar(select(PoolRow.name).where(PoolRow.fs_uuid == fs_uuid))
                if other is not None:
                    raise Conflict(
                        f"filesystem {fs_uuid} is already pool {other}", pool=other, fs_uuid=fs_uuid
                    )
            row = PoolRow(
                name=name,
                path=path,
                store_id=store_id,
                created_at=self._db.now(),
                fs_uuid=fs_uuid,
                fs_type=fs_type,
                profile=profile,
                members=list(members) if members is not None else None,
                location_id=location_id,
                mountpoint=mountpoint,
            )
            session.add(row)
            return row.to_record()

    def get_pool(self, name: str) -> PoolRecord:
        with self._db.session(write=False) as session:
            row = session.get(PoolRow, name)
            if row is None:
                raise NotFound(f"pool {name} does not exist", pool=name)
            return row.to_record()

    def list_pools(self) -> list[PoolRecord]:
        with self._db.session(write=False) as session:
            return [
                row.to_record() for row in session.scalars(select(PoolRow).order_by(PoolRow.name))
            ]

    def update_pool(
        self,
        name: str,
        *,
        members: list[str] | None = None,
        mountpoint: str | None = None,
        location_id: str | None = None,
        path: str | None = None,
        store_id: str | None = None,
    ) -> PoolRecord:
        """Change what may change of a pool (its disks after a replacement, where it is
        mounted, its location); None leaves a field unchanged."""
        with self._db.session(write=True) as session:
            row = session.get(PoolRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"pool {name} does not exist", pool=name)
            if members is not None:
                row.members = list(members)
            if mountpoint is not None:
                row.mountpoint = mountpoint
            if location_id is not None:
                row.location_id = location_id
            if path is not None:
                row.path = path
            if store_id is not None:
                row.store_id = store_id
            return row.to_record()

    def delete_pool(self, name: str) -> None:
        """Forget a pool and its usage history (its disks and their data are left alone)."""
        with self._db.session(write=True) as session:
            row = session.get(PoolRow, name)
            if row is None:
                raise NotFound(f"pool {name} does not exist", pool=name)
            session.execute(delete(PoolUsageRow).where(PoolUsageRow.pool == name))
            session.delete(row)

    def add_pool_usage(
        self, pool: str, at: datetime, used_bytes: int, total_bytes: int
    ) -> PoolUsageRecord:
        """Record a usage sample of ``pool`` taken at ``at``; a second sample at the same instant
        replaces the first. Negative byte counts are :class:`InvalidInput`."""
        at = utc(at, "sample time")
        if used_bytes < 0 or total_bytes < 0:
            raise InvalidInput("a usage sample counts bytes: they are never negative")
        with self._db.session(write=True) as session:
            if session.get(PoolRow, pool) is None:
                raise NotFound(f"pool {pool} does not exist", pool=pool)
            row = session.get(PoolUsageRow, (pool, at), with_for_update=True)
            if row is None:
                row = PoolUsageRow(pool=pool, at=at, used_bytes=used_bytes, total_bytes=total_bytes)
                session.add(row)
            else:
                row.used_bytes = used_bytes
                row.total_bytes = total_bytes
            return row.to_record()

    def list_pool_usage(
        self, pool: str, *, since: datetime | None = None, until: datetime | None = None
    ) -> list[PoolUsageRecord]:
        """The usage samples of ``pool``, oldest first (``since`` and ``until`` inclusive)."""
        query = select(PoolUsageRow).where(PoolUsageRow.pool == pool).order_by(PoolUsageRow.at)
        if since is not None:
            query = query.where(PoolUsageRow.at >= utc(since, "since"))
        if until is not None:
            query = query.where(PoolUsageRow.at <= utc(until, "until"))
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    def prune_pool_usage(self, before: datetime) -> int:
        """Delete every pool's samples taken before ``before``; returns how many went."""
        before = utc(before, "before")
        with self._db.session(write=True) as session:
            result = session.execute(delete(PoolUsageRow).where(PoolUsageRow.at < before))
            return int(getattr(result, "rowcount", 0) or 0)

    def ensure_media(
        self, identity: str, kind: str, label: str, location_id: str | None = None
    ) -> MediaRecord:
        """Record that the medium ``identity`` was seen now, under ``label``.

        ``location_id`` attaches the medium to a location (a removable disk, a tape of a media
        set); None leaves the recorded one unchanged.
        """
        check_name(identity, "media identity")
        check_choice(kind, MEDIA_KINDS, "media kind")
        conflict = f"medium {identity} already exists"
        with self._db.session(write=True, conflict=conflict) as session:
            if location_id is not None:
                location_row(session, location_id)
            row = session.get(MediaRow, identity, with_for_update=True)
            if row is None:
                row = MediaRow(
                    identity=identity,
                    kind=kind,
                    label=label,
                    last_seen=self._db.now(),
                    location_id=location_id,
                )
                session.add(row)
            else:
                if row.kind != kind:
                    raise Conflict(f"medium {identity} is a {row.kind} medium, not {kind}")
                row.label = label
                row.last_seen = self._db.now()
                if location_id is not None:
                    row.location_id = location_id
            return row.to_record()

    def get_media(self, identity: str) -> MediaRecord:
        with self._db.session(write=False) as session:
            row = session.get(MediaRow, identity)
            if row is None:
                raise NotFound(f"medium {identity} is not known", identity=identity)
            return row.to_record()

    def list_media(self, kind: str | None = None) -> list[MediaRecord]:
        query = select(MediaRow).order_by(MediaRow.identity)
        if kind is not None:
            query = query.where(MediaRow.kind == kind)
        with self._db.session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]
