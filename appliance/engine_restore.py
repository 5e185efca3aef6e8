"""The engine's restores: where a restore may write (the restore rules and their checks), and
restoring a point (or part of it) from its best copy to a folder, disk images or a block
device, or as a tar stream.

A mixin of :class:`appliance.engine.Appliance`, kept apart so that the engine module stays
about backups, the store and maintenance.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, cast

from appliance.catalog.records import PointRecord
from appliance.errors import (
    ApplianceError,
    InvalidInput,
    NotFound,
    PathRefused,
)
from appliance.path_rules import (
    BlockFacts,
    Conflict,
    RestoreKind,
    RestoreRules,
    RestoreTarget,
    default_restore_area,
    read_block_facts,
    restore_target,
)
from appliance.restore import restore_disk, restore_tar, restore_tree
from appliance.restore_target import keep_aside, keep_stamp
from appliance.store.repository import Repository
from appliance.vmspec import parse_vm_source
from appliance.workers import CpuMeter, default_workers

if TYPE_CHECKING:
    from appliance.engine import Appliance

ProgressCallback = Callable[[dict[str, Any]], None]
#: The settings document of the restore areas and devices an admin registered.
RESTORE_SETTINGS_KEY = "restore"


class RestoreMixin:
    @property
    def _engine(self) -> Appliance:
        # Only Appliance mixes this in.
        return cast("Appliance", self)

    # --- restore targets ---------------------------------------------------------------------

    def block_facts(self) -> BlockFacts:
        """The kernel's view of block devices now; the pools' devices count as in use."""
        return read_block_facts(p.path for p in self._engine.catalog.list_pools())

    def restore_rules(self) -> RestoreRules:
        """Where restores may write, from the settings (``restore`` key); the data directory's
        own ``restores`` folder is always an area."""
        stored = self._engine.catalog.get_settings(RESTORE_SETTINGS_KEY)
        default = default_restore_area(self._engine.data_dir.path)
        areas = [default, *(a for a in stored.get("areas", []) if a != default)]
        return RestoreRules(
            data_dir=self._engine.data_dir.path,
            areas=tuple(str(a) for a in areas),
            devices=tuple(str(d) for d in stored.get("devices", [])),
        )

    def check_restore_target(
        self,
        point_id: str,
        destination: RestoreKind,
        *,
        target: str | None = None,
        on_conflict: Conflict | None = None,
        disk: str | None = None,
    ) -> RestoreTarget:
        """Check a requested restore target against the path rules (``path_rules``); the service
        calls it when a restore is asked for and again when its job starts."""
        point = self._engine.point(point_id)
        source: str | None = None
        if destination == "source":
            source = self._engine._restore_source(point, disk)
        return restore_target(
            destination,
            point_kind=point.kind,
            rules=self._engine.restore_rules(),
            facts=self._engine.block_facts(),
            target=target,
            on_conflict=on_conflict,
            source=source,
        )

    def _restore_source(self, point: PointRecord, disk: str | None) -> str:
        """The asset's registered source that an in-place restore of ``point`` writes to."""
        try:
            asset = self._engine.catalog.get_asset(point.asset)
        except NotFound:
            raise PathRefused(
                f"asset {point.asset} is no longer registered: it has no source to restore to",
                rule="no_source",
                path="",
            ) from None
        if point.kind == "files":
            return asset.source
        manifest = self._engine.manifest(point.id)
        disks = manifest["disks"]
        if disk is not None:
            disks = [d for d in disks if d["name"] == disk]
        if len(disks) != 1:
            raise PathRefused(
                "an in-place restore of a VM point writes one disk: name it with 'disk'",
                rule="disk_missing",
                path="",
            )
        registered = {os.path.realpath(p) for p in parse_vm_source(asset.source)[0]}
        name = disks[0]["name"]
        recorded = source = os.path.realpath(str(disks[0].get("source", "")))
        # A point a failback made (here, or on a peer that took over, pulled back since) read
        # the VM's disk from a session file: the disk's original is the registered one its
        # nearest ancestor read. Only a registered disk is ever returned.
        parent = manifest.get("parent")
        for _ in range(1000):
            if source in registered:
                return source
            if not parent:
                break
            try:
                ancestor = self._engine.manifest(parent)
            except ApplianceError:
                break  # pruned or unreadable: nothing older says where the disk was
            named = [d for d in ancestor.get("disks", []) if d.get("name") == name]
            source = os.path.realpath(str(named[0].get("source", ""))) if named else ""
            parent = ancestor.get("parent")
        raise PathRefused(
            f"disk {name} was backed up from {recorded}, which is not one of the asset's "
            "registered disks any more",
            rule="no_source",
            path=recorded,
        )

    # --- restores -------------------------------------------------------------------------------

    def restore(
        self,
        point_id: str,
        target: str,
        *,
        subpath: str | None = None,
        disk: str | None = None,
        target_format: str = "raw",
        on_conflict: Conflict = "overwrite",
        block_device: bool = True,
        location: str | None = None,
        log: Callable[[str], None] | None = None,
        workers: int | None = None,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Restore a point (or a path or disk of it) to ``target``, which the caller has checked
        (the service: :meth:`check_restore_target`). ``block_device=False`` refuses to write to
        a block device; ``keep_both`` renames what is in the way instead of replacing it. The
        point is read from its best copy (``location``: the one the user named first), falling
        back to the next when a read fails; ``log`` is told which copies were used. The copies
        opened elsewhere are closed when it ends, whichever way it ends."""
        with contextlib.closing(self._engine.reader(point_id, named=location, log=log)) as repo:
            return self._engine._restore_from(
                repo,
                point_id,
                target,
                subpath=subpath,
                disk=disk,
                target_format=target_format,
                on_conflict=on_conflict,
                block_device=block_device,
                workers=workers,
                progress=progress,
                cancel=cancel,
            )

    def _restore_from(
        self,
        repo: Repository,
        point_id: str,
        target: str,
        *,
        subpath: str | None,
        disk: str | None,
        target_format: str,
        on_conflict: Conflict,
        block_device: bool,
        workers: int | None,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> dict[str, Any]:
        manifest = repo.get_manifest(self._engine.point(point_id).id)
        cpu = CpuMeter()
        with self._engine.locks.shared():
            if manifest["kind"] == "files":
                counts = restore_tree(
                    repo,
                    manifest,
                    target,
                    subpath=subpath,
                    on_conflict=on_conflict,
                    now=self._engine.clock(),
                    workers=workers or default_workers(),
                    progress=progress,
                    cancel=cancel,
                    cpu=cpu,
                )
                return {
                    "point": manifest["point_id"],
                    "target": target,
                    **counts,
                    "cpu": cpu.to_dict(),
                }
            disks = manifest["disks"]
            if disk is not None:
                disks = [d for d in disks if d["name"] == disk]
                if not disks:
                    raise NotFound(f"point {point_id} has no disk named {disk!r}")
            written = []
            kept: list[str] = []
            if len(disks) == 1 and not os.path.isdir(target):
                outputs = [(disks[0], target)]
            else:
                os.makedirs(target, exist_ok=True)
                suffix = "img" if target_format == "raw" else target_format
                outputs = [(d, os.path.join(target, f"{d['name']}.{suffix}")) for d in disks]
            for d, out in outputs:
                if _is_block_device(out) and not block_device:
                    raise PathRefused(
                        f"{out} is a block device, which only a registered restore device may be",
                        rule="device_not_registered",
                        path=out,
                    )
                if on_conflict == "keep_both" and os.path.lexists(out):
                    kept.append(keep_aside(out, keep_stamp(self._engine.clock())))
                restore_disk(
                    repo,
                    d,
                    out,
                    target_format=target_format,
                    progress=progress,
                    threads=workers or default_workers(),
                    cpu=cpu,
                )
                written.append(out)
            return {
                "point": manifest["point_id"],
                "disks": written,
                "kept": kept,
                "vm": manifest.get("vm"),
                "cpu": cpu.to_dict(),
            }

    def restore_tar(self, point_id: str, out: IO[bytes], *, subpath: str | None = None) -> int:
        with contextlib.closing(self._engine.reader(point_id)) as repo:
            manifest = repo.get_manifest(self._engine.point(point_id).id)
            if manifest["kind"] != "files":
                raise InvalidInput("only file points can be streamed as tar")
            with self._engine.locks.shared():
                return restore_tar(repo, manifest, out, subpath=subpath)


def _is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
