"""Failback: the failed-over VM's disks become a recovery point, or go back where they were.

(a) The disks' current state becomes a new incremental recovery point of the asset. The disks are
read through ``qemu-nbd`` over the overlay chain (the exports run again for it when a disk still
needs its backing); when the session's point is the asset's newest, only the ranges the guest
wrote (the overlay's allocated clusters, :func:`changed_ranges_from_map`) are read at all.
(b) The disks are written, byte-exact, to their original image paths or to new files
(``qemu-img convert`` of the chain, into a temp file renamed into place; a block device is written
in place, raw only). The original path is the one the point recorded or, for a point a failback
made (whose source is a session file, here or on the peer it was pulled back from), the one its
nearest ancestor recorded; either way only a disk path the asset registers in the catalog.

A running session is stopped first. The session keeps its overlays afterwards (until discarded),
so a failback can be repeated.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from typing import Any

from appliance.catalog.records import ACTIVE_FAILOVER_STATES
from appliance.errors import ApplianceError, InvalidInput, NotFound
from appliance.vmspec import parse_vm_source
from image.failover.records import now_iso
from image.failover.session import FailoverSession, ProgressCallback, SessionDisk
from image.qemu import convert_argv, overlay_map_argv, run_tool
from image.qemu_img import parse_map


def changed_ranges_from_map(text: str) -> list[tuple[int, int]]:
    """Ranges an overlay holds itself (allocated data or zeros), from its map without backing."""
    ranges: list[tuple[int, int]] = []
    for entry in parse_map(text):
        if entry.depth != 0 or not entry.present:
            continue  # not in the overlay itself: the guest never wrote there
        if ranges and ranges[-1][0] + ranges[-1][1] == entry.start:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + entry.length)
        else:
            ranges.append((entry.start, entry.length))
    return ranges


def guest_disks(session: FailoverSession) -> list[tuple[SessionDisk, str, str]]:
    """(disk, path of its current state, format) for each disk of ``session``."""
    out = []
    for disk in session.disks:
        if disk.local_copy is not None:
            out.append((disk, disk.local_copy, "qcow2"))
        elif os.path.isfile(disk.overlay):
            out.append((disk, disk.overlay, "qcow2"))
        else:
            raise NotFound(
                f"failover session {session.id} no longer has the overlay of disk {disk.name}"
            )
    return out


def fail_back(
    session: FailoverSession,
    *,
    new_point: bool = True,
    write_to: str | None = None,
    target_format: str = "raw",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Make a new point of the session's disks and/or write them to ``write_to`` ("original" or
    a path); records what was done in the session's ``failback`` detail."""
    if not new_point and not write_to:
        raise InvalidInput("a failback makes a new point, writes the disks back, or both")
    with session.lock:
        if session.state in ACTIVE_FAILOVER_STATES:
            session.stop()
        disks = guest_disks(session)
        needs_export = any(disk.local_copy is None for disk, _, _ in disks)
        result: dict[str, Any] = {"session": session.id}
        # Where the disks go is settled first: a refused target leaves no half-done failback.
        targets = _write_targets(session, disks, write_to, target_format) if write_to else []
        try:
            if needs_export:
                session.start_exports()
            if new_point:
                result.update(_failback_point(session, disks, progress, cancel))
            if write_to:
                result["written"] = _write_back(disks, targets, target_format)
        finally:
            session.stop_exports()
        session.update(failback={**result, "at": now_iso()})
        return result


def _failback_point(
    session: FailoverSession,
    disks: list[tuple[SessionDisk, str, str]],
    progress: ProgressCallback | None,
    cancel: threading.Event | None,
) -> dict[str, Any]:
    app = session.app
    latest = app.catalog.latest_point(session.asset, kind="image")
    changed: dict[str, list[tuple[int, int]]] | None = None
    if latest is not None and latest.id == session.point_id:
        # The new point's base is the point the overlays sit on: read only what was written.
        changed = {}
        for disk, path, _ in disks:
            if disk.local_copy is not None:
                changed = None
                break
            changed[disk.name] = changed_ranges_from_map(
                run_tool(overlay_map_argv(path), f"mapping the overlay of {disk.name}")
            )
    paths = [path for _, path, _ in disks]
    outcome = app.backup_image(
        paths,
        session.asset,
        mode="incremental",
        vm_spec=session.manifest.get("vm"),
        changed_ranges=changed,
        disk_format="qcow2",
        own_disks=True,  # the session's overlay or local disks, in the failover folder
        progress=progress,
        cancel=cancel,
    )
    return {
        "point": outcome.point.id,
        "stats": outcome.stats,
        "read_only_changes": changed is not None,
    }


def original_source(session: FailoverSession, disk_name: str) -> str:
    """Where the VM's disk lived: the path the point recorded for it or, when that is not one
    of the asset's registered disks (a point made by a failback, whose source is a session file
    here or on the peer it was pulled back from), the nearest ancestor's. Only a disk the asset
    registers is ever written: a manifest names a path, the catalog says which paths are ours."""
    try:
        registered = set(parse_vm_source(session.app.catalog.get_asset(session.asset).source)[0])
    except NotFound:
        registered = set()
    manifest: dict[str, Any] | None = session.manifest
    for _ in range(1000):
        if manifest is None:
            break
        for disk in manifest.get("disks", []):
            source = str(disk.get("source") or "")
            if disk["name"] == disk_name and source in registered:
                return source
        parent = manifest.get("parent")
        try:
            manifest = session.app.repo.get_manifest(parent) if parent else None
        except ApplianceError:
            manifest = None
    raise InvalidInput(
        f"no point of {session.asset} records disk {disk_name} at one of the asset's registered "
        "disk paths: write it to a restore area instead"
    )


def _write_targets(
    session: FailoverSession,
    disks: list[tuple[SessionDisk, str, str]],
    write_to: str,
    target_format: str,
) -> list[str]:
    """The path each disk is written to, checked before anything is written."""
    if target_format not in ("raw", "qcow2"):
        raise InvalidInput("disks are written back as raw or qcow2")
    targets: list[str] = []
    for disk, _, _ in disks:
        if write_to == "original":
            targets.append(original_source(session, disk.name))
        elif os.path.isdir(write_to) or len(disks) > 1:
            os.makedirs(write_to, exist_ok=True)
            suffix = "img" if target_format == "raw" else target_format
            targets.append(os.path.join(write_to, f"{disk.name}.{suffix}"))
        else:
            targets.append(os.path.abspath(write_to))
    return targets


def _write_back(
    disks: list[tuple[SessionDisk, str, str]], targets: list[str], target_format: str
) -> list[str]:
    for (_disk, path, fmt), target in zip(disks, targets, strict=True):
        write_disk_image(path, fmt, target, target_format)
    return targets


def write_disk_image(source: str, source_fmt: str, target: str, target_format: str) -> None:
    """``qemu-img convert`` the disk (following its chain) to ``target``, byte-exact.

    A regular-file target is written beside it and renamed into place; a block device is written
    in place (raw only).
    """
    try:
        st = os.stat(target)
        is_device = stat.S_ISBLK(st.st_mode)
    except FileNotFoundError:
        is_device = False
    if is_device:
        if target_format != "raw":
            raise InvalidInput("a block device can only be written as raw")
        argv = convert_argv(source, source_fmt, target, "raw")
        argv.insert(2, "-n")
        run_tool(argv, f"writing {target}")
        return
    directory = os.path.dirname(os.path.abspath(target)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".failback-", dir=directory)
    os.close(fd)
    try:
        run_tool(convert_argv(source, source_fmt, tmp, target_format), f"writing {target}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
