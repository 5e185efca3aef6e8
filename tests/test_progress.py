"""Progress of a backup within one large file: the bytes read move before the file ends, and the
total is known from the start and stays put (engine and service, on real files)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import LiveServer, bootstrapped_server
from engine_support import PASSPHRASE, set_engine_env

from appliance.backup import files as backup_files_module
from appliance.backup.progress import ProgressTotals
from appliance.engine import Appliance

MiB = 1024 * 1024


def big_random_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (8 * MiB)):
            f.write(os.urandom(8 * MiB))


def test_totals_grow_during_the_walk_and_are_exact_after_it() -> None:
    totals = ProgressTotals(estimate=1000)
    totals.walked, totals.reused = 400, 300
    assert (totals.total(), totals.done(read=50)) == (1000, 350)
    totals.walked = 1200  # the tree grew past the previous point's size
    assert totals.total() == 1200
    assert totals.done(read=2000) == 1200  # a file read twice (it changed) never passes 100%
    totals.walk_done = True
    totals.walked = 900
    assert totals.total() == 900
    assert ProgressTotals(estimate=0).total() == 0  # a first backup: unknown until walked


def test_engine_reports_bytes_within_one_large_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_engine_env(monkeypatch)
    # Reports every 50 ms instead of 0.5 s (the main process's wait), so a quick machine still
    # shows many of them; the workers' steps (16 MiB) are the real ones.
    monkeypatch.setattr(backup_files_module, "REPORT_SECONDS", 0.05)
    src = tmp_path / "src"
    src.mkdir()
    size = 256 * MiB
    big_random_file(src / "disk.img", size)
    app, _ = Appliance.init(str(tmp_path / "data"), PASSPHRASE)
    reports: list[dict[str, Any]] = []
    app.backup_files(str(src), "big", progress=lambda info: reports.append(dict(info)), workers=1)
    within = [r for r in reports if 0 < r["bytes_done"] < size]
    assert len({r["bytes_done"] for r in within}) >= 3, reports
    done = [r["bytes_done"] for r in reports]
    assert done == sorted(done)
    assert {r.get("bytes_total") for r in reports} == {size}
    assert reports[-1]["bytes_done"] == size


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with bootstrapped_server(tmp_path_factory.mktemp("progress-service")) as live:
        yield live


def test_backup_job_of_one_large_file_moves(
    server: LiveServer, admin: httpx.Client, operator: httpx.Client, tmp_path: Path
) -> None:
    src = tmp_path / "vm-export"
    src.mkdir()
    size = 512 * MiB
    big_random_file(src / "disk.raw", size)
    r = admin.post("/api/assets", json={"name": "export", "kind": "files", "path": str(src)})
    assert r.status_code == 201, r.text
    job_id = operator.post("/api/assets/export/backup", json={"mode": "full"}).json()["id"]
    seen: list[tuple[int, int | None]] = []
    deadline = time.monotonic() + 300
    while True:
        job = operator.get(f"/api/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            break
        p = job["progress"] or {}
        if "bytes_done" in p:
            seen.append((p["bytes_done"], p.get("bytes_total")))
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["state"] == "succeeded", job
    # The job stores progress every half second, and a fast machine reads the file in about a
    # second, so one value within the file is what can be counted on here; that it keeps moving
    # is the engine test's above (same reporting, no job between).
    within = {done for done, _ in seen if 0 < done < size}
    assert within, f"no progress within the file reached the job: {seen}"
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert {total for _, total in seen} == {size}
    assert job["progress"]["bytes_done"] == size
