"""Tiering's work functions: the settings, the plan preview with its cost, and the run.

The CLI, the API, the scheduler and the tests call these. A run (:func:`run_tiering`, the
``tier`` job) plans afresh (:func:`tiering.plan.plan_tiering`), then copies each point (the
engine's ``copy_point``: dedup-aware, verified, committed, resumable), only then drops local
copies the plan allows, and last expires copies past their date (and collects the packs those
leave unneeded at their locations, never a locked one). It stops at the end of its time window and waits for the next one, and
waits for a location that does not answer; a rerun after a crash plans again and resumes (packs
already in the bucket are not sent again).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from appliance.catalog.records import home_location_id
from appliance.engine import Appliance
from appliance.errors import ApplianceError, JobWaiting, LocationUnavailable
from appliance.job_context import JobView
from appliance.jobs import JobKind, register_job_kind
from tiering.plan import TierPlan, plan_tiering
from tiering.pricing import effective_prices, storage_cost
from tiering.rules import TieringSettings, parse_settings
from tiering.windows import current_window

SETTINGS_KEY = "tiering"
PRICES_KEY = "tiering_prices"
#: How long a run waits for a location that did not answer before it tries again.
LOCATION_RETRY = timedelta(minutes=15)


def load_settings(app: Appliance) -> TieringSettings:
    return parse_settings(app.catalog.get_settings(SETTINGS_KEY))


def save_settings(app: Appliance, document: dict[str, Any]) -> TieringSettings:
    """Validate and store the tiering settings (InvalidInput naming what is wrong)."""
    settings = parse_settings(document)
    app.catalog.put_settings(SETTINGS_KEY, settings.to_dict())
    return settings


def current_plan(app: Appliance, now: datetime | None = None) -> TierPlan:
    """The plan for this store's points now."""
    store_id = app.repo.store_id
    points = app.catalog.list_points(store_id=store_id)
    copies = {p.id: app.catalog.copies_of(p.id) for p in points}
    return plan_tiering(
        points,
        copies,
        app.catalog.list_locations(store_id),
        load_settings(app),
        now or app.clock(),
        home_location_id(store_id),
    )


def preview(app: Appliance, now: datetime | None = None) -> dict[str, Any]:
    """The plan with its estimated cost (monthly storage per class and the uploads)."""
    plan = current_plan(app, now)
    prices = effective_prices(app.catalog.get_settings(PRICES_KEY))
    return {
        **plan.to_dict(),
        "cost": storage_cost(plan.bytes_by_class, prices).to_dict(),
        "prices_source": prices.get("source"),
    }


def run_tiering(
    app: Appliance,
    *,
    log: Callable[[str, str], None],
    progress: Callable[[dict[str, Any]], None] | None = None,
    cancel: threading.Event | None = None,
    until: datetime | None = None,
    next_window: datetime | None = None,
) -> dict[str, Any]:
    """Carry out the plan now: copies first, then local drops. ``until``: the end of the time
    window (a run still moving data then waits until ``next_window``)."""
    plan = current_plan(app)
    limit = load_settings(app).bandwidth_mib_s
    bandwidth = limit * (1 << 20) if limit else None
    for problem in plan.problems:
        log("warning", problem)
    copied: list[str] = []
    dropped: list[str] = []
    failed: list[str] = []
    for action in plan.copies:
        if until is not None and app.clock() >= until:
            raise JobWaiting(
                f"the tiering window closed with {len(plan.copies) - len(copied)} copy(ies) left; "
                "it goes on in the next window",
                wake_at=next_window,
                checkpoint={"copied": len(copied)},
            )
        what = f"point {action.point_id} ({action.asset}) to {action.location} as {action.storage_class}"
        log("info", ("resuming the copy of " if action.resume else "copying ") + what)
        try:
            result = app.copy_point(
                action.point_id,
                action.location_id,
                progress=progress,
                cancel=cancel,
                storage_class=action.storage_class,
                retain_until=action.retain_until,
                bandwidth=bandwidth,
            )
        except LocationUnavailable as exc:
            raise JobWaiting(
                f"location {action.location} is unavailable ({exc.message}); tiering goes on "
                "when it is back",
                wake_at=app.clock() + LOCATION_RETRY,
                checkpoint={"copied": len(copied)},
            ) from exc
        except ApplianceError as exc:
            log("error", f"copy of point {action.point_id} to {action.location}: {exc.message}")
            failed.append(action.point_id)
            continue
        log(
            "info",
            f"copied point {action.point_id}: {result['packs_copied']} pack(s), "
            f"{result['bytes_copied']} bytes moved, {result['packs_present']} already there"
            + (f", locked until {result['retain_until']}" if result.get("retain_until") else ""),
        )
        copied.append(action.point_id)
    # Drops are planned again, after the copies: a rule keeping the local copy 0 days drops it
    # in the same run as the copy is made and verified.
    for drop in current_plan(app).drops:
        try:
            app.drop_local_copy(drop.point_id)
        except ApplianceError as exc:
            log("warning", f"local copy of point {drop.point_id} kept: {exc.message}")
            continue
        log("info", f"dropped the local copy of point {drop.point_id} (kept at {drop.kept_at})")
        dropped.append(drop.point_id)
    expired: list[str] = []
    collect: set[str] = set()
    for expiry in plan.expiries:
        try:
            outcome = app.expire_copy(expiry.point_id, expiry.location_id)
        except ApplianceError as exc:
            log(
                "warning",
                f"copy of point {expiry.point_id} at {expiry.location} kept: {exc.message}",
            )
            continue
        log(
            "info",
            f"the copy of point {expiry.point_id} at {expiry.location} expired "
            f"(kept until {expiry.retain_until.isoformat()})"
            + (
                "; the point had no other copy and left the catalog"
                if outcome["point_removed"]
                else ""
            ),
        )
        expired.append(expiry.point_id)
        collect.add(expiry.location_id)
    for location_id in sorted(collect):
        report = app.collect_location_garbage(location_id)
        log(
            "info",
            f"{report.location}: {len(report.packs_deleted)} pack(s) no copy needs were deleted "
            f"({report.bytes_freed} bytes)"
            + (
                f"; {len(report.locked)} still locked, deleted by a later run"
                if report.locked
                else ""
            ),
        )
    if failed:
        log("warning", f"{len(failed)} copy(ies) failed; the next run tries them again")
    return {"copied": copied, "dropped": dropped, "expired": expired, "failed": failed}


def _tier_job(app: Appliance, p: dict[str, Any], ctx: JobView) -> dict[str, Any]:
    until = next_window = None
    if p.get("cron") and p.get("window_hours"):
        # The window is found anew at each run: a run woken at the next slot gets that window.
        until, next_window, open_now = current_window(
            str(p["cron"]), float(p["window_hours"]), app.clock()
        )
        if not open_now:
            raise JobWaiting(
                "outside the tiering window; it goes on in the next one",
                wake_at=next_window,
                checkpoint=dict(ctx.checkpoint),
            )
    return run_tiering(
        app,
        log=ctx.log,
        progress=ctx.progress,
        cancel=ctx.cancel,
        until=until,
        next_window=next_window,
    )


def _tier_resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
    # One tiering run at a time; the store shared (GC must not free packs mid-copy).
    return [("tiering", True), ("store", False)]


def register_tiering_jobs() -> None:
    """Register the ``tier`` job kind (call once at service start-up, or from the CLI)."""
    register_job_kind(
        "tier",
        JobKind(_tier_job, _tier_resources, True, lambda p: "tiering run"),
    )
