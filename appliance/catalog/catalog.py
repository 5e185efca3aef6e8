"""The catalog: an SQL index of assets, stores, recovery points, copies, jobs and accounts.

The catalog is never the only record of anything that matters. Every store is self-describing,
and `catalog rebuild` recreates the catalog's view of a store with
:meth:`Catalog.replace_store_points`. What the catalog alone knows (jobs, their logs, the audit
trail, verification times) is operational history, not data.

Design:

- One adapter class, :class:`Catalog`, over SQLAlchemy 2.0. Each public method runs in its own
  short transaction and returns frozen records (``records``); no session, row or engine escapes.
  Third-party errors are converted here: a duplicate becomes :class:`appliance.errors.Conflict`,
  a value the database cannot store becomes :class:`appliance.errors.InvalidInput`.
- The schema is created and upgraded by Alembic when the catalog is opened (``alembic upgrade
  head``, run in code; no ``alembic.ini`` is read). Concurrent openers are serialised: by a
  PostgreSQL advisory lock, or by SQLite's write lock.
- Time comes from an injected clock (``Catalog.open(url, clock=...)``), so tests and the
  scheduler control every timestamp the catalog stamps. All datetimes are aware and UTC.

SQLite specifics (the default backend): WAL journal so readers never block the writer, foreign
keys enforced, and a 30 s busy timeout. SQLAlchemy, not the ``sqlite3`` module, emits ``BEGIN``:
the module's legacy mode starts transactions only at the first write, which would let a
read-check-write method act on a stale read. Write methods start with ``BEGIN IMMEDIATE``, which
takes the database's write lock up front (waiting up to the busy timeout); starting deferred and
upgrading later would fail at once with "database is locked" whenever another writer committed
since our read. Read-only methods use a plain deferred ``BEGIN`` and run concurrently with the
writer. On PostgreSQL, read-check-write methods lock the rows they check (``SELECT ... FOR
UPDATE``).
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, func, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import (
    DataError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
    StatementError,
)
from sqlalchemy.orm import Session

from appliance.catalog.models import (
    NAME,
    AssetRow,
    AuditRow,
    CopyRow,
    FailoverSessionRow,
    JobLogRow,
    JobRow,
    MediaRow,
    PointRow,
    PolicyRow,
    PoolRow,
    ScheduleStateRow,
    SessionRow,
    SettingRow,
    StoreRow,
    TokenRow,
    UserRow,
)
from appliance.catalog.records import (
    ACTIVE_FAILOVER_STATES,
    ASSET_KINDS,
    COPY_STATES,
    FAILOVER_STATES,
    JOB_STATES,
    JOB_TRANSITIONS,
    LOG_LEVELS,
    MEDIA_KINDS,
    POINT_KINDS,
    POINT_MODES,
    STOPPED_JOB_STATES,
    STORE_LOCATION_KINDS,
    USER_ROLES,
    AssetRecord,
    AuditRecord,
    CopyRecord,
    FailoverSessionRecord,
    JobLogRecord,
    JobRecord,
    MediaRecord,
    PointRecord,
    PolicyRecord,
    PoolRecord,
    SessionRecord,
    StoreRecord,
    TokenRecord,
    UserRecord,
)
from appliance.errors import Conflict, InvalidInput, NotFound

Clock = Callable[[], datetime]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
#: A point can be named by a unique prefix of its ID no shorter than this.
MIN_POINT_PREFIX = 4
#: Key of the PostgreSQL advisory lock held while the schema is upgraded ("CATALOG!" in ASCII).
SCHEMA_LOCK_KEY = 0x434154414C4F4721
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE.
WRITE_OPTION = "appliance_catalog_write"


def _system_clock() -> datetime:
    return datetime.now(UTC)


def _check_choice(value: str, allowed: frozenset[str], what: str) -> None:
    if value not in allowed:
        raise InvalidInput(
            f"{what} {value!r} is not one of {', '.join(sorted(allowed))}",
            value=value,
            allowed=sorted(allowed),
        )


def _check_name(value: str, what: str) -> None:
    if not value or not value.strip():
        raise InvalidInput(f"{what} must not be empty")
    # PostgreSQL enforces the column length and SQLite does not; checking here makes both agree.
    if len(value) > NAME:
        raise InvalidInput(f"{what} is longer than {NAME} characters")


def _utc(value: datetime, what: str) -> datetime:
    """``value`` in UTC; a naive datetime is refused because its zone would be a guess."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what} {value.isoformat()} has no time zone; give an aware datetime")
    return value.astimezone(UTC)


def _check_point(point: PointRecord) -> PointRecord:
    """``point`` validated, with its datetimes normalised to UTC."""
    _check_name(point.id, "recovery point ID")
    _check_name(point.asset, "asset name")
    _check_choice(point.kind, POINT_KINDS, "recovery point kind")
    _check_choice(point.mode, POINT_MODES, "backup mode")
    _check_name(point.status, "recovery point status")
    optional = {
        "parent_id": point.parent_id,
        "base_full_id": point.base_full_id,
        "verify_status": point.verify_status,
    }
    for what, value in optional.items():
        if value is not None:
            _check_name(value, what)
    verified_at = None
    if point.verified_at is not None:
        verified_at = _utc(point.verified_at, "verified_at")
    return replace(point, created_at=_utc(point.created_at, "created_at"), verified_at=verified_at)


def _json_dumps(value: object) -> str:
    """The engine's JSON serializer: a value JSON cannot carry is the caller's mistake.

    NaN and infinities are refused too: PostgreSQL's ``json`` rejects them, SQLite would not, and
    the two backends must accept the same values.
    """
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"value not storable in the catalog as JSON: {exc}") from exc


def _configure_sqlite_connection(dbapi_connection: Any, connection_record: object) -> None:
    # SQLAlchemy's "begin" listener below emits BEGIN; the driver must not emit its own.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        _enable_wal(cursor)
    finally:
        cursor.close()


def _enable_wal(cursor: sqlite3.Cursor) -> None:
    """Put the database file in WAL mode (a property of the file, kept across connections).

    Switching needs an exclusive lock, and when several connections race to switch a new file,
    SQLite reports "database is locked" at once instead of waiting (waiting could deadlock). A
    lost race is retried until the busy timeout; once the file is in WAL mode the pragma is a
    no-op that succeeds.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _begin_sqlite_transaction(connection: Connection) -> None:
    # Straight to the driver: SQLAlchemy's statement machinery costs more than the BEGIN, and
    # every catalog read starts one.
    begin = "BEGIN IMMEDIATE" if connection.get_execution_options().get(WRITE_OPTION) else "BEGIN"
    connection.connection.driver_connection.execute(begin)  # type: ignore[union-attr]


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pre_ping: a PostgreSQL restart must not surface as an error on the next request.
        return create_engine(parsed, pool_pre_ping=True, json_serializer=_json_dumps)
    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or parsed.query.get("mode") == "memory"
    if not in_memory and not database.startswith("file:"):
        directory = Path(database).absolute().parent
        if not directory.is_dir():
            raise NotFound(f"catalog directory {directory} does not exist", path=str(directory))
    # A connection per worker thread of the service (40) stays open: connections beyond the
    # pool are closed when returned, and opening one (pragmas, WAL check) costs more than a query.
    pool: dict[str, int] = {} if in_memory else {"pool_size": 40, "max_overflow": 40}
    engine = create_engine(parsed, json_serializer=_json_dumps, **pool)
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


#: The newest migration revision. Opening a catalog already at this revision skips Alembic (whose
#: import alone costs about half a second of every CLI command); a test keeps it equal to the
#: head of the migration scripts.
HEAD_REVISION = "0003"


def _schema_is_current(engine: Engine) -> bool:
    try:
        with engine.connect() as connection:
            row = connection.execute(text("SELECT version_num FROM alembic_version")).first()
    except (OperationalError, ProgrammingError):
        return False  # no version table yet: a new database
    return row is not None and row[0] == HEAD_REVISION


def _upgrade_schema(engine: Engine) -> None:
    """Run ``alembic upgrade head`` on ``engine`` in one transaction."""
    if _schema_is_current(engine):
        return
    from alembic import command
    from alembic.config import Config

    config = Config()
    # Config values go through ConfigParser interpolation, where "%" is special.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    with engine.execution_options(**{WRITE_OPTION: True}).begin() as connection:
        if connection.dialect.name == "postgresql":
            # Two services opening a fresh database at once must not both create the tables.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Catalog:
    """The catalog of one appliance. Open with :meth:`open`; close with :meth:`close`.

    Thread-safe: every method takes its own connection from the engine's pool.
    """

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{WRITE_OPTION: True})
        self._clock = clock

    @classmethod
    def open(cls, url: str, *, clock: Clock | None = None) -> Catalog:
        """Connect to the catalog at ``url`` and bring its schema up to date.

        ``url`` is an SQLAlchemy URL: ``sqlite:////var/lib/appliance/catalog.db`` (the directory
        must exist; the file is created) or ``postgresql+psycopg://user@host/dbname`` (the
        database must exist). ``clock`` returns the current aware datetime; it defaults to UTC
        wall-clock time.
        """
        engine = _create_engine(url)
        try:
            _upgrade_schema(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, clock or _system_clock)

    @property
    def url(self) -> str:
        """The URL this catalog was opened with (password included: it opens it again)."""
        return self._engine.url.render_as_string(hide_password=False)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _now(self) -> datetime:
        return _utc(self._clock(), "the clock's time")

    @contextmanager
    def _session(self, *, write: bool, conflict: str = "") -> Iterator[Session]:
        """One transaction; committed when the block ends, rolled back if it raises.

        ``conflict`` is the message of the :class:`Conflict` raised when the database reports a
        duplicate (a race lost between a method's own check and its insert lands here too).
        An :class:`InvalidInput` raised while binding a value (see :func:`_json_dumps`) reaches
        the caller unwrapped, whichever layer (SQLAlchemy or the driver) ran the serializer.
        """
        try:
            with (
                Session(self._writer if write else self._engine, expire_on_commit=False) as session,
                session.begin(),
            ):
                yield session
        except IntegrityError as exc:
            raise Conflict(conflict or f"catalog constraint violated: {exc.orig}") from exc
        except DataError as exc:
            # A value PostgreSQL refuses for its column (too long, out of range).
            raise InvalidInput(f"value not storable in the catalog: {exc.orig}") from exc
        except StatementError as exc:
            if isinstance(exc.orig, InvalidInput):
                raise exc.orig from exc
            raise

    # --- assets --------------------------------------------------------------------------------

    def ensure_asset(self, name: str, kind: str, source: str = "") -> AssetRecord:
        """The asset ``name``, created if new; a non-empty ``source`` replaces the recorded one.

        An existing asset of another kind is a :class:`Conflict`.
        """
        _check_name(name, "asset name")
        _check_choice(kind, ASSET_KINDS, "asset kind")
        with self._session(write=True, conflict=f"asset {name} already exists") as session:
            row = self._ensure_asset_row(session, name, kind, source)
            if source and row.source != source:
                row.source = source
            return row.to_record()

    def _ensure_asset_row(self, session: Session, name: str, kind: str, source: str) -> AssetRow:
        row = session.get(AssetRow, name, with_for_update=True)
        if row is None:
            row = AssetRow(
                name=name, kind=kind, source=source, created_at=self._now(), description=None
            )
            session.add(row)
            session.flush()
        elif row.kind != kind:
            raise Conflict(f"asset {name} is a {row.kind} asset, not {kind}", asset=name)
        return row

    def add_asset(
        self, name: str, kind: str, source: str, description: str | None = None
    ) -> AssetRecord:
        """A new asset; an existing one of that name is a :class:`Conflict`."""
        _check_name(name, "asset name")
        _check_choice(kind, ASSET_KINDS, "asset kind")
        conflict = f"asset {name} already exists"
        with self._session(write=True, conflict=conflict) as session:
            if session.get(AssetRow, name, with_for_update=True) is not None:
                raise Conflict(conflict, asset=name)
            row = AssetRow(
                name=name, kind=kind, source=source, created_at=self._now(), description=description
            )
            session.add(row)
            return row.to_record()

    def update_asset(self, name: str, source: str, description: str | None) -> AssetRecord:
        """Replace the asset's source and description (its kind never changes)."""
        with self._session(write=True) as session:
            row = session.get(AssetRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"asset {name} is not in the catalog", asset=name)
            row.source = source
            row.description = description
            return row.to_record()

    def delete_asset(self, name: str) -> None:
        """Forget an asset that has no recovery points and no policies left (else Conflict)."""
        with self._session(write=True) as session:
            row = session.get(AssetRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"asset {name} is not in the catalog", asset=name)
            points = session.scalar(
                select(func.count()).select_from(PointRow).where(PointRow.asset == name)
            )
            policies = session.scalar(
                select(func.count()).select_from(PolicyRow).where(PolicyRow.asset == name)
            )
            if points or policies:
                raise Conflict(
                    f"asset {name} still has {points} recovery point(s) and {policies} "
                    "policy(ies); delete or prune them first",
                    asset=name,
                    points=points,
                    policies=policies,
                )
            session.delete(row)

    def get_asset(self, name: str) -> AssetRecord:
        with self._session(write=False) as session:
            row = session.get(AssetRow, name)
            if row is None:
                raise NotFound(f"asset {name} is not in the catalog", asset=name)
            return row.to_record()

    def list_assets(self) -> list[AssetRecord]:
        with self._session(write=False) as session:
            rows = session.scalars(select(AssetRow).order_by(AssetRow.name))
            return [row.to_record() for row in rows]

    # --- stores --------------------------------------------------------------------------------

    def ensure_store(self, store_id: str, location_kind: str, location: str) -> StoreRecord:
        """The store ``store_id``, created if new; its location is updated if it moved
        (a USB disk mounted elsewhere, a pool renamed)."""
        _check_name(store_id, "store ID")
        _check_choice(location_kind, STORE_LOCATION_KINDS, "store location kind")
        with self._session(write=True, conflict=f"store {store_id} already exists") as session:
            row = session.get(StoreRow, store_id, with_for_update=True)
            if row is None:
                row = StoreRow(
                    store_id=store_id,
                    location_kind=location_kind,
                    location=location,
                    created_at=self._now(),
                )
                session.add(row)
            else:
                row.location_kind = location_kind
                row.location = location
            return row.to_record()

    def get_store(self, store_id: str) -> StoreRecord:
        with self._session(write=False) as session:
            return self._store_row(session, store_id).to_record()

    def list_stores(self) -> list[StoreRecord]:
        with self._session(write=False) as session:
            rows = session.scalars(select(StoreRow).order_by(StoreRow.store_id))
            return [row.to_record() for row in rows]

    @staticmethod
    def _store_row(session: Session, store_id: str) -> StoreRow:
        row = session.get(StoreRow, store_id)
        if row is None:
            raise NotFound(f"store {store_id} is not in the catalog", store_id=store_id)
        return row

    # --- recovery points -----------------------------------------------------------------------

    def add_point(self, point: PointRecord, store_id: str) -> None:
        """Record a new point with its first copy, ``present`` in ``store_id``.

        The asset is created if new (a ``vm`` asset for an image point, else ``files``). A point
        ID already recorded is a :class:`Conflict`; an unknown store is :class:`NotFound`.
        """
        point = _check_point(point)
        conflict = f"recovery point {point.id} is already in the catalog"
        with self._session(write=True, conflict=conflict) as session:
            self._store_row(session, store_id)
            if session.get(PointRow, point.id) is not None:
                raise Conflict(conflict, point_id=point.id)
            self._insert_point(session, point)
            session.add(
                CopyRow(point_id=point.id, store_id=store_id, state="present", added_at=self._now())
            )

    def _insert_point(self, session: Session, point: PointRecord) -> None:
        asset_kind = "vm" if point.kind == "image" else "files"
        self._ensure_asset_row(session, point.asset, asset_kind, point.source)
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
        with self._session(write=False) as session:
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
        with self._session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    def newest_points(self, limit: int, asset: str | None = None) -> list[PointRecord]:
        """The ``limit`` newest points (of one asset, if given), newest first: one indexed
        query, however many points the catalog holds."""
        query = select(PointRow).order_by(PointRow.created_at.desc(), PointRow.id.desc())
        if asset is not None:
            query = query.where(PointRow.asset == asset)
        with self._session(write=False) as session:
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
        with self._session(write=False) as session:
            row = session.scalars(query).first()
            return None if row is None else row.to_record()

    def delete_point(self, point_id: str) -> None:
        """Forget the point and every copy row of it (the stores' data is not touched)."""
        with self._session(write=True) as session:
            row = session.get(PointRow, point_id)
            if row is None:
                raise NotFound(f"recovery point {point_id} is not in the catalog", point=point_id)
            session.execute(delete(CopyRow).where(CopyRow.point_id == point_id))
            session.delete(row)

    def mark_verified(self, point_id: str, at: datetime, status: str) -> None:
        at = _utc(at, "verification time")
        _check_name(status, "verify status")
        with self._session(write=True) as session:
            row = session.get(PointRow, point_id, with_for_update=True)
            if row is None:
                raise NotFound(f"recovery point {point_id} is not in the catalog", point=point_id)
            row.verified_at = at
            row.verify_status = status

    def point_copies(self, point_id: str) -> list[CopyRecord]:
        """Every copy row of the point (in any state), oldest first."""
        with self._session(write=False) as session:
            if session.get(PointRow, point_id) is None:
                raise NotFound(f"recovery point {point_id} is not in the catalog", point=point_id)
            rows = session.scalars(
                select(CopyRow)
                .where(CopyRow.point_id == point_id)
                .order_by(CopyRow.added_at, CopyRow.store_id)
            )
            return [row.to_record() for row in rows]

    def add_copy(self, point_id: str, store_id: str, state: str = "copying") -> CopyRecord:
        """Record another copy of an existing point, e.g. when tiering starts copying it."""
        _check_choice(state, COPY_STATES, "copy state")
        conflict = f"recovery point {point_id} already has a copy in store {store_id}"
        with self._session(write=True, conflict=conflict) as session:
            self._store_row(session, store_id)
            if session.get(PointRow, point_id) is None:
                raise NotFound(f"recovery point {point_id} is not in the catalog", point=point_id)
            if session.get(CopyRow, (point_id, store_id)) is not None:
                raise Conflict(conflict, point_id=point_id, store_id=store_id)
            row = CopyRow(point_id=point_id, store_id=store_id, state=state, added_at=self._now())
            session.add(row)
            return row.to_record()

    def set_copy_state(self, point_id: str, store_id: str, state: str) -> CopyRecord:
        _check_choice(state, COPY_STATES, "copy state")
        with self._session(write=True) as session:
            row = session.get(CopyRow, (point_id, store_id), with_for_update=True)
            if row is None:
                raise NotFound(
                    f"recovery point {point_id} has no copy in store {store_id}",
                    point_id=point_id,
                    store_id=store_id,
                )
            row.state = state
            return row.to_record()

    def replace_store_points(self, store_id: str, points: list[PointRecord]) -> tuple[int, int]:
        """Make the catalog's points of ``store_id`` exactly ``points`` (for `catalog rebuild`).

        The store is the truth; afterwards ``list_points(store_id=store_id)`` lists exactly
        ``points``:

        - a point not in the catalog is inserted (its asset created if new);
        - a point already in the catalog gets the store's fields; verification fields are kept
          when the store's record has none (verification is recorded by the catalog, and a
          store's manifest need not carry it);
        - each point gets a ``present`` copy row for this store;
        - a ``present`` copy row of this store whose point is not in ``points`` is removed, and
          the point with it unless another copy (``present`` or ``copying``) remains elsewhere.
          ``copying`` rows of this store are left to the job that is copying.

        Returns ``(added, removed)``: how many points the store's listing gained and lost.
        """
        points = [_check_point(point) for point in points]
        wanted = {point.id for point in points}
        if len(wanted) != len(points):
            raise InvalidInput(f"the points given for store {store_id} repeat an ID")
        with self._session(write=True) as session:
            self._store_row(session, store_id)
            copies = {
                row.point_id: row
                for row in session.scalars(
                    select(CopyRow).where(CopyRow.store_id == store_id).with_for_update()
                )
            }
            now = self._now()
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
                    if row.to_record() != point:
                        if row.asset != point.asset:
                            asset_kind = "vm" if point.kind == "image" else "files"
                            self._ensure_asset_row(session, point.asset, asset_kind, point.source)
                        row.assign(point)
                copy = copies.get(point.id)
                if copy is None:
                    session.add(
                        CopyRow(point_id=point.id, store_id=store_id, state="present", added_at=now)
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
                    .where(CopyRow.point_id == point_id, CopyRow.state != "deleted")
                )
                if not elsewhere:
                    session.execute(delete(CopyRow).where(CopyRow.point_id == point_id))
                    session.execute(delete(PointRow).where(PointRow.id == point_id))
            return added, removed

    # --- jobs ----------------------------------------------------------------------------------

    def create_job(
        self, kind: str, params: dict[str, Any], resource: str | None = None
    ) -> JobRecord:
        """A new ``queued`` job with a random 32-hex-digit ID."""
        _check_name(kind, "job kind")
        if resource is not None:
            _check_name(resource, "job resource")
        with self._session(write=True) as session:
            row = self._new_job_row(kind, params, resource)
            session.add(row)
            return row.to_record()

    def _new_job_row(self, kind: str, params: dict[str, Any], resource: str | None) -> JobRow:
        return JobRow(
            id=uuid.uuid4().hex,
            kind=kind,
            state="queued",
            params=dict(params),
            progress={},
            result=None,
            error=None,
            created_at=self._now(),
            started_at=None,
            finished_at=None,
            resource=resource,
            log_seq=0,
        )

    def count_jobs(self) -> dict[str, int]:
        """How many jobs are in each state (states without jobs are left out)."""
        with self._session(write=False) as session:
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
            _check_choice(state, JOB_STATES, "job state")
        with self._session(write=True) as session:
            row = self._job_row(session, job_id, lock=True)
            if state is not None and state != row.state:
                if state not in JOB_TRANSITIONS[row.state]:
                    raise Conflict(
                        f"job {job_id} is {row.state}; it cannot become {state}",
                        job_id=job_id,
                        state=row.state,
                    )
                now = self._now()
                row.state = state
                if state == "running":
                    row.started_at = now
                    row.finished_at = None
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

    @staticmethod
    def _job_row(session: Session, job_id: str, *, lock: bool = False) -> JobRow:
        row = session.get(JobRow, job_id, with_for_update=lock)
        if row is None:
            raise NotFound(f"job {job_id} does not exist", job_id=job_id)
        return row

    def get_job(self, job_id: str) -> JobRecord:
        with self._session(write=False) as session:
            return self._job_row(session, job_id).to_record()

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        """Jobs, newest first, at most ``limit`` of them."""
        if limit < 1:
            raise InvalidInput("limit must be at least 1")
        query = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc()).limit(limit)
        if state is not None:
            _check_choice(state, JOB_STATES, "job state")
            query = query.where(JobRow.state == state)
        with self._session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    def append_job_log(self, job_id: str, level: str, message: str) -> None:
        _check_choice(level, LOG_LEVELS, "log level")
        with self._session(write=True) as session:
            self._append_log_line(session, job_id, level, message)

    def _append_log_line(self, session: Session, job_id: str, level: str, message: str) -> None:
        seq = session.scalar(
            update(JobRow)
            .where(JobRow.id == job_id)
            .values(log_seq=JobRow.log_seq + 1)
            .returning(JobRow.log_seq)
            .execution_options(synchronize_session=False)
        )
        if seq is None:
            raise NotFound(f"job {job_id} does not exist", job_id=job_id)
        session.add(JobLogRow(job_id=job_id, seq=seq, at=self._now(), level=level, message=message))

    def job_log(self, job_id: str, after_seq: int = 0) -> list[JobLogRecord]:
        """The job's log lines with ``seq`` greater than ``after_seq``, in order."""
        with self._session(write=False) as session:
            self._job_row(session, job_id)
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
        with self._session(write=True) as session:
            rows = list(
                session.scalars(select(JobRow).where(JobRow.state == "running").with_for_update())
            )
            now = self._now()
            for row in rows:
                row.state = "interrupted"
                row.finished_at = now
            session.flush()
            for row in rows:
                self._append_log_line(
                    session,
                    row.id,
                    "warning",
                    "interrupted: the appliance stopped while this job was running",
                )
            return len(rows)

    # --- policies ------------------------------------------------------------------------------

    def add_policy(self, policy: PolicyRecord) -> PolicyRecord:
        self._check_policy(policy)
        conflict = f"policy {policy.name} already exists"
        with self._session(write=True, conflict=conflict) as session:
            if session.get(PolicyRow, policy.name) is not None:
                raise Conflict(conflict, policy=policy.name)
            self._asset_must_exist(session, policy.asset)
            row = PolicyRow(name=policy.name)
            self._assign_policy(row, policy)
            session.add(row)
            return row.to_record()

    def update_policy(self, policy: PolicyRecord) -> PolicyRecord:
        """Replace every field of the policy named ``policy.name``."""
        self._check_policy(policy)
        with self._session(write=True) as session:
            row = self._policy_row(session, policy.name, lock=True)
            self._asset_must_exist(session, policy.asset)
            self._assign_policy(row, policy)
            return row.to_record()

    def get_policy(self, name: str) -> PolicyRecord:
        with self._session(write=False) as session:
            return self._policy_row(session, name).to_record()

    def list_policies(self, asset: str | None = None) -> list[PolicyRecord]:
        query = select(PolicyRow).order_by(PolicyRow.name)
        if asset is not None:
            query = query.where(PolicyRow.asset == asset)
        with self._session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    def delete_policy(self, name: str) -> None:
        with self._session(write=True) as session:
            row = self._policy_row(session, name, lock=True)
            session.execute(delete(ScheduleStateRow).where(ScheduleStateRow.policy == name))
            session.delete(row)

    # --- schedule state ------------------------------------------------------------------------

    def schedule_state(self, policy: str | None = None) -> dict[str, dict[str, datetime]]:
        """When each schedule entry last fired: ``{policy: {entry key: time}}``."""
        query = select(ScheduleStateRow)
        if policy is not None:
            query = query.where(ScheduleStateRow.policy == policy)
        out: dict[str, dict[str, datetime]] = {}
        with self._session(write=False) as session:
            for row in session.scalars(query):
                out.setdefault(row.policy, {})[row.entry] = row.last_fired_at
        return out

    def reset_schedule_state(self, policy: str, entries: list[str], at: datetime) -> None:
        """Keep the state of ``entries``, start the new ones at ``at`` and forget the others.

        Called when a policy is created or its schedule changed: a new entry's first slot is the
        first one after ``at`` (a schedule never fires for the time before it existed).
        """
        at = _utc(at, "schedule time")
        for entry in entries:
            _check_name(entry, "schedule entry")
        with self._session(write=True) as session:
            self._policy_row(session, policy, lock=True)
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
        fired = {key: _utc(at, "schedule time") for key, at in fired.items()}
        for key in fired:
            _check_name(key, "schedule entry")
        if job_kind is not None:
            _check_name(job_kind, "job kind")
        for level, _message in log or []:
            _check_choice(level, LOG_LEVELS, "log level")
        with self._session(write=True) as session:
            self._policy_row(session, policy, lock=True)
            for key, at in fired.items():
                state = session.get(ScheduleStateRow, (policy, key), with_for_update=True)
                if state is None:
                    session.add(ScheduleStateRow(policy=policy, entry=key, last_fired_at=at))
                else:
                    state.last_fired_at = at
            if job_kind is None:
                return None
            job = self._new_job_row(job_kind, job_params or {}, job_resource)
            session.add(job)
            session.flush()
            for level, message in log or []:
                self._append_log_line(session, job.id, level, message)
            return job.to_record()

    # --- settings ------------------------------------------------------------------------------

    def get_settings(self, key: str) -> dict[str, Any]:
        """The settings document stored under ``key`` (empty if none was stored)."""
        with self._session(write=False) as session:
            row = session.get(SettingRow, key)
            return {} if row is None else dict(row.value)

    def put_settings(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        _check_name(key, "settings key")
        with self._session(write=True) as session:
            row = session.get(SettingRow, key, with_for_update=True)
            if row is None:
                row = SettingRow(key=key, value=dict(value))
                session.add(row)
            else:
                row.value = dict(value)
            return dict(row.value)

    @staticmethod
    def _check_policy(policy: PolicyRecord) -> None:
        _check_name(policy.name, "policy name")
        _check_choice(policy.mode, POINT_MODES, "backup mode")
        if policy.rpo_seconds < 0:
            raise InvalidInput("rpo_seconds must not be negative")

    @staticmethod
    def _assign_policy(row: PolicyRow, policy: PolicyRecord) -> None:
        row.asset = policy.asset
        row.schedule = dict(policy.schedule)
        row.mode = policy.mode
        row.retention = dict(policy.retention)
        row.rpo_seconds = policy.rpo_seconds

    @staticmethod
    def _policy_row(session: Session, name: str, *, lock: bool = False) -> PolicyRow:
        row = session.get(PolicyRow, name, with_for_update=lock)
        if row is None:
            raise NotFound(f"policy {name} does not exist", policy=name)
        return row

    @staticmethod
    def _asset_must_exist(session: Session, name: str) -> None:
        if session.get(AssetRow, name) is None:
            raise NotFound(f"asset {name} is not in the catalog", asset=name)

    # --- pools and media -----------------------------------------------------------------------

    def add_pool(self, name: str, path: str, store_id: str) -> PoolRecord:
        _check_name(name, "pool name")
        _check_name(store_id, "store ID")
        conflict = f"pool {name} already exists"
        with self._session(write=True, conflict=conflict) as session:
            if session.get(PoolRow, name) is not None:
                raise Conflict(conflict, pool=name)
            row = PoolRow(name=name, path=path, store_id=store_id, created_at=self._now())
            session.add(row)
            return row.to_record()

    def get_pool(self, name: str) -> PoolRecord:
        with self._session(write=False) as session:
            row = session.get(PoolRow, name)
            if row is None:
                raise NotFound(f"pool {name} does not exist", pool=name)
            return row.to_record()

    def list_pools(self) -> list[PoolRecord]:
        with self._session(write=False) as session:
            return [
                row.to_record() for row in session.scalars(select(PoolRow).order_by(PoolRow.name))
            ]

    def delete_pool(self, name: str) -> None:
        with self._session(write=True) as session:
            row = session.get(PoolRow, name)
            if row is None:
                raise NotFound(f"pool {name} does not exist", pool=name)
            session.delete(row)

    def ensure_media(self, identity: str, kind: str, label: str) -> MediaRecord:
        """Record that the medium ``identity`` was seen now, under ``label``."""
        _check_name(identity, "media identity")
        _check_choice(kind, MEDIA_KINDS, "media kind")
        conflict = f"medium {identity} already exists"
        with self._session(write=True, conflict=conflict) as session:
            row = session.get(MediaRow, identity, with_for_update=True)
            if row is None:
                row = MediaRow(identity=identity, kind=kind, label=label, last_seen=self._now())
                session.add(row)
            else:
                if row.kind != kind:
                    raise Conflict(f"medium {identity} is a {row.kind} medium, not {kind}")
                row.label = label
                row.last_seen = self._now()
            return row.to_record()

    def get_media(self, identity: str) -> MediaRecord:
        with self._session(write=False) as session:
            row = session.get(MediaRow, identity)
            if row is None:
                raise NotFound(f"medium {identity} is not known", identity=identity)
            return row.to_record()

    def list_media(self, kind: str | None = None) -> list[MediaRecord]:
        query = select(MediaRow).order_by(MediaRow.identity)
        if kind is not None:
            query = query.where(MediaRow.kind == kind)
        with self._session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    # --- users, tokens, audit ------------------------------------------------------------------

    def add_user(self, name: str, role: str, password_hash: str) -> UserRecord:
        _check_name(name, "user name")
        _check_choice(role, USER_ROLES, "role")
        _check_name(password_hash, "password hash")
        conflict = f"user {name} already exists"
        with self._session(write=True, conflict=conflict) as session:
            if session.get(UserRow, name) is not None:
                raise Conflict(conflict, user=name)
            row = UserRow(name=name, role=role, password_hash=password_hash, created_at=self._now())
            session.add(row)
            return row.to_record()

    def get_user(self, name: str) -> UserRecord:
        with self._session(write=False) as session:
            row = session.get(UserRow, name)
            if row is None:
                raise NotFound(f"user {name} does not exist", user=name)
            return row.to_record()

    def list_users(self) -> list[UserRecord]:
        with self._session(write=False) as session:
            return [
                row.to_record() for row in session.scalars(select(UserRow).order_by(UserRow.name))
            ]

    def add_first_admin(self, name: str, password_hash: str) -> UserRecord:
        """Create an admin only while no admin exists (first-run set-up); else Conflict.

        Check and insert share one write transaction, so two set-up requests racing each other
        cannot both create an admin.
        """
        _check_name(name, "user name")
        _check_name(password_hash, "password hash")
        with self._session(write=True, conflict="an admin already exists") as session:
            if self._admin_count(session):
                raise Conflict("an admin already exists; sign in instead")
            if session.get(UserRow, name) is not None:
                raise Conflict(f"user {name} already exists", user=name)
            row = UserRow(
                name=name, role="admin", password_hash=password_hash, created_at=self._now()
            )
            session.add(row)
            return row.to_record()

    def update_user(
        self,
        name: str,
        *,
        role: str | None = None,
        password_hash: str | None = None,
        disabled: bool | None = None,
    ) -> UserRecord:
        """Change a user's role, password hash or whether the account is disabled. Demoting or
        disabling the last enabled admin is a Conflict. Disabling ends every session of the
        user and revokes every token in the same transaction."""
        if role is not None:
            _check_choice(role, USER_ROLES, "role")
        if password_hash is not None:
            _check_name(password_hash, "password hash")
        with self._session(write=True) as session:
            row = self._user_row(session, name, lock=True)
            if role is not None and role != row.role:
                if (
                    row.role == "admin"
                    and row.disabled_at is None
                    and self._admin_count(session) <= 1
                ):
                    raise Conflict(f"{name} is the last admin; make another admin first")
                row.role = role
            if password_hash is not None:
                row.password_hash = password_hash
            if disabled is True and row.disabled_at is None:
                if row.role == "admin" and self._admin_count(session) <= 1:
                    raise Conflict(f"{name} is the last admin; make another admin first")
                row.disabled_at = self._now()
                session.execute(delete(SessionRow).where(SessionRow.user == name))
                self._revoke_tokens(session, name)
            elif disabled is False:
                row.disabled_at = None
            return row.to_record()

    def end_sessions(self, user: str, *, keep: str | None = None) -> int:
        """End every session of ``user`` (but the one hashed ``keep``); returns how many."""
        query = delete(SessionRow).where(SessionRow.user == user)
        if keep is not None:
            query = query.where(SessionRow.hashed != keep)
        with self._session(write=True) as session:
            result = session.execute(query)
            return int(getattr(result, "rowcount", 0) or 0)

    def revoke_tokens(self, user: str) -> int:
        """Revoke every active API token of ``user``; returns how many."""
        with self._session(write=True) as session:
            return self._revoke_tokens(session, user)

    def _revoke_tokens(self, session: Session, user: str) -> int:
        result = session.execute(
            update(TokenRow)
            .where(TokenRow.user == user, TokenRow.revoked_at.is_(None))
            .values(revoked_at=self._now())
        )
        return int(getattr(result, "rowcount", 0) or 0)

    def delete_user(self, name: str) -> None:
        """Delete a user with their API tokens and sessions. The last admin stays (Conflict)."""
        with self._session(write=True) as session:
            row = self._user_row(session, name, lock=True)
            last = row.disabled_at is None and self._admin_count(session) <= 1
            if row.role == "admin" and last:
                raise Conflict(f"{name} is the last admin; make another admin first")
            session.execute(delete(TokenRow).where(TokenRow.user == name))
            session.execute(delete(SessionRow).where(SessionRow.user == name))
            session.delete(row)

    @staticmethod
    def _user_row(session: Session, name: str, *, lock: bool = False) -> UserRow:
        row = session.get(UserRow, name, with_for_update=lock)
        if row is None:
            raise NotFound(f"user {name} does not exist", user=name)
        return row

    @staticmethod
    def _admin_count(session: Session) -> int:
        # Locking the admin rows serialises concurrent demotions on PostgreSQL.
        rows = session.scalars(
            select(UserRow.name)
            .where(UserRow.role == "admin", UserRow.disabled_at.is_(None))
            .with_for_update()
        )
        return len(list(rows))

    # --- sessions ------------------------------------------------------------------------------

    def add_session(
        self, hashed: str, user: str, csrf_hashed: str, expires_at: datetime
    ) -> SessionRecord:
        """Record a browser session by the hash of its cookie value."""
        _check_name(hashed, "session hash")
        _check_name(csrf_hashed, "CSRF token hash")
        expires_at = _utc(expires_at, "session expiry")
        with self._session(write=True, conflict="this session is already recorded") as session:
            self._user_row(session, user)
            now = self._now()
            row = SessionRow(
                hashed=hashed,
                user=user,
                csrf_hashed=csrf_hashed,
                created_at=now,
                expires_at=expires_at,
                last_seen_at=now,
            )
            session.add(row)
            return row.to_record()

    def get_session(self, hashed: str) -> SessionRecord:
        """The unexpired session with this hash; :class:`NotFound` otherwise."""
        with self._session(write=False) as session:
            row = session.get(SessionRow, hashed)
            if row is None or row.expires_at <= self._now():
                raise NotFound("no active session matches")
            return row.to_record()

    def touch_session(self, hashed: str, expires_at: datetime) -> None:
        """Note activity on a session and move its expiry (a sliding session lifetime)."""
        expires_at = _utc(expires_at, "session expiry")
        with self._session(write=True) as session:
            row = session.get(SessionRow, hashed, with_for_update=True)
            if row is None:
                raise NotFound("no active session matches")
            row.last_seen_at = self._now()
            row.expires_at = expires_at

    def delete_session(self, hashed: str) -> None:
        """End a session (signing out); ending an unknown session is a no-op."""
        with self._session(write=True) as session:
            session.execute(delete(SessionRow).where(SessionRow.hashed == hashed))

    def purge_sessions(self) -> int:
        """Delete expired sessions; returns how many."""
        with self._session(write=True) as session:
            result = session.execute(delete(SessionRow).where(SessionRow.expires_at <= self._now()))
            return int(getattr(result, "rowcount", 0) or 0)

    def add_token(self, user: str, hashed: str, scopes: list[str]) -> TokenRecord:
        """Record an API token of ``user`` by its hash (the token itself is never stored)."""
        _check_name(hashed, "token hash")
        with self._session(write=True, conflict="this token is already recorded") as session:
            if session.get(UserRow, user) is None:
                raise NotFound(f"user {user} does not exist", user=user)
            row = TokenRow(
                id=uuid.uuid4().hex,
                user=user,
                hashed=hashed,
                scopes=list(scopes),
                created_at=self._now(),
                revoked_at=None,
            )
            session.add(row)
            return row.to_record()

    def list_tokens(self, user: str | None = None) -> list[TokenRecord]:
        """Tokens (revoked ones too), oldest first."""
        query = select(TokenRow).order_by(TokenRow.created_at, TokenRow.id)
        if user is not None:
            query = query.where(TokenRow.user == user)
        with self._session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    def find_active_token(self, hashed: str) -> TokenRecord:
        """The unrevoked token with this hash; :class:`NotFound` otherwise."""
        with self._session(write=False) as session:
            row = session.scalars(
                select(TokenRow).where(TokenRow.hashed == hashed, TokenRow.revoked_at.is_(None))
            ).first()
            if row is None:
                raise NotFound("no active API token matches")
            return row.to_record()

    def revoke_token(self, token_id: str) -> TokenRecord:
        """Revoke the token now; revoking a revoked token keeps its first revocation time."""
        with self._session(write=True) as session:
            row = session.get(TokenRow, token_id, with_for_update=True)
            if row is None:
                raise NotFound(f"API token {token_id} does not exist", token_id=token_id)
            if row.revoked_at is None:
                row.revoked_at = self._now()
            return row.to_record()

    def audit(
        self, actor: str, action: str, target: str, details: dict[str, Any] | None = None
    ) -> None:
        """Append one line to the audit log."""
        _check_name(actor, "audit actor")
        _check_name(action, "audit action")
        with self._session(write=True) as session:
            session.add(
                AuditRow(
                    at=self._now(),
                    actor=actor,
                    action=action,
                    target=target,
                    details=dict(details or {}),
                )
            )

    def list_audit(self, limit: int = 100) -> list[AuditRecord]:
        """The newest ``limit`` audit lines, newest first."""
        if limit < 1:
            raise InvalidInput("limit must be at least 1")
        query = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
        with self._session(write=False) as session:
            return [row.to_record() for row in session.scalars(query)]

    # --- failover sessions -----------------------------------------------------------------------

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
        _check_name(asset, "asset name")
        _check_name(point_id, "recovery point ID")
        _check_choice(state, FAILOVER_STATES, "failover state")
        session_id = session_id or uuid.uuid4().hex[:12]
        conflict = f"failover session {session_id} already exists"
        with self._session(write=True, conflict=conflict) as session:
            self._asset_must_exist(session, asset)
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
                started_at=self._now(),
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
            _check_choice(state, FAILOVER_STATES, "failover state")
        with self._session(write=True) as session:
            row = session.get(FailoverSessionRow, session_id, with_for_update=True)
            if row is None:
                raise NotFound(f"failover session {session_id} does not exist", session=session_id)
            if state is not None:
                row.state = state
            if details:
                row.details = {**row.details, **details}
            return row.to_record()

    def get_failover_session(self, session_id: str) -> FailoverSessionRecord:
        with self._session(write=False) as session:
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
        with self._session(write=False) as session:
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
        with self._session(write=False) as session:
            out: dict[str, FailoverSessionRecord] = {}
            for row in session.scalars(query):
                record = row.to_record()
                out[record.asset if per == "asset" else record.point_id] = record
            return out
