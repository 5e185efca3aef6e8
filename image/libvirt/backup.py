"""Back up a libvirt domain into the appliance's store as an ordinary VM point.

Live path (libvirt's pull-mode backup API):

1. Freeze the guest's filesystems (``virsh domfsfreeze``) when the domain has a guest-agent
   channel and the agent answers; otherwise the point is crash-consistent and a warning says so.
2. ``virsh backup-begin DOM backup.xml checkpoint.xml``: libvirt takes a point-in-time view of
   every disk, serves it over NBD on a unix socket of the host, and atomically starts a new
   checkpoint ``appliance-<time>-<random>`` (a dirty bitmap per disk). Thaw right after: the view
   exists from here on.
3. The socket is forwarded to the appliance (``ssh -N -L``) and each disk is read as a
   ``DiskImage`` (:mod:`image.libvirt.export`) by :meth:`Appliance.backup_disk_images`.
4. Incremental: the job is begun with ``<incremental>CP</incremental>``, CP being the checkpoint
   recorded in the asset's latest point (``source_details.checkpoint``); each export then
   carries ``qemu:dirty-bitmap:backup-<disk>``, and only those extents are read (the engine's
   ``changed_ranges``, trusted only against that very point: ``changed_since``). A checkpoint that
   is missing on the host, belongs to another domain, or a domain with a non-qcow2 disk (no
   persistent bitmaps) falls back to reading every allocated block, and the point says so.
5. Always, on success, error or cancel: ``virsh domjobabort`` ends the job (virsh has no
   backup-end; aborting a pull job after its reads is the normal end), the tunnel is closed. On
   success older appliance checkpoints are deleted (their bitmaps merge away); on failure the new
   checkpoint is deleted, so the chain stays the one the recorded points name.

Offline path (``allow_offline=True`` only): a domain that cannot be backed up live (a vmdk disk,
no backup API, or not running) is shut down cleanly (``virsh shutdown``, never destroyed),
each disk is served by a read-only ``qemu-nbd`` started on the host in the tunnel's own SSH session
(it lives exactly as long as the tunnel), and the domain is started again if it was running.
The host then needs ``qemu-nbd`` (qemu-utils). Offline points carry no checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from appliance.backup.disks import DiskImage
from appliance.engine import Appliance, BackupOutcome
from appliance.errors import InvalidInput, ObjectMissing, SourceError
from image.libvirt.domains import (
    CHECKPOINT_PREFIX,
    DomainInfo,
    backup_xml,
    checkpoint_xml,
    parse_backup_job,
    vm_definition,
)
from image.libvirt.export import ExportDisk, dirty_ranges
from image.libvirt.host import LibvirtHost, NbdTunnel
from image.libvirt.inventory import domain_xml, find_domain
from image.libvirt.offline import backup_offline

ProgressCallback = Callable[[dict[str, Any]], None]
#: Seconds a guest agent may take to freeze.
FREEZE_TIMEOUT = 30


class CannotBackUpLive(InvalidInput):
    """The domain cannot be backed up live; the reason says why and what to do."""

    code = "cannot_back_up_live"


@dataclass
class _Job:
    """What a backup has set up on the host, for the cleanup to undo."""

    checkpoint: str | None = None
    begun: bool = False
    frozen: bool = False
    tunnels: list[NbdTunnel] = field(default_factory=list)
    disks: list[DiskImage] = field(default_factory=list)


def new_checkpoint_name(now: datetime) -> str:
    return f"{CHECKPOINT_PREFIX}{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def _previous(app: Appliance, asset: str, uuid: str) -> tuple[str | None, str | None]:
    """(point id, checkpoint) of the asset's latest image point, when it came from this domain."""
    latest = app.catalog.latest_point(asset, kind="image")
    if latest is None:
        return None, None
    try:
        details = app.repo.get_manifest(latest.id).get("source_details") or {}
    except ObjectMissing:
        return None, None
    if details.get("domain_uuid") != uuid:
        return latest.id, None
    checkpoint = details.get("checkpoint")
    return latest.id, checkpoint if isinstance(checkpoint, str) else None


def _note(warnings: list[dict[str, str]], code: str, message: str) -> None:
    warnings.append({"code": code, "message": message})


def _freeze(host: LibvirtHost, info: DomainInfo, warnings: list[dict[str, str]]) -> bool:
    if not info.guest_agent:
        _note(
            warnings,
            "crash_consistent",
            "the domain has no guest-agent channel: the point is crash-consistent (as after a "
            "power cut); install qemu-guest-agent in the guest for a consistent one",
        )
        return False
    try:
        host.virsh(["domfsfreeze", info.uuid], timeout=FREEZE_TIMEOUT)
    except SourceError as exc:
        _note(
            warnings,
            "crash_consistent",
            f"the guest agent did not freeze the filesystems ({exc}): the point is "
            "crash-consistent",
        )
        return False
    return True


def _thaw(host: LibvirtHost, uuid: str, warnings: list[dict[str, str]]) -> None:
    try:
        host.virsh(["domfsthaw", uuid], timeout=FREEZE_TIMEOUT)
    except SourceError as exc:
        _note(warnings, "thaw_failed", f"thawing the guest's filesystems failed: {exc}")


def _cleanup(host: LibvirtHost, uuid: str, job: _Job, ok: bool) -> None:
    """Undo what the job set up; never raises over the backup's own outcome."""
    for disk in job.disks:
        disk.close()
    for tunnel in job.tunnels:
        tunnel.close()
    if job.begun:
        with contextlib.suppress(SourceError):
            host.virsh(["domjobabort", uuid])
    if job.checkpoint is not None and not ok:
        with contextlib.suppress(SourceError):
            host.virsh(["checkpoint-delete", uuid, job.checkpoint])


def _prune_checkpoints(host: LibvirtHost, info: DomainInfo, keep: str) -> None:
    """Delete the appliance's older checkpoints of the domain (only its own, by prefix)."""
    old = [c for c in info.checkpoints if c.startswith(CHECKPOINT_PREFIX) and c != keep]
    if old:
        with contextlib.suppress(SourceError):
            host.virsh(*(["checkpoint-delete", info.uuid, c] for c in old))


def _remote_file(host: LibvirtHost, uuid: str, suffix: str) -> str:
    return f"{host.remote_dir}/appliance-backup-{uuid}-{secrets.token_hex(4)}{suffix}"


@contextlib.contextmanager
def _local_xml(backup: str, checkpoint: str | None) -> Iterator[tuple[str, str | None]]:
    """The job's XML documents as files on the appliance (virsh reads them here and sends
    their text to the host)."""
    folder = tempfile.mkdtemp(prefix="appliance-libvirt-xml-")
    try:
        paths: list[str | None] = []
        for name, text in (("backup.xml", backup), ("checkpoint.xml", checkpoint)):
            if text is None:
                paths.append(None)
                continue
            path = os.path.join(folder, name)
            with open(path, "w") as f:
                f.write(text)
            paths.append(path)
        assert paths[0] is not None
        yield paths[0], paths[1]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def backup_domain(
    app: Appliance,
    host: LibvirtHost,
    domain: str,
    asset: str,
    *,
    mode: str = "incremental",
    allow_offline: bool = False,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> BackupOutcome:
    """Back up ``domain`` (name or UUID) of ``host`` as an image point of ``asset``.

    ``mode``: "full" reads every allocated block; "incremental" reads only the blocks changed
    since the asset's latest point when its checkpoint is usable (else every allocated block,
    with a warning). The outcome's stats add ``changed_bytes`` (bytes the change tracking
    named; equal to ``bytes_read`` for a full read), ``wire_bytes`` (bytes read through the
    tunnel), ``source_mode`` ("live" or "offline"), ``consistency``, ``checkpoint``,
    ``incremental_since`` and ``seconds``.
    Raises :class:`CannotBackUpLive` when the domain cannot be backed up live and
    ``allow_offline`` is false."""
    if mode not in ("full", "incremental"):
        raise InvalidInput("a libvirt backup is full or incremental")
    info = find_domain(host, domain)
    if info.reason is not None:
        if not allow_offline:
            raise CannotBackUpLive(
                f"{info.name} on {host.label} cannot be backed up live: {info.reason}",
                domain=info.name,
                reason=info.reason,
            )
        return backup_offline(app, host, info, asset, progress=progress, cancel=cancel)
    return _backup_live(app, host, info, asset, mode, progress, cancel)


def _backup_live(
    app: Appliance,
    host: LibvirtHost,
    info: DomainInfo,
    asset: str,
    mode: str,
    progress: ProgressCallback | None,
    cancel: threading.Event | None,
) -> BackupOutcome:
    started = time.monotonic()
    warnings: list[dict[str, str]] = []
    spec = vm_definition(domain_xml(host, info.uuid, inactive=True))
    targets = [d.target for d in info.disks]
    base_point, base_checkpoint = _previous(app, asset, info.uuid)
    since: str | None = None
    if mode == "incremental" and base_point is not None:
        if not info.incremental:
            _note(
                warnings,
                "full_read",
                "the domain has a disk that is not qcow2 (no persistent dirty bitmaps): every "
                "allocated block was read",
            )
        elif base_checkpoint is None or base_checkpoint not in info.checkpoints:
            _note(
                warnings,
                "full_read",
                f"the checkpoint of point {base_point} ({base_checkpoint or 'none'}) is not on "
                "the host any more: every allocated block was read",
            )
        else:
            since = base_checkpoint
    checkpoint = new_checkpoint_name(app.clock()) if info.incremental else None
    remote_socket = _remote_file(host, info.uuid, ".sock")
    scratch = {t: _remote_file(host, info.uuid, f"-{t}.scratch.qcow2") for t in targets}
    job = _Job()
    ok = False
    try:
        with _local_xml(
            backup_xml(remote_socket, scratch, since),
            checkpoint_xml(checkpoint, targets) if checkpoint else None,
        ) as (backup_file, checkpoint_file):
            job.frozen = _freeze(host, info, warnings)
            try:
                argv = ["backup-begin", info.uuid, backup_file]
                if checkpoint_file is not None:
                    argv.append(checkpoint_file)
                    job.checkpoint = checkpoint
                host.virsh(argv)
                job.begun = True
            finally:
                if job.frozen:
                    _thaw(host, info.uuid, warnings)
        exports = parse_backup_job(host.virsh(["backup-dumpxml", info.uuid]))
        tunnel = host.tunnel(remote_socket)
        job.tunnels.append(tunnel)
        images: dict[str, DiskImage] = {}
        changed: dict[str, list[tuple[int, int]]] | None = {} if since else None
        formats = {d.target: d.format for d in info.disks}
        for export in exports:
            disk = ExportDisk(tunnel.socket, export.export, fmt=formats.get(export.target, "raw"))
            job.disks.append(disk)
            images[export.target] = disk
            if changed is not None:
                if not export.bitmap:
                    raise SourceError(f"the incremental export of {export.target} has no bitmap")
                changed[export.target] = dirty_ranges(
                    tunnel.socket, export.export, f"qemu:dirty-bitmap:{export.bitmap}"
                )
        changed_bytes = (
            sum(length for ranges in changed.values() for _, length in ranges)
            if changed is not None
            else None
        )
        outcome = app.backup_disk_images(
            images,
            asset,
            source=f"libvirt://{host.label}/{info.name}",
            mode=mode,
            vm_spec=spec,
            changed_ranges=changed,
            changed_since=base_point if since else None,
            details={
                "kind": "libvirt",
                "host": host.label,
                "domain": info.name,
                "domain_uuid": info.uuid,
                "checkpoint": checkpoint,
                "incremental_since": since,
                "consistency": "application" if job.frozen else "crash",
            },
            warnings=warnings,
            progress=progress,
            cancel=cancel,
        )
        ok = True
    finally:
        _cleanup(host, info.uuid, job, ok)
    if checkpoint is not None:
        _prune_checkpoints(host, info, checkpoint)
    wire = sum(d.bytes_read for d in job.disks if isinstance(d, ExportDisk))
    outcome.stats.update(
        source_mode="live",
        consistency="application" if job.frozen else "crash",
        incremental_since=since,
        checkpoint=checkpoint,
        changed_bytes=changed_bytes if changed_bytes is not None else outcome.stats["bytes_read"],
        wire_bytes=wire,
        seconds=round(time.monotonic() - started, 3),
    )
    return outcome
