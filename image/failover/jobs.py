"""The failover job kinds, and :func:`register_failover_jobs` binding them to a manager.

Starting, stopping, migrating and failing back run as jobs (so the API returns a job id and the
work runs in a worker that can be cancelled). What each job holds while it runs:

- ``failover_start``: the store, shared; never the asset: a failover must not wait for a backup of
  the VM it recovers.
- ``failover_stop`` / ``failover_migrate``: ``failover:<session>``, exclusively;
  ``failover_failback`` also the store, shared.
- ``boot_test``: its asset exclusively (:func:`boot_test_resources`), and the store, shared.

A job's creation time is the click the RTO counts from.

One process may run several appliances (a peer that took over a source's replica store runs one
per store, each with its own job runner and manager), while job kinds are registered once, by
name. So the work functions do not close over a manager: each finds the manager bound to the
``app`` its runner gives it (:func:`bind_failover_manager`), falling back to the one
:func:`register_failover_jobs` was given last.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from appliance.engine import Appliance
from appliance.errors import ApplianceError, InvalidInput
from appliance.jobs import JobContext, JobKind, register_job_kind
from image.failover.errors import BootProofFailed
from image.failover.manager import FailoverManager
from image.failover.plans import plan_failover_resources, plan_test_resources, run_plan_job


def _requested_at(app: Appliance, ctx: JobContext) -> float:
    try:
        return app.catalog.get_job(ctx.job_id).created_at.timestamp()
    except ApplianceError:
        return time.time()


def boot_test_resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
    """A boot test holds its asset exclusively, as backups of it do (``asset:<name>``).

    So a boot test queued with (after) a backup of the same VM waits for it and tests the point
    it made, and a backup queued while a test boots waits for the test. Boot tests of different
    assets share only the store and run side by side. ``failover_start`` does not take the
    asset: the resource is held for the job (boot, proof, shutdown, discard), never for the life
    of a failed-over VM, and a failover never waits for a backup or a boot test.
    """
    if not p.get("asset"):
        raise InvalidInput("name the VM asset to boot-test")
    return [(f"asset:{p['asset']}", True), ("store", False)]


def _plan_described(what: str) -> Callable[[dict[str, Any]], str]:
    return lambda p: f"{what} of recovery plan {p.get('name') or p.get('plan')}"


# Keyed by the appliance's id, holding the manager weakly: the service or take-over that made a
# manager keeps it alive, and a lookup checks ``manager.app is app`` (an id may be reused).
_bound: weakref.WeakValueDictionary[int, FailoverManager] = weakref.WeakValueDictionary()
_bound_lock = threading.Lock()
_default: list[FailoverManager] = []


def bind_failover_manager(manager: FailoverManager) -> None:
    """Let the failover job kinds run on ``manager.app`` with ``manager``."""
    with _bound_lock:
        _bound[id(manager.app)] = manager


def unbind_failover_manager(manager: FailoverManager) -> None:
    with _bound_lock:
        if _bound.get(id(manager.app)) is manager:
            del _bound[id(manager.app)]


def manager_for(app: Appliance) -> FailoverManager:
    """The manager of ``app``: the one bound to it, else the one registered last."""
    with _bound_lock:
        manager = _bound.get(id(app))
        if manager is None or manager.app is not app:
            manager = _default[0] if _default else None
    if manager is None:
        raise InvalidInput("no failover manager runs in this process")
    return manager


def register_failover_jobs(manager: FailoverManager) -> None:
    """Register the failover job kinds, bound to ``manager`` (call once at service start-up).

    - ``failover_start`` {asset, point?, location?, network?, proof?, accel?}: export (from the
      point's best copy, ``location`` first), boot, prove.
    - ``failover_stop`` {session, discard?}: power down (then quit, then kill).
    - ``failover_migrate`` {session, target_dir?}: mirror the disks to local storage and pivot.
    - ``failover_failback`` {session, new_point?=true, write_to?: "original"|path, format?}.
    - ``boot_test`` {asset, point?, location?, proof?}: isolated boot, RTO and screenshot, then discard.
    - ``plan_failover`` / ``plan_test`` {plan, name?, assets}: a recovery plan's run
      (:mod:`image.failover.plans`).

    ``manager`` is bound to its appliance and becomes the fallback of appliances bound to none.
    """
    bind_failover_manager(manager)
    with _bound_lock:
        _default[:] = [manager]

    def start(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        manager = manager_for(app)
        ctx.log(
            "info",
            f"failing over {p['asset']}" + (f" to point {p['point']}" if p.get("point") else ""),
        )
        record = manager.start(
            p["asset"],
            p.get("point"),
            network=p.get("network"),
            proof=p.get("proof"),
            accel=p.get("accel"),
            requested_at=_requested_at(app, ctx),
            cancel=ctx.cancel,
            progress=ctx.progress,
            location=p.get("location"),
            log=lambda line: ctx.log("info", line),
        )
        details = record.details
        ctx.log("info", f"session {record.id} booted; RTO {details.get('rto_seconds')} s")
        return {
            "session": record.id,
            "point": record.point_id,
            "state": record.state,
            "rto_seconds": details.get("rto_seconds"),
            "screenshot": details.get("screenshot"),
            "ports": details.get("ports"),
            "accel": details.get("accel"),
            "read_from": details.get("read_from"),
        }

    def stop(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        manager = manager_for(app)
        record = manager.stop(p["session"])
        if p.get("discard"):
            record = manager.discard(p["session"])
        ctx.log("info", f"session {record.id} {record.state} ({record.details.get('stopped_by')})")
        return {"session": record.id, "state": record.state}

    def migrate(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        manager = manager_for(app)
        record = manager.migrate(
            p["session"], p.get("target_dir"), progress=ctx.progress, cancel=ctx.cancel
        )
        ctx.log("info", f"session {record.id} now runs on local storage")
        return {"session": record.id, "local_disks": record.details.get("local_disks")}

    def failback(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        manager = manager_for(app)
        result = manager.failback(
            p["session"],
            new_point=bool(p.get("new_point", True)),
            write_to=p.get("write_to"),
            target_format=p.get("format", "raw"),
            progress=ctx.progress,
            cancel=ctx.cancel,
        )
        if result.get("point"):
            ctx.log("info", f"failback recorded point {result['point']}")
        for target in result.get("written", []):
            ctx.log("info", f"wrote {target}")
        return result

    def boot_test(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        manager = manager_for(app)
        result = manager.boot_test(
            p["asset"],
            p.get("point"),
            proof=p.get("proof"),
            accel=p.get("accel"),
            requested_at=_requested_at(app, ctx),
            cancel=ctx.cancel,
            progress=ctx.progress,
            location=p.get("location"),
            log=lambda line: ctx.log("info", line),
        )
        if result["ok"]:
            ctx.log("info", f"{p['asset']} booted in {result['rto_seconds']} s")
        else:
            ctx.log("error", f"boot test of {p['asset']} failed: {result['error']}")
            raise BootProofFailed(
                result["error"],
                session=result.get("session"),
                failed_checks=result.get("failed_checks") or [],
            )
        return result

    def store_shared(p: dict[str, Any]) -> list[tuple[str, bool]]:
        if not p.get("asset"):
            raise InvalidInput("name the VM asset to fail over")
        # Not the asset: a failover must not wait for a backup of the VM it recovers.
        return [("store", False)]

    def per_session(p: dict[str, Any]) -> list[tuple[str, bool]]:
        if not p.get("session"):
            raise InvalidInput("name the failover session")
        return [(f"failover:{p['session']}", True)]

    def failback_resources(p: dict[str, Any]) -> list[tuple[str, bool]]:
        return [*per_session(p), ("store", False)]

    register_job_kind(
        "failover_start",
        JobKind(start, store_shared, False, lambda p: f"failover of {p.get('asset')}"),
    )
    register_job_kind(
        "failover_stop",
        JobKind(stop, per_session, False, lambda p: f"stop of failover {p.get('session')}"),
    )
    register_job_kind(
        "failover_migrate",
        JobKind(migrate, per_session, False, lambda p: f"migration of failover {p.get('session')}"),
    )
    register_job_kind(
        "failover_failback",
        JobKind(
            failback,
            failback_resources,
            False,
            lambda p: f"failback of failover {p.get('session')}",
        ),
    )
    register_job_kind(
        "boot_test",
        JobKind(boot_test, boot_test_resources, True, lambda p: f"boot test of {p.get('asset')}"),
    )

    def plan_run(kind: str) -> Callable[[Appliance, dict[str, Any], JobContext], dict[str, Any]]:
        def work(app: Appliance, p: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
            return run_plan_job(
                manager_for(app),
                p,
                kind=kind,
                requested_at=_requested_at(app, ctx),
                job_id=ctx.job_id,
                log=ctx.log,
                cancel=ctx.cancel,
                progress=ctx.progress,
            )

        return work

    register_job_kind(
        "plan_failover",
        JobKind(plan_run("failover"), plan_failover_resources, False, _plan_described("failover")),
    )
    register_job_kind(
        "plan_test",
        JobKind(plan_run("test"), plan_test_resources, True, _plan_described("test run")),
    )
