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
  .venv/bin/python scripts/bench_failover.py --json out.json  # for scripts/bench
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
from pathlib import Path

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


def appliance_boot(manager: FailoverManager, accel: str) -> tuple[float, dict]:
    requested = time.time()
    record = manager.start("bench", proof=PROOF, accel=accel, requested_at=requested)
    rto = float(record.details["rto_seconds"])
    stats = dict(record.details.get("export_stats") or {})
    stats["check_seconds"] = record.details.get("check_seconds", 0.0)
    stats["prepare_seconds"] = record.details.get("prepare_seconds", 0.0)
    manager.stop(record.id, grace=0)
    manager.discard(record.id)
    return rto, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode per size")
    parser.add_argument("--sizes", default="256,4096", help="disk sizes in MiB: 256 and/or 4096")
    parser.add_argument("--accel", default="tcg", help="tcg (default here) or kvm")
    parser.add_argument("--work", help="work directory (default: a temp dir, removed after)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("APPLIANCE_TEST_WEAK_KDF", "1")
    work = args.work or tempfile.mkdtemp(prefix="bench-failover-")
    os.makedirs(work, exist_ok=True)
    results: dict[str, dict] = {}
    try:
        for size_key in args.sizes.split(","):
            size, extra = SIZES[size_key]
            print(f"== {size_key} MiB disk ({extra // MIB} MiB extra data): preparing", flush=True)
            image = build_test_guest(size=size, extra_data=extra)
            case = os.path.join(work, size_key)
            os.makedirs(case, exist_ok=True)
            disk = os.path.join(case, "disk.raw")
            copy_sparse(image, disk)
            app, _ = Appliance.init(os.path.join(case, "app"), PASSPHRASE)
            t0 = time.monotonic()
            backup = app.backup_image([disk], "bench", vm_spec=VM)
            print(
                f"   backup of {backup.stats['bytes_read'] // MIB} MiB took "
                f"{time.monotonic() - t0:.1f} s",
                flush=True,
            )
            manager = FailoverManager(app, accel=args.accel)
            local_times, appliance_times, store_bytes, served = [], [], [], []
            checks, prepares = [], []
            for run in range(args.runs):
                order = ("local", "appliance") if run % 2 == 0 else ("appliance", "local")
                for mode in order:
                    if mode == "local":
                        seconds = local_boot(disk, case, args.accel)
                        local_times.append(seconds)
                    else:
                        seconds, stats = appliance_boot(manager, args.accel)
                        appliance_times.append(seconds)
                        store_bytes.append(stats.get("bytes_from_store", 0))
                        served.append(stats.get("bytes_served", 0))
                        checks.append(stats["check_seconds"])
                        prepares.append(stats["prepare_seconds"])
                    print(f"   run {run + 1} {mode:9s} {seconds:6.2f} s", flush=True)
            results[size_key] = {
                "disk_mib": size // MIB,
                "data_mib": (size // MIB) if not extra else (extra // MIB),
                "local_s": statistics.median(local_times),
                "appliance_s": statistics.median(appliance_times),
                "local_runs": local_times,
                "appliance_runs": appliance_times,
                "store_bytes_read": int(statistics.median(store_bytes)),
                "guest_bytes_read": int(statistics.median(served)),
                "disk_bytes": size,
                "check_s": statistics.median(checks),
                "prepare_s": statistics.median(prepares),
            }
            app.close()
            shutil.rmtree(case, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        "| disk | local boot (median) | click-to-proof (median) | ratio | point check | "
        "exports + overlays | read from store |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results.values():
        ratio = r["appliance_s"] / r["local_s"]
        share = 100.0 * r["guest_bytes_read"] / r["disk_bytes"]
        print(
            f"| {r['disk_mib']} MiB | {r['local_s']:.2f} s | {r['appliance_s']:.2f} s | "
            f"{ratio:.2f}x | {r['check_s']:.2f} s | {r['prepare_s']:.2f} s | "
            f"{r['store_bytes_read'] / MIB:.1f} MiB stored "
            f"({r['guest_bytes_read'] / MIB:.1f} MiB, {share:.1f} % of the disk) |"
        )
    if "256" in results and "4096" in results:
        big, small = results["4096"]["appliance_s"], results["256"]["appliance_s"]
        print(f"\n4 GiB vs 256 MiB click-to-proof: {big / small:.2f}x (target <= 1.10x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
