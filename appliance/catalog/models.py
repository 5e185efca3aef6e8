"""The catalog's tables as SQLAlchemy 2.0 declarative models.

These models are the schema's source of truth *in code*; the Alembic migrations in
``migrations/versions`` are its source of truth *in databases*. A test compares the two
(``alembic.autogenerate.compare_metadata``) on SQLite and PostgreSQL, so a change here without a
new migration fails the suite. Never edit a released migration: add one.

Design choices that keep SQLite and PostgreSQL interchangeable:

- Only portable types: ``String``, ``Text``, ``Integer``, ``BigInteger``, ``Boolean``, ``JSON``
  and :class:`UTCDateTime` (``DateTime(timezone=True)`` underneath).
- Every constraint is named through :data:`NAMING_CONVENTION`, so a future migration can alter
  it by name on PostgreSQL and through Alembic's batch mode on SQLite.
- Enumerated columns are plain strings validated in Python (see ``records``), not database enums
  or CHECK constraints: adding a value must not need a table rebuild on SQLite.
- ``recovery_points.parent_id``/``base_full_id`` carry no foreign key: every point is a complete
  snapshot, so retention may delete a parent while its children stay; and `catalog rebuild`
  inserts points in whatever order a store lists them.
- Booleans (``locations.immutable``, ...) are ``Boolean`` without a named CHECK constraint
  (SQLAlchemy 2.0 creates none by default), for the same reason.
- ``pools.store_id`` and ``failover_sessions.point_id`` carry no foreign key either: a pool is
  recorded before its store is registered, and a failover session is history that outlives the
  point it booted.

Each model converts itself to its record with ``to_record``; nothing outside this package sees a
model instance.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from appliance.catalog.records import (
    AssetRecord,
    AuditRecord,
    CopyRecord,
    FailoverSessionRecord,
    JobLogRecord,
    JobRecord,
    LocationRecord,
    MediaRecord,
    PointRecord,
    PolicyRecord,
    PoolRecord,
    PoolUsageRecord,
    SessionRecord,
    StoreRecord,
    TokenRecord,
    UserRecord,
)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Lengths of identifier columns. PostgreSQL enforces them, SQLite does not, so they are generous:
# they exist to stop garbage, not to shape the data.
NAME = 255
STATE = 32


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL stores ``timestamptz`` and hands back aware values in the session's time zone;
    SQLite has no datetime type and SQLAlchemy stores the wall-clock digits without the offset.
    Converting every value to UTC before it is bound makes both store the same instant, and
    marking (SQLite) or converting (PostgreSQL) results as UTC makes both return the same value.
    Naive datetimes are refused: whether they mean local time or UTC is a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given to the catalog; use UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AssetRow(Base):
    __tablename__ = "assets"

    name: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    kind: Mapped[str] = mapped_column(String(STATE))
    source: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    description: Mapped[str | None] = mapped_column(Text)

    def to_record(self) -> AssetRecord:
        return AssetRecord(
            name=self.name,
            kind=self.kind,
            source=self.source,
            created_at=self.created_at,
            description=self.description,
        )


class StoreRow(Base):
    __tablename__ = "stores"

    store_id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    location_kind: Mapped[str] = mapped_column(String(STATE))
    location: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def to_record(self) -> StoreRecord:
        return StoreRecord(
            store_id=self.store_id,
            location_kind=self.location_kind,
            location=self.location,
            created_at=self.created_at,
        )


class PointRow(Base):
    __tablename__ = "recovery_points"
    __table_args__ = (Index(None, "asset", "created_at"),)

    id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    asset: Mapped[str] = mapped_column(String(NAME), ForeignKey("assets.name"))
    kind: Mapped[str] = mapped_column(String(STATE))
    mode: Mapped[str] = mapped_column(String(STATE))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    parent_id: Mapped[str | None] = mapped_column(String(NAME))
    base_full_id: Mapped[str | None] = mapped_column(String(NAME))
    source: Mapped[str] = mapped_column(Text)
    logical_bytes: Mapped[int] = mapped_column(BigInteger)
    stored_bytes: Mapped[int] = mapped_column(BigInteger)
    file_count: Mapped[int] = mapped_column(BigInteger)
    warning_count: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(NAME))
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    verify_status: Mapped[str | None] = mapped_column(String(NAME))
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    signals: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    suspicion: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    review: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))

    def to_record(self) -> PointRecord:
        return PointRecord(
            id=self.id,
            asset=self.asset,
            kind=self.kind,
            mode=self.mode,
            created_at=self.created_at,
            parent_id=self.parent_id,
            base_full_id=self.base_full_id,
            source=self.source,
            logical_bytes=self.logical_bytes,
            stored_bytes=self.stored_bytes,
            file_count=self.file_count,
            warning_count=self.warning_count,
            status=self.status,
            verified_at=self.verified_at,
            verify_status=self.verify_status,
            labels=dict(self.labels),
            signals=dict(self.signals or {}),
            suspicion=list(self.suspicion or []),
            review=dict(self.review) if self.review else None,
        )

    def assign(self, point: PointRecord) -> None:
        """Copy every field of ``point`` onto this row (the id included)."""
        self.id = point.id
        self.asset = point.asset
        self.kind = point.kind
        self.mode = point.mode
        self.created_at = point.created_at
        self.parent_id = point.parent_id
        self.base_full_id = point.base_full_id
        self.source = point.source
        self.logical_bytes = point.logical_bytes
        self.stored_bytes = point.stored_bytes
        self.file_count = point.file_count
        self.warning_count = point.warning_count
        self.status = point.status
        self.verified_at = point.verified_at
        self.verify_status = point.verify_status
        self.labels = dict(point.labels)
        self.signals, self.suspicion = dict(point.signals) or None, list(point.suspicion) or None
        self.review = dict(point.review) if point.review else None


class LocationRow(Base):
    """One place that holds (part of) a store (revision 0004)."""

    __tablename__ = "locations"

    id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    store_id: Mapped[str] = mapped_column(String(NAME), ForeignKey("stores.store_id"), index=True)
    kind: Mapped[str] = mapped_column(String(STATE))
    address: Mapped[str] = mapped_column(Text)
    access: Mapped[str] = mapped_column(String(STATE))
    immutable: Mapped[bool] = mapped_column(Boolean)
    removable: Mapped[bool] = mapped_column(Boolean)
    offsite: Mapped[bool] = mapped_column(Boolean)
    online: Mapped[bool] = mapped_column(Boolean)
    label: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)

    def to_record(self) -> LocationRecord:
        return LocationRecord(
            id=self.id,
            store_id=self.store_id,
            kind=self.kind,
            address=self.address,
            access=self.access,
            immutable=self.immutable,
            removable=self.removable,
            offsite=self.offsite,
            online=self.online,
            label=self.label,
            created_at=self.created_at,
            last_seen_at=self.last_seen_at,
            details=dict(self.details),
        )


class CopyRow(Base):
    """A point at a location, keyed by (point, location) since revision 0004.

    ``store_id`` repeats the location's store, so the store-keyed queries (``list_points``,
    ``replace_store_points``) stay single-table.
    """

    __tablename__ = "point_copies"
    __table_args__ = (Index(None, "store_id"), Index(None, "location_id"))

    # Deleting a point removes its copy rows with it, in the database as well as in the ORM.
    point_id: Mapped[str] = mapped_column(
        String(NAME), ForeignKey("recovery_points.id", ondelete="CASCADE"), primary_key=True
    )
    location_id: Mapped[str] = mapped_column(
        String(NAME), ForeignKey("locations.id"), primary_key=True
    )
    store_id: Mapped[str] = mapped_column(String(NAME), ForeignKey("stores.store_id"))
    state: Mapped[str] = mapped_column(String(STATE))
    added_at: Mapped[datetime] = mapped_column(UTCDateTime)
    storage_class: Mapped[str | None] = mapped_column(String(NAME))
    retain_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def to_record(self) -> CopyRecord:
        return CopyRecord(
            point_id=self.point_id,
            store_id=self.store_id,
            state=self.state,
            added_at=self.added_at,
            location_id=self.location_id,
            storage_class=self.storage_class,
            retain_until=self.retain_until,
            verified_at=self.verified_at,
        )


class PolicyRow(Base):
    __tablename__ = "policies"

    name: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    schedule: Mapped[dict[str, Any]] = mapped_column(JSON)
    mode: Mapped[str] = mapped_column(String(STATE))
    retention: Mapped[dict[str, Any]] = mapped_column(JSON)
    rpo_seconds: Mapped[int] = mapped_column(BigInteger)

    def to_record(self, assets: list[str]) -> PolicyRecord:
        """``assets``: the policy's rows of ``policy_assets`` (revision 0009), in order."""
        return PolicyRecord(
            name=self.name,
            assets=assets,
            schedule=dict(self.schedule),
            mode=self.mode,
            retention=dict(self.retention),
            rpo_seconds=self.rpo_seconds,
        )


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index(None, "state"), Index(None, "created_at"))

    id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    kind: Mapped[str] = mapped_column(String(NAME))
    state: Mapped[str] = mapped_column(String(STATE))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    resource: Mapped[str | None] = mapped_column(String(NAME))
    # The seq of the job's last log line. Bumping it with an UPDATE takes the job's row lock, so
    # concurrent writers of one job's log get distinct seqs that commit in seq order -- a reader
    # following the log with ``after_seq`` never skips a line that commits late.
    log_seq: Mapped[int] = mapped_column(Integer)
    # A ``waiting`` job: why, and when it wakes by itself (NULL: an outside event wakes it).
    wait_reason: Mapped[str | None] = mapped_column(Text)
    wake_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The work function's last saved checkpoint (NULL: none); kept across waits and restarts.
    checkpoint: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    # How many times the job started running (NULL on rows older than revision 0005: 0).
    attempts: Mapped[int | None] = mapped_column(Integer, default=0)

    def to_record(self) -> JobRecord:
        return JobRecord(
            id=self.id,
            kind=self.kind,
            state=self.state,
            params=dict(self.params),
            progress=dict(self.progress),
            result=None if self.result is None else dict(self.result),
            error=None if self.error is None else dict(self.error),
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            resource=self.resource,
            wait_reason=self.wait_reason,
            wake_at=self.wake_at,
            checkpoint=dict(self.checkpoint or {}),
            attempts=self.attempts or 0,
        )


class JobLogRow(Base):
    __tablename__ = "job_log"

    job_id: Mapped[str] = mapped_column(
        String(NAME), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    level: Mapped[str] = mapped_column(String(STATE))
    message: Mapped[str] = mapped_column(Text)

    def to_record(self) -> JobLogRecord:
        return JobLogRecord(
            job_id=self.job_id, seq=self.seq, at=self.at, level=self.level, message=self.message
        )


class PoolRow(Base):
    """A disk pool; the filesystem columns (revision 0006) are NULL for a directory pool."""

    __tablename__ = "pools"
    __table_args__ = (Index(None, "fs_uuid", unique=True),)

    name: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    store_id: Mapped[str] = mapped_column(String(NAME))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    fs_uuid: Mapped[str | None] = mapped_column(String(NAME))
    fs_type: Mapped[str | None] = mapped_column(String(STATE))
    profile: Mapped[str | None] = mapped_column(String(STATE))
    members: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    # No foreign key, like store_id: the pool is the filesystem's record, its location the
    # store's; forgetting a location must not need the pool row gone first.
    location_id: Mapped[str | None] = mapped_column(String(NAME))
    mountpoint: Mapped[str | None] = mapped_column(Text)

    def to_record(self) -> PoolRecord:
        return PoolRecord(
            name=self.name,
            path=self.path,
            store_id=self.store_id,
            created_at=self.created_at,
            fs_uuid=self.fs_uuid,
            fs_type=self.fs_type,
            profile=self.profile,
            members=list(self.members or []),
            location_id=self.location_id,
            mountpoint=self.mountpoint,
        )


class PoolUsageRow(Base):
    """A sample of a pool's usage (revision 0006); removed with its pool."""

    __tablename__ = "pool_usage"

    pool: Mapped[str] = mapped_column(
        String(NAME), ForeignKey("pools.name", ondelete="CASCADE"), primary_key=True
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    used_bytes: Mapped[int] = mapped_column(BigInteger)
    total_bytes: Mapped[int] = mapped_column(BigInteger)

    def to_record(self) -> PoolUsageRecord:
        return PoolUsageRecord(
            pool=self.pool, at=self.at, used_bytes=self.used_bytes, total_bytes=self.total_bytes
        )


class MediaRow(Base):
    __tablename__ = "media"

    identity: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    kind: Mapped[str] = mapped_column(String(STATE))
    label: Mapped[str] = mapped_column(Text)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    location_id: Mapped[str | None] = mapped_column(String(NAME), ForeignKey("locations.id"))

    def to_record(self) -> MediaRecord:
        return MediaRecord(
            identity=self.identity,
            kind=self.kind,
            label=self.label,
            last_seen=self.last_seen,
            location_id=self.location_id,
        )


class UserRow(Base):
    __tablename__ = "users"

    name: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    role: Mapped[str] = mapped_column(String(STATE))
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    def to_record(self) -> UserRecord:
        return UserRecord(
            name=self.name,
            role=self.role,
            password_hash=self.password_hash,
            created_at=self.created_at,
            disabled_at=self.disabled_at,
        )


class TokenRow(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    # "user" is a reserved word in PostgreSQL; a plain column name spares raw SQL the quoting.
    user: Mapped[str] = mapped_column(
        "user_name", String(NAME), ForeignKey("users.name"), index=True
    )
    hashed: Mapped[str] = mapped_column(String(NAME), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Revision 0011: NULL for a token that never expires.
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def to_record(self) -> TokenRecord:
        return TokenRecord(
            id=self.id,
            user=self.user,
            hashed=self.hashed,
            scopes=list(self.scopes),
            created_at=self.created_at,
            revoked_at=self.revoked_at,
            expires_at=self.expires_at,
        )


class SessionRow(Base):
    """A browser session, keyed by the SHA-256 of its cookie value (revision 0002)."""

    __tablename__ = "sessions"
    __table_args__ = (Index(None, "expires_at"),)

    hashed: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    user: Mapped[str] = mapped_column(
        "user_name", String(NAME), ForeignKey("users.name", ondelete="CASCADE"), index=True
    )
    csrf_hashed: Mapped[str] = mapped_column(String(NAME))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def to_record(self) -> SessionRecord:
        return SessionRecord(
            hashed=self.hashed,
            user=self.user,
            csrf_hashed=self.csrf_hashed,
            created_at=self.created_at,
            expires_at=self.expires_at,
            last_seen_at=self.last_seen_at,
        )


class ScheduleStateRow(Base):
    """When each schedule entry of a policy last fired (revision 0002).

    ``entry`` is the entry's key (its cron expression and mode), so reordering a policy's entries
    keeps their history and changing one starts it afresh.
    """

    __tablename__ = "schedule_state"

    policy: Mapped[str] = mapped_column(
        String(NAME), ForeignKey("policies.name", ondelete="CASCADE"), primary_key=True
    )
    entry: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    last_fired_at: Mapped[datetime] = mapped_column(UTCDateTime)


class SettingRow(Base):
    """One JSON document of appliance settings under a key (revision 0002)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)


class AuditRow(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index(None, "at"),)

    # Integer, not BigInteger: only SQLite's INTEGER PRIMARY KEY autoincrements.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    actor: Mapped[str] = mapped_column(String(NAME))
    action: Mapped[str] = mapped_column(String(NAME))
    target: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)

    def to_record(self) -> AuditRecord:
        return AuditRecord(
            id=self.id,
            at=self.at,
            actor=self.actor,
            action=self.action,
            target=self.target,
            details=dict(self.details),
        )


class FailoverSessionRow(Base):
    """A failover of an asset to one of its points (``image.failover`` owns its use)."""

    __tablename__ = "failover_sessions"

    id: Mapped[str] = mapped_column(String(NAME), primary_key=True)
    asset: Mapped[str] = mapped_column(String(NAME), ForeignKey("assets.name"), index=True)
    point_id: Mapped[str] = mapped_column(String(NAME))
    state: Mapped[str] = mapped_column(String(STATE))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)

    def to_record(self) -> FailoverSessionRecord:
        return FailoverSessionRecord(
            id=self.id,
            asset=self.asset,
            point_id=self.point_id,
            state=self.state,
            started_at=self.started_at,
            details=dict(self.details),
        )
