"""Retention, prune, garbage collection and verify."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from engine_support import (
    SMALL_PACKS,
    compare_trees,
    new_appliance,
    pack_files,
    run_cli,
    set_engine_env,
    snapshot,
    store_size,
)

from appliance.engine import Appliance
from appliance.maintenance import collect_garbage, verify_point, verify_store
from appliance.retention import RetentionRules, apply_retention
from appliance.store import format as fmt
from appliance.store.packs import PackWriter, pack_object_name

KiB = 1 << 10


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


# --- retention (a pure function) -------------------------------------------------------------------


@dataclass(frozen=True)
class P:
    id: str
    created_at: datetime


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def points(*stamps: str) -> list[P]:
    return [P(f"p{i:02d}", at(s)) for i, s in enumerate(stamps)]


def kept(pts: list[P], **rules: int) -> list[str]:
    decision = apply_retention(pts, RetentionRules(**rules))
    assert set(decision.keep) | set(decision.remove) == {p.id for p in pts}
    assert not set(decision.keep) & set(decision.remove)
    return sorted(decision.keep)


def test_no_rules_keeps_everything() -> None:
    pts = points("2024-01-01T00:00", "2024-01-02T00:00", "2024-01-03T00:00")
    decision = apply_retention(pts, RetentionRules())
    assert decision.remove == []
    assert decision.keep == {p.id: ["no rules"] for p in pts}
    assert RetentionRules().empty() and not RetentionRules(keep_yearly=1).empty()


def test_keep_last() -> None:
    pts = points(*(f"2024-01-01T{h:02d}:00" for h in range(10)))
    decision = apply_retention(pts, RetentionRules(keep_last=3))
    assert sorted(decision.keep) == ["p07", "p08", "p09"]
    assert all(reasons == ["last"] for reasons in decision.keep.values())
    # Newest first.
    assert decision.remove == [f"p{i:02d}" for i in range(6, -1, -1)]
    assert kept(pts, keep_last=20) == sorted(p.id for p in pts)


def test_keep_last_input_order_does_not_matter() -> None:
    pts = points("2024-01-03T00:00", "2024-01-01T00:00", "2024-01-02T00:00")
    assert kept(pts, keep_last=1) == ["p00"]
    assert kept(list(reversed(pts)), keep_last=1) == ["p00"]


def test_keep_daily_keeps_the_newest_point_of_each_day() -> None:
    pts = points(
        "2024-03-01T08:00",  # p00
        "2024-03-01T20:00",  # p01  newest of Mar 1
        "2024-03-03T01:00",  # p02
        "2024-03-03T23:59",  # p03  newest of Mar 3
        "2024-03-04T00:00",  # p04  newest of Mar 4 (the only one)
        "2024-03-06T12:00",  # p05  newest of Mar 6
        "2024-03-06T06:00",  # p06
    )
    assert kept(pts, keep_daily=3) == ["p03", "p04", "p05"]
    # Days without points do not count: 4 days with points back from Mar 6 reach Mar 1.
    assert kept(pts, keep_daily=4) == ["p01", "p03", "p04", "p05"]
    assert kept(pts, keep_daily=100) == ["p01", "p03", "p04", "p05"]


def test_keep_weekly_uses_iso_weeks() -> None:
    pts = points(
        "2020-12-28T10:00",  # p00  ISO 2020-W53 (Monday)
        "2020-12-31T10:00",  # p01  ISO 2020-W53
        "2021-01-03T10:00",  # p02  ISO 2020-W53 (Sunday): same week as Dec 31
        "2021-01-04T10:00",  # p03  ISO 2021-W01 (Monday)
        "2021-01-10T23:00",  # p04  ISO 2021-W01 (Sunday)
        "2021-01-11T00:30",  # p05  ISO 2021-W02
    )
    assert kept(pts, keep_weekly=2) == ["p04", "p05"]
    assert kept(pts, keep_weekly=3) == ["p02", "p04", "p05"]


def test_keep_monthly_and_yearly() -> None:
    pts = points(
        "2021-06-15T00:00",  # p00
        "2022-11-30T00:00",  # p01
        "2022-12-01T00:00",  # p02
        "2022-12-31T23:00",  # p03  newest of Dec 2022 and of 2022
        "2023-01-01T00:00",  # p04
        "2023-01-20T00:00",  # p05  newest of Jan 2023
        "2023-02-02T00:00",  # p06  newest of Feb 2023 and of 2023
    )
    assert kept(pts, keep_monthly=3) == ["p03", "p05", "p06"]
    assert kept(pts, keep_yearly=2) == ["p03", "p06"]
    assert kept(pts, keep_yearly=5) == ["p00", "p03", "p06"]


def test_keep_hourly() -> None:
    pts = points("2024-01-01T10:05", "2024-01-01T10:55", "2024-01-01T11:00", "2024-01-01T13:10")
    assert kept(pts, keep_hourly=2) == ["p02", "p03"]


def test_rules_combine_and_reasons_are_reported() -> None:
    pts = points(
        "2024-01-01T12:00",  # p00  newest of 2024-01-01 (week 1, January)
        "2024-01-15T12:00",  # p01
        "2024-01-31T12:00",  # p02  newest of January
        "2024-02-01T09:00",  # p03
        "2024-02-01T18:00",  # p04  newest of Feb 1
        "2024-02-02T07:00",  # p05  newest overall
    )
    decision = apply_retention(pts, RetentionRules(keep_last=1, keep_daily=2, keep_monthly=2))
    assert decision.keep == {
        "p05": ["last", "daily", "monthly"],
        "p04": ["daily"],
        "p02": ["monthly"],
    }
    assert decision.remove == ["p03", "p01", "p00"]


def test_periods_are_taken_in_utc() -> None:
    plus2 = timezone(timedelta(hours=2))
    pts = [
        P("a", datetime(2024, 3, 1, 10, 0, tzinfo=UTC)),
        # 00:30 on Mar 2 at +02:00 is 22:30 on Mar 1 in UTC: the same UTC day as "a".
        P("b", datetime(2024, 3, 2, 0, 30, tzinfo=plus2)),
        P("c", datetime(2024, 3, 2, 3, 0, tzinfo=plus2)),  # 01:00 UTC on Mar 2
    ]
    assert kept(pts, keep_daily=2) == ["b", "c"]
    assert kept(pts, keep_daily=1) == ["c"]


# --- prune and GC on a real store ---------------------------------------------------------------


def _backup_generations(app: Appliance, source: Path, generations: int) -> list[str]:
    """Points whose data is entirely new each time (nothing shared between generations)."""
    ids = []
    source.mkdir(exist_ok=True)
    for gen in range(generations):
        for old in source.iterdir():
            old.unlink()
        for i in range(3):
            (source / f"gen{gen}-{i}.bin").write_bytes(os.urandom(100 * KiB))
        ids.append(app.backup_files(str(source), "gens", workers=2).point.id)
    return ids


def test_prune_via_cli_then_gc_frees_space(tmp_path: Path) -> None:
    data_dir = tmp_path / "appliance"
    app, _recovery = new_appliance(data_dir, pack_size=SMALL_PACKS)
    source = tmp_path / "src"
    with app:
        ids = _backup_generations(app, source, 4)
    last_state = snapshot(source)
    size_before = store_size(data_dir)
    packs_before = len(pack_files(data_dir))

    dry = run_cli(
        "--json", "prune", "--asset", "gens", "--keep-last", "2", "--dry-run", data_dir=data_dir
    )
    document = json.loads(dry.stdout)
    assert document["dry_run"] is True
    assert sorted(document["remove"]) == sorted(ids[:2])
    assert sorted(document["keep"]) == sorted(ids[2:])
    listed = json.loads(run_cli("--json", "points", data_dir=data_dir).stdout)
    assert sorted(p["id"] for p in listed) == sorted(ids)  # nothing removed
    manifests = data_dir / "pools" / "default" / "store" / "manifests"
    assert len(list(manifests.iterdir())) == 4

    real = json.loads(
        run_cli("--json", "prune", "--asset", "gens", "--keep-last", "2", data_dir=data_dir).stdout
    )
    assert real["dry_run"] is False and sorted(real["remove"]) == sorted(ids[:2])
    listed = json.loads(run_cli("--json", "points", data_dir=data_dir).stdout)
    assert sorted(p["id"] for p in listed) == sorted(ids[2:])
    assert sorted(p.name for p in manifests.iterdir()) == sorted(ids[2:])
    assert store_size(data_dir) == size_before  # prune alone frees nothing

    gc_dry = json.loads(
        run_cli("--json", "gc", "--grace", "0", "--dry-run", data_dir=data_dir).stdout
    )
    assert gc_dry["dry_run"] is True and gc_dry["packs_deleted"] > 0
    assert len(pack_files(data_dir)) == packs_before
    gc = json.loads(run_cli("--json", "gc", "--grace", "0", data_dir=data_dir).stdout)
    assert gc["packs_deleted"] > 0 and gc["points"] == 2
    assert gc["bytes_freed"] > 0
    size_after = store_size(data_dir)
    assert size_after < size_before - 500 * KiB  # two generations of 300 KiB went away
    assert len(pack_files(data_dir)) < packs_before

    with Appliance.open(str(data_dir), passphrase="correct horse battery staple") as app:
        report = verify_store(app.repo)
        assert report.ok and report.coverage == 1.0 and report.points_checked == 2
        app.restore(ids[-1], str(tmp_path / "latest"), workers=2)
        compare_trees(last_state, snapshot(tmp_path / "latest"))
        app.restore(ids[-2], str(tmp_path / "previous"), workers=2)
        assert len(list((tmp_path / "previous").iterdir())) == 3
    verified = run_cli("verify", data_dir=data_dir)
    assert verified.returncode == 0 and b"OK" in verified.stdout


def test_prune_needs_a_rule(tmp_path: Path) -> None:
    data_dir = tmp_path / "appliance"
    app, _recovery = new_appliance(data_dir)
    app.close()
    proc = run_cli("prune", "--asset", "x", data_dir=data_dir, check=False)
    assert proc.returncode == 2 and b"invalid_input" in proc.stderr


def test_gc_repacks_mostly_dead_packs(tmp_path: Path) -> None:
    app, _recovery = new_appliance(tmp_path / "appliance", pack_size=SMALL_PACKS)
    source = tmp_path / "src"
    source.mkdir()
    with app:
        # Many small files: each is one blob, a 64 KiB pack holds ~30 of them.
        for i in range(200):
            (source / f"f{i:03d}.bin").write_bytes(os.urandom(2 * KiB))
        first = app.backup_files(str(source), "small", workers=1).point.id
        for i in range(200):
            if i % 5:
                (source / f"f{i:03d}.bin").unlink()
        state = snapshot(source)
        second = app.backup_files(str(source), "small", workers=1).point.id
        data_packs_before = app.repo.index.counts()[1]
        assert data_packs_before >= 6

        app.repo.delete_manifest(first)
        app.catalog.delete_point(first)
        with app.locks.exclusive():
            report = collect_garbage(app.repo, grace_seconds=0)
        assert report.packs_repacked > 0
        assert report.points == 1 and report.blobs_live >= 40
        assert app.repo.index.counts()[1] < data_packs_before
        verified = verify_store(app.repo)
        assert verified.ok, verified.to_dict()
        assert verify_point(app.repo, second).ok
        app.restore(second, str(tmp_path / "restored"), workers=2)
        compare_trees(state, snapshot(tmp_path / "restored"))
        # A second GC finds nothing more to do.
        with app.locks.exclusive():
            again = collect_garbage(app.repo, grace_seconds=0)
        assert (again.packs_deleted, again.packs_repacked, again.bytes_freed) == (0, 0, 0)


def test_gc_keeps_a_store_whose_packs_are_all_live(tmp_path: Path) -> None:
    app, _recovery = new_appliance(tmp_path / "appliance", pack_size=SMALL_PACKS)
    source = tmp_path / "src"
    with app:
        _backup_generations(app, source, 2)
        files_before = pack_files(tmp_path / "appliance")
        with app.locks.exclusive():
            report = collect_garbage(app.repo, grace_seconds=0)
        assert (report.packs_deleted, report.packs_repacked, report.bytes_freed) == (0, 0, 0)
        assert pack_files(tmp_path / "appliance") == files_before
        assert verify_store(app.repo).ok


def _orphan_pack(app: Appliance) -> Path:
    """A pack no index names, as a crashed backup leaves behind."""
    envelope = app.repo.envelope
    writer = PackWriter(app.repo.backend, fmt.PACK_KIND_DATA, SMALL_PACKS)
    data = os.urandom(5000)
    blob_id = envelope.chunk_id(data)
    writer.add(fmt.BLOB_DATA, blob_id, envelope.seal(fmt.BLOB_DATA, blob_id, data))
    (entry,) = writer.flush()
    return Path(app.data_dir.store_path) / pack_object_name(entry.pack, fmt.PACK_KIND_DATA)


def test_gc_grace_period_protects_young_orphans(tmp_path: Path) -> None:
    app, _recovery = new_appliance(tmp_path / "appliance", pack_size=SMALL_PACKS)
    source = tmp_path / "src"
    with app:
        ids = _backup_generations(app, source, 1)
        orphan = _orphan_pack(app)
        leftover = orphan.parent / "unfinished.tmp-0123456789ab"
        leftover.write_bytes(b"half a pack")
        with app.locks.exclusive():
            young = collect_garbage(app.repo, grace_seconds=3600)
        assert young.packs_orphaned_deleted == 0 and young.temp_files_deleted == 0
        assert orphan.exists() and leftover.exists()
        # An hour and a bit later (injected time), the same grace lets them go.
        with app.locks.exclusive():
            later = collect_garbage(app.repo, grace_seconds=3600, now=lambda: time.time() + 3700)
        assert later.packs_orphaned_deleted == 1 and later.temp_files_deleted == 1
        assert not orphan.exists() and not leftover.exists()
        assert verify_point(app.repo, ids[0]).ok


def test_gc_with_zero_grace_removes_orphans_at_once(tmp_path: Path) -> None:
    app, _recovery = new_appliance(tmp_path / "appliance", pack_size=SMALL_PACKS)
    with app:
        ids = _backup_generations(app, tmp_path / "src", 1)
        orphan = _orphan_pack(app)
        time.sleep(0.01)
        with app.locks.exclusive():
            dry = collect_garbage(app.repo, grace_seconds=0, dry_run=True)
        assert dry.packs_orphaned_deleted == 1 and orphan.exists()
        with app.locks.exclusive():
            report = collect_garbage(app.repo, grace_seconds=0)
        assert report.packs_orphaned_deleted == 1 and not orphan.exists()
        assert report.bytes_freed > 5000
        assert verify_point(app.repo, ids[0]).ok


# --- verify ------------------------------------------------------------------------------------------


def test_budgeted_verify_covers_the_store_in_rounds(tmp_path: Path) -> None:
    app, _recovery = new_appliance(tmp_path / "appliance", pack_size=SMALL_PACKS)
    with app:
        _backup_generations(app, tmp_path / "src", 4)
        packs = pack_files(tmp_path / "appliance")
        total = sum(p.stat().st_size for p in packs)
        largest = max(p.stat().st_size for p in packs)
        budget = total // 4 + 1
        rounds = math.ceil(total / budget)
        assert rounds == 4 and len(packs) > 8
        clock = iter(range(1_000_000, 2_000_000, 100))
        coverages = []
        seen_bytes = 0
        for _ in range(rounds):
            report = verify_store(app.repo, max_bytes=budget, now=lambda: float(next(clock)))
            assert report.ok
            assert report.packs_total == len(packs)
            # The budget is spent, overshooting by at most the one pack that crossed it ...
            assert report.bytes_checked <= budget + largest
            assert report.bytes_checked >= min(budget, total - seen_bytes)
            seen_bytes += report.bytes_checked
            coverages.append(report.coverage)
        # ... and each round continues where the last stopped, so coverage grows to 1.
        assert coverages == sorted(coverages) and coverages[0] < 0.5
        assert coverages[-1] == 1.0
        assert seen_bytes >= total
        # The next round starts over with the packs verified longest ago.
        report = verify_store(app.repo, max_bytes=budget, now=lambda: float(next(clock)))
        assert report.coverage == 1.0 and report.bytes_checked <= budget + largest


def test_full_verify_and_verify_point(tmp_path: Path) -> None:
    app, _recovery = new_appliance(tmp_path / "appliance", pack_size=SMALL_PACKS)
    with app:
        ids = _backup_generations(app, tmp_path / "src", 2)
        disk = tmp_path / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
            f.write(os.urandom(200 * KiB))
        image_point = app.backup_image([str(disk)], "vm", threads=2).point.id
        report = verify_store(app.repo)
        assert report.ok and report.points_checked == 3
        assert report.packs_checked == report.packs_total == len(pack_files(tmp_path / "appliance"))
        assert report.coverage == 1.0 and report.blobs_checked == app.repo.index.counts()[0]
        for point_id in [*ids, image_point]:
            point_report = verify_point(app.repo, point_id)
            assert point_report.ok, point_report.to_dict()
            assert point_report.blobs_checked > 0 and point_report.missing_blobs == 0
        image_report = verify_point(app.repo, image_point)
        assert image_report.bytes_checked >= 200 * KiB
        assert not verify_point(app.repo, "00000000000deadb").ok  # no such manifest
