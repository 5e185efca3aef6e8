"""USB rotation: the pure decisions with explicit times, and hands-off rotation for real.

The real part: each "USB disk" is a loop device of an image file (real block device, ext4,
mount, flush and unmount) whose record carries the udev identity of a real USB stick recorded
with the usb-storage driver (``tests/usb_support.py``); a pull is ``umount -l`` plus
``losetup -d``. The udev handler is called with the diffs discovery would hand it, and a real
:class:`JobRunner` runs the ``usb_export`` jobs it starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_support import PASSPHRASE, digest, new_appliance, run_cli, set_engine_env
from usb_support import (
    SLOW_EXPORT_CHILD,
    LoopDisk,
    data_files,
    file_tree,
    mounts_below,
    probed,
    unmount_below,
    until,
    usb_record,
)

from appliance.engine import Appliance
from appliance.errors import Conflict, InvalidInput, LocationUnavailable
from appliance.jobs import JobRunner
from hardware import usb_backend
from hardware.records import BlockDevice, DeviceDiff, Inventory
from hardware.rotation import (
    MediumState,
    RotationSet,
    check_label,
    insert_action,
    next_label,
    parse_sets,
    plan_export,
    rotation_status,
)
from hardware.usb import (
    configure_set,
    eject,
    initialise_medium,
    media_mountpoint,
    media_overview,
    medium_states,
    offered_disks,
    rotation_overview,
)
from hardware.usb_jobs import (
    EXPORT_KIND,
    export_to_medium,
    on_devices_changed,
    reconcile_media,
    register_usb_jobs,
)

START = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


# --- the pure decisions -----------------------------------------------------------------------


def _state(identity: str, label: str, state: str, written: datetime | None) -> MediumState:
    return MediumState(
        identity,
        label,
        "Offsite",
        f"loc-{identity}",
        state,
        initialised_at=START,
        last_written=written,
    )


def test_a_set_shows_which_disk_is_in_which_are_out_and_which_are_overdue() -> None:
    rotation = RotationSet("Offsite", ("a", "b", "c"), rotate_days=7)
    states = {
        "a": _state("a", "OFFSITE-A", "safe_to_remove", START + 20 * DAY),
        "b": _state("b", "OFFSITE-B", "out", START + 13 * DAY),
        "c": _state("c", "OFFSITE-C", "out", START + 3 * DAY),
    }
    status = rotation_status(rotation, states, START + 21 * DAY)
    assert status.present == ("OFFSITE-A",)
    assert status.away == ("OFFSITE-B", "OFFSITE-C")
    # C was written 18 days ago: 11 days past its week; B 8 days ago: 1 day late.
    assert status.overdue == ("OFFSITE-C", "OFFSITE-B")
    by_label = {m.label: m for m in status.media}
    assert (
        by_label["OFFSITE-C"].overdue_days == 11 and by_label["OFFSITE-C"].days_since_written == 18
    )
    assert by_label["OFFSITE-B"].overdue_days == 1
    assert by_label["OFFSITE-A"].overdue_days is None and by_label["OFFSITE-A"].present
    assert status.next_to_insert == "OFFSITE-C"
    # Exactly rotate_days is on time; a member never written counts from its initialisation.
    on_time = rotation_status(
        RotationSet("Offsite", ("b", "d")),
        {"b": states["b"], "d": _state("d", "OFFSITE-D", "out", None)},
        START + 20 * DAY,
    )
    assert [m.overdue_days for m in on_time.media] == [None, 13]
    assert on_time.next_to_insert == "OFFSITE-D"
    missing = rotation_status(RotationSet("X", ("zz",)), {}, START)
    assert missing.problems == ("member zz is not a known USB disk",)


def test_what_an_insert_does() -> None:
    out = _state("a", "OFFSITE-A", "out", None)
    assert insert_action(None, waiting_job=False, active_job=False)[0] == "offer"
    assert insert_action(out, waiting_job=False, active_job=False)[0] == "export"
    assert insert_action(out, waiting_job=True, active_job=False)[0] == "wake"
    assert insert_action(out, waiting_job=False, active_job=True)[0] == "nothing"
    # A repeated udev add: the disk was handled when it was first seen.
    for seen in ("in", "exporting", "safe_to_remove"):
        action, reason = insert_action(
            _state("a", "OFFSITE-A", seen, None), waiting_job=False, active_job=False
        )
        assert action == "nothing" and "seen plugged in already" in reason


@dataclass(frozen=True)
class _Point:
    id: str
    asset: str
    created_at: datetime
    status: str = "complete"


def test_an_export_takes_the_newest_points_of_the_chosen_assets_newest_first() -> None:
    points = [
        _Point("d1", "docs", START),
        _Point("d2", "docs", START + DAY),
        _Point("d3", "docs", START + 2 * DAY, status="partial"),
        _Point("m1", "mail", START + 3 * DAY),
        _Point("v1", "vm", START + 4 * DAY),
    ]
    every = plan_export(RotationSet("S"), points, verified_here=[])
    assert every.to_copy == ("v1", "m1", "d2")
    chosen = plan_export(
        RotationSet("S", assets=("docs", "mail"), keep_newest=2), points, verified_here=["m1"]
    )
    assert chosen.to_copy == ("d2", "d1") and chosen.present == ("m1",)


def test_sets_and_labels_are_checked() -> None:
    sets = parse_sets({"sets": [{"name": "Offsite", "members": ["u1"], "rotate_days": 14}]})
    assert sets == [RotationSet("Offsite", ("u1",), rotate_days=14)]
    for bad in (
        {"sets": [{"name": ""}]},
        {"sets": [{"name": "A", "rotate_days": 0}]},
        {"sets": [{"name": "A", "keep_newest": True}]},
        {"sets": [{"name": "A", "colour": "red"}]},
        {"sets": [{"name": "A"}, {"name": "a"}]},
        {"sets": [{"name": "A", "members": ["u"]}, {"name": "B", "members": ["u"]}]},
    ):
        with pytest.raises(InvalidInput):
            parse_sets(bad)
    assert next_label("Offsite", ["appl-offsite-1"]) == "appl-offsite-2"
    assert len(next_label("A very long set name", [])) <= 16
    assert check_label("OFFSITE-A") == "OFFSITE-A"
    for bad_label in ("", "seventeen-chars-x", "a b", "-x"):
        with pytest.raises(InvalidInput):
            check_label(bad_label)


# --- for real: loop devices with a recorded USB identity ----------------------------------------


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[Callable[[str], LoopDisk]]:
    """Loop-backed disks of this test; everything mounted below tmp_path is unmounted and
    every loop device of these images detached afterwards."""
    made: list[LoopDisk] = []

    def make(name: str) -> LoopDisk:
        disk = LoopDisk(tmp_path / f"{name}.img")
        made.append(disk)
        return disk

    try:
        yield make
    finally:
        unmount_below(tmp_path)
        for disk in made:
            disk.cleanup()
        assert not mounts_below(tmp_path)


def _inserted(app: Appliance, runner: JobRunner, record: BlockDevice) -> list[dict[str, Any]]:
    """What discovery hands the handler when the disk appears."""
    return on_devices_changed(
        app, runner, DeviceDiff(added=(record,)), Inventory(block={record.identity: record})
    )


def _pulled(app: Appliance, runner: JobRunner, record: BlockDevice) -> list[dict[str, Any]]:
    return on_devices_changed(app, runner, DeviceDiff(removed=(record,)), Inventory())


def _job_log(app: Appliance, job_id: str) -> list[str]:
    return [line.message for line in app.catalog.job_log(job_id)]


@pytest.mark.root
def test_insert_exports_by_itself_verifies_and_says_safe_to_remove_and_a_fresh_appliance_restores(
    tmp_path: Path, disks: Callable[[str], LoopDisk]
) -> None:
    register_usb_jobs()
    app, _ = new_appliance(tmp_path / "app")
    tree = file_tree(tmp_path / "tree", 8, 40_000)
    point = app.backup_files(str(tree), "docs").point.id
    disk = disks("offsite-a")
    blank = usb_record(disk.plug_in())
    assert blank.usb and blank.serial == "LABSTICK0001"
    assert blank.identity == "serial:QEMU_QEMU_HARDDISK_LABSTICK0001-0:0"

    medium = initialise_medium(app, blank, "OFFSITE-A", "Offsite")
    mountpoint = media_mountpoint(app.data_dir.path, medium.identity)
    assert medium.state == "safe_to_remove" and not os.path.ismount(mountpoint)
    record = probed(blank)
    assert (record.fs_uuid, record.fs_label, record.fs_type) == (
        medium.identity,
        "OFFSITE-A",
        "ext4",
    )
    location = app.find_location("OFFSITE-A")
    assert (location.kind, location.address, location.removable) == (
        "removable",
        medium.identity,
        True,
    )
    assert app.catalog.get_media(medium.identity).location_id == location.id
    with pytest.raises(Conflict, match="is USB disk OFFSITE-A already"):
        initialise_medium(app, record, "OFFSITE-B")

    disk.pull()  # taken away, then brought back on Friday
    runner = JobRunner(app, clock=lambda: START)
    runner.start()
    try:
        assert [a["action"] for a in _pulled(app, runner, record)] == ["out"]
        assert medium_states(app)[medium.identity].state == "out"
        with pytest.raises(LocationUnavailable, match="USB disk OFFSITE-A is not plugged in"):
            usb_backend.open_removable(medium.identity, mountpoint=mountpoint, label="OFFSITE-A")

        record = probed(usb_record(disk.plug_in()))
        first = _inserted(app, runner, record)
        assert [a["action"] for a in first] == ["export"]
        job_id = first[0]["jobs"][0]
        again = _inserted(app, runner, record)  # the same add event, delivered twice
        assert [a["action"] for a in again] == ["nothing"]
        done = runner.wait(job_id, 120)
        assert done.state == "succeeded", done.error
        assert [a["action"] for a in _inserted(app, runner, record)] == ["nothing"]
    finally:
        runner.shutdown()
    exports = [j for j in app.catalog.list_jobs(limit=1000) if j.kind == EXPORT_KIND]
    assert [j.id for j in exports] == [job_id]
    assert done.result["copied"][0]["point"] == point, done.result
    assert done.result["safe_to_remove"], _job_log(app, job_id)
    log = _job_log(app, job_id)
    assert "USB disk OFFSITE-A is safe to remove" in log, log
    copy = {c.location_id: c for c in app.catalog.copies_of(point)}[location.id]
    assert copy.state == "present" and copy.verified_at is not None
    assert not os.path.ismount(mountpoint)
    shown = {m["label"]: m for m in media_overview(app)}["OFFSITE-A"]
    assert shown["safe_to_remove"] and shown["points"] == 1 and shown["last_written"]
    sets = rotation_overview(app, now=START)
    assert sets[0]["name"] == "Offsite" and sets[0]["status"]["present"] == ["OFFSITE-A"]
    app.close()

    # A freshly installed appliance: the disk and the passphrase are all it has.
    fresh = tmp_path / "fresh"
    imported = json.loads(run_cli("--json", "usb", "import", record.devnode, data_dir=fresh).stdout)
    assert imported["seeded"] and imported["points_added"] == 1 and imported["label"] == "OFFSITE-A"
    assert not os.path.ismount(media_mountpoint(str(fresh), medium.identity))
    out = tmp_path / "restored"
    run_cli("restore", point, str(out), "--from", "OFFSITE-A", data_dir=fresh)
    assert digest(out / "f3.bin") == digest(tree / "f3.bin")
    listed = json.loads(run_cli("--json", "usb", "list", data_dir=fresh).stdout)
    assert [m["label"] for m in listed["media"]] == ["OFFSITE-A"]
    ejected = run_cli("usb", "eject", "OFFSITE-A", data_dir=fresh)
    assert b"safe to remove" in ejected.stdout
    assert not os.path.ismount(media_mountpoint(str(fresh), medium.identity))


@pytest.mark.root
def test_an_unknown_usb_disk_is_offered_and_never_touched(
    tmp_path: Path, disks: Callable[[str], LoopDisk]
) -> None:
    app, _ = new_appliance(tmp_path / "app")
    disk = disks("holiday-photos")
    devnode = disk.plug_in()
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "HOLIDAY", devnode], check=True)
    before = disk.digest()
    record = probed(usb_record(devnode, serial_suffix="-other"))
    runner = JobRunner(app, clock=lambda: START)
    try:
        actions = _inserted(app, runner, record)
        assert [a["action"] for a in actions] == ["offer"]
        assert [a["action"] for a in _inserted(app, runner, record)] == ["offer"]  # once listed
        offered = offered_disks(app)
        assert [(d["identity"], d["fs_label"]) for d in offered] == [(record.identity, "HOLIDAY")]
        assert not app.catalog.list_jobs(limit=10)
        assert not mounts_below(tmp_path) and disk.digest() == before
        on_devices_changed(app, runner, DeviceDiff(removed=(record,)), Inventory())
        assert offered_disks(app) == []
        # Refused as media while mounted somewhere: nothing is erased.
        where = tmp_path / "elsewhere"
        where.mkdir()
        subprocess.run(["mount", "-o", "ro", devnode, str(where)], check=True)
        try:
            with pytest.raises(Conflict, match="mounted at"):
                initialise_medium(app, record, "OFFSITE-X")
        finally:
            subprocess.run(["umount", str(where)], check=True)
        assert disk.digest() == before
        not_usb = BlockDevice(record.identity, devnode, "disk", record.size_bytes, bus="ata")
        with pytest.raises(Conflict, match="is not a USB disk"):
            initialise_medium(app, not_usb, "OFFSITE-X")
    finally:
        app.close()


@pytest.mark.root
def test_a_disk_pulled_mid_export_stays_consistent_and_the_next_insert_resumes_it(
    tmp_path: Path, disks: Callable[[str], LoopDisk], monkeypatch: pytest.MonkeyPatch
) -> None:
    register_usb_jobs()
    app, _ = new_appliance(tmp_path / "app", pack_size=256 << 10)
    big = app.backup_files(str(file_tree(tmp_path / "big", 12, 300_000)), "vm").point.id
    small = app.backup_files(str(file_tree(tmp_path / "small", 1, 20_000)), "docs").point.id
    disk = disks("offsite-a")
    medium = initialise_medium(app, usb_record(disk.plug_in()), "OFFSITE-A")
    mountpoint = media_mountpoint(app.data_dir.path, medium.identity)
    record = probed(usb_record(disk.devnode or ""))
    disk.pull()
    _pulled(app, JobRunner(app), record)

    # The disk's writes stop at the 4th data pack until the test has pulled the disk.
    reached, go_on = threading.Event(), threading.Event()
    puts = {"data": 0}
    original = usb_backend.RemovableDiskBackend.put

    def put(
        self: usb_backend.RemovableDiskBackend, name: str, data: Any, options: Any = None
    ) -> None:
        if name.startswith("data/"):
            puts["data"] += 1
            if puts["data"] >= 4 and not go_on.is_set():
                reached.set()
                go_on.wait(30)
        original(self, name, data, options)

    monkeypatch.setattr(usb_backend.RemovableDiskBackend, "put", put)
    runner = JobRunner(app, clock=lambda: START)
    runner.start()
    try:
        record = probed(usb_record(disk.plug_in()))
        job_id = _inserted(app, runner, record)[0]["jobs"][0]
        assert reached.wait(60), "the export never reached its 4th data pack"
        disk.pull(mountpoint)  # yanked out mid-write
        go_on.set()
        until(lambda: app.catalog.get_job(job_id).state == "waiting")
        _pulled(app, runner, record)
        waiting = app.catalog.get_job(job_id)
        assert waiting.wait_reason == "waiting for USB disk OFFSITE-A to be plugged in again"
        assert waiting.checkpoint["done"] == [small]  # the newest point went first, whole
        state = medium_states(app)[medium.identity]
        assert state.state == "out" and "pulled during an export" in (state.message or "")
        disk.wait_released()

        # The disk as it was left: the finished point is there whole; the half copy is no point.
        devnode = disk.plug_in()
        check = tmp_path / "check"
        check.mkdir()
        subprocess.run(["mount", "-o", "ro", devnode, str(check)], check=True)
        try:
            assert sorted(os.listdir(check / "store" / "manifests")) == [small]
            before = len(data_files(check / "store"))
        finally:
            subprocess.run(["umount", str(check)], check=True)
        assert before > 1
        assert app.verify_copy(small, "OFFSITE-A")["ok"]
        assert {c.location_id: c.state for c in app.catalog.copies_of(big)}[state.location_id] == (
            "copying"
        )

        actions = _inserted(app, runner, probed(usb_record(devnode)))
        assert [a["action"] for a in actions] == ["wake"] and actions[0]["jobs"] == [job_id]
        done = runner.wait(job_id, 120)
    finally:
        go_on.set()
        runner.shutdown()
    assert done.state == "succeeded", done.error
    resumed = {c["point"]: c for c in done.result["copied"]}
    assert list(resumed) == [big]  # the small point was not copied again
    assert (
        resumed[big]["packs_present"] > 0
        and resumed[big]["packs_copied"] < (resumed[big]["packs_needed"])
    )
    log = _job_log(app, job_id)
    assert any(line.startswith("USB disk OFFSITE-A was pulled during the export") for line in log)
    assert "resuming the export to USB disk OFFSITE-A" in log
    assert log.count("USB disk OFFSITE-A is safe to remove") == 1
    for point in (small, big):
        copy = {c.location_id: c for c in app.catalog.copies_of(point)}[state.location_id]
        assert copy.state == "present" and copy.verified_at is not None
    assert medium_states(app)[medium.identity].state == "safe_to_remove"
    assert not os.path.ismount(mountpoint)
    app.close()


@pytest.mark.root
@pytest.mark.slow
def test_an_export_killed_mid_copy_resumes_on_restart_and_loses_no_committed_point(
    tmp_path: Path, disks: Callable[[str], LoopDisk]
) -> None:
    register_usb_jobs()
    data_dir = tmp_path / "app"
    app, _ = new_appliance(data_dir, pack_size=256 << 10)
    docs = app.backup_files(str(file_tree(tmp_path / "docs", 2, 50_000)), "docs").point.id
    vm = app.backup_files(str(file_tree(tmp_path / "vm", 16, 300_000)), "vm").point.id
    disk = disks("offsite-a")
    medium = initialise_medium(app, usb_record(disk.plug_in()), "OFFSITE-A")
    store = Path(media_mountpoint(app.data_dir.path, medium.identity)) / "store"
    # Last week's export: the docs point, committed and verified.
    configure_set(app, "Offsite", assets=["docs"])
    export_to_medium(app, "OFFSITE-A", log=lambda level, message: None)
    configure_set(app, "Offsite", assets=[])
    app.close()

    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXPORT_CHILD, str(data_dir), PASSPHRASE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert child.stdout is not None
        job_id = child.stdout.readline().strip()
        assert job_id, child.stderr.read() if child.stderr else ""
        until(lambda: (store / "data").is_dir() and len(data_files(store)) >= 5, 60)
        os.killpg(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert sorted(os.listdir(store / "manifests")) == [docs]  # the vm point is not there yet

    app = Appliance.open(str(data_dir), passphrase=PASSPHRASE)
    runner = JobRunner(app)
    try:
        assert app.catalog.get_job(job_id).state == "running"  # as the crash left it
        assert runner.start() == [job_id]
        done = runner.wait(job_id, 120)
    finally:
        runner.shutdown()
    assert done.state == "succeeded", done.error
    resumed = {c["point"]: c for c in done.result["copied"]}
    assert list(resumed) == [vm] and resumed[vm]["packs_present"] > 0
    for point in (docs, vm):
        assert app.verify_copy(point, "OFFSITE-A")["ok"]
    assert medium_states(app)[medium.identity].state == "safe_to_remove"
    assert "USB disk OFFSITE-A is safe to remove" in _job_log(app, job_id)
    app.close()


@pytest.mark.root
def test_eject_flushes_and_unmounts_on_request(
    tmp_path: Path, disks: Callable[[str], LoopDisk]
) -> None:
    app, _ = new_appliance(tmp_path / "app")
    disk = disks("offsite-b")
    medium = initialise_medium(app, usb_record(disk.plug_in()), "OFFSITE-B", "Weekly")
    mountpoint = media_mountpoint(app.data_dir.path, medium.identity)
    backend = usb_backend.open_removable(medium.identity, mountpoint=mountpoint, label="OFFSITE-B")
    backend.get("location.json")  # mounted by the opening; a descriptor is cached
    assert os.path.ismount(mountpoint)
    state = eject(app, "OFFSITE-B")  # the cached descriptor does not keep it busy
    assert state.state == "safe_to_remove" and not os.path.ismount(mountpoint)
    with pytest.raises(LocationUnavailable, match="USB disk OFFSITE-B is not plugged in"):
        backend.get("location.json")
    assert [s["name"] for s in rotation_overview(app)] == ["Weekly"]

    # A rescan after missed events: the disk is found plugged in while it was thought away.
    record = probed(usb_record(disk.devnode or ""))
    runner = JobRunner(app, clock=lambda: START)
    assert [a["action"] for a in reconcile_media(app, runner, Inventory())] == ["out"]
    assert reconcile_media(app, runner, Inventory()) == []  # out already
    found = reconcile_media(app, runner, Inventory(block={record.identity: record}))
    assert [a["action"] for a in found] == ["export"]
    assert app.catalog.get_job(found[0]["jobs"][0]).state == "queued"
    assert os.path.ismount(mountpoint)  # mounted for the export (no runner runs it here)
    app.close()
