"""The pure decisions behind disk pools: the growth forecast, the free-space reserve, the btrfs
output parsers (on output recorded from real runs in ``tests/fixtures/btrfs/``), names, layouts,
labels, import discovery and health. The pools themselves, on real loop devices, are tested in
tests/test_hw_pools.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from appliance.catalog.records import PoolUsageRecord
from appliance.errors import InvalidInput, NotFound
from appliance.space import GIB, reserve_bytes, space_decision
from hardware import btrfs
from hardware import pools as pools_module
from hardware.pool_backend import (
    forecast,
    health_state,
)
from hardware.pool_jobs import (
    member_devid,
    sample_due,
    scrub_due,
)
from hardware.pools import (
    check_layout,
    check_pool_name,
    find_importable,
    pool_label,
)
from hardware.records import BlockDevice, Inventory

FIXTURES = Path(__file__).parent / "fixtures" / "btrfs"
MIB = 1 << 20
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- pure: forecast and reserve ------------------------------------------------------------------


def _samples(points: list[tuple[float, int]], total: int = 100 * GIB) -> list[PoolUsageRecord]:
    return [PoolUsageRecord("p", T0 + timedelta(days=d), used, total) for d, used in points]


def test_forecast_fits_a_line_through_the_last_30_days() -> None:
    # 1 GiB a day for 10 days, 50 GiB used now; full at 100 GiB less the 2 GiB reserve.
    samples = _samples([(d, 40 * GIB + d * GIB) for d in range(11)])
    assert forecast(samples, T0 + timedelta(days=10)) == pytest.approx(48.0)
    # A day later without a new sample: one day less.
    assert forecast(samples, T0 + timedelta(days=11)) == pytest.approx(47.0)
    # Samples older than the window do not count: a shrinking past is ignored.
    old = _samples([(-60, 90 * GIB), (-40, 80 * GIB)])
    assert forecast(old + samples, T0 + timedelta(days=10)) == pytest.approx(48.0)
    # Noise around the trend still gives about the trend.
    noisy = _samples(
        [(d, 40 * GIB + d * GIB + (GIB // 4 if d % 2 else -GIB // 4)) for d in range(11)]
    )
    assert forecast(noisy, T0 + timedelta(days=10)) == pytest.approx(48.0, rel=0.1)


def test_forecast_says_nothing_without_growth_or_history() -> None:
    now = T0 + timedelta(days=10)
    assert forecast([], now) is None
    assert forecast(_samples([(10, GIB)]), now) is None
    assert forecast(_samples([(0, 5 * GIB), (10, 5 * GIB)]), now) is None  # flat
    assert forecast(_samples([(0, 9 * GIB), (10, 5 * GIB)]), now) is None  # shrinking
    minutes = [PoolUsageRecord("p", now - timedelta(minutes=m), GIB + m, 10 * GIB) for m in (0, 30)]
    assert forecast(minutes, now) is None  # half an hour tells nothing
    # Already past the reserve: zero days.
    assert forecast(_samples([(0, 97 * GIB), (10, 99 * GIB)]), now) == 0.0


def test_the_reserve_is_two_percent_and_a_gib_on_large_disks() -> None:
    assert reserve_bytes(0) == 0
    assert reserve_bytes(300 * MIB) == 15 * MIB  # 5 % of a small disk
    assert reserve_bytes(20 * GIB) == GIB
    assert reserve_bytes(10 * GIB) == 512 * MIB
    assert reserve_bytes(1000 * GIB) == 20 * GIB
    ok = space_decision("pool a", 10 * GIB, 100 * GIB)
    assert ok.ok and ok.message == "" and ok.reserve_bytes == 2 * GIB
    full = space_decision("pool a", GIB, 100 * GIB)
    assert not full.ok
    assert "pool a is full" in full.message and "nothing was written" in full.message
    assert not space_decision("pool a", 3 * GIB, 100 * GIB, needed_bytes=2 * GIB).ok
    assert space_decision("pool a", 5 * GIB, 100 * GIB, needed_bytes=2 * GIB).ok


# --- pure: btrfs output recorded from real runs --------------------------------------------------


def test_device_stats_parse_in_both_forms() -> None:
    healthy = btrfs.parse_device_stats(fixture("device-stats-healthy.json"))
    assert [(d.device, d.devid, d.total) for d in healthy] == [
        ("/dev/loop0", 1, 0),
        ("/dev/loop1", 2, 0),
    ]
    corrupted = btrfs.parse_device_stats(fixture("device-stats-corrupted.json"))
    assert corrupted[1].corruption_errs == 20 and corrupted[1].nonzero() == {"corruption_errs": 20}
    text = btrfs.parse_device_stats(fixture("device-stats-corrupted.txt"))
    assert [(d.device, d.corruption_errs) for d in text] == [("/dev/loop0", 0), ("/dev/loop1", 20)]
    degraded = btrfs.parse_device_stats(fixture("device-stats-degraded.json"))
    assert degraded[1].missing and degraded[1].devid == 2 and not degraded[0].missing
    assert btrfs.parse_device_stats(fixture("device-stats-degraded.txt"))[1].missing


def test_filesystem_show_finds_missing_members_mounted_or_not() -> None:
    (healthy,) = btrfs.parse_filesystem_show(fixture("filesystem-show-healthy.txt"))
    assert healthy.uuid == "61729e38-2966-4ff1-8e56-24ace2fb8462"
    assert healthy.label == "appliance-test" and healthy.total_devices == 2
    assert [d.path for d in healthy.devices] == ["/dev/loop0", "/dev/loop1"]
    assert healthy.devices[0].size_bytes == 300 * MIB and healthy.missing_devids == []
    (mounted,) = btrfs.parse_filesystem_show(fixture("filesystem-show-degraded.txt"))
    assert mounted.missing_devids == [2] and [d.devid for d in mounted.present] == [1]
    (unmounted,) = btrfs.parse_filesystem_show(fixture("filesystem-show-degraded-unmounted.txt"))
    assert unmounted.some_missing and unmounted.missing_devids == [2]
    (replaced,) = btrfs.parse_filesystem_show(fixture("filesystem-show-replaced.txt"))
    assert replaced.missing_devids == []


def test_scrub_results_parse() -> None:
    clean = btrfs.parse_scrub(fixture("scrub-clean.txt"))
    assert clean.clean and clean.status == "finished" and clean.total_bytes == 336 * MIB
    corrected = btrfs.parse_scrub(fixture("scrub-corrected.txt"))
    assert corrected.errors == {"csum": 20} and corrected.corrected == 20
    assert corrected.repaired and not corrected.clean and corrected.uncorrectable == 0
    bad = btrfs.parse_scrub(fixture("scrub-uncorrectable.txt"))
    assert bad.uncorrectable == 5 and not bad.repaired
    assert btrfs.parse_scrub(fixture("scrub-status-uncorrectable.txt")).uncorrectable == 5
    assert btrfs.parse_scrub(fixture("scrub-status-never.txt")).status == "never"
    running = btrfs.parse_scrub(fixture("scrub-status-running.txt"))
    assert running.status == "running" and running.percent == 15.62
    assert running.scrubbed_bytes == int(375.25 * MIB)
    raw = btrfs.parse_scrub(fixture("scrub-status-raw-corrected.txt"))
    assert (raw.corrected, raw.errors) == (20, {"csum": 20})
    raw_running = btrfs.parse_scrub(fixture("scrub-status-raw-running.txt"))
    assert raw_running.scrubbed_bytes == 407896064 + 2883584
    assert btrfs.parse_scrub(fixture("scrub-status-after-replace.txt")).duration_seconds == 0
    assert btrfs.parse_scrub(fixture("scrub-big.txt")).duration_seconds == 1


def test_replace_status_and_chunk_profiles_parse() -> None:
    states = {
        name: btrfs.parse_replace_status(fixture(f"replace-status-{name}.txt"))
        for name in ("never", "running", "finished", "canceled")
    }
    assert states["never"].state == "never"
    assert (states["running"].state, states["running"].percent) == ("running", 12.9)
    assert states["finished"].state == "finished" and states["finished"].write_errors == 0
    assert states["canceled"].state == "canceled"
    mixed = btrfs.parse_filesystem_df(fixture("filesystem-df-mixed.txt"))
    assert {(c.kind, c.profile) for c in mixed} >= {("Data", "single"), ("Data", "raid1")}
    assert btrfs.unredundant_chunks(mixed, "raid1") == []  # the single chunks hold nothing
    written = [btrfs.ChunkProfile("Data", "single", 64 * MIB, MIB), *mixed]
    assert [c.profile for c in btrfs.unredundant_chunks(written, "raid1")] == ["single"]
    assert btrfs.unredundant_chunks(written, "single") == []
    raid1 = btrfs.parse_filesystem_df(fixture("filesystem-df-raid1.txt"))
    assert raid1[0].total_bytes == 149946368 and btrfs.unredundant_chunks(raid1, "raid1") == []
    assert btrfs.parse_size("1.50GiB") == 3 * GIB // 2 and btrfs.parse_size("n/a") is None


# --- pure: names, layouts, discovery, health, schedule -------------------------------------------


def test_names_layouts_and_labels() -> None:
    assert check_pool_name("backup-1") == "backup-1"
    for bad in ("default", "", "Big", "a/b", "x" * 33, "-a"):
        with pytest.raises(InvalidInput):
            check_pool_name(bad)
    check_layout("ext4", "single", 1)
    check_layout("btrfs", "raid1", 2)
    check_layout("btrfs", "raid10", 4)
    for fs, profile, n in [
        ("ext4", "raid1", 2),
        ("xfs", "single", 2),
        ("btrfs", "raid10", 3),
        ("btrfs", "single", 2),
        ("btrfs", "raid1", 1),
        ("zfs", "single", 1),
    ]:
        with pytest.raises(InvalidInput):
            check_layout(fs, profile, n)
    assert pool_label("office-backups", "xfs") == "apool-office"
    assert pool_label("office-backups", "ext4") == "apool-office-bac"
    assert pool_label("office-backups", "btrfs") == "apool-office-backups"


def _disk(identity: str, fs_uuid: str | None, label: str | None, fs: str = "btrfs") -> BlockDevice:
    return BlockDevice(
        identity, f"/dev/{identity}", "disk", GIB, fs_type=fs, fs_uuid=fs_uuid, fs_label=label
    )


def test_importable_pools_are_grouped_by_filesystem() -> None:
    inventory = Inventory(
        block={
            d.identity: d
            for d in [
                _disk("b", "u1", "apool-mirror"),
                _disk("a", "u1", "apool-mirror"),
                _disk("c", "u2", "apool-known"),
                _disk("d", "u3", "photos", "ext4"),
                _disk("e", "u4", "apool-one", "xfs"),
                _disk("f", None, None),
            ]
        }
    )
    found = find_importable(inventory, known_fs_uuids=["u2"])
    assert [(p.fs_uuid, p.name, [d.identity for d in p.devices]) for p in found] == [
        ("u1", "mirror", ["a", "b"]),
        ("u4", "one", ["e"]),
    ]


def test_health_schedule_and_members() -> None:
    assert health_state({}) == "ok"
    assert health_state({"warning": ["x"], "degraded": ["y"]}) == "degraded"
    assert health_state({"unavailable": ["z"], "damaged": ["d"]}) == "unavailable"
    assert sample_due(None, T0) and not sample_due(T0, T0 + timedelta(minutes=59))
    assert sample_due(T0, T0 + timedelta(hours=1))
    pool = pools_module.PoolRecord(
        "m", "/p/store", "s", T0, "u", "btrfs", "raid1", ["loop:a", "loop:b"], "l", "/p"
    )
    assert not scrub_due(pool, {}, T0 + timedelta(days=29))
    assert scrub_due(pool, {}, T0 + timedelta(days=30))
    month = (T0 + timedelta(days=30)).isoformat()
    assert not scrub_due(pool, {"last_scrub_at": month}, T0 + timedelta(days=59))
    asked = {"scrub_asked_at": (T0 + timedelta(days=30)).isoformat()}
    assert not scrub_due(pool, asked, T0 + timedelta(days=30, hours=5))
    assert scrub_due(pool, asked, T0 + timedelta(days=31))
    ext4 = pools_module.PoolRecord("e", "/e/store", "s", T0, "u2", "ext4", "single", ["x"])
    assert not scrub_due(ext4, {}, T0 + timedelta(days=90))
    assert member_devid(pool, "loop:b") == 2 and member_devid(pool, "1") == 1
    with pytest.raises(NotFound):
        member_devid(pool, "loop:zz")
