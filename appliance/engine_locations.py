"""The engine's location work: reading a point from its best copy, copies at other locations,
recall from cold storage and location garbage collection (see ``appliance.locations``).

A mixin of :class:`appliance.engine.Appliance`, kept apart so that the engine module stays
about backups, restores and the store; each method delegates to a work function of
``appliance.locations`` with the appliance and the point's full id.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from appliance.catalog.records import LocationRecord
from appliance.locations import gc as location_gc
from appliance.locations import work as locations_work
from appliance.locations.gc import LocationGcReport
from appliance.locations.recall import RecallStatus, prepare_read, recall_estimate
from appliance.store.repository import Repository

if TYPE_CHECKING:
    from appliance.engine import Appliance

ProgressCallback = Callable[[dict[str, Any]], None]


class LocationsMixin:
    @property
    def _engine(self) -> Appliance:
        # Only Appliance mixes this in; the work functions take the appliance itself.
        return cast("Appliance", self)

    def reader(
        self,
        point_id: str,
        *,
        named: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> Repository:
        """The repository to read ``point_id`` from: its best copy first, the others after
        (``appliance.locations``); ``log`` is told when a read moves to another copy. The
        caller closes it (``contextlib.closing``): that closes the copies it opened elsewhere,
        never the home repository."""

        def switched(old: str, new: str, exc: Exception) -> None:
            if log is not None:
                log(f"reading from {old} failed ({exc}); reading from {new}")

        return locations_work.reader(
            self._engine, self._engine.point(point_id).id, named=named, switched=switched
        )

    def prepare_read(
        self, point_id: str, *, subpath: str | None = None, location: str | None = None
    ) -> RecallStatus:
        """When the point's best copy is archived (cold), ask for exactly the packs a read of it
        (``subpath`` of it) needs to be thawed, and say how far that is; never blocks."""
        return prepare_read(
            self._engine, self._engine.point(point_id).id, subpath=subpath, named=location
        )

    def expire_copy(self, point_id: str, location: str) -> dict[str, Any]:
        """Remove a point's copy from a location after its retain-until date."""
        return location_gc.expire_copy(self._engine, self._engine.point(point_id).id, location)

    def collect_location_garbage(
        self, location: str, *, dry_run: bool = False, grace_seconds: float | None = None
    ) -> LocationGcReport:
        """Delete the packs a location holds that none of its copies needs (never locked ones)."""
        return location_gc.collect_location_garbage(
            self._engine,
            location,
            dry_run=dry_run,
            grace_seconds=location_gc.GRACE_SECONDS if grace_seconds is None else grace_seconds,
        )

    def recall_estimate(
        self, point_id: str, *, subpath: str | None = None, location: str | None = None
    ) -> dict[str, Any]:
        """What reading the point would have to recall first (read-only: nothing is asked)."""
        return recall_estimate(
            self._engine, self._engine.point(point_id).id, subpath=subpath, named=location
        )

    def drop_local_copy(self, point_id: str) -> dict[str, Any]:
        """Remove the home pool's copy of a point verified elsewhere (never an asset's newest)."""
        return locations_work.drop_home_copy(self._engine, point_id)

    def reading_from(self, repo: Repository) -> str:
        """The name of the location a :meth:`reader` repository reads from now."""
        return locations_work.reading_from(self._engine, repo)

    def add_location(self, address: str, **options: Any) -> LocationRecord:
        return locations_work.add_location(self._engine, address, **options)

    def remove_location(self, name: str) -> LocationRecord:
        return locations_work.remove_location(self._engine, name)

    def verify_copy(self, point_id: str, location: str) -> dict[str, Any]:
        """Check the point's copy at one location (that copy alone); marks it verified, or
        ``lost`` when damaged."""
        return locations_work.verify_copy(self._engine, point_id, location)

    def find_location(self, name: str) -> LocationRecord:
        """A location of this store by id, id prefix or label (NotFound otherwise)."""
        return locations_work.find_location(self._engine, name)

    def adopt_location(
        self,
        address: str,
        *,
        kind: str = "pool_dir",
        options: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Add the points a location holds to the catalog as copies there (``catalog rebuild
        --from``); points already listed get one more copy, none is duplicated."""
        return locations_work.adopt_location(self._engine, address, kind=kind, options=options)

    def copy_point(
        self,
        point_id: str,
        location: str,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        storage_class: str | None = None,
        retain_until: datetime | None = None,
        bandwidth: float | None = None,
    ) -> dict[str, Any]:
        return locations_work.copy_to(
            self._engine,
            point_id,
            location,
            progress=progress,
            cancel=cancel,
            storage_class=storage_class,
            retain_until=retain_until,
            bandwidth=bandwidth,
        )
