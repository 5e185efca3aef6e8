"""Disk pools on real loop devices.

Real parts: loop devices, mkfs.ext4/xfs/btrfs, mounts by UUID, btrfs raid1 with one disk
detached (degraded mount), a mirror corrupted behind btrfs's back and repaired by a scrub,
``btrfs replace`` onto a new disk, a pool filled to its reserve, an import on a fresh data
directory, and a creation killed with SIGKILL at two points. Every loop device a test attaches
is detached by the ``disks`` fixture (only those: found by their backing files), and every
mount under the test's folder is unmounted, even when the test fails.

The pure decisions behind them are tested in tests/test_hw_pool_decisions.py.
"""

from __future__ import annotations

import inspect
import json
import mmap
import multiprocessing
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import test_backend_conformance as conformance
from alembic import command
from alembic.config import Config
from engine_support import (
    PASSPHRASE,
    compare_trees,
    new_appliance,
    run_cli,
    set_engine_env,
    snapshot,
)
from sqlalchemy import create_engine, text
from sqlalchemy import inspect as inspect_schema

from appliance.catalog import Catalog
from appliance.catalog.catalog import MIGRATIONS_DIR
from appliance.engine import Appliance
from appliance.errors import Conflict, InvalidInput, LocationUnavailable, NotFound, StoreFull
from appliance.jobs import JobRunner
from appliance.locations import work as locations_work
from appliance.maintenance import verify_point
from appliance.restore import restore_tree
from appliance.space import reserve_bytes
from appliance.store.backend import Backend
from appliance.store.registry import open_backend
from hardware import btrfs
from hardware import pools as pools_module
from hardware.cli import describe_block_device
from hardware.pool_backend import (
    BlockPoolBackend,
    mount_pool_filesystem,
    pool_status,
)
from hardware.pool_jobs import (
    device_params,
    pool_tick,
    register_pool_jobs,
    replace_disk,
    scrub_pool,
)
from hardware.pools import (
    create_pool,
    find_importable,
    import_pool,
    mount_pools,
    pool_label,
    unmount_pool,
)
from hardware.records import BlockDevice, Inventory

FIXTURES = Path(__file__).parent / "fixtures" / "btrfs"
MIB = 1 << 20
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- real disks ----------------------------------------------------------------------------------


class Disks:
    """Loop-backed disk files in one folder; the fixture detaches exactly their devices."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(exist_ok=True)
        self.files: list[Path] = []

    def make(self, size: int = 320 * MIB) -> BlockDevice:
        path = self.folder / f"disk{len(self.files)}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        self.files.append(path)
        return self.attach(path)

    def attach(self, path: Path) -> BlockDevice:
        devnode = subprocess.run(
            ["losetup", "--find", "--show", str(path)], check=True, capture_output=True, text=True
        ).stdout.strip()
        device = describe_block_device(devnode)
        assert device.identity == f"loop:{path}"
        return device

    def devices_of(self, path: Path) -> list[str]:
        out = subprocess.run(
            ["losetup", "-j", str(path)], capture_output=True, text=True, check=False
        ).stdout
        return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]

    def detach(self, device: BlockDevice) -> None:
        subprocess.run(["losetup", "-d", device.devnode], check=True)

    def cleanup(self, root: Path) -> None:
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            target = line.split()[1].replace("\\040", " ")
            inside = target.startswith(str(root) + "/")
            if inside and subprocess.run(["umount", target], capture_output=True).returncode:
                subprocess.run(["umount", "-l", target], capture_output=True)
        for path in self.files:
            for devnode in self.devices_of(path):
                subprocess.run(
                    ["btrfs", "device", "scan", "--forget", devnode], capture_output=True
                )
                subprocess.run(["losetup", "-d", devnode], capture_output=True)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[Disks]:
    found = Disks(tmp_path / "disks")
    try:
        yield found
    finally:
        found.cleanup(tmp_path)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict]:
    app, recovery = new_appliance(tmp_path / "appliance")
    tree = tmp_path / "tree"
    (tree / "docs").mkdir(parents=True)
    for i in range(24):
        (tree / "docs" / f"f{i}.bin").write_bytes(os.urandom(60_000 + i))
    (tree / "notes.txt").write_text("notes\n" * 500)
    point = app.backup_files(str(tree), "tree").point.id
    try:
        yield {"app": app, "recovery": recovery, "tree": tree, "point": point}
    finally:
        app.close()


def _restore_only_from(app: Appliance, point: str, location: str, out: Path) -> None:
    repo = locations_work.reader(app, point, named=location, only=True)
    try:
        restore_tree(repo, repo.get_manifest(point), str(out), workers=1)
    finally:
        repo.close()  # no descriptor left open on the pool: it can be unmounted


def _verify_only_at(app: Appliance, point: str, location: str) -> bool:
    """The copy at ``location`` alone verifies (``verify_copy`` without leaving its reader's
    descriptors open on the pool, which would keep it from being unmounted)."""
    repo = locations_work.reader(app, point, named=location, only=True)
    try:
        return verify_point(repo, point).ok
    finally:
        repo.close()


def _findmnt(target: str, column: str) -> str:
    return subprocess.run(
        ["findmnt", "-n", "-o", column, "--mountpoint", target],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


@pytest.mark.root
@pytest.mark.parametrize("fs_type", ["ext4", "xfs"])
def test_a_single_disk_pool_holds_a_copy_and_restores_it(
    fs_type: str, site: dict, disks: Disks, tmp_path: Path
) -> None:
    app: Appliance = site["app"]
    disk = disks.make()
    pool = create_pool(app, "single", [disk], fs_type)
    assert (pool.fs_type, pool.profile, pool.members) == (fs_type, "single", [disk.identity])
    assert pool.mountpoint == str(tmp_path / "appliance" / "pools" / "single")
    assert _findmnt(pool.mountpoint, "UUID") == pool.fs_uuid
    assert _findmnt(pool.mountpoint, "SOURCE") == disk.devnode
    assert describe_block_device(disk.devnode).fs_label == pool_label("single", fs_type)
    location = app.catalog.get_location(str(pool.location_id))
    assert (location.kind, location.address, location.label) == (
        "block_pool",
        pool.fs_uuid,
        "single",
    )
    assert location.details["options"] == {"mountpoint": pool.mountpoint}

    copied = app.copy_point(site["point"], "single")
    assert copied["state"] == "present" and copied["packs_copied"] > 0
    assert _verify_only_at(app, site["point"], "single")
    _restore_only_from(app, site["point"], "single", tmp_path / "out")
    compare_trees(snapshot(site["tree"]), snapshot(tmp_path / "out"))

    status = pool_status(app, "single").to_dict()
    assert status["health"]["state"] == "ok" and status["warnings"] == []
    assert status["capacity"]["total_bytes"] > 250 * MIB
    default = pool_status(app, "default").to_dict()
    assert default["kind"] == "directory" and default["warnings"] == ["shares the system disk"]

    with pytest.raises(Conflict):
        create_pool(app, "other", [disk], fs_type)  # a disk of a pool is never taken
    with pytest.raises(Conflict):
        create_pool(app, "single", [disks.make()], fs_type)

    # Pulled: unavailable, never empty; the copy is still there when it comes back.
    unmount_pool(app, "single")
    disks.detach(disk)
    stranger = disks.make()  # most likely on the node the pool's disk had: never taken for it
    subprocess.run(["mkfs.ext4", "-q", "-F", stranger.devnode], check=True)
    with pytest.raises(LocationUnavailable):
        locations_work.location_backend(app, app.find_location("single"))
    assert _findmnt(str(pool.mountpoint), "SOURCE") == ""
    assert not app.find_location("single").online
    assert pool_status(app, "single").health.state == "unavailable"
    assert mount_pools(app)[0]["mounted"] is False
    assert not os.listdir(pool.mountpoint)  # nothing was written into the bare mountpoint
    disks.attach(disks.files[0])
    assert mount_pools(app) == [
        {"pool": "single", "mounted": True, "degraded": False, "error": None}
    ]
    assert _verify_only_at(app, site["point"], "single")


def _corrupt_member(pack_files: list[Path], image: Path, mountpoint: str) -> int:
    """Overwrite, in one member's image, a 4 KiB block from the middle of every pack (found by
    its content, read through the mount first); the pool is unmounted meanwhile."""
    blocks = []
    for path in pack_files:
        data = path.read_bytes()
        middle = (len(data) // 2) // 4096 * 4096
        if len(data) >= middle + 4096:
            blocks.append(data[middle : middle + 4096])
    subprocess.run(["umount", mountpoint], check=True)
    hit = 0
    with open(image, "r+b") as f, mmap.mmap(f.fileno(), 0) as image_map:
        for block in blocks:
            at = image_map.find(block)
            if at >= 0:
                image_map[at : at + 4096] = bytes(b ^ 0xFF for b in block)
                hit += 1
        image_map.flush()
    return hit


@pytest.mark.root
@pytest.mark.slow
def test_a_mirror_repairs_itself_serves_degraded_and_gets_a_new_disk(
    site: dict, disks: Disks, tmp_path: Path
) -> None:
    app: Appliance = site["app"]
    first, second = disks.make(), disks.make()
    pool = create_pool(app, "mirror", [first, second])
    assert (pool.fs_type, pool.profile) == ("btrfs", "raid1")
    assert pool.members == [first.identity, second.identity]
    app.copy_point(site["point"], "mirror")
    mountpoint = str(pool.mountpoint)

    # One mirror corrupted behind btrfs's back: a scrub (as a job) finds and repairs it.
    packs = sorted(Path(mountpoint, "store", "data").rglob("*"))
    packs = [p for p in packs if p.is_file()]
    assert _corrupt_member(packs, disks.files[1], mountpoint) == len(packs) > 0
    register_pool_jobs()
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.wait(runner.submit("pool_scrub", {"pool": "mirror"}).id, 120)
    finally:
        runner.shutdown()
    assert job.state == "succeeded", job.error
    assert job.result is not None
    scrub = job.result["scrub"]
    assert scrub["corrected"] >= len(packs) and scrub["uncorrectable"] == 0
    lines = [line.message for line in app.catalog.job_log(job.id)]
    assert any("rewritten from their good copy" in line for line in lines)
    health = pool_status(app, "mirror").health
    assert health.state == "warning"  # the disk that lied is named, with its counters
    assert health.device_errors[0]["member"] == second.identity
    assert health.device_errors[0]["counters"]["corruption_errs"] >= len(packs)
    _restore_only_from(app, site["point"], "mirror", tmp_path / "out1")
    compare_trees(snapshot(site["tree"]), snapshot(tmp_path / "out1"))

    # A disk gone: the pool mounts degraded when next used, serves, and says so.
    unmount_pool(app, "mirror")
    disks.detach(second)
    _restore_only_from(app, site["point"], "mirror", tmp_path / "out2")
    compare_trees(snapshot(site["tree"]), snapshot(tmp_path / "out2"))
    assert "degraded" in _findmnt(mountpoint, "OPTIONS").split(",")
    health = pool_status(app, "mirror").health
    assert health.state == "degraded" and health.degraded_mount
    assert health.missing == [second.identity]
    assert any("missing" in reason for reason in health.reasons)
    unmount_pool(app, "mirror")
    assert mount_pools(app) == [
        {"pool": "mirror", "mounted": True, "degraded": True, "error": None}
    ]
    app.backup_files(str(site["tree"]), "tree", mode="full")  # new data while degraded
    latest = app.catalog.latest_point("tree")
    assert latest is not None
    app.copy_point(latest.id, "mirror")

    # A new disk takes the missing one's place: healthy again, every chunk mirrored.
    third = disks.make()
    runner = JobRunner(app)
    runner.start()
    try:
        params = {"pool": "mirror", "member": second.identity, "device": device_params(third)}
        job = runner.wait(runner.submit("pool_replace", params).id, 120)
    finally:
        runner.shutdown()
    assert job.state == "succeeded", job.error
    result = job.result or {}
    assert job.checkpoint == {"devid": 2}
    assert (result["devid"], result["replaced"], result["by"]) == (
        2,
        second.identity,
        third.identity,
    )
    assert result["health"]["state"] == "ok", result["health"]
    assert app.catalog.get_pool("mirror").members == [first.identity, third.identity]
    again = replace_disk(app, "mirror", "2", third)  # a rerun finds it done
    assert again["health"]["state"] == "ok"
    assert btrfs.unredundant_chunks(btrfs.chunk_profiles(mountpoint), "raid1") == []
    clean = scrub_pool(app, "mirror")
    assert clean["scrub"]["clean"], clean
    for point in (site["point"], latest.id):
        assert app.verify_copy(point, "mirror")["ok"]


@pytest.mark.root
def test_a_full_pool_refuses_a_copy_and_a_backup_before_writing(
    site: dict, disks: Disks, tmp_path: Path
) -> None:
    app: Appliance = site["app"]
    pool = create_pool(app, "small", [disks.make(64 * MIB)], "ext4")
    mountpoint = str(pool.mountpoint)
    status = pool_status(app, "small")
    assert status.capacity is not None
    free, reserve = status.capacity.free_bytes, status.capacity.reserve_bytes
    filler = Path(mountpoint, "filler")
    subprocess.run(["fallocate", "-l", str(free - reserve // 2), str(filler)], check=True)
    copies = app.catalog.copies_of(site["point"])
    with pytest.raises(StoreFull) as refused:
        app.copy_point(site["point"], "small")
    assert "location small is full" in refused.value.message
    assert "nothing was written" in refused.value.message
    assert app.catalog.copies_of(site["point"]) == copies  # not even a "copying" copy
    assert not Path(mountpoint, "store", "data").exists()
    filler.unlink()
    assert app.copy_point(site["point"], "small")["state"] == "present"

    # The home pool on a full disk: the backup is refused before a point is begun.
    home_disk = disks.make(64 * MIB)
    where = tmp_path / "home"
    where.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-F", home_disk.devnode], check=True)
    subprocess.run(["mount", home_disk.devnode, str(where)], check=True)
    home, _ = new_appliance(where / "appliance")
    with home:
        st = os.statvfs(where)
        free = st.f_bavail * st.f_frsize
        total = st.f_blocks * st.f_frsize
        subprocess.run(
            ["fallocate", "-l", str(free - reserve_bytes(total) // 2), str(where / "filler")],
            check=True,
        )
        before = sorted(p.name for p in Path(home.data_dir.store_path).rglob("*"))
        with pytest.raises(StoreFull) as refused:
            home.backup_files(str(site["tree"]), "tree")
        assert "pool default is full" in refused.value.message
        assert home.catalog.list_points() == []
        assert sorted(p.name for p in Path(home.data_dir.store_path).rglob("*")) == before


@pytest.mark.root
def test_a_pool_imports_on_a_fresh_data_directory(site: dict, disks: Disks, tmp_path: Path) -> None:
    app: Appliance = site["app"]
    first, second = disks.make(), disks.make()
    pool = create_pool(app, "archive", [first, second])
    app.copy_point(site["point"], "archive")
    unmount_pool(app, "archive")
    app.close()

    found = find_importable(
        Inventory(block={d.identity: describe_block_device(d.devnode) for d in (first, second)})
    )
    assert [(p.fs_uuid, p.name, len(p.devices)) for p in found] == [(pool.fs_uuid, "archive", 2)]
    fresh = tmp_path / "fresh"
    listed = run_cli("pool", "import", "--json", data_dir=fresh, passphrase=None)
    assert pool.fs_uuid in listed.stdout.decode()
    done = run_cli(
        "pool",
        "import",
        str(pool.fs_uuid),
        "--json",
        data_dir=fresh,
        passphrase=None,
        env={"APPLIANCE_RECOVERY_KEY": site["recovery"]},
    )
    assert b'"seeded": true' in done.stdout
    with Appliance.open(str(fresh), passphrase=PASSPHRASE) as again:
        assert [p.id for p in again.catalog.list_points()] == [site["point"]]
        imported = again.catalog.get_pool("archive")
        assert imported.mountpoint == str(fresh / "pools" / "archive")
        assert imported.members == [first.identity, second.identity]
        assert imported.profile == "raid1"
        out = tmp_path / "restored"
        again.restore(site["point"], str(out))
        compare_trees(snapshot(site["tree"]), snapshot(out))
        with pytest.raises(Conflict):
            import_pool(again, str(pool.fs_uuid), "twice")
    other, _ = new_appliance(tmp_path / "other")  # another store: refused, never adopted
    with other, pytest.raises(Conflict) as refused:
        import_pool(other, str(pool.fs_uuid))
    assert "import it on a fresh data directory" in refused.value.message
    assert _findmnt(str(tmp_path / "other" / "pools" / "archive"), "SOURCE") == ""


def _create_and_die(data_dir: str, devices: list[BlockDevice], die_at: str) -> None:
    app = Appliance.open(data_dir, passphrase=PASSPHRASE)

    def die(*_: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    made: Callable[[str], None] | None = die if die_at == "made" else None
    if die_at == "marker":  # after the location was added, before the pool is recorded
        pools_module.write_marker = die  # type: ignore[assignment]
    create_pool(app, "resumed", devices, "btrfs", "raid1", made=made)


@pytest.mark.root
@pytest.mark.parametrize("die_at", ["made", "marker"])
def test_a_creation_killed_midway_resumes_without_formatting_again(
    die_at: str, site: dict, disks: Disks
) -> None:
    app: Appliance = site["app"]
    devices = [disks.make(), disks.make()]
    child = multiprocessing.get_context("fork").Process(
        target=_create_and_die, args=(app.data_dir.path, devices, die_at)
    )
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    made = describe_block_device(devices[0].devnode).fs_uuid
    assert made is not None
    with pytest.raises(NotFound):
        app.catalog.get_pool("resumed")

    pool = create_pool(app, "resumed", devices, "btrfs", "raid1")
    assert pool.fs_uuid == made  # the disks were not formatted again
    locations = [loc for loc in app.catalog.list_locations() if loc.kind == "block_pool"]
    assert [(loc.id, loc.label) for loc in locations] == [(pool.location_id, "resumed")]
    app.copy_point(site["point"], "resumed")
    assert app.verify_copy(site["point"], "resumed")["ok"]
    with pytest.raises(Conflict):
        create_pool(app, "resumed", devices, "btrfs", "raid1")


@pytest.mark.root
def test_the_tick_samples_usage_and_asks_for_monthly_scrubs(site: dict, disks: Disks) -> None:
    app: Appliance = site["app"]
    register_pool_jobs()
    runner = JobRunner(app)
    runner.start()
    try:
        params = {"name": "ticked", "devices": [device_params(disks.make())], "fs_type": "btrfs"}
        job = runner.wait(runner.submit("pool_create", params).id, 120)
    finally:
        runner.shutdown()
    assert job.state == "succeeded", job.error
    pool = app.catalog.get_pool("ticked")
    assert job.checkpoint == {"fs_uuid": pool.fs_uuid}
    assert (pool.fs_type, pool.profile) == ("btrfs", "single")
    lines = [line.message for line in app.catalog.job_log(job.id)]
    assert any(line.startswith("making btrfs") for line in lines)
    tick = pool_tick(app, runner)
    start = pool.created_at
    assert tick(start + timedelta(minutes=5)) == []
    assert {s.pool for s in app.catalog.list_pool_usage("ticked")} == {"ticked"}
    assert tick(start + timedelta(minutes=30)) == []  # sampled less than an hour ago
    assert len(app.catalog.list_pool_usage("ticked")) == 1
    submitted = tick(start + timedelta(days=31))
    assert len(submitted) == 1 and app.catalog.get_job(submitted[0]).kind == "pool_scrub"
    assert tick(start + timedelta(days=31, minutes=1)) == []  # queued already
    assert len(app.catalog.list_pool_usage("ticked")) == 2
    assert len(app.catalog.list_pool_usage("default")) == 2


def test_pool_records_and_usage_in_the_catalog(tmp_path: Path) -> None:
    with Catalog.open(f"sqlite:///{tmp_path / 'c.db'}", clock=lambda: T0) as catalog:
        catalog.add_pool("default", "/d/pools/default/store", "s1")
        pool = catalog.add_pool(
            "mirror",
            "/d/pools/mirror/store",
            "s1",
            fs_uuid="u-1",
            fs_type="btrfs",
            profile="raid1",
            members=["loop:/a", "loop:/b"],
            location_id="loc1",
            mountpoint="/d/pools/mirror",
        )
        assert pool.block and not catalog.get_pool("default").block
        assert catalog.get_pool("mirror") == pool
        with pytest.raises(Conflict):
            catalog.add_pool("again", "/x", "s1", fs_uuid="u-1")
        with pytest.raises(InvalidInput):
            catalog.add_pool("bad", "/x", "s1", fs_type="zfs")
        updated = catalog.update_pool("mirror", members=["loop:/a", "loop:/c"])
        assert updated.members == ["loop:/a", "loop:/c"] and updated.fs_uuid == "u-1"
        for day in range(3):
            catalog.add_pool_usage("mirror", T0 + timedelta(days=day), day * 10, 100)
        catalog.add_pool_usage("mirror", T0, 5, 100)  # the same instant replaces
        first = catalog.list_pool_usage("mirror")[0]
        assert (first.used_bytes, first.at) == (5, T0)
        assert len(catalog.list_pool_usage("mirror", since=T0 + timedelta(days=1))) == 2
        assert catalog.prune_pool_usage(T0 + timedelta(days=1)) == 1
        with pytest.raises(NotFound):
            catalog.add_pool_usage("nope", T0, 1, 2)
        catalog.delete_pool("mirror")
        assert [p.name for p in catalog.list_pools()] == ["default"]


def test_a_downgrade_to_0005_forgets_block_pools_and_keeps_the_default(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with Catalog.open(url, clock=lambda: T0) as catalog:
        catalog.add_pool("default", "/d/pools/default/store", "s1")
        catalog.add_pool("mirror", "/m/store", "s1", fs_uuid="u-1", fs_type="btrfs")
        catalog.add_pool_usage("mirror", T0, 1, 2)
    engine = create_engine(url)
    try:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0005")
        assert "pool_usage" not in inspect_schema(engine).get_table_names()
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT name, path FROM pools")).all()
        assert [tuple(r) for r in rows] == [("default", "/d/pools/default/store")]
    finally:
        engine.dispose()
    with Catalog.open(url) as catalog:
        (default,) = catalog.list_pools()
        assert default.name == "default" and not default.block and default.members == []


@pytest.mark.root
def test_the_command_line_makes_lists_scrubs_and_mounts_pools(site: dict, disks: Disks) -> None:
    data_dir = Path(site["app"].data_dir.path)
    first, second = disks.make(), disks.make()
    made = run_cli(
        "pool",
        "create",
        "cli",
        "--disk",
        first.devnode,
        "--disk",
        second.devnode,
        "--json",
        data_dir=data_dir,
    )
    created = json.loads(made.stdout)
    assert (created["fs_type"], created["profile"], created["health"]["state"]) == (
        "btrfs",
        "raid1",
        "ok",
    )
    listed = json.loads(run_cli("pool", "list", "--json", data_dir=data_dir).stdout)
    assert [(p["name"], p["kind"]) for p in listed] == [("default", "directory"), ("cli", "block")]
    assert listed[0]["warnings"] == ["shares the system disk"]
    text = run_cli("pool", "list", data_dir=data_dir).stdout.decode()
    assert "cli" in text and "btrfs raid1" in text and "shares the system disk" in text
    scrubbed = json.loads(run_cli("pool", "scrub", "cli", "--json", data_dir=data_dir).stdout)
    assert scrubbed["scrub"]["clean"]
    status = json.loads(run_cli("pool", "status", "cli", "--json", data_dir=data_dir).stdout)
    assert status["health"]["last_scrub"]["status"] == "finished"
    assert status["members"] == [first.identity, second.identity]
    refused = run_cli(
        "pool", "create", "default", "--disk", first.devnode, data_dir=data_dir, check=False
    )
    assert refused.returncode == 2 and b"the data directory's own pool" in refused.stderr
    subprocess.run(["umount", created["mountpoint"]], check=True)
    mounted = json.loads(run_cli("pool", "mount", "--json", data_dir=data_dir).stdout)
    assert mounted == [{"pool": "cli", "mounted": True, "degraded": False, "error": None}]


# --- the backend contract, on a block pool --------------------------------------------------------


@pytest.fixture
def backend(disks: Disks, tmp_path: Path) -> Iterator[Backend]:
    """A ``block_pool`` location's backend on a fresh ext4 loop disk, opened (and mounted)
    through the registry as the appliance opens it."""
    disk = disks.make(64 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", disk.devnode], check=True)
    fs_uuid = str(describe_block_device(disk.devnode).fs_uuid)
    mountpoint = tmp_path / "pool"
    mount_pool_filesystem(fs_uuid, str(mountpoint))
    (mountpoint / "store").mkdir()
    subprocess.run(["umount", str(mountpoint)], check=True)  # opening mounts it again
    store = open_backend("block_pool", fs_uuid, mountpoint=str(mountpoint))
    assert isinstance(store, BlockPoolBackend)
    yield store
    store.close()


# Every test of the conformance suite that takes a backend runs here against the fixture above.
for _name, _test in vars(conformance).items():
    if _name.startswith("test_") and "backend" in inspect.signature(_test).parameters:
        globals()[_name] = _test


@pytest.mark.root
def test_an_unmounted_block_pool_is_unavailable_never_empty(backend: Backend) -> None:
    assert isinstance(backend, BlockPoolBackend)
    backend.put("data/ab/one", b"1")
    subprocess.run(["umount", backend.mountpoint], check=True)
    os.makedirs(os.path.join(backend.mountpoint, "store", "data"))  # a decoy on the system disk
    for operation in (
        lambda: list(backend.list("data/")),
        lambda: backend.get("data/ab/one"),
        lambda: backend.stat("data/ab/one"),
        lambda: backend.put("data/ab/two", b"2"),
        lambda: backend.delete("data/ab/one"),
    ):
        with pytest.raises(LocationUnavailable):
            operation()
