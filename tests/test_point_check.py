"""The check of a new image point right after its backup, and the failover's choice of point.

The check runs on real stores (small packs, so a small disk spans many) with real damage: a
byte flipped in a pack, a pack deleted. The choice of point (``choose_point``,
``choice_reason``) is pure and tested on explicit records with an explicit ``now``.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from engine_support import SMALL_PACKS, new_appliance, run_cli, set_engine_env

from appliance.catalog.records import PointRecord, home_location_id
from appliance.engine import Appliance
from appliance.errors import InvalidInput
from appliance.jobs import JobRunner
from appliance.point_check import (
    PROBLEMS_KEY,
    check_point_data,
    recorded_problems,
    verify_new_point,
)
from appliance.point_packs import point_packs
from appliance.store.packs import pack_object_name
from image.failover.admission import choice_reason, choose_point, pick_point, when_text

ASSET = "web"
MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    set_engine_env(monkeypatch)


def _disk(path: Path, mib: int = 2, seed: int = 1) -> str:
    """A disk image: random data with zero holes (zero chunks are never stored)."""
    rnd = __import__("random").Random(seed)
    with open(path, "wb") as f:
        for i in range(mib * 16):  # 64 KiB steps
            f.write(rnd.randbytes(65536) if i % 3 else bytes(65536))
    return str(path)


@pytest.fixture()
def app(tmp_path: Path) -> Any:
    appliance, _ = new_appliance(tmp_path / "data", pack_size=SMALL_PACKS)
    yield appliance
    appliance.close()


def _packs_of(app: Appliance, point_id: str) -> dict[bytes, int]:
    needs = point_packs(app.repo, app.repo.get_manifest(point_id))
    return needs.packs


def _data_pack(app: Appliance, point_id: str) -> str:
    """The file of one data pack of the point (the first by name)."""
    from appliance.store import format as fmt

    packs = sorted(p for p, k in _packs_of(app, point_id).items() if k == fmt.PACK_KIND_DATA)
    name = pack_object_name(packs[0], fmt.PACK_KIND_DATA)
    return os.path.join(app.data_dir.store_path, name)


def _flip_byte(path: str, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# --- the check ------------------------------------------------------------------------------------


def test_a_whole_point_verifies_ok_and_says_how_much_it_checked(app: Appliance, tmp_path: Path):
    point = app.backup_image([_disk(tmp_path / "a.raw")], ASSET).point
    assert point.verify_status is None
    check = verify_new_point(app, point.id)
    assert check.ok and check.problems == []
    packs = _packs_of(app, point.id)
    assert check.packs == len(packs) > 2  # small packs: the disk spans several
    # 2 MiB in 64 KiB chunks, a third of them zero (never stored), plus its chunk table
    assert check.chunks == 21 + 1
    assert check.packs_hashed == check.packs and check.bytes_hashed > 21 * 65536
    assert check.summary() == (
        f"verified point {point.id}: 22 chunks in {check.packs} packs, {check.seconds:.1f} s"
    )
    recorded = app.point(point.id)
    assert recorded.verify_status == "ok" and recorded.verified_at is not None
    home = home_location_id(app.repo.store_id)
    copy = next(c for c in app.catalog.copies_of(point.id) if c.location_id == home)
    assert copy.verified_at == recorded.verified_at


def test_a_damaged_pack_fails_the_check_and_keeps_the_point(app: Appliance, tmp_path: Path):
    point = app.backup_image([_disk(tmp_path / "a.raw")], ASSET).point
    path = _data_pack(app, point.id)
    _flip_byte(path)
    check = verify_new_point(app, point.id)
    pack_hex = os.path.basename(path)[:16]
    assert not check.ok
    assert check.problems == [f"pack {pack_hex} is damaged: its content does not match its name"]
    assert check.summary() == f"point {point.id} failed verification: {check.problems[0]}"
    recorded = app.point(point.id)  # still there, marked
    assert recorded.verify_status == "damaged"
    problems = recorded_problems(app.catalog.get_settings(PROBLEMS_KEY), [recorded])
    assert problems == {point.id: check.problems[0]}
    # A pack gone is named as missing.
    os.unlink(path)
    again = verify_new_point(app, point.id)
    assert again.problems == [f"pack {pack_hex} is missing"]
    # A verify that later decides otherwise makes the remembered problem stale: not used.
    app.catalog.mark_verified(point.id, recorded.verified_at + timedelta(hours=1), "damaged")
    stale = recorded_problems(app.catalog.get_settings(PROBLEMS_KEY), [app.point(point.id)])
    assert stale == {}


def test_chunks_missing_from_the_index_are_named(app: Appliance, tmp_path: Path):
    point = app.backup_image([_disk(tmp_path / "a.raw")], ASSET).point
    manifest = app.repo.get_manifest(point.id)
    table = bytes.fromhex(manifest["disks"][0]["tables"][0])
    app.repo.index.remove_blobs(
        [(table, next(iter(app.repo.index.lookup_many([table]).values())).pack)]
    )
    check = check_point_data(app.repo, manifest)
    assert check.problems == [f"1 chunk table(s) not in the store (e.g. {table.hex()[:16]})"]


def test_a_damaged_chunk_table_is_a_problem_not_a_crash(app: Appliance, tmp_path: Path):
    from appliance.store import format as fmt

    point = app.backup_image([_disk(tmp_path / "a.raw")], ASSET).point
    meta = [p for p, k in _packs_of(app, point.id).items() if k == fmt.PACK_KIND_META]
    path = os.path.join(app.data_dir.store_path, pack_object_name(meta[0], fmt.PACK_KIND_META))
    size = os.path.getsize(path)
    for offset in range(64, size, 512):  # every blob of the pack, the table's among them
        _flip_byte(path, offset)
    check = verify_new_point(app, point.id)
    assert not check.ok
    assert check.problems[0].startswith("a chunk table cannot be read: ")
    assert f"pack {meta[0].hex()[:16]} is damaged: its content does not match its name" in (
        check.problems
    )
    assert app.point(point.id).verify_status == "damaged"


def test_each_pack_is_hashed_once_per_run(app: Appliance, tmp_path: Path):
    disk = _disk(tmp_path / "a.raw")
    first = app.backup_image([disk], ASSET).point
    second = app.backup_image([disk], ASSET).point  # the same data: the same packs
    checked: dict[bytes, str | None] = {}
    a = check_point_data(app.repo, app.repo.get_manifest(first.id), checked=checked)
    b = check_point_data(app.repo, app.repo.get_manifest(second.id), checked=checked)
    assert a.packs_hashed == a.packs and b.packs == a.packs
    assert b.packs_hashed == 0 and b.bytes_hashed == 0 and b.ok


def test_a_files_point_is_refused(app: Appliance, tmp_path: Path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    point = app.backup_files(str(folder), "docs").point
    with pytest.raises(InvalidInput, match="not a VM image point"):
        verify_new_point(app, point.id)


# --- the backup job's hook -----------------------------------------------------------------------


def test_the_backup_job_verifies_its_point_before_it_ends(app: Appliance, tmp_path: Path):
    disk = _disk(tmp_path / "a.raw")
    runner = JobRunner(app)
    runner.start()
    try:
        job = runner.submit("backup_image", {"disks": [disk], "asset": ASSET, "mode": "full"})
        done = runner.wait(job.id, timeout=120)
        assert done.state == "succeeded", done.error
        point_id = done.result["point"]
        assert done.result["check"]["ok"] is True and done.result["check"]["problems"] == []
        assert app.point(point_id).verify_status == "ok"
        lines = [line.message for line in app.catalog.job_log(job.id)]
        check = done.result["check"]
        assert (
            f"verified point {point_id}: {check['chunks']} chunks in {check['packs']} packs, "
            f"{check['seconds']:.1f} s"
        ) in lines
        assert pick_point(app.catalog.list_points(asset=ASSET)).id == point_id

        # Damage under the data the next backup shares: its check fails, the job says so and
        # still succeeds (the point exists), and the failover's choice falls back with the why.
        path = _data_pack(app, point_id)
        _flip_byte(path)
        job = runner.submit("backup_image", {"disks": [disk], "asset": ASSET})
        done = runner.wait(job.id, timeout=120)
        assert done.state == "succeeded", done.error
        newest = done.result["point"]
        assert done.result["check"]["ok"] is False
        problem = f"pack {os.path.basename(path)[:16]} is damaged"
        assert done.result["check"]["problems"][0].startswith(problem)
        log = app.catalog.job_log(job.id)
        failed = [line for line in log if line.level == "error"]
        assert failed and failed[0].message.startswith(f"point {newest} failed verification")
        points = app.catalog.list_points(asset=ASSET)
        assert {p.id: p.verify_status for p in points} == {point_id: "ok", newest: "damaged"}
        choice = choose_point(points)
        assert choice.point.id == point_id and choice.why == "newest_failed"
        reason = choice_reason(
            choice,
            now=app.clock(),
            problems=recorded_problems(app.catalog.get_settings(PROBLEMS_KEY), points),
        )
        assert reason is not None and f"failed verification: {problem}" in reason
        assert reason.endswith("instead")
    finally:
        runner.shutdown()


def test_the_cli_runs_the_same_check(tmp_path: Path):
    data = tmp_path / "data"
    app, _ = new_appliance(data, pack_size=SMALL_PACKS)
    point = app.backup_image([_disk(tmp_path / "a.raw")], ASSET).point
    path = _data_pack(app, point.id)
    app.close()
    ok = run_cli("--json", "verify", "--quick", point.id, data_dir=data)
    assert json.loads(ok.stdout)["ok"] is True
    _flip_byte(path)
    bad = run_cli("verify", "--quick", point.id, data_dir=data, check=False)
    assert bad.returncode == 1, bad.stderr
    assert b"failed verification: pack" in bad.stdout
    refused = run_cli("verify", "--quick", data_dir=data, check=False)
    assert refused.returncode == 2 and b"name the point" in refused.stderr


# --- which point boots, and why (pure) ------------------------------------------------------------

NOW = datetime(2026, 12, 5, 10, 30, tzinfo=UTC)


def _point(pid: str, at: datetime, verify: str | None = None, kind: str = "image") -> PointRecord:
    return PointRecord(
        id=pid,
        asset=ASSET,
        kind=kind,
        mode="full",
        created_at=at,
        verified_at=at if verify else None,
        verify_status=verify,
    )


TODAY_8 = NOW.replace(hour=8, minute=0)
TODAY_10 = NOW.replace(hour=10, minute=2)


def test_the_newest_point_boots_when_it_verified_ok():
    points = [_point("a", TODAY_8, "ok"), _point("b", TODAY_10, "ok")]
    choice = choose_point(points)
    assert choice.point.id == "b" and choice.why == "newest_ok"
    assert choice_reason(choice, now=NOW) is None


def test_a_newest_point_that_failed_verification_gives_way_with_the_reason():
    points = [_point("a", TODAY_8, "ok"), _point("b", TODAY_10, "damaged")]
    choice = choose_point(points)
    assert (choice.point.id, choice.newest.id, choice.why) == ("a", "b", "newest_failed")
    reason = choice_reason(choice, now=NOW, problems={"b": "pack 3fa9c2e1d0b4a5c6 is damaged"})
    assert reason == (
        "the newest point (today 10:02) failed verification: pack 3fa9c2e1d0b4a5c6 is "
        "damaged; booting the one of today 08:00 instead"
    )
    # without a recorded problem (a full verify found it) the sentence still says what happened
    assert choice_reason(choice, now=NOW) == (
        "the newest point (today 10:02) failed verification; booting the one of today 08:00 instead"
    )


def test_an_unverified_newest_point_gives_way_to_the_newest_verified_one():
    points = [_point("a", TODAY_8 - timedelta(days=1), "ok"), _point("b", TODAY_10)]
    choice = choose_point(points)
    assert choice.point.id == "a" and choice.why == "newest_unverified"
    assert choice_reason(choice, now=NOW) == (
        "the newest point (today 10:02) is not verified yet; booting the newest verified one, "
        "of yesterday 08:00, instead"
    )


def test_without_any_verified_point():
    old = TODAY_8 - timedelta(days=40)
    only_unverified = choose_point([_point("a", old), _point("b", TODAY_10)])
    assert only_unverified.point.id == "b" and only_unverified.why == "none_verified"
    assert choice_reason(only_unverified, now=NOW) == (
        "no point has verified ok yet; booting the newest one, of today 10:02"
    )
    damaged_newest = choose_point([_point("a", old), _point("b", TODAY_10, "damaged")])
    assert damaged_newest.point.id == "a" and damaged_newest.why == "none_verified"
    assert choice_reason(damaged_newest, now=NOW) == (
        "no point has verified ok yet and the newest one (today 10:02) failed verification; "
        "booting the one of 26 Oct 08:00 instead"
    )
    all_damaged = choose_point([_point("a", old, "damaged"), _point("b", TODAY_10, "damaged")])
    assert all_damaged.point.id == "b" and all_damaged.why == "all_failed"
    assert "every point failed verification" in (choice_reason(all_damaged, now=NOW) or "")


def test_only_image_points_count_and_none_is_said_plainly():
    files_only = choose_point([_point("f", TODAY_10, "ok", kind="files")])
    assert files_only.point is None and files_only.why == "no_point"
    assert choice_reason(files_only, now=NOW) is None
    assert pick_point([_point("f", TODAY_10, "ok", kind="files"), _point("a", TODAY_8)]).id == "a"


def test_point_times_in_words():
    assert when_text(TODAY_10, NOW) == "today 10:02"
    assert when_text(TODAY_10 - timedelta(days=1), NOW) == "yesterday 10:02"
    assert when_text(datetime(2025, 3, 1, 7, 5, tzinfo=UTC), NOW) == "1 Mar 2025 07:05"
    # a time zone moves the day as well as the hour
    from zoneinfo import ZoneInfo

    late = datetime(2026, 12, 4, 23, 30, tzinfo=UTC)
    assert when_text(late, NOW, ZoneInfo("Europe/Berlin")) == "today 00:30"
