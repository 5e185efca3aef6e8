"""``appliance tape pools`` from the command line: a pool's schedule set, checked, listed in
words and cleared; allocation and retention kept when not given; a pool deleted once empty."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from engine_support import PASSPHRASE, run_cli

from appliance.engine import Appliance
from hardware.tape.library import create_virtual_library, register_library


@pytest.fixture
def data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    app, _ = Appliance.init(str(data), PASSPHRASE)
    with app:
        library = create_virtual_library(tmp_path / "lib", slots=2, name="cli")
        register_library(app.catalog, library.root)
    return data


def _pools(data: Path, *args: str) -> list[dict[str, Any]]:
    pools: list[dict[str, Any]] = json.loads(
        run_cli("--json", "tape", "pools", *args, data_dir=data).stdout
    )
    return pools


def _refused(data: Path, *args: str) -> str:
    proc = run_cli("tape", "pools", *args, data_dir=data, check=False)
    assert proc.returncode == 2, proc
    return proc.stderr.decode()


def test_a_pools_schedule_is_set_checked_listed_and_cleared(data: Path) -> None:
    run_cli("tape", "pools", "--pool", "weekly", "--allocation", "new_set", "--retention-days",
            "30", data_dir=data)  # fmt: skip
    drive = "virtual:cli-drive0"
    refused = [
        (("--schedule", "every saturday"), "needs five fields"),
        (("--schedule", "0 3 * * 6"), "needs the drive it writes with"),
        (("--schedule", "61 3 * * 6", "--drive", drive), "is not a valid cron expression"),
        (("--schedule", "0 3 * * 6", "--drive", "virtual:cli-drive9"), "no tape drive"),
        (("--schedule", "0 3 * * 6", "--drive", drive, "--points", "gfs"), "at least one daily"),
        (("--schedule", "0 3 * * 6", "--drive", drive, "--asset", "nope"), "nope"),
        (("--drive", drive), "name the schedule"),
    ]
    for args, words in refused:
        assert words in _refused(data, "--pool", "weekly", *args), args
    (pool,) = _pools(data)
    assert pool["schedule"] is None  # a refusal changes nothing

    (pool,) = _pools(
        data, "--pool", "weekly", "--schedule", "30 2  * * 6", "--drive", drive,
        "--points", "gfs", "--keep-weekly", "4", "--keep-monthly", "3",
    )  # fmt: skip
    # Only the schedule was given: allocation and retention stay as they were.
    assert (pool["allocation"], pool["retention_days"]) == ("new_set", 30)
    assert (pool["schedule"], pool["drive"]) == ("30 2 * * 6", drive)
    assert pool["points_words"] == "the points GFS keeps: 4 weekly, 3 monthly"
    words = run_cli("tape", "pools", data_dir=data).stdout.decode()
    assert words.strip() == (
        "weekly: new_set, kept 30 day(s); backs up on '30 2 * * 6' with virtual:cli-drive0, "
        "the points GFS keeps: 4 weekly, 3 monthly"
    )
    # Retention changed alone: the schedule and the other values stay.
    (pool,) = _pools(data, "--pool", "weekly", "--retention-days", "60")
    assert (pool["allocation"], pool["retention_days"], pool["schedule"]) == (
        "new_set", 60, "30 2 * * 6",
    )  # fmt: skip
    # The points alone: the schedule and drive stay.
    (pool,) = _pools(data, "--pool", "weekly", "--points", "newest")
    assert (pool["schedule"], pool["points"]) == ("30 2 * * 6", {"rule": "newest"})

    (pool,) = _pools(data, "--pool", "weekly", "--no-schedule")
    assert (pool["schedule"], pool["drive"], pool["retention_days"]) == (None, None, 60)
    words = run_cli("tape", "pools", data_dir=data).stdout.decode()
    assert words.strip() == "weekly: new_set, kept 60 day(s); backed up only when asked"

    # A new pool given only a schedule gets continue / 365 days.
    pools = _pools(data, "--pool", "daily", "--schedule", "0 1 * * *", "--drive", drive)
    daily = next(p for p in pools if p["name"] == "daily")
    assert (daily["allocation"], daily["retention_days"]) == ("continue", 365)
    assert daily["points"] == {"rule": "newest"}


def test_a_pool_is_deleted_only_once_empty(data: Path) -> None:
    assert "tape pool 'nowhere' does not exist" in _refused(data, "--delete", "nowhere")
    run_cli("tape", "pools", "--pool", "weekly", data_dir=data)
    run_cli("tape", "pools", "--pool", "other", data_dir=data)
    with Appliance.open(str(data), passphrase=PASSPHRASE) as app:
        app.catalog.put_tape_medium("C00001", pool="weekly")
    assert "pool weekly still has 1 tape(s): erase them or move them" in _refused(
        data, "--delete", "weekly"
    )
    assert "--delete takes no other pool option" in _refused(
        data, "--delete", "weekly", "--retention-days", "3"
    )
    with Appliance.open(str(data), passphrase=PASSPHRASE) as app:
        app.catalog.put_tape_medium("C00001", pool=None)
    out = run_cli("tape", "pools", "--delete", "weekly", data_dir=data).stdout.decode()
    assert out.splitlines()[0] == "pool weekly deleted"
    assert [p["name"] for p in _pools(data)] == ["other"]
