"""`appliance repair`: after a pack is lost or damaged, new backups must not inherit the damage,
and a store whose index files are damaged must be openable again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from engine_support import PASSPHRASE, new_appliance, run_cli, set_engine_env, snapshot

from appliance.engine import Appliance
from appliance.maintenance import repair_store, verify_store


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    set_engine_env(monkeypatch)


def _tree(root: Path) -> Path:
    (root / "docs").mkdir(parents=True)
    for i in range(6):
        (root / "docs" / f"f{i}.bin").write_bytes(os.urandom(200_000 + i))
    return root


def _data_packs(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "pools" / "default" / "store" / "data").rglob("*"), key=str)


def test_lost_pack_is_dropped_and_the_next_backup_stores_the_data_again(tmp_path):
    src = _tree(tmp_path / "src")
    app, _ = new_appliance(tmp_path / "data", pack_size=64 * 1024)
    with app:
        first = app.backup_files(str(src), "docs").point.id
        packs = [p for p in _data_packs(tmp_path / "data") if p.is_file()]
        packs[0].unlink()
        with app.locks.exclusive():
            report = repair_store(app.repo)
        # A lost pack simply is not in the rebuilt index: nothing to drop, the point is named.
        meta_packs = list((tmp_path / "data").rglob("meta/*/*"))
        assert report.packs_scanned == len(packs) - 1 + len(meta_packs)
        assert list(report.affected_points) == [first]
        assert "missing" in report.affected_points[first][0]
        # A full backup of the same (unchanged) source must re-store what was lost.
        second = app.backup_files(str(src), "docs", mode="full").point.id
        # The data stored again has the same chunk IDs: the old point is whole again too.
        assert verify_store(app.repo).ok
        for point in (first, second):
            out = tmp_path / f"out-{point}"
            app.restore(point, str(out))
            assert snapshot(out) == snapshot(src)


def test_repair_cli_opens_a_store_whose_index_file_is_damaged(tmp_path):
    src = _tree(tmp_path / "src")
    data = tmp_path / "data"
    app, _ = new_appliance(data)
    with app:
        point = app.backup_files(str(src), "docs").point.id
    index_file = next((data / "pools" / "default" / "store" / "index").iterdir())
    blob = bytearray(index_file.read_bytes())
    blob[40] ^= 0xFF
    index_file.write_bytes(bytes(blob))
    for cache in (data / "cache").iterdir():
        for f in cache.iterdir():
            f.unlink()
    failed = run_cli("points", data_dir=data, check=False)
    assert failed.returncode == 2 and b"index" in failed.stderr
    repaired = run_cli("repair", data_dir=data, check=False)
    assert repaired.returncode == 0, repaired.stderr
    assert b"Index rebuilt" in repaired.stdout
    run_cli("restore", point, str(tmp_path / "out"), data_dir=data)
    assert snapshot(tmp_path / "out") == snapshot(src)
    with Appliance.open(str(data), passphrase=PASSPHRASE) as again:
        assert verify_store(again.repo).ok


def test_bit_flipped_blob_is_dropped_from_the_index(tmp_path):
    src = _tree(tmp_path / "src")
    app, _ = new_appliance(tmp_path / "data", pack_size=64 * 1024)
    with app:
        first = app.backup_files(str(src), "docs").point.id
        pack = next(p for p in _data_packs(tmp_path / "data") if p.is_file())
        data = bytearray(pack.read_bytes())
        data[200] ^= 0x01  # inside the first envelope
        pack.write_bytes(bytes(data))
        with app.locks.exclusive():
            report = repair_store(app.repo)
        assert report.blobs_dropped == 1 and len(report.damaged_packs) == 1
        assert list(report.affected_points) == [first]
        second = app.backup_files(str(src), "docs", mode="full").point.id
        out = tmp_path / "out"
        app.restore(second, str(out))
        assert snapshot(out) == snapshot(src)
