"""Failover end to end with real QEMU (TCG here): the busybox test guest, backed up, booted from
the store, proven, migrated off, failed back; and the faults a failover must report clearly.

One guest image is built per session (cached by content hash) and one appliance per module holds
its backup; tests that damage a store work on a copy. Missing QEMU fails (never skips) with the
install step. Every boot is ~8-12 s under TCG, so the module boots as few times as it can.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from engine_support import PASSPHRASE, StepClock, set_engine_env, store_digest
from guest_support import PROOF, VM, failover_jobs, fetch, guest_image_path
from loop_support import mounted_disk

from appliance.backup.images import read_table
from appliance.boot_verification import boot_test_result
from appliance.catalog.records import home_location_id
from appliance.engine import Appliance
from appliance.errors import Conflict, InvalidInput, LockHeld
from appliance.jobs import JobRunner
from appliance.store.packs import pack_object_name
from image.boot_proof import png_file_is_blank
from image.failover import (
    BootProofFailed,
    FailoverFailed,
    FailoverManager,
    InsufficientMemory,
    PointNotLocal,
    changed_ranges_from_map,
    register_failover_jobs,
)
from image.qemu import choose_accelerator, load_accelerator, overlay_map_argv, run_tool
from image.testguest import HEALTH_TEXT, MARKER, copy_sparse

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

ASSET = "web"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    set_engine_env(monkeypatch)


@pytest.fixture(scope="session")
def guest_image() -> str:
    return guest_image_path()


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture(scope="module")
def protected(guest_image, tmp_path_factory):
    """A data dir whose asset ``web`` has one backup of the test guest's disk."""
    mp = pytest.MonkeyPatch()
    set_engine_env(mp)
    base = tmp_path_factory.mktemp("fo")
    disk = str(base / "web.raw")
    copy_sparse(guest_image, disk)
    app, _ = Appliance.init(str(base / "app"), PASSPHRASE, clock=StepClock())
    point = app.backup_image([disk], ASSET, vm_spec=VM).point
    app.close()
    yield {"base": base, "disk": disk, "point": point.id, "image": guest_image}
    mp.undo()


@pytest.fixture(scope="module")
def appliance(protected):
    mp = pytest.MonkeyPatch()
    set_engine_env(mp)
    app = Appliance.open(str(protected["base"] / "app"), passphrase=PASSPHRASE, clock=StepClock())
    with failover_jobs(app) as (manager, runner):
        yield app, manager, runner
    app.close()
    mp.undo()


def wait_job(runner, job_id: str, timeout: float = 180):
    job = runner.wait(job_id, timeout=timeout)
    assert job.state == "succeeded", (job.state, job.error)
    return job.result


def test_failover_migrate_and_failback_through_jobs(appliance, protected, tmp_path):
    app, manager, runner = appliance
    store = app.data_dir.store_path
    before = store_digest(store)

    job = runner.submit("failover_start", {"asset": ASSET, "proof": PROOF})
    result = wait_job(runner, job.id)
    session = result["session"]
    assert result["point"] == protected["point"] and result["accel"] == "tcg"
    info = manager.get(session)
    details = info["details"]
    assert info["state"] == "running" and info["live"]
    assert 0 < details["boot_seconds"] <= details["rto_seconds"] < 120
    # The proof: the marker on the serial console, the health page through the port forward.
    assert MARKER in manager.serial_log(session)
    port = result["ports"]["80"]
    assert fetch(port).startswith(f"{HEALTH_TEXT} boots=")
    # A non-blank PNG screenshot of the console.
    shot = result["screenshot"]
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not png_file_is_blank(shot)
    # Only part of the disk was read from the store to boot.
    stats = details["export_stats"]
    assert 0 < stats["bytes_served"] < os.path.getsize(protected["disk"]) // 4

    # A second failover of the same VM is refused while the first runs.
    with pytest.raises(Conflict, match="already failed over"):
        manager.start(ASSET, proof=PROOF)
    conflicting = runner.wait(runner.submit("failover_start", {"asset": ASSET}).id, timeout=60)
    assert conflicting.state == "failed" and conflicting.error["code"] == "conflict"

    # The guest's writes landed in the overlay, never in the store.
    overlay = os.path.join(manager.state_dir, "sessions", session, "web.qcow2")
    written = changed_ranges_from_map(run_tool(overlay_map_argv(overlay, force_share=True), "map"))
    assert written, "the guest wrote nothing to its overlay"
    assert store_digest(store) == before

    # Migrate off the backup: the exports stop and the VM keeps serving.
    moved = wait_job(runner, runner.submit("failover_migrate", {"session": session}).id)
    local = moved["local_disks"]["web"]
    assert os.path.isfile(local)
    assert not os.path.exists(overlay)
    assert manager.get(session)["details"]["storage"] == "local"
    assert all(d.export is None for d in manager.session(session).disks)
    time.sleep(1)
    assert fetch(port).startswith(HEALTH_TEXT)
    assert manager.screenshot(session) is not None

    # Fail back: a new point of the running state, and a byte-identical new image file.
    target = str(tmp_path / "back.raw")
    back = wait_job(
        runner,
        runner.submit("failover_failback", {"session": session, "write_to": target}).id,
    )
    assert manager.get(session)["state"] == "stopped"
    assert back["written"] == [target]
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", target, local],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    new_point = back["point"]
    assert new_point != protected["point"]
    assert 0 < back["stats"]["changed_chunks"] < 64  # only what the guest touched was stored
    restored = str(tmp_path / "restored.raw")
    app.restore(new_point, restored)
    assert sha256(restored) == sha256(target)
    assert app.manifest(new_point)["vm"]["memory_mib"] == 256

    stopped = wait_job(
        runner, runner.submit("failover_stop", {"session": session, "discard": True}).id
    )
    assert stopped["state"] == "stopped"
    assert not os.path.exists(os.path.join(manager.state_dir, "sessions", session))


def test_failback_from_the_overlay_reads_only_what_the_guest_wrote(appliance, protected, tmp_path):
    app, manager, _ = appliance
    original = protected["disk"]
    latest = app.catalog.latest_point(ASSET, kind="image")
    record = manager.start(ASSET, latest.id, proof=PROOF)
    assert record.state == "running"
    stopped = manager.stop(record.id)
    assert stopped.state == "stopped" and stopped.details["stopped_by"] == "powered off"
    # "Original" is a disk the asset registers, never just a path a manifest names: with the
    # asset pointing elsewhere, the recorded path is not written.
    asset = app.catalog.get_asset(ASSET)
    app.catalog.update_asset(ASSET, str(tmp_path / "elsewhere.raw"), asset.description)
    before = sha256(original)
    with pytest.raises(InvalidInput, match="registered disk paths"):
        manager.failback(record.id, write_to="original")
    assert sha256(original) == before
    app.catalog.update_asset(ASSET, asset.source, asset.description)
    result = manager.failback(record.id, write_to="original")
    assert result["read_only_changes"] is True
    assert result["stats"]["bytes_read"] <= 2 * 1024 * 1024
    assert result["written"] == [original]
    restored = str(tmp_path / "restored.raw")
    app.restore(result["point"], restored)
    assert sha256(restored) == sha256(original)
    # The written-back disk is the guest-visible state of the overlay chain, byte for byte.
    overlay = os.path.join(manager.state_dir, "sessions", record.id, "web.qcow2")
    session = manager.session(record.id)
    session.start_exports()
    try:
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", original, overlay],
            capture_output=True,
            text=True,
        )
    finally:
        session.stop_exports()
    assert compare.returncode == 0, compare.stdout + compare.stderr
    manager.discard(record.id)


def test_qemu_dying_mid_boot_fails_the_session(appliance):
    app, manager, _ = appliance
    outcome: dict = {}

    def run():
        try:
            manager.start(ASSET, proof=PROOF)
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    pid = None
    while pid is None and time.monotonic() < deadline:
        sessions = app.catalog.list_failover_sessions(ASSET, states=frozenset({"booting"}))
        if sessions and sessions[0].details.get("pid"):
            pid = sessions[0].details["pid"]
        time.sleep(0.05)
    assert pid is not None
    time.sleep(1.0)
    os.kill(pid, 9)
    thread.join(60)
    error = outcome["error"]
    assert isinstance(error, FailoverFailed)
    assert "QEMU exited with status -9 while the VM was booting" in error.message
    record = app.catalog.get_failover_session(error.details["session"])
    assert record.state == "failed" and "QEMU exited" in record.details["error"]


def test_a_proof_that_never_passes_fails_naming_the_check_and_keeps_a_screenshot(appliance):
    app, manager, _ = appliance
    proof = {"serial": "THIS-LINE-NEVER-APPEARS", "timeout": 5}
    with pytest.raises(BootProofFailed) as info:
        manager.start(ASSET, proof=proof)
    message = info.value.message
    assert message.startswith("boot proof failed after 5 s: serial console never printed")
    assert "THIS-LINE-NEVER-APPEARS" in message
    assert info.value.details["failed_checks"] == ["serial"]
    record = app.catalog.get_failover_session(info.value.details["session"])
    assert record.state == "failed"
    # Recorded with the session, so its readers need not parse the message.
    assert record.details["failed_checks"] == ["serial"]
    assert boot_test_result(record).failed_checks == ("serial",)
    shot = record.details["screenshot"]
    assert shot and os.path.isfile(shot)
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _copy(protected, tmp_path: Path) -> Appliance:
    shutil.copytree(
        protected["base"] / "app", tmp_path / "app", ignore=shutil.ignore_patterns("failover")
    )
    return Appliance.open(str(tmp_path / "app"), passphrase=PASSPHRASE)


def test_a_corrupt_pack_fails_the_boot_naming_the_point(protected, tmp_path):
    app = _copy(protected, tmp_path)
    try:
        manifest = app.manifest(protected["point"])
        table = read_table(app.repo, manifest["disks"][0])
        entry = app.repo.locate(table[0])  # the MBR: the first thing the BIOS reads
        path = app.repo.backend.path(pack_object_name(entry.pack, entry.pack_kind))
        with open(path, "r+b") as f:
            f.seek(entry.offset + entry.length // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        manager = FailoverManager(app, accel="tcg")
        with pytest.raises(FailoverFailed) as info:
            manager.start(ASSET, protected["point"], proof=PROOF)
        assert info.value.message.startswith(f"point {protected['point']} damaged: blob ")
        assert entry.pack.hex()[:16] in info.value.message
        record = app.catalog.get_failover_session(info.value.details["session"])
        assert record.state == "failed" and "damaged" in record.details["error"]
        manager.shutdown()
    finally:
        app.close()


def test_a_point_not_in_the_local_store_says_what_to_do_first(protected, tmp_path):
    app = _copy(protected, tmp_path)
    try:
        manifest = app.manifest(protected["point"])
        entry = app.repo.locate(read_table(app.repo, manifest["disks"][0])[0])
        os.unlink(app.repo.backend.path(pack_object_name(entry.pack, entry.pack_kind)))
        manager = FailoverManager(app, accel="tcg")
        before = len(app.catalog.list_failover_sessions(ASSET))
        with pytest.raises(PointNotLocal, match=r"cannot be read from any copy online.*recall"):
            manager.start(ASSET, protected["point"], proof=PROOF)
        assert len(app.catalog.list_failover_sessions(ASSET)) == before  # nothing was started
        manager.shutdown()
    finally:
        app.close()


def test_one_manager_per_data_directory(appliance):
    app, manager, _ = appliance
    with pytest.raises(LockHeld, match="another failover manager"):
        FailoverManager(app, state_dir=manager.state_dir)


def test_not_enough_memory_is_refused_before_booting(appliance):
    app, manager, _ = appliance
    before = len(app.catalog.list_failover_sessions(ASSET))
    with pytest.raises(InsufficientMemory, match="the VM needs 4194304 MiB"):
        manager.start(ASSET, proof=PROOF, memory_mib=4 * 1024 * 1024)
    assert len(app.catalog.list_failover_sessions(ASSET)) == before


def test_scheduled_boot_test_records_rto_and_screenshot_and_discards(appliance):
    _, manager, runner = appliance
    manager.set_asset_settings(ASSET, proof=PROOF)
    result = wait_job(runner, runner.submit("boot_test", {"asset": ASSET}).id)
    assert result["ok"] and result["rto_seconds"] > 0
    assert os.path.isfile(result["screenshot"]) and not png_file_is_blank(result["screenshot"])
    last = manager.last_boot_test(ASSET)
    assert last is not None and last["id"] == result["session"]
    assert last["details"]["purpose"] == "boot_test" and last["state"] == "stopped"
    assert last["details"]["rto_seconds"] == result["rto_seconds"]
    assert not os.path.exists(os.path.join(manager.state_dir, "sessions", result["session"]))


def test_accelerator_choice_is_made_once_and_remembered(tmp_path, guest_image):
    started = time.monotonic()
    choice = choose_accelerator(str(tmp_path), guest_image=guest_image, timeout=25)
    assert choice.accel in ("kvm", "tcg") and choice.reason
    assert load_accelerator(str(tmp_path)) == choice
    again = time.monotonic()
    assert choose_accelerator(str(tmp_path), guest_image=guest_image) == choice
    assert time.monotonic() - again < time.monotonic() - started


@pytest.mark.root
def test_a_pack_the_home_pool_lost_is_read_from_the_second_location(protected, tmp_path):
    """The point is copied to a location on a real loop-mounted ext4; the home pool loses the
    pack of the disk's first chunk (what the BIOS reads first). The failover falls back to the
    second location, boots and proves the boot, and the job log names the location it read."""
    app = _copy(protected, tmp_path)
    with mounted_disk(tmp_path / "second.img", tmp_path / "second", 128 << 20):
        manager = FailoverManager(app, accel="tcg")
        runner = JobRunner(app)
        register_failover_jobs(manager)
        runner.start()
        try:
            app.add_location(str(tmp_path / "second"), label="second", require_mount=True)
            copied = app.copy_point(protected["point"], "second")
            assert copied["packs_copied"] > 0
            assert app.verify(protected["point"]).ok  # the home copy now comes first
            manifest = app.manifest(protected["point"])
            entry = app.repo.locate(read_table(app.repo, manifest["disks"][0])[0])
            os.unlink(app.repo.backend.path(pack_object_name(entry.pack, entry.pack_kind)))

            job = runner.submit("failover_start", {"asset": ASSET, "proof": PROOF})
            result = wait_job(runner, job.id)
            assert result["read_from"] == "second"
            lines = [line.message for line in app.catalog.job_log(job.id)]
            home = app.catalog.get_location(home_location_id(app.repo.store_id)).label
            assert any(
                line.startswith(f"reading from {home} failed") and "reading from second" in line
                for line in lines
            ), lines
            assert f"reading point {protected['point']} from location second" in lines
            session = app.catalog.get_failover_session(result["session"])
            assert session.details["read_from"] == "second"
            assert fetch(result["ports"]["80"]).startswith(f"{HEALTH_TEXT} boots=")
            wait_job(runner, runner.submit("failover_stop", {"session": result["session"]}).id)
        finally:
            runner.shutdown()
            manager.shutdown(grace=2)
            app.close()
