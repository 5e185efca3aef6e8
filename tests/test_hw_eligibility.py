"""Which disks may join a pool: the pure rules on explicit facts, then the host adapter on this
machine's real root disk and real loop devices."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from udev_support import attach_loop, detach_loop

from hardware.eligibility import Candidate, pool_candidates, refusals
from hardware.hostfacts import HostFacts, host_facts, mount_entries, mount_of
from hardware.records import BlockDevice, Changer, Inventory, TapeDrive
from hardware.udev import scan

GiB = 1 << 30


def disk(name: str, identity: str | None = None, size: int = 500 * GiB, **kw) -> BlockDevice:
    return BlockDevice(
        identity=identity or f"serial:{name.upper()}",
        devnode=f"/dev/{name}",
        kind=kw.pop("kind", "disk"),
        size_bytes=size,
        **kw,
    )


def part(parent: BlockDevice, n: int, size: int = 100 * GiB, **kw) -> BlockDevice:
    return BlockDevice(
        identity=f"{parent.identity}-part{n}",
        devnode=f"{parent.devnode}{n}",
        kind="partition",
        size_bytes=size,
        parent=parent.identity,
        **kw,
    )


def inventory(*devices: BlockDevice) -> Inventory:
    return Inventory(block={d.identity: d for d in devices})


def by_node(candidates: list[Candidate]) -> dict[str, Candidate]:
    return {c.device.devnode: c for c in candidates}


# --- the pure rules -------------------------------------------------------------------------------

SDA = disk("sda")
SDA1, SDA2 = part(SDA, 1, fs_type="ext4"), part(SDA, 2, fs_type="xfs")
SDB = disk("sdb")
SDC = disk("sdc", fs_type="ext4", fs_uuid="c0ffee", fs_label="old")
SYSTEM = HostFacts(
    mounted={"/dev/sda2": "/", "/dev/sda1": "/boot"},
    system_disks={"/dev/sda": ("/", "/boot")},
)


def test_a_blank_disk_is_eligible_and_the_system_disk_is_not():
    found = by_node(pool_candidates(inventory(SDA, SDA1, SDA2, SDB), SYSTEM))
    assert found["/dev/sdb"].eligible
    assert found["/dev/sdb"].refusals == () and found["/dev/sdb"].warnings == ()
    assert found["/dev/sda"].refusals == (
        "is the system disk (holds /, /boot)",
        "holds sda1, which is mounted at /boot",
        "holds sda2, which is mounted at /",
    )
    assert found["/dev/sda2"].refusals == (
        "mounted at /",
        "is on the system disk (holds /, /boot)",
        "shares its disk with sda1, which is mounted at /boot",
    )
    assert list(found) == ["/dev/sda", "/dev/sda1", "/dev/sda2", "/dev/sdb"]


def test_a_filesystem_is_a_warning_not_a_refusal():
    (candidate,) = pool_candidates(inventory(SDC), HostFacts())
    assert candidate.eligible
    assert candidate.warnings == ("holds a ext4 filesystem labelled 'old': a pool erases it",)


def test_mounted_elsewhere_swap_and_holders_refuse():
    facts = HostFacts(
        mounted={"/dev/sdb": "/mnt/usb", "/dev/sdc": "swap"}, held={"/dev/sdd": ("dm-0",)}
    )
    found = by_node(pool_candidates(inventory(SDB, SDC, disk("sdd")), facts))
    assert found["/dev/sdb"].refusals == ("mounted at /mnt/usb",)
    assert found["/dev/sdc"].refusals == ("used as swap",)
    assert found["/dev/sdd"].refusals == ("in use by dm-0",)


def test_every_member_of_a_mounted_btrfs_is_refused():
    a = disk("sdb", fs_type="btrfs", fs_uuid="pool-1")
    b = disk("sdc", fs_type="btrfs", fs_uuid="pool-1")
    facts = HostFacts(mounted={"/dev/sdb": "/srv/pool"}, mounted_fs_uuids=frozenset({"pool-1"}))
    found = by_node(pool_candidates(inventory(a, b), facts))
    assert found["/dev/sdc"].refusals == ("its filesystem is mounted (btrfs pool-1)",)
    assert "mounted at /srv/pool" in found["/dev/sdb"].refusals


def test_pool_members_by_fs_uuid_or_identity_and_restore_devices():
    member = disk("sdb", fs_type="btrfs", fs_uuid="pool-1")
    by_identity = disk("sdc", identity="wwn:0x5000c500a1b2c3d4")
    restore = disk("sdd")
    facts = HostFacts(
        pool_members=frozenset({"pool-1", "wwn:0x5000c500a1b2c3d4"}),
        restore_devices=frozenset({restore.identity}),
    )
    found = by_node(pool_candidates(inventory(member, by_identity, restore), facts))
    assert found["/dev/sdb"].refusals == ("already a pool member",)
    assert found["/dev/sdc"].refusals == ("already a pool member",)
    assert found["/dev/sdd"].refusals == ("registered as a restore device",)


def test_read_only_and_too_small():
    tiny = disk("sdb", size=512 << 20)
    ro = disk("sdc", read_only=True)
    found = by_node(pool_candidates(inventory(tiny, ro), HostFacts()))
    assert found["/dev/sdb"].refusals == (
        "is too small (512 MiB; a pool disk needs at least 1 GiB)",
    )
    assert found["/dev/sdc"].refusals == ("is read-only",)
    assert by_node(pool_candidates(inventory(tiny), HostFacts(min_size_bytes=1 << 20)))[
        "/dev/sdb"
    ].eligible


def test_partitions_on_a_free_disk_are_eligible_and_the_disk_warns_about_them():
    sdb1, sdb2 = part(SDB, 1, fs_type="ntfs", fs_label="DATA"), part(SDB, 2)
    found = by_node(pool_candidates(inventory(SDB, sdb1, sdb2), HostFacts()))
    assert all(c.eligible for c in found.values())
    assert found["/dev/sdb"].warnings == (
        "holds partitions (sdb1, sdb2): a pool on the whole disk erases them",
    )
    assert found["/dev/sdb1"].warnings == (
        "holds a ntfs filesystem labelled 'DATA': a pool erases it",
    )


def test_a_partition_next_to_one_in_use_is_refused_and_so_is_its_disk():
    sdb1, sdb2 = part(SDB, 1), part(SDB, 2)
    facts = HostFacts(mounted={"/dev/sdb1": "/mnt/photos"})
    found = by_node(pool_candidates(inventory(SDB, sdb1, sdb2), facts))
    assert found["/dev/sdb2"].refusals == (
        "shares its disk with sdb1, which is mounted at /mnt/photos",
    )
    assert found["/dev/sdb"].refusals == ("holds sdb1, which is mounted at /mnt/photos",)
    facts = HostFacts(pool_members=frozenset({sdb2.identity}))
    found = by_node(pool_candidates(inventory(SDB, sdb1, sdb2), facts))
    assert found["/dev/sdb1"].refusals == (
        "shares its disk with sdb2, which is already a pool member",
    )
    assert found["/dev/sdb"].refusals == ("holds sdb2, which is already a pool member",)


def test_a_usb_disk_is_eligible_with_a_warning():
    (candidate,) = pool_candidates(inventory(disk("sdb", bus="usb", removable=True)), HostFacts())
    assert candidate.eligible
    assert candidate.warnings == (
        "is a USB disk: a pool's disks stay in the box (USB disks are rotation media)",
    )


def test_tapes_and_changers_are_never_candidates():
    tape = TapeDrive(identity="serial:beaf11", devnode="/dev/nst0")
    changer = Changer(identity="serial:DEC12345AB", devnode="/dev/sg0")
    everything = Inventory(
        block={SDB.identity: SDB}, tapes={tape.identity: tape}, changers={changer.identity: changer}
    )
    assert [c.device for c in pool_candidates(everything, HostFacts())] == [SDB]
    assert refusals(tape, everything, HostFacts()) == ("is a tape drive, not a disk",)
    assert refusals(changer, everything, HostFacts()) == ("is a tape changer, not a disk",)


def test_natural_order_of_device_nodes():
    devices = [disk(f"loop{n}", identity=f"loop:/f{n}", kind="loop") for n in (10, 2, 1)]
    assert [c.device.devnode for c in pool_candidates(inventory(*devices), HostFacts())] == [
        "/dev/loop1",
        "/dev/loop2",
        "/dev/loop10",
    ]


def test_mount_of_picks_the_longest_mount_point(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "27 1 254:0 / / rw - ext4 /dev/vda rw\n"
        "40 27 7:3 / /srv/pool rw - btrfs /dev/loop3 rw\n"
        "41 27 7:4 / /srv/pool\\040two rw - ext4 /dev/loop4 rw\n"
    )
    entries = mount_entries(str(info))
    assert [e.target for e in entries] == ["/", "/srv/pool", "/srv/pool two"]
    assert mount_of("/srv/pool/store", entries).major_minor == "7:3"
    assert mount_of("/srv/pool two/x", entries).source == "/dev/loop4"
    assert mount_of("/srv/poolx", entries).major_minor == "254:0"


# --- this host ------------------------------------------------------------------------------------


def _root_disk() -> str:
    entry = mount_of("/", mount_entries())
    assert entry is not None
    name = Path(f"/sys/dev/block/{entry.major_minor}").resolve().name
    if Path(f"/sys/class/block/{name}/partition").exists():
        name = Path(f"/sys/class/block/{name}").resolve().parent.name
    return f"/dev/{name}"


def test_host_facts_say_the_root_disk_is_a_system_disk(tmp_path):
    facts = host_facts(str(tmp_path), pool_members=["pool-1"], restore_devices=["serial:R"])
    root = _root_disk()
    assert "/" in facts.system_disks[root]
    assert str(tmp_path) in facts.system_disks[root]  # the data directory lives there too
    assert facts.pool_members == {"pool-1"} and facts.restore_devices == {"serial:R"}
    found = scan()
    root_record = next(d for d in found.block.values() if d.devnode == root)
    said = refusals(root_record, found, facts)
    assert any(r.startswith("is the system disk (holds /, ") for r in said), said


@pytest.mark.root
def test_a_fresh_loop_device_is_eligible_until_mounted(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(2 * GiB)
    device = attach_loop(image)
    where = tmp_path / "mnt"
    where.mkdir()
    try:
        candidate = _candidate(image, tmp_path)
        assert candidate.device.devnode == device
        assert candidate.eligible, candidate.refusals
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True)
        subprocess.run(["mount", device, str(where)], check=True)
        try:
            assert _candidate(image, tmp_path).refusals == (f"mounted at {where}",)
        finally:
            subprocess.run(["umount", str(where)], check=True)
    finally:
        detach_loop(device)


@pytest.mark.root
def test_both_disks_of_a_mounted_btrfs_mirror_are_refused(tmp_path):
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    devices = []
    where = tmp_path / "pool"
    where.mkdir()
    try:
        for image in images:
            with open(image, "wb") as f:
                f.truncate(2 * GiB)
            devices.append(attach_loop(image))
        subprocess.run(
            ["mkfs.btrfs", "-q", "-f", "-d", "raid1", "-m", "raid1", *devices],
            check=True,
            capture_output=True,
        )
        subprocess.run(["mount", devices[0], str(where)], check=True)
        try:
            first, second = (_candidate(image, tmp_path) for image in images)
            assert f"mounted at {where}" in first.refusals
            assert any(r.startswith("its filesystem is mounted (btrfs ") for r in second.refusals)
            assert not second.eligible
        finally:
            subprocess.run(["umount", str(where)], check=True)
        assert _candidate(images[1], tmp_path).eligible
    finally:
        for device in devices:
            detach_loop(device)


def _candidate(image: Path, data_dir: Path) -> Candidate:
    found = {c.device.identity: c for c in pool_candidates(scan(), host_facts(str(data_dir)))}
    return found[f"loop:{image}"]
