"""SMART in a pool's health: the pure decision on recorded smartctl output, the hourly cache,
and real pools on loop devices (which have no SMART: ``unknown``, never held against a pool).

The recorded outputs are ``tests/fixtures/smart/`` (the loop-device ones are real recordings of
this host; the ATA, NVMe and SCSI ones follow smartmontools' documented JSON format). On the
real pools smartctl itself runs on each member; a failing disk is then given to the pool through
the readings' reader, as the only stand-in: no failing disk exists here.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_support import new_appliance, set_engine_env

from appliance.engine import Appliance
from hardware import pool_backend
from hardware.cli import describe_block_device
from hardware.pool_backend import (
    SmartReadings,
    health_state,
    pool_health,
    smart_details,
    smart_reasons,
)
from hardware.pools import create_pool
from hardware.records import BlockDevice
from hardware.smart import Health, parse_smartctl, read_health

FIXTURES = Path(__file__).parent / "fixtures" / "smart"
MIB = 1 << 20


def recorded(name: str) -> Health:
    return parse_smartctl((FIXTURES / name).read_text())


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


# --- the pure decision ---------------------------------------------------------------------------


def test_a_failing_disk_makes_the_pool_warn_naming_the_disk_and_why() -> None:
    readings = [
        ("serial:WD-GOOD", recorded("ata-passing.json")),
        ("serial:WD-BAD", recorded("ata-failing.json")),
    ]
    reasons = smart_reasons(readings)
    assert reasons == [
        "disk serial:WD-BAD is failing according to SMART (the disk's SMART self-assessment "
        "says it is failing): replace it"
    ]
    assert health_state({"warning": reasons}) == "warning"
    # A failing disk does not hide worse news: a missing mirror disk is still "degraded".
    assert health_state({"warning": reasons, "degraded": ["1 disk(s) missing"]}) == "degraded"
    nvme = smart_reasons([("wwn:0xnvme", recorded("nvme-critical.json"))])
    assert len(nvme) == 1 and nvme[0].startswith("disk wwn:0xnvme is failing according to SMART")


@pytest.mark.parametrize(
    "name",
    [
        "loop-no-smart.json",
        "loop-as-sat.json",
        "ata-passing.json",
        "nvme-passing.json",
        "scsi-passing.json",
        "ata-reallocated.json",
    ],
)
def test_unknown_and_passing_disks_say_nothing_against_the_pool(name: str) -> None:
    health = recorded(name)
    assert health.status in ("ok", "unknown")
    assert smart_reasons([("loop:/srv/disk0.img", health)]) == []
    assert health_state({"warning": smart_reasons([("d", health)])}) == "ok"


def test_the_details_list_every_member_with_its_verdict() -> None:
    reallocated = recorded("ata-reallocated.json")
    details = smart_details(
        [
            ("serial:A", "/dev/sda", reallocated),
            ("loop:/x.img", "/dev/loop7", recorded("loop-no-smart.json")),
        ]
    )
    assert [(d["member"], d["device"], d["status"]) for d in details] == [
        ("serial:A", "/dev/sda", "ok"),
        ("loop:/x.img", "/dev/loop7", "unknown"),
    ]
    assert "8 reallocated sectors" in details[0]["warnings"]
    assert "Unable to detect device type" in details[1]["reason"]


def test_a_disk_is_read_at_most_once_an_hour() -> None:
    now = [1000.0]
    asked: list[str] = []

    def read(devnode: str) -> Health:
        asked.append(devnode)
        return recorded("ata-passing.json")

    readings = SmartReadings(read, clock=lambda: now[0])
    for _ in range(3):
        assert readings.health("serial:A", "/dev/sda").status == "ok"
    assert asked == ["/dev/sda"]
    readings.health("serial:B", "/dev/sdb")  # another disk: its own reading
    now[0] += 3599
    readings.health("serial:A", "/dev/sda")
    assert asked == ["/dev/sda", "/dev/sdb"]
    now[0] += 1
    readings.health("serial:A", "/dev/sda")
    assert asked == ["/dev/sda", "/dev/sdb", "/dev/sda"]
    readings.health("serial:A", "/dev/sdc")  # the same disk back on another node: read again
    assert asked[-1] == "/dev/sdc"


# --- real pools on loop devices -------------------------------------------------------------------


class LoopDisks:
    """Sparse image files attached as loop devices; :meth:`cleanup` unmounts what was mounted
    below the test's folder and detaches exactly these devices."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.files: list[Path] = []

    def make(self, size: int = 320 * MIB) -> BlockDevice:
        path = self.folder / f"disk{len(self.files)}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        self.files.append(path)
        devnode = subprocess.run(
            ["losetup", "--find", "--show", str(path)], check=True, capture_output=True, text=True
        ).stdout.strip()
        return describe_block_device(devnode)

    def cleanup(self, root: Path) -> None:
        for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
            target = line.split()[1].replace("\\040", " ")
            inside = target.startswith(str(root) + "/")
            if inside and subprocess.run(["umount", target], capture_output=True).returncode:
                subprocess.run(["umount", "-l", target], capture_output=True)
        for path in self.files:
            out = subprocess.run(["losetup", "-j", str(path)], capture_output=True, text=True)
            for devnode in [line.split(":", 1)[0] for line in out.stdout.splitlines() if line]:
                subprocess.run(
                    ["btrfs", "device", "scan", "--forget", devnode], capture_output=True
                )
                subprocess.run(["losetup", "-d", devnode], capture_output=True)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Appliance, LoopDisks]]:
    app, _ = new_appliance(tmp_path / "appliance")
    disks = LoopDisks(tmp_path / "disks")
    try:
        yield app, disks
    finally:
        app.close()
        disks.cleanup(tmp_path)


@pytest.mark.root
def test_loop_disks_have_no_smart_and_a_failing_member_warns_the_pool(
    site: tuple[Appliance, LoopDisks], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, disks = site
    first, second = disks.make(), disks.make()
    mirror = create_pool(app, "mirror", [first, second], "btrfs")
    single_disk = disks.make()
    single = create_pool(app, "single", [single_disk], "ext4")
    asked: list[str] = []
    failing: set[str] = set()

    def read(devnode: str) -> Health:
        asked.append(devnode)
        if devnode in failing:
            return recorded("ata-failing.json")
        return read_health(devnode)  # smartctl itself, on the loop device

    monkeypatch.setattr(pool_backend, "SMART_READINGS", SmartReadings(read))

    health = pool_health(app, mirror)
    assert (health.state, health.reasons) == ("ok", [])
    assert sorted((d["member"], d["device"]) for d in health.smart) == sorted(
        [(first.identity, first.devnode), (second.identity, second.devnode)]
    )
    assert {d["status"] for d in health.smart} == {"unknown"}
    health = pool_health(app, single)
    assert health.state == "ok"
    assert [(d["member"], d["status"]) for d in health.smart] == [(single_disk.identity, "unknown")]
    assert pool_health(app, mirror).state == "ok"  # read again within the hour: cached
    assert sorted(asked) == sorted([first.devnode, second.devnode, single_disk.devnode])

    # A member whose SMART says it is failing: the pool warns, naming that disk.
    failing.add(second.devnode)
    monkeypatch.setattr(pool_backend, "SMART_READINGS", SmartReadings(read))
    health = pool_health(app, mirror)
    assert health.state == "warning"
    assert health.reasons == [
        f"disk {second.identity} is failing according to SMART (the disk's SMART "
        "self-assessment says it is failing): replace it"
    ]
    failing.add(single_disk.devnode)
    health = pool_health(app, single)
    assert health.state == "warning" and single_disk.identity in health.reasons[0]
    assert health.to_dict()["smart"][0]["status"] == "failing"
