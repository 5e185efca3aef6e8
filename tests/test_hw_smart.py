"""SMART health: the pure parser on recorded and format-documented smartctl JSON, and the adapter
on this host's real loop device (which has no SMART: an honest ``unknown``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from udev_support import attached_loop

from hardware.smart import Health, parse_smartctl, read_health, smartctl_argv

FIXTURES = Path(__file__).parent / "fixtures" / "smart"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_ata_passing_disk_is_ok_with_its_readings():
    health = parse_smartctl(fixture("ata-passing.json"))
    assert health.status == "ok"
    assert health.reason == "the disk's SMART self-assessment passed"
    assert health.warnings == ()
    assert (health.protocol, health.model, health.serial) == (
        "ATA",
        "WDC WD40EFRX-68N32N0",
        "WD-WCC7K1ABCDEF",
    )
    assert (health.temperature_c, health.power_on_hours) == (38, 32410)
    assert (health.reallocated_sectors, health.pending_sectors, health.offline_uncorrectable) == (
        0,
        0,
        0,
    )
    assert health.exit_status == 0
    assert health.percentage_used is None  # an ATA disk reports no NVMe counters


def test_reallocated_sectors_warn_but_the_disk_is_still_ok():
    health = parse_smartctl(fixture("ata-reallocated.json"))
    assert health.status == "ok"
    assert health.reallocated_sectors == 8
    assert "8 reallocated sectors" in health.warnings
    assert "2 sectors pending reallocation" in health.warnings
    assert "1 uncorrectable sectors" in health.warnings
    assert "the disk's error log has entries" in health.warnings  # exit status bit 6


def test_failed_self_assessment_is_failing():
    health = parse_smartctl(fixture("ata-failing.json"))
    assert health.status == "failing"
    assert "failing" in health.reason
    assert health.reallocated_sectors == 3112


def test_a_prefail_attribute_below_threshold_is_failing_even_if_the_verdict_passed():
    document = json.loads(fixture("ata-failing.json"))
    document["smart_status"]["passed"] = True
    document["smartctl"]["exit_status"] = 16  # bit 4 only
    health = parse_smartctl(document)
    assert health.status == "failing"
    assert health.reason == "Reallocated_Sector_Ct at or below its failure threshold"


def test_exit_status_bit_3_alone_is_failing():
    document = json.loads(fixture("ata-passing.json"))
    document["smartctl"]["exit_status"] = 8
    assert parse_smartctl(document).status == "failing"


def test_nvme_passing():
    health = parse_smartctl(fixture("nvme-passing.json"))
    assert health.status == "ok"
    assert (health.protocol, health.critical_warning, health.media_errors) == ("NVMe", 0, 0)
    assert (health.percentage_used, health.temperature_c, health.power_on_hours) == (3, 36, 8761)
    assert health.reallocated_sectors is None
    assert health.warnings == ()


def test_nvme_critical_warning_is_failing_and_explained():
    health = parse_smartctl(fixture("nvme-critical.json"))
    assert health.status == "failing"
    assert health.critical_warning == 0x0C
    assert "NVMe critical warning: it has become read-only" in health.warnings
    assert (
        "NVMe critical warning: its reliability is degraded by media or internal errors"
        in health.warnings
    )
    assert "12 media and data integrity errors" in health.warnings
    assert "104% of its rated endurance used" in health.warnings


def test_scsi_passing_counts_grown_defects():
    health = parse_smartctl(fixture("scsi-passing.json"))
    assert health.status == "ok"
    assert (health.model, health.grown_defects, health.temperature_c) == (
        "SEAGATE ST4000NM0023",
        4,
        33,
    )
    assert "4 grown defects" in health.warnings


def test_recorded_loop_device_is_unknown_with_smartctls_words():
    health = parse_smartctl(fixture("loop-no-smart.json"))
    assert health.status == "unknown"
    assert health.exit_status == 1
    assert health.reason == (
        "smartctl cannot read SMART from this device: /dev/loop0: Unable to detect device type"
    )
    assert health.messages == ("/dev/loop0: Unable to detect device type",)


def test_recorded_device_that_does_not_identify_is_unknown():
    health = parse_smartctl(fixture("loop-as-sat.json"))
    assert health.status == "unknown"
    assert health.reason == "smartctl could not open or identify the device"
    assert health.protocol == "ATA"


def test_no_smart_status_is_unknown_not_ok():
    document = json.loads(fixture("ata-passing.json"))
    del document["smart_status"]
    health = parse_smartctl(document)
    assert health.status == "unknown"
    assert health.reason.startswith("the device reports no SMART health")


def test_garbage_is_unknown():
    assert parse_smartctl("smartctl: not json", exit_status=4) == Health(
        "unknown", "smartctl printed no JSON", exit_status=4
    )
    assert parse_smartctl("[1, 2]").status == "unknown"


def test_argv():
    assert smartctl_argv("/dev/sdb") == ["smartctl", "--json", "-a", "/dev/sdb"]
    assert smartctl_argv("/dev/sdb", "sat") == ["smartctl", "--json", "-a", "-d", "sat", "/dev/sdb"]


@pytest.mark.root
def test_read_health_on_a_real_loop_device(tmp_path):
    if shutil.which("smartctl") is None:
        pytest.fail("smartctl is not installed: run scripts/setup (smartmontools)", pytrace=False)
    with attached_loop(tmp_path / "disk.img") as device:
        health = read_health(device)
    assert health.status == "unknown"
    assert health.exit_status is not None and health.exit_status & 0b11
    assert f"{device}: Unable to detect device type" in health.reason


def test_read_health_without_smartctl(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    health = read_health("/dev/sdb")
    assert health.status == "unknown"
    assert "smartctl is not installed" in health.reason
