"""The catalog's database object: engine, transactions, schema upgrades and value checks.

One :class:`Database` is shared by every repository of the catalog (``assets``, ``locations``,
``points``, ``copies``, ``jobs``, ``schedules``, ``accounts``, ``failovers``); the facade
:class:`appliance.catalog.Catalog` opens it and composes the repositories over it.

Design:

- Each repository method runs in its own short transaction, taken from :meth:`Database.session`,
  and returns frozen records (``records``); no session, row or engine escapes the package.
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
read-check-write method act on a stale read. Write transactions start with ``BEGIN IMMEDIATE``,
which takes the database's write lock up front (waiting up to the busy timeout); starting
deferred and upgrading later would fail at once with "database is locked" whenever another
writer committed since our read. Read-only transactions use a plain deferred ``BEGIN`` and run
concurrently with the writer. On PostgreSQL, read-check-write methods lock the rows they check
(``SELECT ... FOR UPDATE``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import (
    DataError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
    StatementError,
)
from sqlalchemy.orm import Session

from appliance.catalog.models import NAME
from appliance.errors import Conflict, InvalidInput, NotFound

Clock = Callable[[], datetime]
log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
#: Key of the PostgreSQL advisory lock held while the schema is upgraded ("CATALOG!" in ASCII).
SCHEMA_LOCK_KEY = 0x434154414C4F4721
SQLITE_BUSY_TIMEOUT_MS = 30_000
#: Execution option that makes a SQLite transaction start with BEGIN IMMEDIATE.
WRITE_OPTION = "appliance_catalog_write"


def system_clock() -> datetime:
    return datetime.now(UTC)


def check_choice(value: str, allowed: frozenset[str], what: str) -> None:
    if value not in allowed:
        raise InvalidInput(
            f"{what} {value!r} is not one of {', '.join(sorted(allowed))}",
            value=value,
            allowed=sorted(allowed),
        )


def check_name(value: str, what: str) -> None:
    if not value or not value.strip():
        raise InvalidInput(f"{what} must not be empty")
    # PostgreSQL enforces the column length and SQLite does not; checking here makes both agree.
    if len(value) > NAME:
        raise InvalidInput(f"{what} is longer than {NAME} characters")


def utc(value: datetime, what: str) -> datetime:
    """``value`` in UTC; a naive datetime is refused because its zone would be a guess."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what} {value.isoformat()} has no time zone; give an aware datetime")
    return value.astimezone(UTC)


def json_dumps(value: object) -> str:
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


def create_catalog_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # pre_ping: a PostgreSQL restart must not surface as an error on the next request.
        return create_engine(parsed, pool_pre_ping=True, json_serializer=json_dumps)
    database = parsed.database or ""
    in_memory = database in ("", ":memory:") or parsed.query.get("mode") == "memory"
    if not in_memory and not database.startswith("file:"):
        directory = Path(database).absolute().parent
        if not directory.is_dir():
            raise NotFound(f"catalog directory {directory} does not exist", path=str(directory))
    # A connection per worker thread of the service (40) stays open: connections beyond the
    # pool are closed when returned, and opening one (pragmas, WAL check) costs more than a query.
    pool: dict[str, int] = {} if in_memory else {"pool_size": 40, "max_overflow": 40}
    engine = create_engine(parsed, json_serializer=json_dumps, **pool)
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


#: The newest migration revision. Opening a catalog already at this revision skips Alembic (whose
#: import alone costs about half a second of every CLI command); a test keeps it equal to the
#: head of the migration scripts.
HEAD_REVISION = "0012"


def _schema_is_current(engine: Engine) -> bool:
    try:
        with engine.connect() as connection:
            row = connection.execute(text("SELECT version_num FROM alembic_version")).first()
    except (OperationalError, ProgrammingError):
        return False  # no version table yet: a new database
    return row is not None and row[0] == HEAD_REVISION


#: Copies of a SQLite catalog taken before a migration (``<catalog>.before-<revision>``) kept.
SCHEMA_BACKUPS_KEEP = 3


def _stored_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as connection:
            row = connection.execute(text("SELECT version_num FROM alembic_version")).first()
    except (OperationalError, ProgrammingError):
        return None
    return None if row is None else str(row[0])


def backup_before_migration(engine: Engine) -> Path | None:
    """Copy an existing SQLite catalog that is about to be migrated to
    ``<catalog>.before-<head revision>`` (SQLite's backup API: consistent while others read),
    keeping the newest :data:`SCHEMA_BACKUPS_KEEP`; returns the copy, or None when there is
    nothing to copy (a new catalog, an in-memory one, or PostgreSQL, whose dumps are the
    operator's: a copy of a whole server is not ours to take)."""
    if engine.dialect.name != "sqlite":
        log.info("catalog schema upgrade on %s: no copy is made first", engine.dialect.name)
        return None
    database = engine.url.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    path = Path(database)
    revision = _stored_revision(engine)
    if not path.is_file() or revision is None or revision == HEAD_REVISION:
        return None
    target = path.with_name(f"{path.name}.before-{HEAD_REVISION}")
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    source = sqlite3.connect(path)
    try:
        copy = sqlite3.connect(partial)
        try:
            source.backup(copy)
        finally:
            copy.close()
    finally:
        source.close()
    partial.replace(target)
    log.warning("catalog at revision %s copied to %s before its upgrade", revision, target)
    copies = sorted(
        path.parent.glob(f"{path.name}.before-*"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for old in [c for c in copies if not c.name.endswith(".partial")][SCHEMA_BACKUPS_KEEP:]:
        old.unlink(missing_ok=True)
    return target


def upgrade_schema(engine: Engine) -> None:
    """Run ``alembic upgrade head`` on ``engine`` in one transaction (an existing SQLite
    catalog is copied first: :func:`backup_before_migration`)."""
    if _schema_is_current(engine):
        return
    backup_before_migration(engine)
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


class Database:
    """The engine of one catalog, its clock, and the transactions every repository runs in.

    Thread-safe: every transaction takes its own connection from the engine's pool.
    """

    def __init__(self, engine: Engine, clock: Clock) -> None:
        self.engine = engine
        self._writer = engine.execution_options(**{WRITE_OPTION: True})
        self._clock = clock

    @classmethod
    def open(cls, url: str, *, clock: Clock | None = None) -> Database:
        """Connect to ``url`` and bring its schema up to date (see ``Catalog.open``)."""
        engine = create_catalog_engine(url)
        try:
            upgrade_schema(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, clock or system_clock)

    @property
    def url(self) -> str:
        """The URL this catalog was opened with (password included: it opens it again)."""
        return self.engine.url.render_as_string(hide_password=False)

    def close(self) -> None:
        self.engine.dispose()

    def now(self) -> datetime:
        """The clock's time, checked to be aware and converted to UTC."""
        return utc(self._clock(), "the clock's time")

    @contextmanager
    def session(self, *, write: bool, conflict: str = "") -> Iterator[Session]:
        """One transaction; committed when the block ends, rolled back if it raises.

        ``conflict`` is the message of the :class:`Conflict` raised when the database reports a
        duplicate (a race lost between a method's own check and its insert lands here too).
        An :class:`InvalidInput` raised while binding a value (see :func:`json_dumps`) reaches
        the caller unwrapped, whichever layer (SQLAlchemy or the driver) ran the serializer.
        """
        try:
            with (
                Session(self._writer if write else self.engine, expire_on_commit=False) as session,
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
