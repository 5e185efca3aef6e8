"""The built-in job kinds' work and resource functions (the runner is :mod:`appliance.jobs`).

Each work function takes the engine, the job's parameters and the job as a
:class:`appliance.job_context.JobView` (progress, log, cancel event, checkpoint); it knows nothing
of HTTP and calls the same engine methods the CLI calls. A resource function names what the job
holds while it runs: ``(name, exclusive)`` pairs.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from appliance.engine import Appliance
from appliance.errors import JobWaiting, LocationUnavailable
from appliance.job_context import JobView
from appliance.maintenance import collect_garbage
from appliance.point_check import verify_new_point
from appliance.retention import RetentionRules
from appliance.sources.ingest import session_chunks

#: How long a copy waits for its unavailable location before it tries again (an outside event,
#: such as the disk being inserted, wakes it sooner: ``JobRunner.wake_matching("location:ID")``).
LOCATION_RETRY = timedelta(minutes=5)


def backup_files(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    ctx.log("info", f"backing up {p['source']} as {p['asset']} ({p.get('mode', 'incremental')})")
    outcome = app.backup_files(
        p["source"],
        p["asset"],
        mode=p.get("mode", "incremental"),
        progress=ctx.progress,
        cancel=ctx.cancel,
    )
    for warning in outcome.warnings[:100]:
        ctx.log("warning", f"{warning['path']}: {warning['message']}")
    ctx.progress({**ctx.latest, "percent": 100.0})
    if outcome.point.suspicion:
        ctx.log(
            "warning", f"this backup looks like ransomware: {'; '.join(outcome.point.suspicion)}"
        )
    return {
        "point": outcome.point.id,
        "mode": outcome.point.mode,
        "stats": outcome.stats,
        "warnings": len(outcome.warnings),
        # The alerts raise their ransomware warning from this (appliance.engine_signals).
        "suspicion": list(outcome.point.suspicion),
    }


def backup_image(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    ctx.log("info", f"backing up disks {', '.join(p['disks'])} as {p['asset']}")
    outcome = app.backup_image(
        p["disks"],
        p["asset"],
        mode=p.get("mode", "incremental"),
        vm_spec=p.get("vm"),
        progress=ctx.progress,
        cancel=ctx.cancel,
    )
    # Checked before the job ends, so "newest" and "newest verified" agree for the failover.
    check = verify_new_point(app, outcome.point.id, log=ctx.log)
    ctx.progress({**ctx.latest, "percent": 100.0})
    return {
        "point": outcome.point.id,
        "mode": outcome.point.mode,
        "stats": outcome.stats,
        "check": check.to_dict(),
    }


def restore(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    # The target is checked again now, not only when the restore was asked for: the settings
    # may have changed since, or a folder on the way been swapped for a link.
    checked = app.check_restore_target(
        p["point"],
        p.get("destination", "area"),
        target=p.get("target"),
        on_conflict=p.get("on_conflict"),
        disk=p.get("disk"),
    )
    recall = app.prepare_read(p["point"], subpath=p.get("path"), location=p.get("location"))
    if not recall.done:
        raise JobWaiting(
            f"{recall.describe()}; the restore goes on when they are readable",
            wake_at=app.clock() + timedelta(seconds=recall.poll_seconds),
            checkpoint={"recall": recall.to_dict()},
        )
    if recall.location is not None:
        bundled = f" in {recall.objects} object(s), {recall.bundles} of them bundles"
        what = f"{recall.packs} pack(s){bundled if recall.bundles else ''}"
        ctx.log("info", f"recalled {what} from {recall.location}")
    point = app.point(p["point"])
    # The log line and the result name the same resolved choices (where, and what happens to a
    # file already there), so the job page cannot say one thing and the log another.
    ctx.log(
        "info",
        f"restoring point {point.id} of {point.asset} to {checked.path} "
        f"({checked.kind}, existing files: {checked.on_conflict.replace('_', ' ')})",
    )
    result = app.restore(
        p["point"],
        checked.path,
        subpath=p.get("path"),
        disk=p.get("disk"),
        target_format=p.get("format", "raw"),
        on_conflict=checked.on_conflict,
        block_device=checked.block_device,
        location=p.get("location"),
        log=lambda message: ctx.log("warning", message),
        progress=ctx.progress,
        cancel=ctx.cancel,
    )
    return {
        **result,
        "asset": point.asset,
        "point_created_at": point.created_at.isoformat(),
        "destination": checked.kind,
        "target": checked.path,
        "on_conflict": checked.on_conflict,
        "path": p.get("path"),
    }


def verify(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    report = app.verify(p.get("point"), max_bytes=p.get("max_bytes"), progress=ctx.progress)
    for point_id, reasons in report.affected_points.items():
        ctx.log("error", f"point {point_id}: {'; '.join(reasons)}")
    return report.to_dict()


def prune(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    rules = RetentionRules(**{k: int(v) for k, v in p.get("rules", {}).items()})
    dry_run = bool(p.get("dry_run"))
    decision = app.prune(
        p["asset"],
        rules,
        dry_run=dry_run,
        deleted=lambda point_id: ctx.log("info", f"removed point {point_id}"),
    )
    for point_id, why in decision.held.items():
        ctx.log("warning", f"kept point {point_id}: {why}")
    return {
        "keep": decision.keep,
        "remove": decision.remove,
        "held": decision.held,
        "dry_run": dry_run,
    }


def copy(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    if ctx.checkpoint:
        ctx.log(
            "info",
            f"resuming the copy of point {p['point']} to {p['location']} "
            f"({ctx.checkpoint.get('packs_copied', 0)} pack(s) were copied before it waited; "
            "packs already there are not sent again)",
        )
    else:
        ctx.log("info", f"copying point {p['point']} to {p['location']}")
    copied = {"packs_copied": int(ctx.checkpoint.get("packs_copied", 0))}

    def progress(info: dict[str, Any]) -> None:
        copied["latest"] = int(info.get("packs", 0))
        ctx.progress(info)

    try:
        result = app.copy_point(p["point"], p["location"], progress=progress, cancel=ctx.cancel)
    except LocationUnavailable as exc:
        # A pulled or unmounted disk: wait for it rather than fail; the copy stays "copying".
        raise JobWaiting(
            f"location {p['location']} is unavailable ({exc.message}); the copy goes on when "
            "it is back",
            wake_at=app.clock() + LOCATION_RETRY,
            checkpoint={"packs_copied": copied["packs_copied"] + copied.get("latest", 0)},
        ) from exc
    ctx.log(
        "info",
        f"{result['packs_copied']} pack(s) copied, {result['packs_present']} already there",
    )
    return result


def recall(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    """Make a point (one path of it) readable from its cold copy, and wait until it is."""
    status = app.prepare_read(p["point"], subpath=p.get("path"), location=p.get("location"))
    if not status.done:
        raise JobWaiting(
            f"{status.describe()}; the point is readable when they are",
            wake_at=app.clock() + timedelta(seconds=status.poll_seconds),
            checkpoint={"recall": status.to_dict()},
        )
    if status.location is None:
        ctx.log("info", f"point {p['point']} has a readable copy: nothing to recall")
    else:
        ctx.log(
            "info", f"{status.packs} pack(s) of point {p['point']} readable at {status.location}"
        )
    return status.to_dict()


def verify_copy(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    result = app.verify_copy(p["point"], p["location"])
    for reason in result["affected_points"].get(p["point"], []):
        ctx.log("error", f"copy at {result['label']}: {reason}")
    return result


def copy_resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
    # The store shared (GC must not free packs mid-copy), the target location exclusively.
    return [("store", False), (f"location:{p['location']}", True)]


def gc(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    with app.locks.exclusive():
        report = collect_garbage(
            app.repo,
            grace_seconds=float(p.get("grace", 3600)),
            keep=session_chunks(app.data_dir.path),
        )
    return report.to_dict()


def rebuild(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    return app.rebuild_catalog()


def store_shared(p: dict[str, Any]) -> list[tuple[str, bool]]:
    return [("store", False)]


def store_exclusive(p: dict[str, Any]) -> list[tuple[str, bool]]:
    return [("store", True)]


def asset_backup(p: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(f"asset:{p['asset']}", True), ("store", False)]
