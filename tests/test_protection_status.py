"""Protection status on crafted records with explicit times: every rule, each 3-2-1 leg, a VM
running from backup first, and nothing called fine by default. The system-disk fact is checked
against real directories (a tmp folder on the root filesystem, /dev/shm on another device)."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from appliance.catalog.records import (
    AssetRecord,
    CopyRecord,
    FailoverSessionRecord,
    LocationRecord,
    PointRecord,
    PolicyRecord,
)
from appliance.protection_facts import system_disk_locations
from appliance.protection_status import (
    AT_RISK,
    NEEDS_ATTENTION,
    PROTECTED,
    RUNNING_FROM_BACKUP,
    AssetFacts,
    asset_status,
    legs,
    policies_of,
    worst_first,
)

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def location(lid: str, kind: str = "pool_dir", **flags: Any) -> LocationRecord:
    values: dict[str, Any] = {
        "immutable": False,
        "removable": kind in ("removable", "tape_set"),
        "offsite": False,
        "online": True,
        "access": "random",
    }
    values.update(flags)
    return LocationRecord(
        id=lid, store_id="s", kind=kind, address=f"/{lid}", label=lid, created_at=T0, **values
    )


LOCS = {
    "sys": location("sys"),
    "data": location("data", "block_pool"),
    "usb": location("usb", "removable", offsite=True),
    "cold": location("cold", "s3_bucket", offsite=True, immutable=True, access="cold"),
    "hot": location("hot", "s3_bucket", offsite=True),
    "peer": location("peer", "peer", offsite=True),
}


def point(pid: str, age: timedelta, **kw: Any) -> PointRecord:
    kw.setdefault("verified_at", NOW - timedelta(days=1))
    kw.setdefault("verify_status", "ok")
    return PointRecord(id=pid, asset="web", kind="image", mode="full", created_at=NOW - age, **kw)


def copy(where: str, state: str = "present") -> CopyRecord:
    return CopyRecord(point_id="p1", store_id="s", state=state, added_at=T0, location_id=where)


def policy(rpo: int = 86400, asset: str = "web") -> PolicyRecord:
    return PolicyRecord(
        name=f"daily-{asset}", assets=[asset], schedule={}, mode="incremental", retention={},
        rpo_seconds=rpo,
    )  # fmt: skip


def session(
    sid: str, state: str, purpose: str, at: datetime, **details: Any
) -> FailoverSessionRecord:
    return FailoverSessionRecord(
        id=sid, asset="web", point_id="p1", state=state, started_at=at,
        details={"purpose": purpose, **details},
    )  # fmt: skip


PROVEN = session("t1", "stopped", "boot_test", NOW - timedelta(days=2), proven_at=(NOW - timedelta(days=2)).isoformat(), rto_seconds=42.0)  # fmt: skip


def facts(kind: str = "files", **kw: Any) -> AssetFacts:
    base: dict[str, Any] = {
        "asset": AssetRecord(name="web", kind=kind, source="/src", created_at=T0),
        "policies": [policy()],
        "points": [point("p1", timedelta(hours=2))],
        "copies": [copy("sys"), copy("cold")],
        "locations": LOCS,
        "system_disk": frozenset({"sys"}),
    }
    if kind == "vm":
        base["last_boot_test"] = base["last_proven_boot"] = PROVEN
    base.update(kw)
    return AssetFacts(**base)


def codes(f: AssetFacts, now: datetime = NOW) -> list[str]:
    return [r.code for r in asset_status(f, now).reasons]


def test_every_rule_passing_is_protected() -> None:
    for kind in ("files", "vm"):
        status = asset_status(facts(kind), NOW)
        assert status.state == PROTECTED and status.reasons == [], kind
        assert status.legs.copies == 2 and status.legs.media == ("cloud", "system_disk")


def test_nothing_is_fine_by_default() -> None:
    bare = facts(
        "vm", policies=[], points=[], copies=[], last_boot_test=None, last_proven_boot=None
    )
    status = asset_status(bare, NOW)
    assert status.state == AT_RISK
    assert [r.code for r in status.reasons] == ["no_good_point", "no_policy", "never_boot_tested"]
    assert {r.fix.action for r in status.reasons if r.fix} == {"add_policy", "run_backup"}
    # A files asset with no policy but a fine backup still needs attention.
    assert asset_status(facts(policies=[]), NOW).state == NEEDS_ATTENTION


def test_demo_like_vm_names_every_missing_thing() -> None:
    """No policy, one copy on the system disk, never verified, never test-booted."""
    demo = facts(
        "vm",
        policies=[],
        points=[point("p1", timedelta(hours=3), verified_at=None, verify_status=None)],
        copies=[copy("sys")],
        last_boot_test=None,
        last_proven_boot=None,
    )
    status = asset_status(demo, NOW)
    assert status.state == NEEDS_ATTENTION
    assert [r.code for r in status.reasons] == [
        "no_policy",
        "one_copy",
        "system_disk_only",
        "no_offsite_copy",
        "no_immutable_or_offline_copy",
        "never_verified",
        "never_boot_tested",
    ]
    fixes = {r.code: r.fix for r in status.reasons if r.fix}
    assert fixes["no_policy"].link == "#/assets?add_policy=web"
    assert fixes["one_copy"].action == "add_copy_rule"
    assert fixes["never_verified"].action == "run_verify" and fixes["never_verified"].point == "p1"
    assert fixes["never_boot_tested"].action == "run_boot_test"
    assert "system disk" in status.reasons[2].message


def test_rpo_target_is_the_tightest_policy() -> None:
    old = [point("p1", timedelta(hours=5))]
    assert codes(facts(points=old, policies=[policy(86400)])) == []
    two = [policy(86400), replace(policy(3600), name="hourly")]
    status = asset_status(facts(points=old, policies=two), NOW)
    assert status.state == AT_RISK and status.rpo_seconds == 3600
    assert status.reasons[0].code == "rpo_missed"
    assert (
        status.reasons[0].message == "The newest good backup is 5 hours old; the target is 1 hour."
    )
    # A policy without a target (0) sets none: the age alone is no reason.
    assert codes(facts(points=old, policies=[policy(0)])) == []


def test_damaged_and_failed_points_are_not_good() -> None:
    points = [
        point("p1", timedelta(hours=30)),
        point("p2", timedelta(hours=1), status="failed"),
    ]
    assert codes(facts(points=points)) == ["rpo_missed"]


@pytest.mark.parametrize(
    ("copies", "missing"),
    [
        (
            ["sys"],
            ["one_copy", "system_disk_only", "no_offsite_copy", "no_immutable_or_offline_copy"],
        ),
        (["sys", "data"], ["no_offsite_copy", "no_immutable_or_offline_copy"]),
        (["hot", "peer"], ["no_immutable_or_offline_copy"]),
        (["data", "data2"], ["one_medium", "no_offsite_copy", "no_immutable_or_offline_copy"]),
        (["data", "usb"], []),  # removable: offline, and marked off site
        (["sys", "cold"], []),  # cold bucket: offline and immutable
        (["data", "hotlock"], []),  # immutable bucket
        (["data", "tape"], ["no_offsite_copy"]),  # tape on site: offline, not off site
    ],
)
def test_each_3_2_1_leg(copies: list[str], missing: list[str]) -> None:
    locs = {
        **LOCS,
        "data2": location("data2", "block_pool"),
        "hotlock": location("hotlock", "s3_bucket", offsite=True, immutable=True),
        "tape": location("tape", "tape_set", access="sequential"),
    }
    got = codes(facts(copies=[copy(c) for c in copies], locations=locs))
    assert got == missing


def test_only_held_copies_count_and_a_lost_copy_is_named() -> None:
    found = legs(
        [copy("sys"), copy("cold", "copying"), copy("usb", "lost")], LOCS, frozenset({"sys"})
    )
    assert found.copies == 1 and not found.enough_copies and found.only_system_disk
    status = asset_status(
        facts(copies=[copy("sys"), copy("cold", "archived"), copy("usb", "lost")]), NOW
    )
    assert [r.code for r in status.reasons] == ["copy_lost"]
    assert status.reasons[0].message == "1 copy of the newest backup is lost (usb)."
    # The system disk is a medium of its own; the same folder elsewhere is an appliance disk.
    assert legs([copy("sys")], LOCS, frozenset()).media == ("appliance_disk",)


def test_verify_rules() -> None:
    stale = [point("p1", timedelta(hours=2), verified_at=NOW - timedelta(days=8))]
    status = asset_status(facts(points=stale), NOW)
    assert [r.code for r in status.reasons] == ["verify_stale"]
    assert (
        status.reasons[0].message == "The backups were last verified 8 days ago (more than 7 days)."
    )
    fresh = [point("p1", timedelta(hours=2), verified_at=NOW - timedelta(days=6, hours=23))]
    assert codes(facts(points=fresh)) == []
    # The newest verify found damage: that point is not good, and the asset is at risk.
    damaged = [
        point("p0", timedelta(hours=3), verified_at=NOW - timedelta(days=3)),
        point(
            "p1", timedelta(hours=2), verify_status="damaged", verified_at=NOW - timedelta(hours=1)
        ),
    ]
    status = asset_status(facts(points=damaged), NOW)
    assert status.state == AT_RISK and status.last_good is not None
    assert status.last_good.id == "p0" and codes(facts(points=damaged)) == ["verify_damaged"]


def test_boot_test_rules() -> None:
    failed = session("t2", "failed", "boot_test", NOW - timedelta(hours=1), error="QEMU exited")
    status = asset_status(facts("vm", last_boot_test=failed), NOW)
    assert status.state == AT_RISK and [r.code for r in status.reasons] == ["boot_test_failed"]
    assert status.reasons[0].fix is not None and status.reasons[0].fix.link == "#/failover/t2"
    old = session("t3", "stopped", "boot_test", NOW - timedelta(days=31), proven_at=(NOW - timedelta(days=31)).isoformat(), rto_seconds=30.0)  # fmt: skip
    status = asset_status(facts("vm", last_boot_test=old, last_proven_boot=old), NOW)
    assert [r.code for r in status.reasons] == ["boot_proof_stale"]
    assert status.reasons[0].message == "The last proven boot was 31 days ago (more than 30 days)."
    ok = asset_status(facts("vm"), NOW)
    assert ok.proven_boot is not None and ok.proven_boot.rto_seconds == 42.0
    # Boot tests are for VMs: a folder never needs one.
    assert codes(facts("files", last_boot_test=None)) == []


def test_a_vm_running_from_backup_comes_first() -> None:
    running = session("f1", "running", "failover", NOW - timedelta(minutes=5))
    testing = session("t9", "booting", "boot_test", NOW - timedelta(minutes=1))
    vm = asset_status(facts("vm", active_sessions=[testing, running]), NOW)
    assert vm.state == RUNNING_FROM_BACKUP and vm.running_session == "f1"
    assert vm.reasons[0].code == "running_from_backup"
    assert vm.reasons[0].fix is not None and vm.reasons[0].fix.link == "#/failover/f1"
    # A boot test in flight is not the VM running from backup.
    assert asset_status(facts("vm", active_sessions=[testing]), NOW).state == PROTECTED
    at_risk = asset_status(
        replace(facts(points=[]), asset=AssetRecord("aaa", "files", "/", T0)), NOW
    )
    fine = asset_status(
        facts(asset=AssetRecord("abc", "files", "/", T0), policies=[policy(asset="abc")]), NOW
    )
    assert [s.state for s in worst_first([fine, at_risk, vm])] == [
        RUNNING_FROM_BACKUP,
        AT_RISK,
        PROTECTED,
    ]


def test_policies_of_one_asset_in_one_helper() -> None:
    mine, other = policy(asset="web"), policy(asset="db")
    both = replace(policy(asset="db"), name="both", assets=["db", "web"])
    assert policies_of("web", [mine, other, both]) == [mine, both]
    assert policies_of("db", [mine, other, both]) == [other, both]


def test_system_disk_is_the_root_filesystems_device(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat("/").st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    on_root = replace(location("a"), address=str(tmp_path))
    elsewhere = replace(location("b"), address=str(shm))
    missing = replace(location("c"), address=str(tmp_path / "gone"))
    bucket = replace(location("d", "s3_bucket"), address=str(tmp_path))
    assert os.stat(tmp_path).st_dev == os.stat("/").st_dev
    assert system_disk_locations([on_root, elsewhere, missing, bucket]) == frozenset({"a"})
    # Seen from another root (a data disk), the same folders are not on it.
    assert system_disk_locations([on_root, elsewhere], root=str(shm)) == frozenset({"b"})
