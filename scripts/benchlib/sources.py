"""The ``sources`` phase: the backup client over HTTPS against the same data backed up locally.

Two ``appliance serve --tls`` processes on 127.0.0.1 (fresh stores, so neither run dedups
against the other): on ``local`` the tree is an asset backed up by a job, on ``client`` a client
host is added through the API and ``appliance-client`` (in this process, as a host runs it) backs
the same tree up over HTTPS with the pinned certificate. Both on the same two cores. Then ~5 % of
the files are rewritten and the client backs up again: bytes of chunk batches on the wire vs the
new sealed bytes the point added to the store.

The same for a disk: a raw image file (random, text and zero regions) as a VM asset backed up
by a job on ``local``, and sent by the client as a block device (``--image``) to ``client``; then
2 % of its 4 KiB blocks are rewritten and the client sends an incremental.

Targets (issue 18): client ≥ 0.7x local; incremental bytes sent ≤ 1.05x new compressed chunks.
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

TITLE = "Remote sources: the backup client over HTTPS vs a local backup"


@dataclass
class Run:
    local_s: float
    client_s: float
    size: int
    inc_sent: int
    inc_new: int
    inc_changed: int
    img_local_s: float = 0.0
    img_client_s: float = 0.0
    img_inc_sent: int = 0
    img_inc_new: int = 0


@dataclass
class SourcesResult:
    runs: list[Run] = field(default_factory=list)
    problem: str | None = None


def _tree(root: Path, size: int, seed: int) -> int:
    """Half random files (do not compress), half text (compresses ~4x); 64 KiB to 8 MiB."""
    rng = random.Random(seed)
    words = [b"backup", b"appliance", b"chunk", b"store", b"point", b"client", b"pack"]
    total = 0
    n = 0
    while total < size:
        length = min(rng.choice([64 << 10, 256 << 10, 1 << 20, 8 << 20]), size - total)
        folder = root / f"d{n % 16:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        if n % 2:
            data = rng.randbytes(length)
        else:
            line = b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
            data = (line * (length // len(line) + 1))[:length]
        (folder / f"f{n:05d}").write_bytes(data)
        total += length
        n += 1
    return total


def _change(root: Path, share: float, seed: int) -> int:
    rng = random.Random(seed)
    files = sorted(p for p in root.rglob("f*") if p.is_file())
    changed = 0
    for path in rng.sample(files, max(1, int(len(files) * share))):
        size = path.stat().st_size
        path.write_bytes(rng.randbytes(size))
        changed += size
    return changed


def _disk(path: Path, size: int, seed: int) -> None:
    """A third random, a third text, a third zeros, in 1 MiB runs."""
    rng = random.Random(seed)
    line = b"backup appliance disk block of text\n"
    text = (line * (2**20 // len(line) + 1))[: 2**20]
    with open(path, "wb") as f:
        for n in range(size // 2**20):
            kind = n % 3
            f.write(rng.randbytes(2**20) if kind == 0 else text if kind == 1 else bytes(2**20))


def _scribble(path: Path, share: float, seed: int) -> None:
    rng = random.Random(seed)
    blocks = path.stat().st_size // 4096
    with open(path, "r+b") as f:
        for block in rng.sample(range(blocks), int(blocks * share)):
            f.seek(block * 4096)
            f.write(rng.randbytes(4096))


def _client_disk(config: str, disk: Path, state: Path) -> dict[str, Any]:
    from appliance.client.blockdev import ImageRequest, run_image_backup
    from appliance.client.cli import connect, load_config

    conn = connect(load_config(config))
    try:
        request = ImageRequest(
            [str(disk)], "bench-disks", "bench", image_files=True, state_dir=str(state)
        )
        return run_image_backup(conn, request)
    finally:
        conn.close()


def _job_seconds(job: dict[str, Any]) -> float:
    start = datetime.fromisoformat(job["started_at"])
    end = datetime.fromisoformat(job["finished_at"])
    return (end - start).total_seconds()


def _local(service: Any, asset: dict[str, Any], wait_job: Any) -> float:
    """Add ``asset`` (the body of ``POST /api/assets``) and time its full backup job."""
    with service.api() as api:
        r = api.post("/api/assets", json=asset)
        if r.status_code != 201:
            raise RuntimeError(f"asset: {r.status_code} {r.text}")
        job = api.post(f"/api/assets/{asset['name']}/backup", json={"mode": "full"}).json()
        done = wait_job(api, job["id"])
        if done["state"] != "succeeded":
            raise RuntimeError(f"local backup of {asset['name']}: {done.get('error')}")
        return _job_seconds(done)


def _client(service: Any, tree: Path, work: Path) -> tuple[str, Any]:
    from appliance.client import cli

    with service.api() as api:
        r = api.post("/api/hosts", json={"name": "bench", "kind": "client", "disks": True})
        if r.status_code != 201:
            raise RuntimeError(f"host: {r.status_code} {r.text}")
        token = r.json()["token"]
    config = work / "client.json"
    from api.identity import certificate_fingerprint

    fingerprint = certificate_fingerprint(service.data / "tls" / "cert.pem")
    args = ["--config", str(config), "enroll", "--server", service.url]
    if cli.main([*args, "--fingerprint", fingerprint, "--token", token]) != 0:
        raise RuntimeError("enroll failed")
    return str(config), cli


def _client_backup(config: str, tree: Path, state: Path) -> dict[str, Any]:
    from appliance.client.backup import BackupRequest, run_backup
    from appliance.client.cli import connect, load_config

    conn = connect(load_config(config))
    try:
        request = BackupRequest([str(tree)], "bench", "bench", state_dir=str(state))
        return run_backup(conn, request)
    finally:
        conn.close()


def run(
    cli: Path,
    work: Path,
    *,
    scale: float,
    repeat: int,
    log: Any,
    service_cls: Any,
    wait_job: Any,
) -> SourcesResult:
    result = SourcesResult()
    size = int(512 * 1024 * 1024 * scale)
    work.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="sources-", dir=work))
    logs = work / "logs"
    try:
        for n in range(repeat):
            tree = base / f"tree{n}"
            actual = _tree(tree, size, seed=n)
            local = service_cls(cli, base / f"local{n}", logs)
            remote = service_cls(cli, base / f"client{n}", logs)
            try:
                local.start()
                remote.start()
                config, _ = _client(remote, tree, base)
                os.sync()
                order = ["local", "client"] if n % 2 == 0 else ["client", "local"]
                times: dict[str, float] = {}
                for which in order:
                    # Each starts with no dirty pages left by the other (writeback would
                    # slow whichever runs second).
                    os.sync()
                    if which == "local":
                        times["local"] = _local(
                            local, {"name": "tree", "kind": "files", "path": str(tree)}, wait_job
                        )
                    else:
                        started = time.monotonic()
                        _client_backup(config, tree, base / "state")
                        times["client"] = time.monotonic() - started
                changed = _change(tree, 0.05, seed=100 + n)
                os.sync()
                inc = _client_backup(config, tree, base / "state")
                with remote.api() as api:
                    point = api.get(f"/api/points/{inc['point']}").json()
                new = int(point.get("stored_bytes", 0))
                run_ = Run(
                    times["local"], times["client"], actual, inc["chunk_bytes_sent"], new, changed
                )
                shutil.rmtree(tree, ignore_errors=True)
                disk = base / f"disk{n}.raw"
                _disk(disk, size, seed=n)
                os.sync()
                for which in order:
                    os.sync()
                    if which == "local":
                        run_.img_local_s = _local(
                            local, {"name": "disk", "kind": "vm", "disks": [str(disk)]}, wait_job
                        )
                    else:
                        started = time.monotonic()
                        _client_disk(config, disk, base / "state")
                        run_.img_client_s = time.monotonic() - started
                _scribble(disk, 0.02, seed=200 + n)
                os.sync()
                img = _client_disk(config, disk, base / "state")
                with remote.api() as api:
                    point = api.get(f"/api/points/{img['point']}").json()
                run_.img_inc_sent = img["chunk_bytes_sent"]
                run_.img_inc_new = int(point.get("stored_bytes", 0))
                disk.unlink()
                result.runs.append(run_)
                log(
                    f"sources {n + 1}/{repeat}: local {run_.local_s:.1f} s, client "
                    f"{run_.client_s:.1f} s ({_mib(actual) / run_.client_s:.0f} MiB/s), "
                    f"incremental sent {_mib(run_.inc_sent):.1f} MiB for {_mib(new):.1f} MiB new; "
                    f"disk: local {run_.img_local_s:.1f} s, client {run_.img_client_s:.1f} s, "
                    f"incremental sent {_mib(run_.img_inc_sent):.1f} MiB for "
                    f"{_mib(run_.img_inc_new):.1f} MiB new"
                )
            finally:
                local.stop()
                remote.stop()
                shutil.rmtree(tree, ignore_errors=True)
    except Exception as exc:  # the report says what failed instead of a traceback
        result.problem = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return result


def _mib(n: float) -> float:
    return n / 2**20


def rows(result: SourcesResult) -> list[list[str]]:
    out = []
    for n, r in enumerate(result.runs, 1):
        out.append(
            [
                str(n),
                f"{_mib(r.size):.0f}",
                f"{r.local_s:.1f} ({_mib(r.size) / r.local_s:.0f} MiB/s)",
                f"{r.client_s:.1f} ({_mib(r.size) / r.client_s:.0f} MiB/s)",
                f"{r.local_s / r.client_s:.2f}x",
                f"{_mib(r.inc_sent):.1f} / {_mib(r.inc_new):.1f} = {r.inc_sent / max(r.inc_new, 1):.3f}x",
            ]
        )
    return out


HEADERS = ["run", "MiB", "local s", "client s", "client ÷ local speed", "incr. sent / new"]
DISK_HEADERS = [
    "run",
    "disk MiB",
    "local job s",
    "client --image s",
    "client ÷ local speed",
    "incr. sent / new",
]


def disk_rows(result: SourcesResult) -> list[list[str]]:
    out = []
    for n, r in enumerate(result.runs, 1):
        if not r.img_client_s:
            continue
        out.append(
            [
                str(n),
                f"{_mib(r.size):.0f}",
                f"{r.img_local_s:.1f} ({_mib(r.size) / r.img_local_s:.0f} MiB/s)",
                f"{r.img_client_s:.1f} ({_mib(r.size) / r.img_client_s:.0f} MiB/s)",
                f"{r.img_local_s / r.img_client_s:.2f}x",
                f"{_mib(r.img_inc_sent):.1f} / {_mib(r.img_inc_new):.1f} = "
                f"{r.img_inc_sent / max(r.img_inc_new, 1):.3f}x",
            ]
        )
    return out


def targets(result: SourcesResult) -> list[tuple[str, str, str]]:
    if not result.runs:
        return [
            ("client vs local", "≥ 0.7x", "not measured"),
            ("incremental bytes", "≤ 1.05x", "-"),
        ]
    speed = statistics.median(r.local_s / r.client_s for r in result.runs)
    sent = statistics.median(r.inc_sent / max(r.inc_new, 1) for r in result.runs)
    disks = [r for r in result.runs if r.img_client_s]
    disk_checks = []
    if disks:
        d_speed = statistics.median(r.img_local_s / r.img_client_s for r in disks)
        d_sent = statistics.median(r.img_inc_sent / max(r.img_inc_new, 1) for r in disks)
        disk_checks = [
            (
                "disk: client --image vs local job (median)",
                "≥ 0.7x",
                f"{d_speed:.2f}x {'✓' if d_speed >= 0.7 else '✗'}",
            ),
            (
                "disk: incremental bytes sent vs new (median)",
                "≤ 1.05x",
                f"{d_sent:.3f}x {'✓' if d_sent <= 1.05 else '✗'}",
            ),
        ]
    return [
        (
            "client over HTTPS vs local (median)",
            "≥ 0.7x",
            f"{speed:.2f}x {'✓' if speed >= 0.7 else '✗'}",
        ),
        (
            "incremental bytes sent vs new (median)",
            "≤ 1.05x",
            f"{sent:.3f}x {'✓' if sent <= 1.05 else '✗'}",
        ),
        *disk_checks,
    ]


def render(
    result: SourcesResult, text_table: Any, markdown_table: Any
) -> tuple[list[str], list[str]]:
    text = ["", f"== {TITLE} =="]
    md = ["", f"### {TITLE}", ""]
    if result.problem:
        text.append(f"  ! {result.problem}")
        md.append(f"- {result.problem}")
    if result.runs:
        text.append(text_table(HEADERS, rows(result)))
        md.append(markdown_table(HEADERS, rows(result)))
        if disk_rows(result):
            text.append(text_table(DISK_HEADERS, disk_rows(result)))
            md += ["", markdown_table(DISK_HEADERS, disk_rows(result))]
    checks = [[name, goal, got] for name, goal, got in targets(result)]
    text.append(text_table(["target", "goal", "measured"], checks))
    md += ["", markdown_table(["target", "goal", "measured"], checks)]
    return text, md
