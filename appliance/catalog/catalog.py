"""The catalog facade: one object over the catalog's repositories, as every caller uses it.

The catalog is an SQL index of assets, stores and their locations, recovery points and their
copies, jobs, policies and accounts. It is never the only record of anything that matters:
every store is self-describing, and `catalog rebuild` recreates the catalog's view of a store
with :meth:`Catalog.replace_store_points`. What the catalog alone knows (jobs, their logs, the
audit trail, verification times) is operational history, not data.

Design: one :class:`database.Database` (engine, clock, transactions, schema upgrades) shared by
one small repository class per aggregate -- ``assets``, ``locations`` (stores, locations, pools,
media), ``points``, ``copies``, ``jobs``, ``schedules`` (policies, schedule state, settings),
``accounts`` (users, sessions, tokens, audit) and ``failovers``. :class:`Catalog` composes them
(``catalog.points``, ``catalog.accounts``, ...) and keeps a flat method for each repository
method, a one-line delegation, so ``catalog.add_point(...)`` and ``catalog.points.add_point(...)``
are the same call. Each repository method documents its contract; each runs in its own short
transaction and returns frozen records (``records``).
"""

from __future__ import annotations

from datetime import datetime
from types import TracebackType
from typing import Any

from sqlalchemy import Engine

from appliance.catalog.accounts import AccountRepository
from appliance.catalog.assets import AssetRepository
from appliance.catalog.copies import CopyRepository
from appliance.catalog.database import HEAD_REVISION, MIGRATIONS_DIR, Clock, Database
from appliance.catalog.failovers import FailoverRepository
from appliance.catalog.jobs import JobRepository
from appliance.catalog.locations import LocationRepository
from appliance.catalog.points import MIN_POINT_PREFIX, PointRepository
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
    SessionRecord,
    StoreRecord,
    TokenRecord,
    UserRecord,
)
from appliance.catalog.schedules import ScheduleRepository

__all__ = ["HEAD_REVISION", "MIGRATIONS_DIR", "MIN_POINT_PREFIX", "Catalog", "Clock"]


class Catalog:
    """The catalog of one appliance. Open with :meth:`open`; close with :meth:`close`.

    Thread-safe: every method takes its own connection from the engine's pool.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self.assets = AssetRepository(db)
        self.locations = LocationRepository(db)
        self.points = PointRepository(db)
        self.copies = CopyRepository(db)
        self.jobs = JobRepository(db)
        self.schedules = ScheduleRepository(db)
        self.accounts = AccountRepository(db)
        self.failovers = FailoverRepository(db)

    @classmethod
    def open(cls, url: str, *, clock: Clock | None = None) -> Catalog:
        """Connect to the catalog at ``url`` and bring its schema up to date.

        ``url`` is an SQLAlchemy URL: ``sqlite:////var/lib/appliance/catalog.db`` (the directory
        must exist; the file is created) or ``postgresql+psycopg://user@host/dbname`` (the
        database must exist). ``clock`` returns the current aware datetime; it defaults to UTC
        wall-clock time.
        """
        return cls(Database.open(url, clock=clock))

    @property
    def url(self) -> str:
        """The URL this catalog was opened with (password included: it opens it again)."""
        return self.db.url

    @property
    def _engine(self) -> Engine:
        return self.db.engine

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- assets ----------------------------------------------------------------------------------

    def ensure_asset(self, name: str, kind: str, source: str = "") -> AssetRecord:
        return self.assets.ensure_asset(name, kind, source)

    def add_asset(
        self, name: str, kind: str, source: str, description: str | None = None
    ) -> AssetRecord:
        return self.assets.add_asset(name, kind, source, description)

    def update_asset(self, name: str, source: str, description: str | None) -> AssetRecord:
        return self.assets.update_asset(name, source, description)

    def delete_asset(self, name: str) -> None:
        self.assets.delete_asset(name)

    def get_asset(self, name: str) -> AssetRecord:
        return self.assets.get_asset(name)

    def list_assets(self) -> list[AssetRecord]:
        return self.assets.list_assets()

    # --- locations -------------------------------------------------------------------------------

    def ensure_store(self, store_id: str, location_kind: str, location: str) -> StoreRecord:
        return self.locations.ensure_store(store_id, location_kind, location)

    def get_store(self, store_id: str) -> StoreRecord:
        return self.locations.get_store(store_id)

    def list_stores(self) -> list[StoreRecord]:
        return self.locations.list_stores()

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
        return self.locations.add_location(
            store_id,
            kind,
            address,
            access=access,
            immutable=immutable,
            removable=removable,
            offsite=offsite,
            online=online,
            label=label,
            details=details,
            location_id=location_id,
        )

    def get_location(self, location_id: str) -> LocationRecord:
        return self.locations.get_location(location_id)

    def list_locations(self, store_id: str | None = None) -> list[LocationRecord]:
        return self.locations.list_locations(store_id)

    def update_location(
        self,
        location_id: str,
        *,
        online: bool | None = None,
        last_seen_at: datetime | None = None,
        label: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> LocationRecord:
        return self.locations.update_location(
            location_id, online=online, last_seen_at=last_seen_at, label=label, details=details
        )

    def remove_location(self, location_id: str) -> None:
        self.locations.remove_location(location_id)

    def add_pool(self, name: str, path: str, store_id: str) -> PoolRecord:
        return self.locations.add_pool(name, path, store_id)

    def get_pool(self, name: str) -> PoolRecord:
        return self.locations.get_pool(name)

    def list_pools(self) -> list[PoolRecord]:
        return self.locations.list_pools()

    def delete_pool(self, name: str) -> None:
        self.locations.delete_pool(name)

    def ensure_media(
        self, identity: str, kind: str, label: str, location_id: str | None = None
    ) -> MediaRecord:
        return self.locations.ensure_media(identity, kind, label, location_id)

    def get_media(self, identity: str) -> MediaRecord:
        return self.locations.get_media(identity)

    def list_media(self, kind: str | None = None) -> list[MediaRecord]:
        return self.locations.list_media(kind)

    # --- points ----------------------------------------------------------------------------------

    def add_point(self, point: PointRecord, store_id: str) -> None:
        self.points.add_point(point, store_id)

    def get_point(self, id_or_prefix: str) -> PointRecord:
        return self.points.get_point(id_or_prefix)

    def list_points(
        self, asset: str | None = None, store_id: str | None = None
    ) -> list[PointRecord]:
        return self.points.list_points(asset, store_id)

    def newest_points(self, limit: int, asset: str | None = None) -> list[PointRecord]:
        return self.points.newest_points(limit, asset)

    def latest_point(
        self, asset: str, kind: str | None = None, mode: str | None = None
    ) -> PointRecord | None:
        return self.points.latest_point(asset, kind, mode)

    def delete_point(self, point_id: str) -> None:
        self.points.delete_point(point_id)

    def mark_verified(self, point_id: str, at: datetime, status: str) -> None:
        self.points.mark_verified(point_id, at, status)

    def replace_store_points(self, store_id: str, points: list[PointRecord]) -> tuple[int, int]:
        return self.points.replace_store_points(store_id, points)

    # --- copies ----------------------------------------------------------------------------------

    def copies_of(self, point_id: str) -> list[CopyRecord]:
        return self.copies.copies_of(point_id)

    def point_copies(self, point_id: str) -> list[CopyRecord]:
        return self.copies.point_copies(point_id)

    def copies_at(self, location_id: str, state: str | None = None) -> list[CopyRecord]:
        return self.copies.copies_at(location_id, state)

    def set_copy(
        self,
        point_id: str,
        location_id: str,
        state: str,
        storage_class: str | None = None,
        retain_until: datetime | None = None,
        verified_at: datetime | None = None,
    ) -> CopyRecord:
        return self.copies.set_copy(
            point_id, location_id, state, storage_class, retain_until, verified_at
        )

    def mark_copy_verified(self, point_id: str, location_id: str, at: datetime) -> CopyRecord:
        return self.copies.mark_copy_verified(point_id, location_id, at)

    def add_copy(self, point_id: str, store_id: str, state: str = "copying") -> CopyRecord:
        return self.copies.add_copy(point_id, store_id, state)

    def set_copy_state(self, point_id: str, store_id: str, state: str) -> CopyRecord:
        return self.copies.set_copy_state(point_id, store_id, state)

    # --- jobs ------------------------------------------------------------------------------------

    def create_job(
        self, kind: str, params: dict[str, Any], resource: str | None = None
    ) -> JobRecord:
        return self.jobs.create_job(kind, params, resource)

    def count_jobs(self) -> dict[str, int]:
        return self.jobs.count_jobs()

    def update_job(
        self,
        job_id: str,
        *,
        state: str | None = None,
        progress: dict[str, Any] | None = None,
        result: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
    ) -> JobRecord:
        return self.jobs.update_job(
            job_id, state=state, progress=progress, result=result, error=error
        )

    def get_job(self, job_id: str) -> JobRecord:
        return self.jobs.get_job(job_id)

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[JobRecord]:
        return self.jobs.list_jobs(state, limit)

    def append_job_log(self, job_id: str, level: str, message: str) -> None:
        self.jobs.append_job_log(job_id, level, message)

    def job_log(self, job_id: str, after_seq: int = 0) -> list[JobLogRecord]:
        return self.jobs.job_log(job_id, after_seq)

    def mark_running_jobs_interrupted(self) -> int:
        return self.jobs.mark_running_jobs_interrupted()

    def set_waiting(
        self,
        job_id: str,
        reason: str,
        wake_at: datetime | None,
        checkpoint: dict[str, Any] | None,
    ) -> JobRecord:
        return self.jobs.set_waiting(job_id, reason, wake_at, checkpoint)

    def due_waiting(self, now: datetime) -> list[JobRecord]:
        return self.jobs.due_waiting(now)

    def wake_job(self, job_id: str) -> JobRecord | None:
        return self.jobs.wake_job(job_id)

    def save_checkpoint(self, job_id: str, checkpoint: dict[str, Any]) -> None:
        self.jobs.save_checkpoint(job_id, checkpoint)

    # --- schedules -------------------------------------------------------------------------------

    def add_policy(self, policy: PolicyRecord) -> PolicyRecord:
        return self.schedules.add_policy(policy)

    def update_policy(self, policy: PolicyRecord) -> PolicyRecord:
        return self.schedules.update_policy(policy)

    def get_policy(self, name: str) -> PolicyRecord:
        return self.schedules.get_policy(name)

    def list_policies(self, asset: str | None = None) -> list[PolicyRecord]:
        return self.schedules.list_policies(asset)

    def delete_policy(self, name: str) -> None:
        self.schedules.delete_policy(name)

    def schedule_state(self, policy: str | None = None) -> dict[str, dict[str, datetime]]:
        return self.schedules.schedule_state(policy)

    def reset_schedule_state(self, policy: str, entries: list[str], at: datetime) -> None:
        self.schedules.reset_schedule_state(policy, entries, at)

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
        return self.schedules.fire_schedule(
            policy,
            fired,
            job_kind=job_kind,
            job_params=job_params,
            job_resource=job_resource,
            log=log,
        )

    def get_settings(self, key: str) -> dict[str, Any]:
        return self.schedules.get_settings(key)

    def put_settings(self, key: str, value: dict[str, Any]) -> dict[str, Any]:
        return self.schedules.put_settings(key, value)

    # --- accounts --------------------------------------------------------------------------------

    def add_user(self, name: str, role: str, password_hash: str) -> UserRecord:
        return self.accounts.add_user(name, role, password_hash)

    def get_user(self, name: str) -> UserRecord:
        return self.accounts.get_user(name)

    def list_users(self) -> list[UserRecord]:
        return self.accounts.list_users()

    def add_first_admin(self, name: str, password_hash: str) -> UserRecord:
        return self.accounts.add_first_admin(name, password_hash)

    def update_user(
        self,
        name: str,
        *,
        role: str | None = None,
        password_hash: str | None = None,
        disabled: bool | None = None,
    ) -> UserRecord:
        return self.accounts.update_user(
            name, role=role, password_hash=password_hash, disabled=disabled
        )

    def end_sessions(self, user: str, *, keep: str | None = None) -> int:
        return self.accounts.end_sessions(user, keep=keep)

    def revoke_tokens(self, user: str) -> int:
        return self.accounts.revoke_tokens(user)

    def delete_user(self, name: str) -> None:
        self.accounts.delete_user(name)

    def add_session(
        self, hashed: str, user: str, csrf_hashed: str, expires_at: datetime
    ) -> SessionRecord:
        return self.accounts.add_session(hashed, user, csrf_hashed, expires_at)

    def get_session(self, hashed: str) -> SessionRecord:
        return self.accounts.get_session(hashed)

    def touch_session(self, hashed: str, expires_at: datetime) -> None:
        self.accounts.touch_session(hashed, expires_at)

    def delete_session(self, hashed: str) -> None:
        self.accounts.delete_session(hashed)

    def purge_sessions(self) -> int:
        return self.accounts.purge_sessions()

    def add_token(self, user: str, hashed: str, scopes: list[str]) -> TokenRecord:
        return self.accounts.add_token(user, hashed, scopes)

    def list_tokens(self, user: str | None = None) -> list[TokenRecord]:
        return self.accounts.list_tokens(user)

    def find_active_token(self, hashed: str) -> TokenRecord:
        return self.accounts.find_active_token(hashed)

    def revoke_token(self, token_id: str) -> TokenRecord:
        return self.accounts.revoke_token(token_id)

    def audit(
        self, actor: str, action: str, target: str, details: dict[str, Any] | None = None
    ) -> None:
        self.accounts.audit(actor, action, target, details)

    def list_audit(self, limit: int = 100) -> list[AuditRecord]:
        return self.accounts.list_audit(limit)

    # --- failovers -------------------------------------------------------------------------------

    def add_failover_session(
        self,
        asset: str,
        point_id: str,
        details: dict[str, Any],
        *,
        state: str = "starting",
        session_id: str | None = None,
    ) -> FailoverSessionRecord:
        return self.failovers.add_failover_session(
            asset, point_id, details, state=state, session_id=session_id
        )

    def update_failover_session(
        self, session_id: str, *, state: str | None = None, details: dict[str, Any] | None = None
    ) -> FailoverSessionRecord:
        return self.failovers.update_failover_session(session_id, state=state, details=details)

    def get_failover_session(self, session_id: str) -> FailoverSessionRecord:
        return self.failovers.get_failover_session(session_id)

    def list_failover_sessions(
        self, asset: str | None = None, states: frozenset[str] | None = None, limit: int = 100
    ) -> list[FailoverSessionRecord]:
        return self.failovers.list_failover_sessions(asset, states, limit)

    def last_boot_tests(
        self, *, per: str = "asset", asset: str | None = None, proven_only: bool = False
    ) -> dict[str, FailoverSessionRecord]:
        return self.failovers.last_boot_tests(per=per, asset=asset, proven_only=proven_only)
