"""Running a recovery plan: its VMs failed over group by group, or test-booted and discarded.

:func:`run_plan` is the one work function (the ``plan_failover`` and ``plan_test`` jobs, the
tests). A run:

1. records itself in the catalog (``plan_runs``), with the click as ``requested_at``;
2. picks each VM's point (the plan's, else the manager's choice) and reads its memory from the
   point's VM definition, then admits the *whole* plan (:func:`~image.failover.plan_rules.
   check_plan_memory`): when the VMs do not all fit, it is refused with the numbers and nothing
   boots (a plan half booted for want of memory is worse than one that never started);
3. runs the groups in order. The VMs of a group start side by side, each an ordinary failover
   session (:meth:`FailoverManager.start`, whose RTO then also counts from the plan's click).
   After a group the next one waits for every VM's boot proof, or for the group's delay;
4. stops at the first VM that fails: groups not started stay unstarted, what already runs keeps
   running (a real failover must not undo the VMs that came up), and the result says which VM
   failed and why.

A test run boots every VM isolated whatever the plan says (``purpose: boot_test``), proves it,
keeps its proof screenshot, then shuts every VM down and discards its overlay. The result is
kept on the run either way: per VM the session, point, state, when its boot started and was
proven, its RTO and screenshot, and the plan's total RTO (click to the last proof).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from appliance.catalog.records_plans import PlanRecord
from appliance.errors import ApplianceError, InvalidInput, NotFound
from image.failover.admission import MEMORY_RESERVE_MIB, pick_point
from image.failover.errors import FailoverFailed, InsufficientMemory
from image.failover.manager import FailoverManager
from image.failover.plan_rules import check_plan_memory, network_for_test_run, plan_total_rto
from image.failover.records import epoch_iso
from image.qemu import mem_available_mib

LogFunction = Callable[[str, str], None]
#: How long a test run gives each VM to power down before it is stopped harder.
TEST_STOP_GRACE = 5.0


@dataclass
class VmRun:
    """One VM of a run, as the run goes (written to the run's result after each change)."""

    asset: str
    group: int
    point: str | None = None
    memory_mib: int = 0
    state: str = "waiting"  # waiting, booting, proven, failed, not_started
    session: str | None = None
    started_at: str | None = None
    proven_at: str | None = None
    rto_seconds: float | None = None
    error: str | None = None
    code: str | None = None
    screenshot: str | None = None


def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso).timestamp() if iso else None


class _Run:
    """The shared state of one run: its VMs, written to the catalog under a lock."""

    def __init__(
        self, manager: FailoverManager, plan: PlanRecord, kind: str, click: float, run_id: str
    ) -> None:
        self.manager = manager
        self.plan = plan
        self.kind = kind
        self.click = click
        self.run_id = run_id
        self.lock = threading.Lock()
        self.vms = [
            VmRun(str(vm["asset"]), number, vm.get("point"))
            for number, group in enumerate(plan.groups, start=1)
            for vm in group["vms"]
        ]
        self.error: str | None = None
        self.failed: str | None = None
        self.progress: Callable[[dict[str, Any]], None] | None = None

    def result(self, state: str = "running") -> dict[str, Any]:
        vms = [asdict(vm) for vm in self.vms]
        total = plan_total_rto(self.click, [_epoch(vm.proven_at) for vm in self.vms])
        return {
            "run": self.run_id,
            "plan": self.plan.id,
            "name": self.plan.name,
            "kind": self.kind,
            "state": state,
            "requested_at": epoch_iso(self.click),
            "vms": vms,
            "total_rto_seconds": total if state == "succeeded" else None,
            "failed": self.failed,
            "error": self.error,
        }

    def save(self, state: str | None = None) -> dict[str, Any]:
        with self.lock:
            result = self.result(state or "running")
        self.manager.app.catalog.update_plan_run(self.run_id, result=result, state=state)
        if self.progress is not None:
            states = {vm["asset"]: vm["state"] for vm in result["vms"]}
            proven = sum(1 for s in states.values() if s == "proven")
            self.progress(
                {"run": self.run_id, "proven": proven, "vms": len(states), "states": states}
            )
        return result

    def fail(self, vm: VmRun | None, message: str) -> None:
        with self.lock:
            if self.error is None:
                self.error = message
                self.failed = vm.asset if vm is not None else None


def _point_and_memory(manager: FailoverManager, vm: VmRun) -> None:
    """Fill in the VM's point (the manager's rule when the plan names none) and its memory."""
    app = manager.app
    if vm.point:
        record = app.catalog.get_point(vm.point)
        if record.asset != vm.asset or record.kind != "image":
            raise InvalidInput(f"point {record.id} is not a VM image point of {vm.asset}")
    else:
        chosen = pick_point(app.catalog.list_points(asset=vm.asset))
        if chosen is None:
            raise NotFound(
                f"{vm.asset} has no VM image recovery point to fail over to", asset=vm.asset
            )
        record = chosen
    repo = app.reader(record.id)
    try:
        spec = dict(repo.get_manifest(record.id).get("vm") or {})
    finally:
        if repo is not app.repo:
            repo.close()
    vm.point = record.id
    vm.memory_mib = int(spec.get("memory_mib", 512))


def _admit(run: _Run, available_mib: int | None) -> None:
    manager = run.manager
    reserve = (
        manager.memory_reserve_mib
        if manager.memory_reserve_mib is not None
        else int(manager.settings().get("memory_reserve_mib", MEMORY_RESERVE_MIB))
    )
    reason = check_plan_memory(
        [(vm.asset, vm.memory_mib) for vm in run.vms],
        mem_available_mib() if available_mib is None else available_mib,
        reserve,
        manager.committed_mib(),
    )
    if reason is not None:
        raise InsufficientMemory(
            f"cannot run plan {run.plan.name}: {reason}; nothing was started",
            plan=run.plan.id,
            memory_mib=sum(vm.memory_mib for vm in run.vms),
        )


def _boot(
    run: _Run,
    vm: VmRun,
    network: dict[str, Any] | None,
    log: LogFunction,
    cancel: threading.Event | None,
) -> None:
    """Fail one VM over (blocks until its proof or failure); never raises."""
    with run.lock:
        vm.state = "booting"
        vm.started_at = epoch_iso(time.time())
    run.save()
    log("info", f"group {vm.group}: starting {vm.asset} from point {vm.point}")
    try:
        record = run.manager.start(
            vm.asset,
            vm.point,
            network=network,
            purpose="boot_test" if run.kind == "test" else "failover",
            requested_at=run.click,
            cancel=cancel,
            log=lambda line: log("info", f"{vm.asset}: {line}"),
        )
    except Exception as exc:  # every failure of one VM is that VM's result, never the run's end
        message = exc.message if isinstance(exc, ApplianceError) else f"{type(exc).__name__}: {exc}"
        session = exc.details.get("session") if isinstance(exc, ApplianceError) else None
        with run.lock:
            vm.state = "failed"
            vm.error = message
            vm.code = exc.code if isinstance(exc, ApplianceError) else "failover_failed"
            vm.session = str(session) if session else None
        if vm.session:
            with contextlib.suppress(ApplianceError):
                vm.screenshot = run.manager.screenshot(vm.session)
        run.fail(vm, f"{vm.asset} failed: {message}")
        log("error", f"{vm.asset} failed: {message}")
    else:
        details = record.details
        with run.lock:
            vm.state = "proven"
            vm.session = record.id
            vm.proven_at = details.get("proven_at")
            vm.rto_seconds = details.get("rto_seconds")
            vm.screenshot = details.get("screenshot")
        log("info", f"{vm.asset} proven; RTO {vm.rto_seconds} s (session {record.id})")
    run.save()


def _networks(run: _Run) -> dict[str, dict[str, Any] | None]:
    """Each VM's network: the plan's (None: the asset's configured one); isolated in a test."""
    out: dict[str, dict[str, Any] | None] = {}
    for group in run.plan.groups:
        for vm in group["vms"]:
            network = vm.get("network")
            if run.kind == "test":
                configured = run.manager.asset_settings(vm["asset"]).get("network")
                network = network_for_test_run(network, configured)
            out[str(vm["asset"])] = network
    return out


def _run_groups(run: _Run, log: LogFunction, cancel: threading.Event | None) -> None:
    networks = _networks(run)
    threads: list[threading.Thread] = []
    for number, group in enumerate(run.plan.groups, start=1):
        if run.error is not None:
            break
        if cancel is not None and cancel.is_set():
            run.fail(None, "the plan was cancelled before group " + str(number))
            break
        members = [vm for vm in run.vms if vm.group == number]
        started = [
            threading.Thread(
                target=_boot,
                args=(run, vm, networks[vm.asset], log, cancel),
                name=f"plan-{run.plan.id}-{vm.asset}",
                daemon=True,
            )
            for vm in members
        ]
        for thread in started:
            thread.start()
        threads += started
        last = number == len(run.plan.groups)
        if group.get("after") == "delay" and not last:
            delay = int(group.get("delay_seconds") or 0)
            log("info", f"group {number} started; the next group starts in {delay} s")
            if cancel is not None:
                cancel.wait(delay)
            else:
                time.sleep(delay)
        else:
            for thread in started:
                thread.join()
            if not last and run.error is None:
                log("info", f"group {number} proven; starting group {number + 1}")
    for thread in threads:
        thread.join()
    with run.lock:
        for vm in run.vms:
            if vm.state == "waiting":
                vm.state = "not_started"


def _discard_test_sessions(run: _Run, log: LogFunction) -> None:
    """A test run leaves nothing running: every session it started is stopped and discarded."""
    for vm in run.vms:
        if not vm.session:
            continue
        try:
            run.manager.stop(vm.session, grace=TEST_STOP_GRACE)
            run.manager.discard(vm.session)
        except ApplianceError as exc:
            log("warning", f"{vm.asset}: could not discard session {vm.session}: {exc.message}")
    log("info", "test run: every VM shut down and discarded")


def run_plan(
    manager: FailoverManager,
    plan: PlanRecord,
    kind: str,
    *,
    requested_at: float | None = None,
    job_id: str | None = None,
    log: LogFunction | None = None,
    cancel: threading.Event | None = None,
    available_mib: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run ``plan`` (``kind``: "failover" or "test"); returns the run's result (also kept on
    the run in the catalog). ``requested_at`` (epoch seconds) is the click every RTO counts from;
    ``available_mib`` replaces the host's ``MemAvailable`` in the admission; ``progress`` is told
    each VM's state after every change (the job's progress).

    Raises InsufficientMemory (nothing started) when the whole plan does not fit, and the
    point's error when a VM has no point to boot; a VM that fails to boot is in the result
    (``state: failed``), not raised.
    """
    if kind not in ("failover", "test"):
        raise InvalidInput("a plan run is a failover or a test")
    say: LogFunction = log or (lambda level, message: None)
    click = requested_at or time.time()
    record = manager.app.catalog.add_plan_run(
        plan, kind, datetime.fromtimestamp(click, UTC), job_id=job_id
    )
    run = _Run(manager, plan, kind, click, record.id)
    run.progress = progress
    what = "test run" if kind == "test" else "failover"
    count = len(run.vms)
    say("info", f"{what} of plan {plan.name}: {count} VM{'s' if count != 1 else ''}")
    try:
        for vm in run.vms:
            _point_and_memory(manager, vm)
        _admit(run, available_mib)
    except ApplianceError as exc:
        run.fail(None, exc.message)
        with run.lock:
            for vm in run.vms:
                vm.state = "not_started"
        run.save("failed")
        say("error", exc.message)
        raise
    run.save()
    _run_groups(run, say, cancel)
    if kind == "test":
        _discard_test_sessions(run, say)
    state = "failed" if run.error is not None else "succeeded"
    result = run.save(state)
    if state == "succeeded":
        say("info", f"plan {plan.name}: every VM proven; total RTO {result['total_rto_seconds']} s")
    return result


def run_plan_job(
    manager: FailoverManager,
    params: dict[str, Any],
    *,
    kind: str,
    requested_at: float,
    job_id: str,
    log: LogFunction,
    cancel: threading.Event | None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """The ``plan_failover`` / ``plan_test`` job: :func:`run_plan`; a run with a failed VM
    fails the job (the run's result stays in the catalog)."""
    plan = manager.app.catalog.get_plan(str(params.get("plan") or ""))
    result = run_plan(
        manager,
        plan,
        kind,
        requested_at=requested_at,
        job_id=job_id,
        log=log,
        cancel=cancel,
        progress=progress,
    )
    if result["state"] != "succeeded":
        raise FailoverFailed(
            f"plan {plan.name}: {result['error']}", run=result["run"], failed=result["failed"]
        )
    return result


def plan_failover_resources(params: dict[str, Any]) -> list[tuple[str, bool]]:
    """A failover of a plan holds the plan exclusively (one run of a plan at a time) and the
    store shared; never an asset: a failover must not wait for a backup of a VM it recovers."""
    if not params.get("plan"):
        raise InvalidInput("name the recovery plan to run")
    return [(f"plan:{params['plan']}", True), ("store", False)]


def plan_test_resources(params: dict[str, Any]) -> list[tuple[str, bool]]:
    """A test run also holds each of its VMs (``params["assets"]``) exclusively, as a boot
    test does, so it waits for their queued backups and tests the points they make."""
    assets = sorted({str(a) for a in params.get("assets") or []})
    held = plan_failover_resources(params)
    return [held[0], *[(f"asset:{a}", True) for a in assets], held[1]]
