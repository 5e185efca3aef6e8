"""USB rotation, hands-off: what a plugged-in disk starts, the ``usb_export`` job, and eject.

:func:`on_devices_changed` is the udev handler (discovery calls it with each scan's
:class:`~hardware.records.DeviceDiff`; a duplicate event is an empty diff or a repeated add, and
both are harmless). A disk whose filesystem is a known medium is mounted and then, as
:func:`hardware.rotation.insert_action` decides, either wakes the export waiting for it or starts
a ``usb_export`` job; an unknown USB disk is only *offered* (remembered for the page) and never
touched. A medium that goes away is unmounted lazily and marked ``out``.

The export (:func:`export_to_medium`, the ``usb_export`` job's work and ``appliance usb export``)
copies the set's chosen points (:func:`hardware.rotation.plan_export`) with the engine's
``copy_point`` (dedup-aware: only the packs the disk lacks; the manifest last, so a half copy is
no point), verifies each copy, flushes and unmounts the disk and records it ``safe_to_remove``
with its ``last_written`` time; the job's log then says "USB disk OFFSITE-A is safe to remove".
A disk pulled mid-export fails the copy; the job then waits ("waiting for USB disk OFFSITE-A to
be plugged in again") with the points done so far as its checkpoint, and the next insert wakes
it: it resumes with the packs that are missing.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from appliance.catalog.records import JobRecord, home_location_id
from appliance.engine import Appliance
from appliance.errors import (
    ApplianceError,
    BackupCancelled,
    IntegrityError,
    JobWaiting,
    LocationUnavailable,
)
from appliance.job_context import JobView
from appliance.jobs import JOB_KINDS, JobKind, JobRunner, register_job_kind
from hardware.records import BlockDevice, DeviceDiff, Inventory
from hardware.rotation import insert_action, plan_export
from hardware.usb import (
    attach_medium,
    eject,
    find_medium,
    media_mountpoint,
    medium_present,
    medium_states,
    offer_disk,
    release_medium,
    set_of,
    update_medium,
    withdraw_offer,
)

EXPORT_KIND = "usb_export"
EJECT_KIND = "usb_eject"
#: How long an export waits for its disk before it looks again (an insert wakes it at once).
USB_RETRY = timedelta(hours=1)
#: Job states in which an export still has work to do.
ACTIVE_STATES = ("queued", "running", "interrupted")

Log = Callable[[str, str], None]
Progress = Callable[[dict[str, Any]], None]


def _pulled(app: Appliance, identity: str, exc: BaseException) -> bool:
    """Whether a failure during an export means the disk went away."""
    if isinstance(exc, BackupCancelled):
        return False
    if isinstance(exc, LocationUnavailable):
        return True
    mountpoint = media_mountpoint(app.data_dir.path, identity)
    return not os.path.ismount(mountpoint) or not medium_present(identity)


def export_to_medium(
    app: Appliance,
    medium: str,
    *,
    log: Log,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    checkpoint: dict[str, Any] | None = None,
    save_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Export the medium's rotation set to it (see the module doc); returns what was copied.
    Raises :class:`JobWaiting` when the disk is not plugged in or is pulled midway (with the
    points done as the checkpoint to resume from)."""
    state = find_medium(app, medium)
    rotation = set_of(app, state)
    done: list[str] = [str(p) for p in (checkpoint or {}).get("done", [])]
    again = " again" if (checkpoint or {}).get("started") else ""
    try:
        attach_medium(app, state.identity)
    except LocationUnavailable as exc:
        raise JobWaiting(
            f"waiting for USB disk {state.label} to be plugged in{again}",
            wake_at=app.clock() + USB_RETRY,
            checkpoint={**(checkpoint or {}), "done": done},
        ) from exc
    update_medium(app, state.identity, state="exporting", message=None)
    store = app.repo.store_id
    at_home = {c.point_id for c in app.catalog.copies_at(home_location_id(store), "present")}
    here = app.catalog.copies_at(state.location_id, "present")
    plan = plan_export(
        rotation,
        [p for p in app.catalog.list_points(store_id=store) if p.id in at_home],
        [c.point_id for c in here if c.verified_at is not None or not rotation.verify],
    )
    todo = [p for p in plan.to_copy if p not in done]
    log(
        "info",
        f"exporting {len(todo)} point(s) to USB disk {state.label} (set {rotation.name}); "
        f"{len(plan.present) + len(plan.to_copy) - len(todo)} already on it",
    )
    copied: list[dict[str, Any]] = []
    failed: list[str] = []
    try:
        for point_id in todo:
            if save_checkpoint is not None:
                save_checkpoint({"done": done, "started": True})
            result = app.copy_point(point_id, state.location_id, progress=progress, cancel=cancel)
            line = (
                f"point {point_id}: {result['packs_copied']} pack(s) copied "
                f"({result['bytes_copied']} bytes), {result['packs_present']} already on the disk"
            )
            if rotation.verify:
                report = app.verify_copy(point_id, state.location_id)
                if not report["ok"]:
                    failed.append(point_id)
                    reasons = "; ".join(report["affected_points"].get(point_id, []))
                    log("error", f"{line}; it did not verify: {reasons}")
                    continue
                line += ", verified"
            log("info", line)
            copied.append({"point": point_id, **{k: result[k] for k in _COPY_FIELDS}})
            done.append(point_id)
            if save_checkpoint is not None:
                save_checkpoint({"done": done, "started": True})
    except (ApplianceError, OSError) as exc:
        written = f"{len(done)} of {len(plan.to_copy)} point(s) written"
        if not _pulled(app, state.identity, exc):
            # Cancelled, or a failure of the appliance's own store: the disk is left unmounted.
            safe = _release_quietly(app, state.identity)
            update_medium(
                app,
                state.identity,
                state="safe_to_remove" if safe else "in",
                message=f"export stopped ({written}): {exc}",
            )
            raise
        with contextlib.suppress(ApplianceError, OSError):
            release_medium(app, state.identity, lazy=True)
        update_medium(
            app,
            state.identity,
            message=f"pulled during an export ({written}): plug it in again to finish",
        )
        log("warning", f"USB disk {state.label} was pulled during the export ({written}): {exc}")
        raise JobWaiting(
            f"waiting for USB disk {state.label} to be plugged in again",
            wake_at=app.clock() + USB_RETRY,
            checkpoint={"done": done, "started": True},
        ) from exc
    try:
        release_medium(app, state.identity)
    except ApplianceError as exc:
        update_medium(
            app,
            state.identity,
            state="in",
            last_written=app.clock(),
            message=f"written, but not unmounted ({exc}): eject it before pulling it",
        )
        log("warning", f"USB disk {state.label} could not be unmounted: {exc}")
        safe = False
    else:
        update_medium(
            app,
            state.identity,
            state="safe_to_remove",
            last_written=app.clock(),
            message=f"{len(failed)} point(s) did not verify" if failed else None,
        )
        log("info", f"USB disk {state.label} is safe to remove")
        safe = True
    if failed:
        raise IntegrityError(
            f"{len(failed)} point(s) exported to USB disk {state.label} did not verify: "
            + ", ".join(failed),
            points=failed,
        )
    return {
        "medium": state.identity,
        "label": state.label,
        "set": rotation.name,
        "copied": copied,
        "points": list(plan.to_copy) + list(plan.present),
        "safe_to_remove": safe,
    }


_COPY_FIELDS = ("packs_needed", "packs_copied", "packs_present", "bytes_copied")


def _release_quietly(app: Appliance, identity: str) -> bool:
    try:
        release_medium(app, identity)
    except (ApplianceError, OSError):
        return False
    return True


# --- the jobs -----------------------------------------------------------------------------------


def _export_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    if ctx.checkpoint.get("started"):
        ctx.log("info", f"resuming the export to USB disk {p.get('label', p['medium'])}")
    return export_to_medium(
        app,
        p["medium"],
        log=ctx.log,
        progress=ctx.progress,
        cancel=ctx.cancel,
        checkpoint=ctx.checkpoint,
        save_checkpoint=ctx.save_checkpoint,
    )


def _eject_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    state = eject(app, p["medium"])
    ctx.log("info", f"USB disk {state.label} is safe to remove")
    return state.to_dict()


def _export_resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
    # The store shared (GC must not free packs mid-copy); the disk and its location exclusively.
    return [("store", False), (f"location:{p['location']}", True), (f"medium:{p['medium']}", True)]


def _eject_resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(f"medium:{p['medium']}", True)]


def register_usb_jobs() -> None:
    """Register the ``usb_export`` and ``usb_eject`` job kinds (at service start-up; again is
    harmless)."""
    if EXPORT_KIND in JOB_KINDS and EJECT_KIND in JOB_KINDS:
        return
    register_job_kind(
        EXPORT_KIND,
        # Resumable: a rerun after a crash skips the points done and the packs already there.
        JobKind(
            _export_job,
            _export_resources,
            True,
            lambda p: f"export to USB disk {p.get('label', p['medium'])}",
        ),
    )
    register_job_kind(
        EJECT_KIND,
        JobKind(
            _eject_job, _eject_resources, True, lambda p: f"eject of USB disk {p.get('label')}"
        ),
    )


def _export_jobs(app: Appliance, identity: str, states: tuple[str, ...]) -> list[JobRecord]:
    return [
        job
        for state in states
        for job in app.catalog.list_jobs(state=state, limit=1000)
        if job.kind == EXPORT_KIND and job.params.get("medium") == identity
    ]


def submit_export(app: Appliance, jobs: JobRunner, medium: str) -> JobRecord:
    """Queue an export to the medium, unless one is queued, running or waiting already (that
    one is returned; a waiting one is woken)."""
    register_usb_jobs()
    state = find_medium(app, medium)
    waiting = _export_jobs(app, state.identity, ("waiting",))
    if waiting:
        return jobs.wake(waiting[0].id) or app.catalog.get_job(waiting[0].id)
    active = _export_jobs(app, state.identity, ACTIVE_STATES)
    if active:
        return active[0]
    return jobs.submit(
        EXPORT_KIND,
        {"medium": state.identity, "location": state.location_id, "label": state.label},
    )


def submit_eject(app: Appliance, jobs: JobRunner, medium: str) -> JobRecord:
    """Queue an eject (it runs after an export of the disk that holds it)."""
    register_usb_jobs()
    state = find_medium(app, medium)
    return jobs.submit(EJECT_KIND, {"medium": state.identity, "label": state.label})


# --- udev ---------------------------------------------------------------------------------------


def _inserted(app: Appliance, jobs: JobRunner, device: BlockDevice) -> dict[str, Any]:
    states = medium_states(app)
    state = states.get(device.fs_uuid or "")
    outcome: dict[str, Any] = {"device": device.identity, "devnode": device.devnode}
    if state is None:
        if not device.usb or device.kind != "disk":
            return {**outcome, "action": "ignored", "reason": "not a whole USB disk"}
        offer_disk(app, device)
        action, reason = insert_action(None, waiting_job=False, active_job=False)
        return {**outcome, "action": action, "reason": reason}
    waiting = _export_jobs(app, state.identity, ("waiting",))
    active = _export_jobs(app, state.identity, ACTIVE_STATES)
    action, reason = insert_action(state, waiting_job=bool(waiting), active_job=bool(active))
    outcome.update(medium=state.identity, label=state.label, action=action, reason=reason)
    if action == "nothing":
        return outcome
    update_medium(app, state.identity, state="in", inserted_at=app.clock(), removed_at=None)
    try:
        attach_medium(app, state.identity)
    except ApplianceError as exc:
        update_medium(app, state.identity, message=f"could not be mounted: {exc.message}")
    if action == "wake":
        register_usb_jobs()
        outcome["jobs"] = jobs.wake_matching(f"medium:{state.identity}")
    else:
        outcome["jobs"] = [submit_export(app, jobs, state.identity).id]
    return outcome


def _removed(app: Appliance, identity: str) -> dict[str, Any]:
    state = medium_states(app)[identity]
    with contextlib.suppress(ApplianceError, OSError):
        release_medium(app, identity, lazy=True)
    message = state.message
    if state.state == "exporting":
        message = "pulled during an export: plug it in again to finish"
    elif state.state == "in":
        message = "pulled before it was safe to remove"
    update_medium(app, identity, state="out", removed_at=app.clock(), message=message)
    return {"medium": identity, "label": state.label, "action": "out", "reason": message or ""}


def on_devices_changed(
    app: Appliance, jobs: JobRunner, diff: DeviceDiff, inventory: Inventory
) -> list[dict[str, Any]]:
    """Act on one scan's changes (see the module doc); ``inventory`` is the scan itself.
    Returns what was done, one entry per device that mattered."""
    states = medium_states(app)
    out: list[dict[str, Any]] = []
    gone = [d for d in diff.removed if isinstance(d, BlockDevice)]
    gone += [
        b
        for b, a in diff.changed
        if isinstance(b, BlockDevice) and (not isinstance(a, BlockDevice) or b.fs_uuid != a.fs_uuid)
    ]
    for device in gone:
        if device.fs_uuid in states and inventory.by_fs_uuid(device.fs_uuid) is None:
            if states[device.fs_uuid].state != "out":
                out.append(_removed(app, device.fs_uuid))
        elif device in diff.removed:
            withdraw_offer(app, device.identity)
    came = [d for d in diff.added if isinstance(d, BlockDevice)]
    came += [a for _, a in diff.changed if isinstance(a, BlockDevice)]
    for device in came:
        if device.usb or device.fs_uuid in states:
            out.append(_inserted(app, jobs, device))
    return out


def reconcile_media(app: Appliance, jobs: JobRunner, inventory: Inventory) -> list[dict[str, Any]]:
    """Bring the media states in line with a whole scan (at start-up, or a periodic rescan when
    udev events may have been missed): media not found are ``out``, USB disks found are
    handled as plugged in (nothing happens for those already seen)."""
    out = [
        _removed(app, identity)
        for identity, state in medium_states(app).items()
        if state.state != "out" and inventory.by_fs_uuid(identity) is None
    ]
    present = DeviceDiff(added=tuple(inventory.block[k] for k in sorted(inventory.block)))
    return out + on_devices_changed(app, jobs, present, inventory)
