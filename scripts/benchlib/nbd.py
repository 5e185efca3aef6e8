"""The ``nbd`` phase: the instant-recovery NBD export against ``nbdkit file`` on the same disk.

1. **Throughput.** A sparse raw disk (``datagen.plan_image``: 2 GiB x scale, mixed text, binary,
   random and duplicate regions, about a third holes) is backed up with our CLI into a fresh data
   directory. The point's disk is then served by our export (``export_image_over_nbd`` in a
   process of its own, as the failover runs it) and the raw file by ``nbdkit --readonly file``,
   each on a unix socket. ``nbdcopy`` copies each to ``null:`` and to a file on tmpfs, with
   extents (holes skipped) and with ``--no-extents`` (every byte read); A and B alternate, medians
   are reported with the ratio ours / nbdkit (target >= 0.8x in each mode). Our export starts cold
   for every copy (a fresh process): its chunk cache is no help.
2. **Correctness.** The tmpfs copy of our export is compared with the source (``cmp``).
3. **Isolation.** While ``nbdcopy --no-extents`` streams the whole disk from our export, a second
   client reads 4 KiB from one data chunk after another that nobody read yet (from the end of
   the disk backwards, so each needs a decode): its median and worst latency, against the same
   reads on an idle export. Target: the median stays under 5 ms, i.e. the second client's reads
   do not queue behind the stream's decodes (a boot's reads while another client copies).

Runs alone too: ``.venv/bin/python scripts/benchlib/nbd.py --scale 0.5``; with
``NBD_BENCH_EXPORT=/path/to/nbd_export.py`` it measures that file's export instead (before/after).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
MiB = 1 << 20
TITLE = "Instant recovery: NBD export vs nbdkit file"
METHOD = (
    "One sparse raw disk backed up with our CLI; `nbdcopy` of the point's disk served by our "
    "export, and of the raw file served by `nbdkit --readonly file`, over unix sockets, to "
    "`null:` and to a tmpfs file, with and without `--no-extents`; A/B interleaved, medians. "
    "Our export is restarted cold for each copy."
)
MODES = ("extents", "no-extents")
SINKS = ("null", "tmpfs")
#: A second client's median read latency while a stream runs must stay under this (seconds).
ISOLATION_LIMIT = 0.005

# Serves one disk of a point on a socket until stdin closes, then prints its stats. The export
# comes from image.nbd_export, or from the file NBD_BENCH_EXPORT names (an older version, for a
# before/after comparison on the same machine).
_SERVER = """
import importlib.util, json, os, sys
from appliance.engine import Appliance
path = os.environ.get("NBD_BENCH_EXPORT")
if path:
    spec = importlib.util.spec_from_file_location("nbd_export_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    export_image_over_nbd = module.export_image_over_nbd
else:
    from image.nbd_export import export_image_over_nbd
data_dir, point, socket_path = sys.argv[1:4]
with Appliance.open(data_dir, passphrase="bench", sync_index=False) as app:
    with app.locks.shared():
        manifest = app.repo.get_manifest(point)
        disk = manifest["disks"][0]["name"]
        export = export_image_over_nbd(app.repo, manifest, disk, socket_path)
        print("ready", flush=True)
        sys.stdin.read()
        export.stop()
        print(json.dumps({"stats": export.stats.to_dict(), "errors": export.errors}), flush=True)
"""


@dataclass
class NbdResult:
    disk_bytes: int = 0
    allocated_bytes: int = 0
    cores: int = 0
    #: seconds per run, keyed "ours/extents/null" etc.
    times: dict[str, list[float]] = field(default_factory=dict)
    identical: bool | None = None
    idle_latency: list[float] = field(default_factory=list)
    busy_latency: list[float] = field(default_factory=list)
    export_stats: dict[str, int] = field(default_factory=dict)
    problem: str | None = None

    def rate(self, server: str, mode: str, sink: str) -> float:
        seconds = self.times.get(f"{server}/{mode}/{sink}", [])
        return self.disk_bytes / MiB / statistics.median(seconds) if seconds else 0.0

    def ratio(self, mode: str, sink: str) -> float:
        theirs = self.rate("nbdkit", mode, sink)
        return self.rate("ours", mode, sink) / theirs if theirs else 0.0


# --- servers -------------------------------------------------------------------------------------


class _Server:
    """A server process on a unix socket; ``stop`` ends it and returns what it printed last."""

    def __init__(self, argv: list[str], sock: Path, *, ours: bool) -> None:
        self.sock = sock
        self.ours = ours
        sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        if ours:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
            if line.strip() != "ready":
                self.proc.kill()
                raise RuntimeError(f"our export did not start: {line!r}")
        deadline = time.monotonic() + 30
        while not sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server {argv[0]} did not open {sock}")
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.ours:
            stdout, _ = self.proc.communicate(input="", timeout=60)
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            out = json.loads(lines[-1]) if lines else {}
        else:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.sock.unlink(missing_ok=True)
        return out


def _ours(data_dir: Path, point: str, sock: Path) -> _Server:
    argv = [sys.executable, "-c", _SERVER, str(data_dir), point, str(sock)]
    return _Server(argv, sock, ours=True)


def _nbdkit(image: Path, sock: Path) -> _Server:
    argv = ["nbdkit", "--foreground", "--readonly", "-U", str(sock), "file", str(image)]
    return _Server(argv, sock, ours=False)


def _copy(uri: str, mode: str, target: str) -> float:
    argv = ["nbdcopy", *(["--no-extents"] if mode == "no-extents" else []), uri, target]
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - started


# --- phase parts ---------------------------------------------------------------------------------


def _make_disk(image: Path, scale: float) -> tuple[int, int]:
    """Write the benchmark disk (sparse) and return (size, bytes written)."""
    sys.path.insert(0, str(HERE))
    import datagen

    size, regions = datagen.plan_image(scale)
    with open(image, "wb") as out:
        out.truncate(size)
    jobs = [(str(image), r, regions[r.source]) for r in regions if r.kind != "hole"]
    with multiprocessing.get_context("fork").Pool(
        os.cpu_count() or 1, initializer=datagen._vocab
    ) as pool:
        written = sum(pool.imap_unordered(datagen._image_job, jobs))
    return size, written


def _backup(work: Path, image: Path) -> tuple[Path, str]:
    sys.path.insert(0, str(HERE))
    import tools

    cli = ROOT / ".venv" / "bin" / "appliance"
    ours = tools.Ours(work, timeout=3600, cli=cli)
    ours.env |= {"APPLIANCE_TEST_WEAK_KDF": "1"}
    ours.prepare()
    ours.backup(image, "vm", "image", full=True)
    return ours.repo, ours._latest_point("vm")


def _throughput(
    work: Path, image: Path, data_dir: Path, point: str, repeat: int, result: NbdResult
) -> None:
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else work
    target = shm / f"nbd-bench-{os.getpid()}.raw"
    sock_ours, sock_kit = work / "ours.sock", work / "nbdkit.sock"
    try:
        for _ in range(repeat):
            for mode in MODES:
                for sink in SINKS:
                    for server in ("ours", "nbdkit"):
                        if server == "ours":
                            running = _ours(data_dir, point, sock_ours)
                        else:
                            running = _nbdkit(image, sock_kit)
                        dest = "null:" if sink == "null" else str(target)
                        try:
                            seconds = _copy(running.uri, mode, dest)
                        finally:
                            stats = running.stop()
                        result.times.setdefault(f"{server}/{mode}/{sink}", []).append(seconds)
                        if server == "ours" and mode == "no-extents" and sink == "null":
                            result.export_stats = stats.get("stats", {})
                            if stats.get("errors"):
                                raise RuntimeError(f"export errors: {stats['errors']}")
                        if server == "ours" and sink == "tmpfs" and result.identical is not False:
                            same = subprocess.run(["cmp", "-s", str(image), str(target)])
                            result.identical = same.returncode == 0
                        target.unlink(missing_ok=True)
    finally:
        target.unlink(missing_ok=True)


def _data_chunks_from_end(image: Path, chunk: int, count: int) -> list[int]:
    """Offsets of up to ``count`` chunks holding data, from the end of the disk backwards."""
    out: list[int] = []
    with open(image, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for offset in range((size // chunk - 1) * chunk, -1, -chunk):
            data = os.pread(f.fileno(), chunk, offset)
            if data.count(0) != len(data):
                out.append(offset)
                if len(out) >= count:
                    break
    return out


def _latencies(sock: str, offsets: list[int], stop: threading.Event | None) -> list[float]:
    from image.nbd_client import NbdClient

    out: list[float] = []
    with NbdClient.connect_unix(sock) as client:
        for offset in offsets:
            if stop is not None and stop.is_set():
                break
            started = time.perf_counter()
            client.pread(offset, 4096)
            out.append(time.perf_counter() - started)
            time.sleep(0.002)
    return out


def _isolation(work: Path, image: Path, data_dir: Path, point: str, result: NbdResult) -> None:
    sys.path.insert(0, str(ROOT))
    offsets = _data_chunks_from_end(image, 64 * 1024, 3000)
    sock = work / "iso.sock"
    running = _ours(data_dir, point, sock)
    try:
        result.idle_latency = _latencies(str(sock), offsets[:200], None)
    finally:
        running.stop()
    running = _ours(data_dir, point, sock)  # cold again
    try:
        done = threading.Event()
        samples: list[float] = []

        def probe() -> None:
            time.sleep(0.2)  # let the stream get going
            samples.extend(_latencies(str(sock), offsets, done))

        thread = threading.Thread(target=probe)
        thread.start()
        try:
            _copy(running.uri, "no-extents", "null:")
        finally:
            done.set()
            thread.join()
        result.busy_latency = samples
    finally:
        running.stop()


def run(work: Path, *, scale: float, repeat: int, log: Callable[[str], None] = print) -> NbdResult:
    """The phase (see the module doc); a failure is the result's ``problem``."""
    result = NbdResult(cores=os.cpu_count() or 1)
    sys.path.insert(0, str(ROOT))
    try:
        for tool in ("nbdkit", "nbdcopy", "cmp"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} is not installed")
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work, prefix="nbd-") as tmp:
            base = Path(tmp)
            image = base / "disk.raw"
            result.disk_bytes, result.allocated_bytes = _make_disk(image, scale)
            log(
                f"nbd: a {result.disk_bytes // MiB} MiB disk "
                f"({result.allocated_bytes // MiB} MiB written), backing it up"
            )
            data_dir, point = _backup(base, image)
            runs = max(repeat, 3)
            log(f"nbd: nbdcopy from our export and from nbdkit, {runs} run(s) per mode")
            _throughput(base, image, data_dir, point, runs, result)
            log("nbd: a second client's reads while a stream runs")
            _isolation(base, image, data_dir, point, result)
    except Exception as exc:  # the phase reports, the bench goes on
        result.problem = f"nbd phase failed: {type(exc).__name__}: {exc}"
    return result


# --- report --------------------------------------------------------------------------------------


def _ms(samples: list[float], how: Callable[[list[float]], float]) -> str:
    return f"{how(samples) * 1000:.2f} ms" if samples else "-"


def rows(result: NbdResult) -> list[list[str]]:
    out = []
    for mode in MODES:
        for sink in SINKS:
            ours, kit = result.rate("ours", mode, sink), result.rate("nbdkit", mode, sink)
            ratio = result.ratio(mode, sink)
            out.append(
                [f"{mode} to {sink}", f"{ours:.0f} MiB/s", f"{kit:.0f} MiB/s", f"{ratio:.2f}x"]
            )
    return out


def targets(result: NbdResult) -> list[tuple[str, str, str]]:
    checks = []
    for mode in MODES:
        ratio = result.ratio(mode, "null")
        checks.append(
            (
                f"nbdcopy {'--no-extents ' if mode == 'no-extents' else ''}of our export "
                ">= 0.8x nbdkit file",
                f"{ratio:.2f}x",
                "PASS" if ratio >= 0.8 else "FAIL",
            )
        )
    if result.identical is not None:
        checks.append(
            (
                "nbdcopy of our export equals the source disk",
                "identical" if result.identical else "DIFFERS",
                "PASS" if result.identical else "FAIL",
            )
        )
    if result.busy_latency:
        median = statistics.median(result.busy_latency)
        checks.append(
            (
                "no read waits on another client's read "
                f"(uncached 4 KiB reads during a stream, median < {ISOLATION_LIMIT * 1000:.0f} ms)",
                f"median {median * 1000:.2f} ms, max {max(result.busy_latency) * 1000:.1f} ms "
                f"({len(result.busy_latency)} reads)",
                "PASS" if median < ISOLATION_LIMIT else "FAIL",
            )
        )
    return checks


def render(
    result: NbdResult,
    text_table: Callable[[list[str], list[list[str]]], str],
    markdown_table: Callable[[list[str], list[list[str]]], str],
) -> tuple[list[str], list[str]]:
    headers = ["nbdcopy", "our export", "nbdkit file", "ratio"]
    runs = len(result.times.get("ours/extents/null", []))
    lines = [
        f"{result.disk_bytes // MiB} MiB disk, {result.allocated_bytes // MiB} MiB written, "
        f"{result.cores} cores, {runs} run(s), medians",
        f"second client's uncached 4 KiB reads: idle median "
        f"{_ms(result.idle_latency, statistics.median)}, during a stream median "
        f"{_ms(result.busy_latency, statistics.median)}, max {_ms(result.busy_latency, max)}",
    ]
    s = result.export_stats
    if s:
        lines.append(
            f"export (one --no-extents copy): {s.get('chunks_from_store', 0)} chunks decoded, "
            f"{s.get('bytes_from_store', 0) / MiB:.0f} MiB read from packs, "
            f"{s.get('connections', 0)} connections"
        )
    text = ["", f"== {TITLE} ==", *lines, text_table(headers, rows(result))]
    md = ["", f"### {TITLE}", "", METHOD, ""] + [f"- {line}" for line in lines]
    md += ["", markdown_table(headers, rows(result))]
    if result.problem:
        text.append(f"  ! {result.problem}")
        md += ["", f"- {result.problem}"]
    checks = targets(result)
    text += ["", "== targets (nbd) =="]
    text += [f"{verdict:<4}  {label}: {value}" for label, value, verdict in checks]
    md += ["", "### Targets (nbd)", ""]
    md.append(
        markdown_table(
            ["target", "measured", "result"],
            [[label, value, verdict] for label, value, verdict in checks],
        )
    )
    return text, md


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "nbd-bench")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    import report

    result = run(args.work, scale=args.scale, repeat=args.repeat)
    text, _ = render(result, report.text_table, report.markdown_table)
    print("\n".join(text))
    return 2 if result.problem else 0


if __name__ == "__main__":
    sys.exit(main())
