"""The appliance engine: a data directory's store and catalog, and the work functions on them.

Every long operation (backup, restore, verify, prune, GC, catalog rebuild) is a method here that
knows nothing about HTTP or terminals: it takes plain arguments, an optional progress callback and
an optional cancel event, and returns a result. The CLI, the API's jobs, the scheduler and the
tests call them the same way. The location methods (copies, recall, location GC) live in
:mod:`appliance.engine_locations`, the restores in :mod:`appliance.engine_restore`.

Data directory layout::

    catalog.sqlite              the catalog (unless a PostgreSQL URL is configured)
    restores/                   the restore area every appliance has (see path_rules.py)
    pools/default/store/        the default pool's store (self-describing; see docs/format.md)
    cache/<store id>/           local index cache and verify ledger (safe to delete)
    locks/                      flock files of running operations

Time is injected (``clock``) so that tests and policies use explicit timestamps.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.backup.files import backup_tree
from appliance.backup.signals import SignalCounter
from appliance.catalog import Catalog
from appliance.catalog.records import PointRecord, home_location_id
from appliance.engine_images import ImagesMixin
from appliance.engine_locations import LocationsMixin
from appliance.engine_restore import RestoreMixin
from appliance.engine_signals import SignalsMixin
from appliance.errors import Conflict as ConflictError
from appliance.errors import (
    InvalidInput,
    NotFound,
    ObjectMissing,
)
from appliance.maintenance import VerifyReport, verify_point, verify_store
from appliance.points import new_manifest, new_point_id, record_from_manifest
from appliance.retention import (
    RetentionDecision,
    RetentionRules,
    apply_retention,
    ransomware_holds,
)
from appliance.space import check_free_space
from appliance.store.backend import LocalDirectoryBackend
from appliance.store.repository import Repository
from appliance.workers import CpuMeter, default_workers

Clock = Callable[[], datetime]
ProgressCallback = Callable[[dict[str, Any]], None]
MODES = ("full", "incremental", "differential")
#: The data directory's own pool (the store's home location).
DEFAULT_POOL = "default"
#: The catalog settings key of the restore areas and devices (``{"areas": [], "devices": []}``).


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DataDir:
    path: str
    #: The store's folder when it is not the default pool's: a peer that takes over a source's
    #: replica opens it in place, with this data directory's rules, cache and locks.
    store_dir: str | None = None

    @property
    def store_path(self) -> str:
        if self.store_dir is not None:
            return self.store_dir
        return os.path.join(self.path, "pools", "default", "store")

    @property
    def cache_path(self) -> str:
        return os.path.join(self.path, "cache")

    @property
    def secrets_path(self) -> str:
        """Credentials of locations (bucket keys), one 0600 file each, never in the catalog."""
        return os.path.join(self.path, "secrets")

    @property
    def lock_path(self) -> str:
        return os.path.join(self.path, "locks")

    @property
    def catalog_url(self) -> str:
        return os.environ.get("APPLIANCE_CATALOG_URL") or (
            "sqlite:///" + os.path.join(self.path, "catalog.sqlite")
        )


@dataclass
class BackupOutcome:
    point: PointRecord
    stats: dict[str, Any]
    warnings: list[dict[str, str]] = field(default_factory=list)


class Appliance(ImagesMixin, LocationsMixin, RestoreMixin, SignalsMixin):
    def __init__(
        self, data_dir: DataDir, repo: Repository, catalog: Catalog, clock: Clock = utcnow
    ) -> None:
        self.data_dir = data_dir
        self.repo = repo
        self.catalog = catalog
        self.clock = clock
        self.locks = repo.locks(data_dir.lock_path)
        catalog.ensure_store(repo.store_id, "pool", data_dir.store_path)
        home = catalog.get_location(home_location_id(repo.store_id))
        if home.label != DEFAULT_POOL:  # named after the pool it is, not its path
            catalog.update_location(home.id, label=DEFAULT_POOL)

    # --- lifecycle --------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: str,
        passphrase: str,
        *,
        clock: Clock = utcnow,
        catalog_url: str | None = None,
        **store_config: Any,
    ) -> tuple[Appliance, str]:
        data_dir = DataDir(os.path.abspath(path))
        os.makedirs(data_dir.store_path, exist_ok=True)
        backend = LocalDirectoryBackend(data_dir.store_path)
        repo = Repository.init(backend, passphrase, data_dir.cache_path, **store_config)
        catalog = Catalog.open(catalog_url or data_dir.catalog_url)
        return cls(data_dir, repo, catalog, clock), repo.key.recovery_key()

    @classmethod
    def open(
        cls,
        path: str,
        *,
        passphrase: str | None = None,
        recovery_key: str | None = None,
        clock: Clock = utcnow,
        catalog_url: str | None = None,
        sync_index: bool = True,
    ) -> Appliance:
        data_dir = DataDir(os.path.abspath(path))
        backend = LocalDirectoryBackend(data_dir.store_path)
        repo = Repository.open(
            backend,
            data_dir.cache_path,
            passphrase=passphrase,
            recovery_key=recovery_key,
            sync=sync_index,
        )
        catalog = Catalog.open(catalog_url or data_dir.catalog_url)
        return cls(data_dir, repo, catalog, clock)

    def close(self) -> None:
        self.repo.close()
        self.catalog.close()

    def __enter__(self) -> Appliance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- base points --------------------------------------------------------------------------

    def _base(self, asset: str, kind: str, mode: str) -> tuple[str, dict[str, Any] | None]:
        """Pick the point to compare against; a mode without a usable base becomes a full."""
        if mode not in MODES:
            raise InvalidInput(f"mode must be one of {', '.join(MODES)}")
        if mode == "full":
            return "full", None
        base = self.catalog.latest_point(
            asset, kind=kind, mode="full" if mode == "differential" else None
        )
        if base is None:
            return "full", None
        try:
            return mode, self.repo.get_manifest(base.id)
        except ObjectMissing:
            return "full", None

    @staticmethod
    def _base_full(base: dict[str, Any] | None) -> str | None:
        if base is None:
            return None
        return str(base["point_id"]) if base["mode"] == "full" else base.get("base_full")

    def _record(self, manifest: dict[str, Any]) -> PointRecord:
        # Data and index are already in the store; the manifest makes the point real, the
        # catalog row makes it visible. A crash between the two is repaired by `catalog rebuild`.
        self.repo.put_manifest(manifest["point_id"], manifest)
        point = record_from_manifest(manifest)
        self.catalog.add_point(point, self.repo.store_id)
        return point

    # --- backups --------------------------------------------------------------------------------

    def backup_files(
        self,
        source: str,
        asset: str,
        *,
        mode: str = "incremental",
        workers: int | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> BackupOutcome:
        source = os.path.abspath(source)
        # A full pool refuses before anything is written (appliance.space).
        check_free_space(self.data_dir.store_path, f"pool {DEFAULT_POOL}")
        with self.locks.shared(), self.locks.asset(asset):
            created = self.clock()
            mode, base = self._base(asset, "files", mode)
            if base is not None and base.get("source") != source:
                mode, base = "full", None  # another folder under the same name: start afresh
            point_id = new_point_id(created)
            signals = SignalCounter(base["point_id"] if base else None)
            cpu = CpuMeter()
            tree, stats, warnings = backup_tree(
                self.repo,
                source,
                previous=base,
                workers=workers or default_workers(),
                progress=progress,
                cancel=cancel,
                signals=signals,
                cpu=cpu,
            )
            manifest = new_manifest(
                point_id=point_id,
                asset=asset,
                kind="files",
                mode=mode,
                created=created,
                parent=base["point_id"] if base else None,
                base_full=self._base_full(base),
                store_id=self.repo.store_id,
                source=source,
            )
            manifest["tree"] = tree
            manifest["stats"] = {**vars(stats), "logical_bytes": stats.bytes_total}
            manifest["warnings"] = warnings.items
            manifest["warning_count"] = warnings.count
            point = self.judge_point(self._record(manifest), signals.result())
            # The CPU it cost is the engine's report, not a fact of the point: not in the manifest.
            return BackupOutcome(point, {**manifest["stats"], "cpu": cpu.to_dict()}, warnings.items)

    # --- restores -------------------------------------------------------------------------------

    def point(self, point_id: str) -> PointRecord:
        return self.catalog.get_point(point_id)

    def manifest(self, point_id: str) -> dict[str, Any]:
        """The point's manifest: from the home pool, or from its best copy elsewhere when the
        home copy left (manifests stay hot in cold buckets: no recall is needed)."""
        point = self.point(point_id)
        try:
            return self.repo.get_manifest(point.id)
        except ObjectMissing:
            held = self.catalog.copies_of(point.id)
            if not any(c.state in ("present", "archived", "recalling") for c in held):
                raise
        repo = self.reader(point.id)
        try:
            return repo.get_manifest(point.id)
        finally:
            repo.close()

    # --- catalog ----------------------------------------------------------------------------------

    # --- verify, prune, delete ------------------------------------------------------------------

    def verify(
        self,
        point_id: str | None = None,
        *,
        max_bytes: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> VerifyReport:
        """Verify one point, or the store (a budgeted slice when ``max_bytes`` is given), and
        record the outcome on every point it decided: the points it found damaged, and, unless
        the run was a budgeted slice, every other point as ok. Points in the store but not in the
        catalog are skipped (``catalog rebuild`` adds them)."""
        if point_id is not None:
            point_id = self.point(point_id).id
            home = home_location_id(self.repo.store_id)
            if not any(
                c.location_id == home and c.state == "present"
                for c in self.catalog.copies_of(point_id)
            ):
                raise InvalidInput(
                    f"point {point_id} has no copy in the local pool; verify one of its copies "
                    "where it is (verify --location)",
                    point=point_id,
                )
        with self.locks.shared():
            if point_id is not None:
                report = verify_point(self.repo, point_id)
            else:
                report = verify_store(self.repo, max_bytes=max_bytes, progress=progress)
        if point_id is not None:
            decided = [point_id]
        elif max_bytes is None:
            decided = self.repo.manifest_ids()
        else:
            decided = list(report.affected_points)
        now = self.clock()
        home = home_location_id(self.repo.store_id)
        for pid in decided:
            status = "damaged" if pid in report.affected_points else "ok"
            with contextlib.suppress(NotFound):
                self.catalog.mark_verified(pid, now, status)
                if status == "ok":  # what was read is the home pool's copy
                    self.catalog.mark_copy_verified(pid, home, now)
        return report

    def delete_points(
        self, point_ids: list[str], *, deleted: Callable[[str], None] | None = None
    ) -> None:
        """Delete points from the home pool: each one's manifest, then its catalog entry, under
        the store's exclusive lock (LockHeld while a backup, restore or maintenance holds it).
        The data they alone used is freed by the next GC.

        A point with copies at other locations keeps its catalog entry (its home copy becomes
        ``deleted``): those copies leave by expiring at their location (``expire_copy``, never
        before their lock ends), not by a delete here. A point held *only* elsewhere is refused
        (:class:`~appliance.errors.Conflict`, naming the copies and until when they are locked), so that no one
        with the appliance's admin rights makes a locked copy disappear from view."""
        home = home_location_id(self.repo.store_id)
        with self.locks.exclusive():
            for point_id in point_ids:
                copies = self.catalog.copies_of(point_id)
                held = [c for c in copies if c.state not in ("deleted", "lost")]
                elsewhere = [c for c in held if c.location_id != home]
                if elsewhere and all(c.location_id != home for c in held):
                    raise ConflictError(_held_elsewhere(self, point_id, elsewhere), point=point_id)
                self.repo.delete_manifest(point_id)
                if elsewhere:
                    self.catalog.set_copy(point_id, home, "deleted")
                else:
                    self.catalog.delete_point(point_id)
                if deleted is not None:
                    deleted(point_id)

    def prune(
        self,
        asset: str,
        rules: RetentionRules,
        *,
        dry_run: bool = False,
        deleted: Callable[[str], None] | None = None,
    ) -> RetentionDecision:
        """Apply retention rules to an asset's points; unless ``dry_run``, delete the others."""
        if rules.empty():
            raise InvalidInput("a prune needs at least one keep rule")
        self.catalog.get_asset(asset)
        # Retention keeps the home pool: points whose home copy already left (tiering kept them
        # elsewhere) are not the home pool's to keep or remove.
        home = home_location_id(self.repo.store_id)
        local = [
            p
            for p in self.catalog.list_points(asset=asset)
            if any(
                c.location_id == home and c.state not in ("deleted", "lost")
                for c in self.catalog.copies_of(p.id)
            )
        ]
        # A suspicious point holds the clean past (appliance.retention.ransomware_holds).
        decision = apply_retention(local, rules, ransomware_holds(local))
        if not dry_run:
            self.delete_points(decision.remove, deleted=deleted)
        return decision

    def rebuild_catalog(self) -> dict[str, Any]:
        """Recreate the catalog's view of this store from the store alone.

        Points whose manifest cannot be read are left out and named in ``damaged_points``.
        """
        self.repo.sync_index()
        points = []
        damaged: list[str] = []
        for point_id in self.repo.manifest_ids():
            try:
                points.append(record_from_manifest(self.repo.get_manifest(point_id)))
            except Exception:  # a damaged manifest must not stop the rebuild of the others
                damaged.append(point_id)
        added, removed = self.catalog.replace_store_points(self.repo.store_id, points)
        return {
            "points": len(points),
            "added": added,
            "removed": removed,
            "damaged": len(damaged),
            "damaged_points": damaged,
        }


def _held_elsewhere(app: Appliance, point_id: str, copies: list[Any]) -> str:
    labels = {loc.id: loc.label for loc in app.catalog.list_locations(app.repo.store_id)}
    now = app.clock()
    held = []
    for copy in copies:
        where = labels.get(copy.location_id or "", copy.location_id or "?")
        if copy.retain_until is not None and copy.retain_until > now:
            where += f" (locked until {copy.retain_until.isoformat(timespec='minutes')})"
        held.append(where)
    return (
        f"point {point_id} has no copy on the home pool; it is held at {', '.join(held)} "
        "and leaves by expiring there (never before its lock ends)"
    )
