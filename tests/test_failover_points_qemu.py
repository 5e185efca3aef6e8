"""Which point boots, with real QEMU (TCG here) and the busybox test guest, through the jobs.

- Right after a fresh backup, a boot test with no point named boots that new point: the backup
  job verified it before it ended (before, the older verified point booted).
- A damaged pack of the newest point fails its check (the CLI's work function), and the next
  boot test boots the older point and says why in its job log.

Two boots (~10-30 s each under TCG on a loaded machine). Missing QEMU fails with the install
step (guest_support).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import Any

import pytest
from engine_support import PASSPHRASE, StepClock, set_engine_env
from guest_support import PROOF, VM, failover_jobs, guest_image_path

from appliance.engine import Appliance
from appliance.jobs import JobRunner
from appliance.point_check import verify_new_point
from appliance.point_packs import point_packs
from appliance.store import format as fmt
from appliance.store.packs import pack_object_name
from image.testguest import copy_sparse

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

ASSET = "web"
MIB = 1024 * 1024
#: Unallocated space of the guest disk (its partitions end at 65 MiB): the guest never reads it.
TAIL_OFFSET = 100 * MIB
BOOT_TIMEOUT = 300


@pytest.fixture()
def running(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    set_engine_env(monkeypatch)
    disk = str(tmp_path / "web.raw")
    copy_sparse(guest_image_path(), disk)
    app, _ = Appliance.init(str(tmp_path / "app"), PASSPHRASE, clock=StepClock())
    try:
        with failover_jobs(app) as (manager, runner):
            yield {"app": app, "manager": manager, "runner": runner, "disk": disk}
    finally:
        app.close()


def _run(runner: JobRunner, kind: str, params: dict[str, Any]) -> Any:
    job = runner.wait(runner.submit(kind, params).id, timeout=BOOT_TIMEOUT)
    assert job.state == "succeeded", (job.state, job.error)
    return job


def _write_tail(disk: str, seed: int) -> None:
    with open(disk, "r+b") as f:
        f.seek(TAIL_OFFSET)
        f.write(random.Random(seed).randbytes(MIB))


def test_the_fresh_point_boots_and_a_damaged_one_gives_way(running: dict[str, Any]) -> None:
    app: Appliance = running["app"]
    runner: JobRunner = running["runner"]
    disk = running["disk"]
    backup = {"disks": [disk], "asset": ASSET, "vm": VM}

    first = _run(runner, "backup_image", {**backup, "mode": "full"}).result["point"]
    app.verify(first)  # a nightly verify checked it
    _write_tail(disk, 1)
    job = _run(runner, "backup_image", backup)
    second = job.result["point"]
    assert job.result["check"]["ok"] is True
    assert app.point(second).verify_status == "ok"

    # Right after the backup, the new point is the one that boots.
    test = _run(runner, "boot_test", {"asset": ASSET, "proof": PROOF})
    assert test.result["ok"] and test.result["point"] == second, test.result
    assert 0 < test.result["rto_seconds"] < PROOF["timeout"]

    # Damage in a pack only the newest point uses: its check fails, the older point boots.
    older = set(point_packs(app.repo, app.repo.get_manifest(first)).packs)
    newer = point_packs(app.repo, app.repo.get_manifest(second)).packs
    own = sorted(p for p, kind in newer.items() if kind == fmt.PACK_KIND_DATA and p not in older)
    assert own, "the new tail data should be in a pack of its own"
    path = os.path.join(app.data_dir.store_path, pack_object_name(own[0], fmt.PACK_KIND_DATA))
    with open(path, "r+b") as f:
        f.seek(64)
        byte = f.read(1)
        f.seek(64)
        f.write(bytes([byte[0] ^ 0x80]))
    check = verify_new_point(app, second)
    problem = f"pack {own[0].hex()[:16]} is damaged: its content does not match its name"
    assert check.problems == [problem]

    job = _run(runner, "boot_test", {"asset": ASSET, "proof": PROOF})
    assert job.result["ok"] and job.result["point"] == first, job.result
    lines = [line.message for line in app.catalog.job_log(job.id)]
    why = [line for line in lines if line.startswith("the newest point (")]
    assert why, lines
    assert f"failed verification: {problem}; booting the one of " in why[0]
    session = app.catalog.get_failover_session(job.result["session"])
    assert session.point_id == first
