"""Locations from the CLI, on two real loop-mounted ext4 filesystems: add them, copy a point to
both, lose the first disk and the local pool's packs, restore from the second (the notes name the
switches), and rebuild the catalog on a fresh data directory from the second alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from engine_support import compare_trees, run_cli, snapshot
from loop_support import mounted_disk

pytestmark = pytest.mark.root


def _json(*args: str, data_dir: Path) -> object:
    return json.loads(run_cli("--json", *args, data_dir=data_dir).stdout)


def test_locations_copy_restore_and_rebuild_from_the_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(12):
        (tree / "sub" / f"f{i}").write_bytes(os.urandom(30_000))
    run_cli("init", data_dir=data)
    backup = _json("backup", "files", str(tree), "--asset", "docs", data_dir=data)
    point = backup["point"]["id"]  # type: ignore[index]
    with (
        mounted_disk(tmp_path / "a.img", tmp_path / "a") as _a,
        mounted_disk(tmp_path / "b.img", tmp_path / "b"),
    ):
        for name in ("a", "b"):
            run_cli(
                "locations",
                "add",
                str(tmp_path / name),
                "--require-mount",
                "--label",
                name,
                data_dir=data,
            )
        # A folder inside the data directory is no location.
        inside = run_cli("locations", "add", str(data / "x"), data_dir=data, check=False)
        assert inside.returncode != 0
        listed = _json("locations", data_dir=data)
        home = next(
            loc["label"]
            for loc in listed
            if loc["address"] == str(data / "pools" / "default" / "store")
        )  # type: ignore[index, union-attr]
        assert sorted(loc["label"] for loc in listed) == sorted(["a", "b", home])  # type: ignore[index, union-attr]
        first = _json("copy", point, "--to", "a", data_dir=data)
        assert first["packs_copied"] == first["packs_needed"] > 0  # type: ignore[index]
        again = _json("copy", point, "--to", "a", data_dir=data)
        assert again["packs_copied"] == 0  # type: ignore[index]
        _json("copy", point, "--to", "b", data_dir=data)
        checked = _json("verify", point, "--location", "b", data_dir=data)
        assert checked["ok"] and checked["blobs_checked"] > 0  # type: ignore[index]
        points = _json("points", "--copies", data_dir=data)
        states = {c["label"]: c["state"] for c in points[0]["copies"]}  # type: ignore[index]
        assert states == {home: "present", "a": "present", "b": "present"}

        # Lose the first disk and the local pool's data: the restore reads from the second.
        subprocess.run(["umount", "-l", str(tmp_path / "a")], check=True)
        store = data / "pools" / "default" / "store"
        shutil.move(store / "data", tmp_path / "lost-data")
        shutil.move(store / "meta", tmp_path / "lost-meta")
        out = tmp_path / "restored"
        restored = run_cli("restore", point, str(out), "--from", "a", data_dir=data)
        assert "reading from a failed" in restored.stderr.decode()
        compare_trees(snapshot(tree), snapshot(out))
        # Named first, the local pool fails mid-read (its packs are gone): the next copy serves.
        out = tmp_path / "restored-2"
        restored = run_cli("restore", point, str(out), "--from", home, data_dir=data)
        notes = restored.stderr.decode()
        assert f"reading from {home} failed" in notes and "reading from b" in notes, notes
        compare_trees(snapshot(tree), snapshot(out))
        busy = run_cli("locations", "remove", "b", data_dir=data, check=False)
        assert busy.returncode != 0 and b"conflict" in busy.stderr

        # A fresh data directory learns the point from the second location alone.
        fresh = tmp_path / "fresh"
        rebuilt = _json("catalog", "rebuild", "--from", str(tmp_path / "b"), data_dir=fresh)
        assert rebuilt["points_added"] == 1 and rebuilt["copies"] == 1  # type: ignore[index]
        again_rebuilt = _json("catalog", "rebuild", "--from", str(tmp_path / "b"), data_dir=fresh)
        assert again_rebuilt["points_added"] == 0  # type: ignore[index]
        assert [p["id"] for p in _json("points", data_dir=fresh)] == [point]  # type: ignore[index, union-attr]
        out2 = tmp_path / "restored-fresh"
        run_cli("restore", point, str(out2), data_dir=fresh)
        compare_trees(snapshot(tree), snapshot(out2))
