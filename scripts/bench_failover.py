#!/usr/bin/env python3
"""Failover benchmark: boot of the plain local raw disk vs. click-to-proof through the appliance.

The same busybox test guest (image/testguest.py) is booted, with the same QEMU argv builder and
the same boot proof (serial marker + HTTP health page through a port forward), in two ways:

  local      QEMU on a local copy of the raw disk; timed from QEMU's start to the proof
  appliance  FailoverManager.start on the backed-up disk (the store's point check, NBD exports,
             qcow2 overlays, QEMU, proof); timed from the request (the click) to the proof

for a 256 MiB disk and for a 4 GiB disk holding 3 GiB of (never read) data. Runs are interleaved
(local, appliance, local, ...) and medians reported, with the bytes read from the store while
booting. Targets (issue 4): appliance <= 1.2x local, and 4 GiB within 10 % of 256 MiB.

  .venv/bin/python scripts/bench_failover.py                  # 3 runs of each, both sizes
  .venv/bin/python scripts/bench_failover.py --runs 1 --sizes 256
  .venv/bin/python scripts/bench_failover.py --json out.json  # every run, as JSON

scripts/bench runs the same measurement as its `failover` phase (this file loaded as a module:
:func:`measure`, then :func:`rows` and :func:`targets` for its report).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from appliance.engine import Appliance  # noqa: E402
from image.failover import FailoverManager  # noqa: E402
from image.qemu import (  # noqa: E402
    DiskAttachment,
    Isolated,
    PortForward,
    QemuFiles,
    build_qemu_argv,
    free_port,
    qemu_binary,
)
from image.testguest import MARKER, MIB, build_test_guest, copy_sparse  # noqa: E402

PASSPHRASE = "bench failover"
PROOF = {"serial": MARKER, "http_port": 80, "http_expect": "OK", "timeout": 180}
VM = {"name": "bench", "memory_mib": 256, "vcpus": 1, "disks": [{"name": "disk", "bus": "virtio"}]}
SIZES = {"256": (256 * MIB, 0), "4096": (4096 * MIB, 3072 * MIB)}


def local_boot(disk: str, work: str, accel: str) -> float:
    """Seconds from QEMU's start to the marker and the health page, on the raw disk itself."""
    files = QemuFiles(
        qmp_socket=os.path.join(work, "qmp.sock"), serial_log=os.path.join(work, "serial.log")
    )
    for path in (files.serial_log, files.qmp_socket):
        if os.path.exists(path):
            os.unlink(path)
    port = free_port()
    argv = build_qemu_argv(
        VM,
        [DiskAttachment(disk, fmt="raw")],
        accel=accel,
        network=Isolated((PortForward(port, 80),)),
        files=files,
        qemu=qemu_binary(),
    )
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        marker = False
        while time.monotonic() - started < 180:
            if proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {proc.returncode}")
            if not marker and os.path.exists(files.serial_log):
                with open(files.serial_log, "rb") as f:
                    marker = MARKER.encode() in f.read()
            if marker:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                        if b"OK" in r.read():
                            return time.monotonic() - started
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError("the local boot was not proven within 180 s")
    finally:
        proc.terminate()  # our own child
        proc.wait()


def appliance_boot(manager: FailoverManager, accel: str) -> tuple[float, dict[str, Any]]:
    requested = time.time()
    record = manager.start("bench", proof=PROOF, accel=accel, requested_at=requested)
    rto = float(record.details["rto_seconds"])
    stats: dict[str, Any] = dict(record.details.get("export_stats") or {})
    stats["check_seconds"] = record.details.get("check_seconds", 0.0)
    stats["prepare_seconds"] = record.details.get("prepare_seconds", 0.0)
    stats["boot_seconds"] = record.details.get("boot_seconds", 0.0)
    manager.stop(record.id, grace=0)
    manager.discard(record.id)
    return rto, stats


# --- results -------------------------------------------------------------------------------------


@dataclass
class SizeResult:
    """Every run of one disk size (seconds; bytes as counted by the export)."""

    disk_bytes: int
    data_mib: int
    local_runs: list[float] = field(default_factory=list)
    appliance_runs: list[float] = field(default_factory=list)
    store_bytes: list[int] = field(default_factory=list)  # sealed bytes read from the store
    guest_bytes: list[int] = field(default_factory=list)  # bytes the guest read from the export
    checks: list[float] = field(default_factory=list)  # the point check before the boot
    prepares: list[float] = field(default_factory=list)  # exports and overlays
    boots: list[float] = field(default_factory=list)  # from QEMU's start to the proof

    @property
    def local_s(self) -> float:
        return statistics.median(self.local_runs)

    @property
    def appliance_s(self) -> float:
        return statistics.median(self.appliance_runs)

    @property
    def ratio(self) -> float:
        return self.appliance_s / self.local_s

    @property
    def best_ratio(self) -> float:
        return min(self.appliance_runs) / min(self.local_runs)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(local_s=self.local_s, appliance_s=self.appliance_s, ratio=self.ratio)
        return out


@dataclass
class FailoverResult:
    runs: int
    accel: str
    sizes: dict[str, SizeResult] = field(default_factory=dict)  # "256", "4096"
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    problem: str | None = None

    def size_ratio(self) -> float | None:
        """4 GiB click-to-proof over 256 MiB click-to-proof (medians), when both ran."""
        if "256" in self.sizes and "4096" in self.sizes:
            return self.sizes["4096"].appliance_s / self.sizes["256"].appliance_s
        return None


TITLE = "failover: local boot vs click-to-proof from the store"
METHOD = (
    "The busybox test guest (256 MiB of RAM, 1 vCPU, SeaBIOS + syslinux) booted with the same "
    "argv and the same proof (serial marker + HTTP health page through a port forward): "
    "`local` is QEMU on the raw disk itself, timed from QEMU's start; `click-to-proof` is "
    "`FailoverManager.start` on the backed-up disk, timed from the request (point check, NBD "
    "exports, qcow2 overlays, QEMU, proof). Runs alternate local/appliance; medians (best)."
)
HEADERS = [
    "disk",
    "local boot",
    "click-to-proof",
    "ratio",
    "point check",
    "exports + overlays",
    "QEMU start to proof",
    "read from the store during boot",
]
RATIO_TARGET = 1.2
SIZE_TARGET = 1.1


def _mib(n: float) -> str:
    return f"{n / MIB:.1f} MiB"


def rows(result: FailoverResult) -> list[list[str]]:
    out = []
    for r in result.sizes.values():
        if not r.local_runs or not r.appliance_runs:
            continue
        guest = statistics.median(r.guest_bytes) if r.guest_bytes else 0
        share = 100.0 * guest / r.disk_bytes
        label = f"{r.disk_bytes // MIB} MiB"
        if r.data_mib and r.data_mib != r.disk_bytes // MIB:
            label += f", {r.data_mib} MiB data"
        out.append(
            [
                label,
                f"{r.local_s:.2f} s ({min(r.local_runs):.2f})",
                f"{r.appliance_s:.2f} s ({min(r.appliance_runs):.2f})",
                f"{r.ratio:.2f}x ({r.best_ratio:.2f}x)",
                f"{statistics.median(r.checks):.2f} s",
                f"{statistics.median(r.prepares):.2f} s",
                f"{statistics.median(r.boots):.2f} s",
                f"{_mib(statistics.median(r.store_bytes))} sealed "
                f"({_mib(guest)} of guest data, {share:.1f} % of the disk)",
            ]
        )
    return out


def targets(result: FailoverResult) -> list[tuple[str, str, str]]:
    checks = []
    for key, r in result.sizes.items():
        if r.local_runs and r.appliance_runs:
            checks.append(
                (
                    f"{key} MiB click-to-proof <= {RATIO_TARGET}x local boot (median)",
                    f"{r.ratio:.2f}x",
                    "PASS" if r.ratio <= RATIO_TARGET else "FAIL",
                )
            )
    size = result.size_ratio()
    if size is not None:
        checks.append(
            (
                f"4 GiB vs 256 MiB click-to-proof <= {SIZE_TARGET}x",
                f"{size:.2f}x",
                "PASS" if size <= SIZE_TARGET else "FAIL",
            )
        )
    return checks


def conditions(result: FailoverResult) -> str:
    before = ", ".join(f"{x:.2f}" for x in result.load_before)
    after = ", ".join(f"{x:.2f}" for x in result.load_after)
    return (
        f"{result.runs} run(s) of each kind per disk, accelerator {result.accel}, "
        f"{os.cpu_count()} CPUs; load average (1, 5, 15 min) {before} before, {after} after"
    )


# --- the measurement -----------------------------------------------------------------------------


def measure(
    sizes: list[str],
    runs: int,
    *,
    accel: str = "tcg",
    work: str | None = None,
    log: Callable[[str], None] = print,
) -> FailoverResult:
    """Back up the test guest of each size and boot it ``runs`` times each way, interleaved."""
    unknown = [s for s in sizes if s not in SIZES]
    if unknown or runs < 1:
        raise ValueError(f"sizes are {', '.join(SIZES)} (not {unknown}) and runs >= 1")
    os.environ.setdefault("APPLIANCE_TEST_WEAK_KDF", "1")
    result = FailoverResult(runs=runs, accel=accel, load_before=os.getloadavg())
    own_work = work is None
    work = work or tempfile.mkdtemp(prefix="bench-failover-")
    os.makedirs(work, exist_ok=True)
    try:
        for size_key in sizes:
            size, extra = SIZES[size_key]
            log(f"== {size_key} MiB disk ({extra // MIB} MiB extra data): preparing")
            image = build_test_guest(size=size, extra_data=extra)
            case = os.path.join(work, size_key)
            shutil.rmtree(case, ignore_errors=True)
            os.makedirs(case)
            disk = os.path.join(case, "disk.raw")
            copy_sparse(image, disk)
            app, _ = Appliance.init(os.path.join(case, "app"), PASSPHRASE)
            try:
                t0 = time.monotonic()
                backup = app.backup_image([disk], "bench", vm_spec=VM)
                log(
                    f"   backup of {backup.stats['bytes_read'] // MIB} MiB took "
                    f"{time.monotonic() - t0:.1f} s"
                )
                entry = SizeResult(disk_bytes=size, data_mib=(extra or size) // MIB)
                result.sizes[size_key] = entry
                manager = FailoverManager(app, accel=accel)
                try:
                    for run in range(runs):
                        order = ("local", "appliance") if run % 2 == 0 else ("appliance", "local")
                        for mode in order:
                            if mode == "local":
                                seconds = local_boot(disk, case, accel)
                                entry.local_runs.append(seconds)
                            else:
                                seconds, stats = appliance_boot(manager, accel)
                                entry.appliance_runs.append(seconds)
                                entry.store_bytes.append(int(stats.get("bytes_from_store", 0)))
                                entry.guest_bytes.append(int(stats.get("bytes_served", 0)))
                                entry.checks.append(float(stats["check_seconds"]))
                                entry.prepares.append(float(stats["prepare_seconds"]))
                                entry.boots.append(float(stats["boot_seconds"]))
                            log(f"   run {run + 1} {mode:9s} {seconds:6.2f} s")
                finally:
                    manager.shutdown(grace=0)
            finally:
                app.close()
                shutil.rmtree(case, ignore_errors=True)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
        result.load_after = os.getloadavg()
    return result


def markdown_table(headers: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode per size")
    parser.add_argument("--sizes", default="256,4096", help="disk sizes in MiB: 256 and/or 4096")
    parser.add_argument("--accel", default="tcg", help="tcg (default here) or kvm")
    parser.add_argument("--work", help="work directory (default: a temp dir, removed after)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    result = measure(
        [s for s in args.sizes.split(",") if s],
        args.runs,
        accel=args.accel,
        work=args.work,
        log=lambda line: print(line, flush=True),
    )
    print()
    print(conditions(result))
    print(markdown_table(HEADERS, rows(result)))
    size = result.size_ratio()
    if size is not None:
        print(f"\n4 GiB vs 256 MiB click-to-proof: {size:.2f}x (target <= {SIZE_TARGET}x)")
    if args.json:
        with open(args.json, "w") as f:
            document = {key: r.to_dict() for key, r in result.sizes.items()}
            json.dump(document, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
