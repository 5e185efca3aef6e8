"""Recovery plans run with real QEMU (TCG here): two test-guest VMs, each backed up from its own
copy of the guest image, booted in order; a test run through the ``plan_test`` job; the whole
plan's memory admission; a failed VM stopping the plan.

Missing QEMU fails (never skips) with the install step. Each boot is ~8-15 s under TCG on the
shared cores, so the module boots as few VMs as it can.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from engine_support import PASSPHRASE, StepClock, set_engine_env
from guest_support import PROOF, VM, guest_image_path

from appliance.engine import Appliance
from appliance.jobs import JobRunner
from image.boot_proof import png_file_is_blank
from image.failover import FailoverManager, InsufficientMemory, register_failover_jobs, run_plan
from image.failover.plan_rules import parse_plan_groups
from image.testguest import copy_sparse

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

ASSETS = ("dc", "app")
#: The guest's proof, with room for two VMs booting on two shared cores.
SLOW_PROOF = {**PROOF, "timeout": 240}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Appliance, FailoverManager]]:
    mp = pytest.MonkeyPatch()
    set_engine_env(mp)
    image = guest_image_path()
    base = tmp_path_factory.mktemp("plans")
    app, _ = Appliance.init(str(base / "app"), PASSPHRASE, clock=StepClock())
    for name in ASSETS:
        disk = str(base / f"{name}.raw")
        copy_sparse(image, disk)
        app.backup_image([disk], name, vm_spec={**VM, "name": name})
    manager = FailoverManager(app, accel="tcg")
    for name in ASSETS:
        manager.set_asset_settings(name, proof=SLOW_PROOF)
    yield app, manager
    manager.shutdown(grace=2)
    app.close()
    mp.undo()


def _plan(app: Appliance, name: str, groups: list[dict[str, Any]]) -> Any:
    kinds = {a.name: a.kind for a in app.catalog.list_assets()}
    return app.catalog.add_plan(name, parse_plan_groups(groups, kinds))


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_a_two_vm_plan_boots_in_order_the_second_after_the_first_proof(site: Any) -> None:
    app, manager = site
    plan = _plan(app, "in order", [{"vms": [{"asset": "dc"}]}, {"vms": [{"asset": "app"}]}])
    lines: list[str] = []
    result = run_plan(manager, plan, "failover", log=lambda level, line: lines.append(line))
    try:
        assert result["state"] == "succeeded", result
        dc, second = result["vms"]
        assert (dc["asset"], dc["group"], second["asset"], second["group"]) == ("dc", 1, "app", 2)
        assert dc["state"] == second["state"] == "proven"
        # The second group started only after the first VM's boot proof.
        assert _at(second["started_at"]) >= _at(dc["proven_at"])
        session = app.catalog.get_failover_session(second["session"])
        assert _at(session.details["boot_started_at"]) > _at(dc["proven_at"])
        # Every RTO counts from the plan's click; the plan's total is click to the last proof.
        click = _at(result["requested_at"])
        assert 0 < dc["rto_seconds"] < second["rto_seconds"]
        assert second["rto_seconds"] == pytest.approx(_at(second["proven_at"]) - click, abs=0.02)
        assert result["total_rto_seconds"] == pytest.approx(second["rto_seconds"], abs=0.02)
        # Each VM is an ordinary failover session, left running.
        for vm in result["vms"]:
            info = manager.get(vm["session"])
            assert info["state"] == "running" and info["details"]["purpose"] == "failover"
        assert "group 1 proven; starting group 2" in lines
        runs = app.catalog.list_plan_runs(plan.id)
        assert [(r.kind, r.state) for r in runs] == [("failover", "succeeded")]
        assert runs[0].result["total_rto_seconds"] == result["total_rto_seconds"]
    finally:
        for vm in result["vms"]:
            if vm["session"]:
                manager.stop(vm["session"], grace=5)
                manager.discard(vm["session"])


def test_a_delay_starts_the_next_group_without_waiting_for_the_proof(site: Any) -> None:
    app, manager = site
    groups = [
        {"vms": [{"asset": "dc"}], "after": "delay", "delay_seconds": 1},
        {"vms": [{"asset": "app"}]},
    ]
    result = run_plan(manager, _plan(app, "delayed", groups), "test")
    assert result["state"] == "succeeded", result
    dc, second = result["vms"]
    # app started a second after dc, long before dc's boot was proven (a boot takes seconds).
    assert _at(second["started_at"]) - _at(dc["started_at"]) >= 1.0
    assert _at(second["started_at"]) < _at(dc["proven_at"])
    assert result["total_rto_seconds"] == pytest.approx(
        max(_at(dc["proven_at"]), _at(second["proven_at"])) - _at(result["requested_at"]), abs=0.02
    )


def test_a_plan_that_does_not_fit_in_memory_boots_nothing(site: Any) -> None:
    app, manager = site
    plan = _plan(app, "too big", [{"vms": [{"asset": "dc"}]}, {"vms": [{"asset": "app"}]}])
    before = len(app.catalog.list_failover_sessions())
    # Enough for one VM (256 + 160 MiB) over the reserve, not for both.
    available = manager.memory_reserve_mib or 512
    available += 256 + 160 + 100
    with pytest.raises(InsufficientMemory) as caught:
        run_plan(manager, plan, "failover", available_mib=available)
    message = caught.value.message
    assert "the plan needs 832 MiB for its 2 VMs (dc 256 MiB, app 256 MiB" in message
    assert f"{available} MiB available" in message and "nothing was started" in message
    assert len(app.catalog.list_failover_sessions()) == before
    (run,) = app.catalog.list_plan_runs(plan.id)
    assert run.state == "failed" and run.result["error"] == message
    assert {vm["state"] for vm in run.result["vms"]} == {"not_started"}


def test_a_failed_vm_stops_the_plan_before_the_next_group(site: Any) -> None:
    app, manager = site
    manager.set_asset_settings("dc", proof={"serial": "NEVER-PRINTED", "timeout": 4})
    try:
        plan = _plan(app, "fails", [{"vms": [{"asset": "dc"}]}, {"vms": [{"asset": "app"}]}])
        result = run_plan(manager, plan, "failover")
    finally:
        manager.set_asset_settings("dc", proof=SLOW_PROOF)
    dc, second = result["vms"]
    assert result["state"] == "failed" and result["failed"] == "dc"
    assert dc["state"] == "failed" and dc["code"] == "boot_proof_failed"
    assert "NEVER-PRINTED" in dc["error"] and result["error"].startswith("dc failed:")
    assert second["state"] == "not_started" and second["session"] is None
    assert result["total_rto_seconds"] is None


def test_a_test_run_job_proves_screenshots_and_discards_every_vm(site: Any) -> None:
    app, manager = site
    plan = _plan(
        app,
        "nightly",
        [
            # A bridged network in the plan: a test run must never join it.
            {"vms": [{"asset": "dc", "network": {"mode": "bridged", "bridge": "br-prod"}}]},
            {"vms": [{"asset": "app"}]},
        ],
    )
    runner = JobRunner(app)
    register_failover_jobs(manager)
    runner.start()
    try:
        job = runner.submit("plan_test", {"plan": plan.id, "assets": plan.assets})
        done = runner.wait(job.id, timeout=600)
    finally:
        runner.shutdown()
    assert done.state == "succeeded", done.error
    result = done.result
    assert result["kind"] == "test" and result["total_rto_seconds"] > 0
    dc, second = result["vms"]
    assert _at(second["started_at"]) >= _at(dc["proven_at"])
    for vm in result["vms"]:
        assert vm["state"] == "proven" and vm["rto_seconds"] > 0
        assert os.path.isfile(vm["screenshot"]) and not png_file_is_blank(vm["screenshot"])
        session = app.catalog.get_failover_session(vm["session"])
        assert session.state == "stopped" and session.details["purpose"] == "boot_test"
        assert session.details["network"]["mode"] == "isolated"
        assert not os.path.exists(os.path.join(manager.state_dir, "sessions", vm["session"]))
    # The job's progress is per VM.
    assert done.progress["proven"] == 2 and done.progress["vms"] == 2
    assert done.progress["states"] == {"dc": "proven", "app": "proven"}
    (run,) = app.catalog.list_plan_runs(plan.id, kind="test")
    assert run.state == "succeeded" and run.job_id == job.id
    log = [line.message for line in app.catalog.job_log(job.id)]
    assert any(line.startswith("dc proven; RTO") for line in log)
    assert "test run: every VM shut down and discarded" in log
