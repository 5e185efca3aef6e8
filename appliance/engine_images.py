"""VM image points: the engine's methods that back up disk images, from files on the
appliance (``backup_image``) or from already opened disks such as a libvirt host's NBD export
(``backup_disk_images``); both end in one point-making step. Mixed into
:class:`appliance.engine.Appliance`."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from appliance.backup.disks import DiskImage
from appliance.backup.images import DiskStats, backup_disk, backup_disk_image
from appliance.errors import InvalidInput
from appliance.path_rules import check_disk_source
from appliance.points import new_manifest, new_point_id
from appliance.space import check_free_space
from appliance.store.packs import IndexEntry
from appliance.vmspec import default_spec, load_spec, normalise
from appliance.workers import CpuMeter, default_workers

if TYPE_CHECKING:
    from appliance.engine import Appliance, BackupOutcome

ProgressCallback = Callable[[dict[str, Any]], None]
#: Reads one disk of an image point: (name, base entry or None, changed ranges or None) ->
#: (manifest entry, stats, index entries to commit).
DiskReader = Callable[
    [str, dict[str, Any] | None, list[tuple[int, int]] | None],
    tuple[dict[str, Any], DiskStats, list[IndexEntry]],
]
#: The data directory's own pool (as in appliance.engine).
DEFAULT_POOL = "default"


class ImagesMixin:
    @property
    def _engine(self) -> Appliance:
        # Only Appliance mixes this in.
        return cast("Appliance", self)

    def backup_image(
        self,
        disks: list[str],
        asset: str,
        *,
        mode: str = "incremental",
        vm_spec: str | dict[str, Any] | None = None,
        changed_ranges: dict[str, list[tuple[int, int]]] | None = None,
        disk_format: str | None = None,
        threads: int | None = None,
        own_disks: bool = False,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> BackupOutcome:
        """Back up VM disk images as a point of ``asset``. The disks must pass the disk-source
        rules (``path_rules.check_disk_source``), checked at every backup, not only when the
        asset was registered: a file may have been swapped for a link to a system file or a
        device since. ``own_disks``: the disks are the appliance's own (a failback's local disks
        in its failover folder), not named by a request."""
        if not disks:
            raise InvalidInput("name at least one disk image")
        check_free_space(self._engine.data_dir.store_path, f"pool {DEFAULT_POOL}")
        if not own_disks:
            facts = self._engine.block_facts()
            for d in disks:
                check_disk_source(
                    os.path.abspath(d), data_dir=self._engine.data_dir.path, facts=facts
                )
        disks = [os.path.abspath(d) for d in disks]
        names = _disk_names(disks)
        # The VM definition is checked before any disk is read: a bad one must not cost a backup.
        if isinstance(vm_spec, str):
            spec = load_spec(vm_spec)
        elif isinstance(vm_spec, dict):
            spec = normalise(vm_spec)
        else:
            spec = default_spec(asset, names)
        fmt_name = disk_format
        workers = threads or default_workers()
        cpu = CpuMeter()

        def read_path(path: str) -> DiskReader:
            def read(
                name: str, base: dict[str, Any] | None, ranges: list[tuple[int, int]] | None
            ) -> tuple[dict[str, Any], DiskStats, list[IndexEntry]]:
                return backup_disk(
                    self._engine.repo,
                    path,
                    name=name,
                    base=base,
                    changed_ranges=ranges,
                    fmt_name=fmt_name,
                    threads=workers,
                    progress=progress,
                    cancel=cancel,
                    cpu=cpu,
                )

            return read

        return self._engine._image_point(
            asset,
            mode=mode,
            spec=spec,
            source=" ".join(disks),
            readers=[(name, read_path(path)) for name, path in zip(names, disks, strict=True)],
            changed_ranges=changed_ranges,
            cpu=cpu,
        )

    def backup_disk_images(
        self,
        images: dict[str, DiskImage],
        asset: str,
        *,
        source: str,
        mode: str = "incremental",
        vm_spec: dict[str, Any] | None = None,
        changed_ranges: dict[str, list[tuple[int, int]]] | None = None,
        changed_since: str | None = None,
        details: dict[str, Any] | None = None,
        warnings: list[dict[str, str]] | None = None,
        threads: int | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> BackupOutcome:
        """Back up already opened disks (name -> ``DiskImage``; the caller closes them) as an
        image point of ``asset``, exactly as :meth:`backup_image` would store them.

        For sources the appliance reaches itself (a libvirt host's NBD export): ``source`` names
        the origin in the manifest. ``changed_ranges`` are trusted only when the point this
        backup compares against is ``changed_since`` (the point the source's change tracking
        started from); otherwise every allocated chunk is read and a warning says why.
        ``details`` are kept in the manifest under ``"source_details"`` (e.g. the libvirt
        checkpoint this point ends at); ``warnings`` are recorded with the point."""
        if not images:
            raise InvalidInput("name at least one disk image")
        check_free_space(self._engine.data_dir.store_path, f"pool {DEFAULT_POOL}")
        spec = normalise(vm_spec) if vm_spec is not None else default_spec(asset, list(images))
        workers = threads or default_workers()
        cpu = CpuMeter()

        def read_image(disk: DiskImage) -> DiskReader:
            def read(
                name: str, base: dict[str, Any] | None, ranges: list[tuple[int, int]] | None
            ) -> tuple[dict[str, Any], DiskStats, list[IndexEntry]]:
                return backup_disk_image(
                    self._engine.repo,
                    disk,
                    name=name,
                    source=f"{source}#{name}",
                    base=base,
                    changed_ranges=ranges,
                    threads=workers,
                    progress=progress,
                    cancel=cancel,
                    cpu=cpu,
                )

            return read

        return self._engine._image_point(
            asset,
            mode=mode,
            spec=spec,
            source=source,
            readers=[(name, read_image(disk)) for name, disk in images.items()],
            changed_ranges=changed_ranges,
            changed_since=changed_since,
            details=details,
            warnings=warnings,
            cpu=cpu,
        )

    def _image_point(
        self,
        asset: str,
        *,
        mode: str,
        spec: dict[str, Any],
        source: str,
        readers: list[tuple[str, DiskReader]],
        changed_ranges: dict[str, list[tuple[int, int]]] | None,
        cpu: CpuMeter,
        changed_since: str | None = None,
        details: dict[str, Any] | None = None,
        warnings: list[dict[str, str]] | None = None,
        before_record: Callable[[], None] | None = None,
    ) -> BackupOutcome:
        """Read each disk against the asset's base point and record the image point.
        ``before_record`` runs after the last disk, before the point is made: a last check
        that may still refuse it (an upload's table longer than its disks)."""
        notes = list(warnings or [])
        with self._engine.locks.shared(), self._engine.locks.asset(asset):
            created = self._engine.clock()
            mode, base = self._engine._base(asset, "image", mode)
            if (
                changed_ranges is not None
                and changed_since is not None
                and (base is None or base["point_id"] != changed_since)
            ):
                # The source tracked changes since another point than the one compared against:
                # its list would miss what changed in between, so read everything.
                changed_ranges = None
                notes.append(
                    {
                        "code": "full_read",
                        "message": f"changes were tracked since point {changed_since}, not "
                        "since the base point: every allocated block was read",
                    }
                )
            base_disks = {d["name"]: d for d in base.get("disks", [])} if base else {}
            point_id = new_point_id(created)
            entries_out: list[dict[str, Any]] = []
            totals = {
                "logical_bytes": 0,
                "bytes_read": 0,
                "new_bytes": 0,
                "changed_chunks": 0,
                "zero_chunks": 0,
                "disks": len(readers),
            }
            for name, read in readers:
                ranges = (changed_ranges or {}).get(name) if changed_ranges is not None else None
                entry, stats, index_entries = read(name, base_disks.get(name), ranges)
                self._engine.repo.commit_index(index_entries)
                entries_out.append(entry)
                totals["logical_bytes"] += stats.size
                totals["bytes_read"] += stats.bytes_read
                totals["new_bytes"] += stats.new_bytes
                totals["changed_chunks"] += stats.changed_chunks
                totals["zero_chunks"] += stats.zero_chunks
            if before_record is not None:
                before_record()
            manifest = new_manifest(
                point_id=point_id,
                asset=asset,
                kind="image",
                mode=mode,
                created=created,
                parent=base["point_id"] if base else None,
                base_full=self._engine._base_full(base),
                store_id=self._engine.repo.store_id,
                source=source,
            )
            manifest["disks"] = entries_out
            manifest["vm"] = spec
            manifest["stats"] = totals
            if details is not None:
                manifest["source_details"] = details
            manifest["warnings"] = notes
            manifest["warning_count"] = len(notes)
            point = self._engine._record(manifest)
            from appliance.engine import BackupOutcome  # the engine imports this module

            return BackupOutcome(point, {**totals, "cpu": cpu.to_dict()}, notes)


def _disk_names(disks: list[str]) -> list[str]:
    names: list[str] = []
    for path in disks:
        base = os.path.basename(path).rsplit(".", 1)[0] or "disk"
        name = base
        n = 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names
