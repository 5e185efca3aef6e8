"""The long pool operations and their job kinds: create, scrub, replace a disk, import; and the
scheduler's pool tick (usage sampled hourly, btrfs pools scrubbed monthly).

:func:`scrub_pool` and :func:`replace_disk` are work functions like the others (the CLI calls
them directly); scrub and replace run ``btrfs ... -B`` in a child process polled for progress
and stopped with ``btrfs ... cancel`` when the job is cancelled. Every kind is resumable after a
crash: a creation finds the filesystem it made, a replacement the kernel finished (or is still
running: btrfs carries on without the process that started it) is recognised by the new disk
sitting at the old one's device id, an import of a pool already recorded answers with it, and a
scrub simply runs again.

Register the kinds with :func:`register_pool_jobs` and add :func:`pool_tick` to the scheduler's
``extra_ticks`` (both at service start).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from datetime import datetime, timedelta
from typing import Any

from appliance.catalog.records import PoolRecord, PoolUsageRecord
from appliance.engine import Appliance
from appliance.errors import BackupCancelled, InvalidInput, NotFound
from appliance.job_context import JobView
from appliance.jobs import JobKind, JobRunner, register_job_kind
from hardware import btrfs
from hardware.mounts import CommandFailed
from hardware.pool_backend import (
    find_pool,
    is_mounted,
    list_pools,
    mount_pool_filesystem,
    pool_capacity,
    pool_health,
    pool_state,
    save_pool_state,
)
from hardware.pools import check_disks, create_pool, import_pool, read_marker, write_marker
from hardware.records import BlockDevice

Progress = Callable[[dict[str, Any]], None]
Log = Callable[[str, str], None]
#: How often the tick samples usage, and how often a btrfs pool is scrubbed.
SAMPLE_EVERY = timedelta(hours=1)
SCRUB_EVERY = timedelta(days=30)
#: A scheduled scrub that did not finish is asked for again after this.
SCRUB_RETRY = timedelta(days=1)
#: Usage samples older than this are dropped when new ones are taken.
USAGE_KEPT = timedelta(days=400)
SCHEDULE_KEY = "pool_schedule"
_ACTIVE = ("queued", "running", "waiting")


def _no_log(level: str, message: str) -> None:
    pass


# --- running btrfs's long commands ------------------------------------------------------------


def _blocking(
    argv: Sequence[str],
    what: str,
    *,
    poll: Callable[[], dict[str, Any] | None],
    progress: Progress | None,
    cancel: threading.Event | None,
    on_cancel: Callable[[], object],
    ok: Sequence[int] = (0,),
    interval: float = 2.0,
) -> tuple[str, bool]:
    """Run a blocking btrfs command, reporting ``poll()`` every ``interval`` seconds and calling
    ``on_cancel`` once when ``cancel`` is set; (its output, cancelled)."""
    try:
        proc = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    except FileNotFoundError as exc:
        raise CommandFailed(f"{what}: btrfs-progs is not installed") from exc
    cancelled = False
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=interval)
                break
            except subprocess.TimeoutExpired:
                pass
            if cancel is not None and cancel.is_set() and not cancelled:
                cancelled = True
                on_cancel()
            info = poll() if progress is not None else None
            if progress is not None and info is not None:
                progress(info)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode not in ok and not cancelled:
        said = (err or out).strip().splitlines()
        raise CommandFailed(f"{what}: {said[-1] if said else f'exit status {proc.returncode}'}")
    return out + err, cancelled


def run_scrub(
    mountpoint: str, *, progress: Progress | None = None, cancel: threading.Event | None = None
) -> tuple[btrfs.ScrubResult, bool]:
    """Scrub the filesystem at ``mountpoint`` (every copy of every block read and checked; a bad
    copy rewritten from a good one); (result, cancelled)."""

    def poll() -> dict[str, Any] | None:
        try:
            status = btrfs.last_scrub(mountpoint)
        except CommandFailed:
            return None
        done, total = status.scrubbed_bytes or 0, status.total_bytes or 0
        return {"phase": "scrubbing", "bytes_done": done, "bytes_total": total}

    out, cancelled = _blocking(
        btrfs.scrub_start_argv(mountpoint),
        f"scrubbing {mountpoint}",
        ok=(0, btrfs.SCRUB_UNCORRECTABLE),
        poll=poll,
        progress=progress,
        cancel=cancel,
        on_cancel=lambda: btrfs.run_btrfs(
            btrfs.scrub_cancel_argv(mountpoint), "cancelling the scrub", ok=(0, 1, 2)
        ),
    )
    result = btrfs.parse_scrub(out)
    return (btrfs.last_scrub(mountpoint) if result.status == "unknown" else result), cancelled


def run_replace(
    mountpoint: str,
    devid: int,
    devnode: str,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> tuple[btrfs.ReplaceStatus, bool]:
    """Rebuild member ``devid`` (from its mirror when it is missing) onto ``devnode``, which
    takes its place; (final status, cancelled)."""

    def poll() -> dict[str, Any] | None:
        try:
            status = btrfs.replace_status(mountpoint)
        except CommandFailed:
            return None
        return {"phase": "replacing", "percent": status.percent or 0.0}

    _, cancelled = _blocking(
        btrfs.replace_start_argv(devid, devnode, mountpoint),
        f"replacing device {devid} of {mountpoint} by {devnode}",
        poll=poll,
        progress=progress,
        cancel=cancel,
        on_cancel=lambda: btrfs.run_btrfs(
            ["btrfs", "replace", "cancel", mountpoint], "cancelling the replacement", ok=(0, 1, 2)
        ),
    )
    return btrfs.replace_status(mountpoint), cancelled


def _wait_for_replace(mountpoint: str, interval: float = 1.0) -> btrfs.ReplaceStatus:
    while True:
        status = btrfs.replace_status(mountpoint)
        if status.state != "running":
            return status
        time.sleep(interval)


# --- work functions ------------------------------------------------------------------------------


def _btrfs_pool(app: Appliance, name: str, *, redundant: bool) -> tuple[PoolRecord, str]:
    pool = find_pool(app, name)
    if pool.fs_type != "btrfs" or pool.mountpoint is None or pool.fs_uuid is None:
        raise InvalidInput(
            f"pool {pool.name} is {pool.fs_type or 'a folder'}: only btrfs keeps the checksums "
            "and mirrors this needs",
            pool=pool.name,
        )
    if redundant and pool.profile not in ("raid1", "raid10"):
        raise InvalidInput(
            f"pool {pool.name} has no mirror to rebuild a disk from: make a new pool and copy "
            "its points there",
            pool=pool.name,
        )
    mount_pool_filesystem(pool.fs_uuid, pool.mountpoint)
    return pool, pool.mountpoint


def scrub_pool(
    app: Appliance,
    name: str,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    log: Log = _no_log,
) -> dict[str, Any]:
    """Scrub a btrfs pool: every block's checksum checked on every disk, bad copies rewritten
    from good ones; then data left with one copy by a degraded spell gets its mirror back (when
    every disk is there). The result is kept as the pool's last scrub (its health shows it)."""
    pool, mountpoint = _btrfs_pool(app, name, redundant=False)
    log("info", f"scrubbing pool {pool.name} ({mountpoint})")
    result, cancelled = run_scrub(mountpoint, progress=progress, cancel=cancel)
    if cancelled:
        raise BackupCancelled("the scrub was cancelled; the next one checks everything again")
    save_pool_state(
        app, pool.name, last_scrub_at=app.clock().isoformat(), last_scrub=result.to_dict()
    )
    if result.corrected:
        log("warning", f"{result.corrected} bad block(s) were rewritten from their good copy")
    if result.uncorrectable:
        log("error", f"{result.uncorrectable} block(s) had no good copy left: verify the points")
    converted = None
    fs = btrfs.filesystem(mountpoint)
    chunks = btrfs.chunk_profiles(mountpoint)
    if (
        fs is not None
        and not fs.missing_devids
        and btrfs.unredundant_chunks(chunks, pool.profile or "")
    ):
        converted = btrfs.convert_profiles(mountpoint, str(pool.profile))
        log("info", f"data written while a disk was missing is mirrored again: {converted}")
    log("info", "scrub finished: " + ("no errors" if result.clean else str(result.errors)))
    health = pool_health(app, pool)
    return {
        "pool": pool.name,
        "scrub": result.to_dict(),
        "converted": converted,
        "health": health.to_dict(),
    }


def member_devid(pool: PoolRecord, member: str) -> int:
    """The btrfs device id of a pool member named by identity (or by its device id)."""
    if member in pool.members:
        return pool.members.index(member) + 1
    if member.isdigit() and 0 < int(member) <= max(len(pool.members), 1):
        return int(member)
    raise NotFound(
        f"pool {pool.name} has no disk {member!r}; its disks: {', '.join(pool.members)}",
        pool=pool.name,
    )


def replace_disk(
    app: Appliance,
    pool_name: str,
    member: str,
    new_device: BlockDevice,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    log: Log = _no_log,
) -> dict[str, Any]:
    """Replace a missing or failing member of a mirrored pool by ``new_device``: btrfs rebuilds
    its copies onto it, data written while degraded is mirrored again, and the pool's members
    name the new disk in the old one's place. A rerun after an interruption finishes the job."""
    pool, mountpoint = _btrfs_pool(app, pool_name, redundant=True)
    devid = member_devid(pool, member)
    old = pool.members[devid - 1] if devid <= len(pool.members) else f"device {devid}"
    if btrfs.replace_status(mountpoint).state == "running":
        log("info", "a replacement is under way already; waiting for it to end")
        _wait_for_replace(mountpoint)
    target = os.path.realpath(new_device.devnode)
    fs = btrfs.filesystem(mountpoint)
    done = fs is not None and any(
        d.devid == devid and d.path is not None and os.path.realpath(d.path) == target
        for d in fs.devices
    )
    if not done:
        check_disks(app, [new_device], force=True)
        log("info", f"rebuilding {old} (device {devid}) onto {new_device.identity} ({target})")
        final, cancelled = run_replace(mountpoint, devid, target, progress=progress, cancel=cancel)
        if cancelled:
            raise BackupCancelled("the replacement was cancelled; the pool is as it was before")
        if final.state != "finished":
            raise CommandFailed(f"the replacement ended {final.state}, not finished")
        log("info", f"{new_device.identity} holds device {devid}'s copies now")
    converted = btrfs.convert_profiles(mountpoint, str(pool.profile))
    log("info", f"every chunk is {pool.profile} again: {converted}")
    members = list(pool.members) + [""] * max(0, devid - len(pool.members))
    members[devid - 1] = new_device.identity
    updated = app.catalog.update_pool(pool.name, members=members)
    marker = read_marker(mountpoint)
    if marker:
        write_marker(
            mountpoint,
            {
                **{k: v for k, v in marker.items() if k not in ("kind", "version")},
                "members": members,
            },
        )
    health = pool_health(app, updated)
    return {
        "pool": pool.name,
        "devid": devid,
        "replaced": old,
        "by": new_device.identity,
        "converted": converted,
        "health": health.to_dict(),
    }


def sample_usage(app: Appliance, now: datetime | None = None) -> list[PoolUsageRecord]:
    """Record every mounted pool's usage now (the forecast's history); old samples go."""
    now = now or app.clock()
    taken = []
    for pool in list_pools(app):
        capacity = pool_capacity(pool)
        if capacity is not None:
            taken.append(
                app.catalog.add_pool_usage(
                    pool.name, now, capacity.used_bytes, capacity.total_bytes
                )
            )
    app.catalog.prune_pool_usage(now - USAGE_KEPT)
    return taken


# --- job kinds -----------------------------------------------------------------------------------


def device_params(device: BlockDevice) -> dict[str, Any]:
    """A disk record as a job parameter (JSON)."""
    document = asdict(device)
    document["links"] = list(device.links)
    return document


def device_from_params(document: dict[str, Any]) -> BlockDevice:
    known = {f.name for f in fields(BlockDevice)}
    values = {k: v for k, v in document.items() if k in known}
    values["links"] = tuple(values.get("links") or ())
    return BlockDevice(**values)


def _pool_by_fs(app: Appliance, fs_uuid: str | None) -> PoolRecord | None:
    return next((p for p in app.catalog.list_pools() if fs_uuid and p.fs_uuid == fs_uuid), None)


def _create_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    done = _pool_by_fs(app, ctx.checkpoint.get("fs_uuid"))
    if done is not None and done.name == p["name"]:  # finished before an interruption
        return {"pool": done.name, "fs_uuid": done.fs_uuid, "location": done.location_id}

    def made(fs_uuid: str) -> None:
        ctx.save_checkpoint({"fs_uuid": fs_uuid})

    ctx.progress({"phase": "creating"})
    pool = create_pool(
        app,
        p["name"],
        [device_from_params(d) for d in p["devices"]],
        p.get("fs_type", "btrfs"),
        p.get("profile"),
        force=bool(p.get("force")),
        made=made,
        log=ctx.log,
    )
    return {"pool": pool.name, "fs_uuid": pool.fs_uuid, "location": pool.location_id}


def _scrub_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    return scrub_pool(app, p["pool"], progress=ctx.progress, cancel=ctx.cancel, log=ctx.log)


def _replace_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    devid = ctx.checkpoint.get("devid")
    if devid is None:  # the member's identity leaves the pool's record when it is replaced
        devid = member_devid(find_pool(app, p["pool"]), str(p["member"]))
        ctx.save_checkpoint({"devid": devid})
    device = device_from_params(p["device"])
    return replace_disk(
        app, p["pool"], str(devid), device, progress=ctx.progress, cancel=ctx.cancel, log=ctx.log
    )


def _import_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    done = _pool_by_fs(app, p["fs_uuid"])
    if done is not None:  # recorded before an interruption
        return {"pool": done.name, "fs_uuid": done.fs_uuid, "location": done.location_id}
    devices = [device_from_params(d) for d in p.get("devices") or []]
    return import_pool(app, p["fs_uuid"], p.get("name"), devices=devices, log=ctx.log)


def register_pool_jobs() -> None:
    """Register ``pool_create``, ``pool_scrub``, ``pool_replace`` and ``pool_import``."""
    register_job_kind(
        "pool_create",
        JobKind(
            _create_job,
            lambda p: (
                [(f"pool:{p['name']}", True)]
                + [(f"disk:{d['identity']}", True) for d in p["devices"]]
            ),
            True,
            lambda p: f"create pool {p['name']}",
        ),
    )
    register_job_kind(
        "pool_scrub",
        JobKind(
            _scrub_job,
            lambda p: [(f"pool:{p['pool']}", True)],
            True,
            lambda p: f"scrub of pool {p['pool']}",
        ),
    )
    register_job_kind(
        "pool_replace",
        JobKind(
            _replace_job,
            lambda p: [(f"pool:{p['pool']}", True), (f"disk:{p['device']['identity']}", True)],
            True,
            lambda p: f"replace {p['member']} in pool {p['pool']}",
        ),
    )
    register_job_kind(
        "pool_import",
        JobKind(
            _import_job,
            lambda p: [(f"filesystem:{p['fs_uuid']}", True), ("store", False)],
            True,
            lambda p: f"import pool {p.get('name') or p['fs_uuid']}",
        ),
    )


# --- the scheduler's tick ----------------------------------------------------------------------


def _when(text: object) -> datetime | None:
    return datetime.fromisoformat(text) if isinstance(text, str) else None


def sample_due(last: datetime | None, now: datetime) -> bool:
    return last is None or now - last >= SAMPLE_EVERY


def scrub_due(pool: PoolRecord, state: dict[str, Any], now: datetime) -> bool:
    """A btrfs pool is scrubbed a month after its last scrub (or its creation); one asked for
    that did not get done is asked for again a day later."""
    if pool.fs_type != "btrfs":
        return False
    last = _when(state.get("last_scrub_at")) or pool.created_at
    asked = _when(state.get("scrub_asked_at"))
    return now - last >= SCRUB_EVERY and (
        asked is None or asked <= last or now - asked >= SCRUB_RETRY
    )


def pool_tick(app: Appliance, runner: JobRunner) -> Callable[[datetime], list[str]]:
    """The scheduler's hook: sample every pool's usage hourly, and submit a ``pool_scrub`` for
    each mounted btrfs pool whose scrub is due (never a second while one is queued or runs)."""

    def tick(now: datetime) -> list[str]:
        schedule = app.catalog.get_settings(SCHEDULE_KEY)
        if sample_due(_when(schedule.get("last_sample_at")), now):
            app.catalog.put_settings(SCHEDULE_KEY, {**schedule, "last_sample_at": now.isoformat()})
            sample_usage(app, now)
        busy = {
            job.params.get("pool")
            for state in _ACTIVE
            for job in app.catalog.list_jobs(state=state)
            if job.kind == "pool_scrub"
        }
        submitted = []
        for pool in list_pools(app):
            state = pool_state(app, pool.name)
            if pool.name in busy or not scrub_due(pool, state, now):
                continue
            if (
                pool.fs_uuid is None
                or pool.mountpoint is None
                or not is_mounted(pool.fs_uuid, pool.mountpoint)
            ):
                continue  # unavailable: its health says so; scrubbed when it is back
            save_pool_state(app, pool.name, scrub_asked_at=now.isoformat())
            submitted.append(
                runner.submit("pool_scrub", {"pool": pool.name, "trigger": "schedule"}).id
            )
        return submitted

    return tick
