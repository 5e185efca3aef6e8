"""The ``scaling`` phase: how our CLI's speed grows with ``--workers``, and where its CPU goes.

Four operations on the bench's generated data set: a full backup of the tree, a full backup of
the image, a restore of the tree point and a restore of the image point. Each runs once per
worker count (``--workers 1`` and each N of ``--scaling-workers``), A/B interleaved: per
repetition every operation runs each worker count in turn, the order rotating per repetition;
medians are reported.

- **CPU-bound.** The page cache is kept warm: the operation's input (the source for a backup,
  the store for a restore) is read once right before the timed command, after a ``sync`` so no
  earlier write-back overlaps it. A backup goes into a fresh data dir (``init`` untimed), so it
  deduplicates against nothing; a restore goes into a fresh target, from one reference data dir
  holding a tree and an image point made (untimed) before the first measurement.
- **Speed-up** is one worker's wall / N workers' wall; **efficiency** is speed-up / N; the
  target is speed-up ≥ 0.7·N for every N > 1 up to 8.
- **CPU seconds per GiB** (of the operation's logical size: the tree's bytes, the image's raw
  size) come from the CLI's JSON (``stats.cpu`` of a backup, ``cpu`` of a restore:
  ``{"coordinator_s", "workers_s"}``): all processes (coordinator + workers) and the coordinating
  process alone. The **serial share** is coordinator / all at the largest worker count measured, and
  Amdahl's law turns it into the speed-up 8 cores can reach, 1 / (s + (1 - s) / 8). A CLI
  without the field shows "-" and those targets "n/a".
- **Cross-check from outside**: each command starts in its own cgroup v2 leaf (a ``sh`` wrapper
  writes its own pid into ``cgroup.procs``, then execs the CLI, so every process it forks is
  counted), and ``usage_usec`` of its ``cpu.stat`` is read after it exits. Sampling /proc misses
  short-lived workers; the cgroup does not. Without a writable cgroup v2 the column reads "-".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30
TITLE = "Scaling: our CLI with 1 to N workers, page cache warm"
METHOD = (
    "Each operation with `appliance --workers 1` and `--workers N`, A/B interleaved, medians; "
    "page cache warm (input read just before), backups into a fresh data dir, restores into a "
    "fresh target. CPU from the CLI's JSON (`cpu`: coordinator_s, workers_s) per GiB of the "
    "logical size; serial share = coordinator / all at the largest N; Amdahl: "
    "1 / (s + (1 - s) / 8). The cgroup column is the whole command's CPU measured from outside "
    "(cgroup v2 `cpu.stat`)."
)
OPERATIONS = ("backup tree", "backup image", "restore tree", "restore image")
#: Speed-up target per worker count N: at least this times N, for every N up to MAX_TARGET_N.
EFFICIENCY_TARGET = 0.7
TWO_WORKERS_TARGET = 1.8
MAX_TARGET_N = 8
SERIAL_SHARE_LIMIT = 0.10
AMDAHL_CORES = 8
AMDAHL_TARGET = 5.0
HEADERS = [
    "operation",
    "workers",
    "wall s",
    "MiB/s",
    "speed-up",
    "efficiency",
    "CPU s/GiB all",
    "CPU s/GiB coordinator",
    "serial share",
    f"Amdahl {AMDAHL_CORES} cores",
    "CPU s/GiB cgroup",
]


class CommandFailed(Exception):
    """A measured or preparing command failed; the message says which and why."""


def default_workers(cpus: int | None = None) -> list[int]:
    """1, 2, 4, 8, capped at the machine's CPU count."""
    cpus = cpus or os.cpu_count() or 1
    return [n for n in (1, 2, 4, 8) if n <= cpus] or [1]


def parse_workers(text: str) -> list[int]:
    """``--scaling-workers``: a comma list of positive counts; 1, the baseline, is always in."""
    try:
        counts = {int(part) for part in text.split(",") if part.strip()}
    except ValueError as exc:
        raise ValueError(f"--scaling-workers must be a comma list of integers: {text!r}") from exc
    if any(n < 1 for n in counts):
        raise ValueError(f"--scaling-workers must be ≥ 1: {text!r}")
    return sorted(counts | {1})


def amdahl(serial_share: float, cores: int = AMDAHL_CORES) -> float:
    """The speed-up ``cores`` can give work of which ``serial_share`` runs on one core."""
    return 1.0 / (serial_share + (1.0 - serial_share) / cores)


def cpu_of(document: Any, operation: str) -> tuple[float, float] | None:
    """(coordinator_s, workers_s) from the CLI's JSON output; None where it is not reported."""
    if not isinstance(document, dict):
        return None
    holder = document.get("stats") if operation.startswith("backup") else document
    cpu = holder.get("cpu") if isinstance(holder, dict) else None
    if not isinstance(cpu, dict):
        return None
    coordinator, workers = cpu.get("coordinator_s"), cpu.get("workers_s")
    if not isinstance(coordinator, int | float) or not isinstance(workers, int | float):
        return None
    if isinstance(coordinator, bool) or isinstance(workers, bool) or min(coordinator, workers) < 0:
        return None
    return float(coordinator), float(workers)


@dataclass(frozen=True)
class Measure:
    """One timed command."""

    wall: float
    cpu: tuple[float, float] | None  # (coordinator_s, workers_s) as the CLI reports them
    cgroup_s: float | None  # the whole command's CPU, from its cgroup


@dataclass
class ScalingResult:
    workers: list[int] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)  # operation -> logical bytes
    runs: dict[tuple[str, int], list[Measure]] = field(default_factory=dict)
    conditions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    problem: str | None = None


@dataclass(frozen=True)
class Figures:
    """Medians of one operation at one worker count, and what follows from them."""

    wall: float
    mibps: float
    speedup: float | None
    efficiency: float | None
    cpu_all: float | None  # CPU s per GiB, all processes (CLI's own figures)
    cpu_coordinator: float | None
    serial_share: float | None
    amdahl: float | None
    cpu_cgroup: float | None


def figures(result: ScalingResult) -> dict[tuple[str, int], Figures]:
    """The table's numbers; an (operation, N) without a successful run is absent."""
    out: dict[tuple[str, int], Figures] = {}
    for op in OPERATIONS:
        base = result.runs.get((op, 1))
        base_wall = statistics.median(m.wall for m in base) if base else None
        gib = result.sizes.get(op, 0) / GiB
        for n in result.workers:
            runs = result.runs.get((op, n))
            if not runs or not gib:
                continue
            wall = statistics.median(m.wall for m in runs)
            speedup = base_wall / wall if base_wall and wall else None
            cpus = [m.cpu for m in runs if m.cpu is not None]
            cpu_all = cpu_coordinator = share = None
            if cpus:
                total = statistics.median(c + w for c, w in cpus)
                coordinator = statistics.median(c for c, _ in cpus)
                cpu_all, cpu_coordinator = total / gib, coordinator / gib
                share = coordinator / total if total else None
            cgroups = [m.cgroup_s for m in runs if m.cgroup_s is not None]
            out[(op, n)] = Figures(
                wall=wall,
                mibps=result.sizes[op] / MiB / wall if wall else 0.0,
                speedup=speedup,
                efficiency=speedup / n if speedup is not None else None,
                cpu_all=cpu_all,
                cpu_coordinator=cpu_coordinator,
                serial_share=share,
                amdahl=amdahl(share) if share is not None else None,
                cpu_cgroup=statistics.median(cgroups) / gib if cgroups else None,
            )
    return out


# --- measuring ----------------------------------------------------------------------------------


def cgroup2_root() -> tuple[Path | None, str]:
    """Where this machine's cgroup v2 hierarchy is mounted, if we may create groups in it.

    ``/sys/fs/cgroup`` itself on a unified system; ``/sys/fs/cgroup/unified`` or the like on a
    hybrid one, which still counts ``cpu.stat`` usage without the cpu controller."""
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1] for line in f if line.split()[2:3] == ["cgroup2"]]
    except OSError as exc:
        return None, f"no cgroup CPU cross-check (/proc/self/mounts: {exc})"
    mounts.sort(key=lambda m: m != "/sys/fs/cgroup")
    for mount in mounts:
        if os.access(mount, os.W_OK):
            return Path(mount), f"cgroup v2 at {mount} measures each command's CPU from outside"
    return None, "no cgroup CPU cross-check (no writable cgroup v2 mount)"


class CpuCgroup:
    """A cgroup v2 leaf for one command: ``argv`` wraps it so it moves itself in first."""

    counter = 0

    def __init__(self, root: Path) -> None:
        CpuCgroup.counter += 1
        self.path = root / f"bench-{os.getpid()}-{CpuCgroup.counter}"
        self.path.mkdir()

    def argv(self, command: list[str]) -> list[str]:
        # The shell writes its own pid, then execs: the command and all it forks start inside.
        script = 'echo $$ > "$1" && shift && exec "$@"'
        return ["sh", "-c", script, "sh", str(self.path / "cgroup.procs"), *command]

    def usage_s(self) -> float:
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "usage_usec":
                return int(value) / 1e6
        raise CommandFailed(f"{self.path}/cpu.stat has no usage_usec")

    def remove(self) -> None:
        # Anything still inside was forked by our command and outlived it: stop it, then remove.
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                with contextlib.suppress(OSError):
                    (self.path / "cgroup.kill").write_text("1\n")
                time.sleep(0.1)


def _command(
    argv: list[str], env: dict[str, str], log: Path, timeout: float, cgroup: Path | None
) -> tuple[float, str, float | None]:
    """Run one command: (wall seconds, stdout, CPU seconds from its cgroup or None).

    No /proc sampler runs alongside (unlike tools.run): on two cores it would steal CPU from
    the figures it is there to take."""
    group = CpuCgroup(cgroup) if cgroup else None
    try:
        with open(log, "ab") as err:
            err.write(f"$ {' '.join(argv)}\n".encode())
            err.flush()
            started = time.perf_counter()
            proc = subprocess.Popen(
                group.argv(argv) if group else argv,
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
            try:
                out, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise CommandFailed(
                    f"`{' '.join(argv[:6])} …` timed out after {timeout:g} s"
                ) from exc
            wall = time.perf_counter() - started
        if proc.returncode != 0:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line]
            reason = lines[-1][:300] if lines else "no output"
            raise CommandFailed(
                f"`{' '.join(argv[:6])} …` exited {proc.returncode}: {reason} ({log})"
            )
        return wall, out.decode(errors="replace"), group.usage_s() if group else None
    finally:
        if group:
            group.remove()


def _warm(path: Path) -> None:
    """Read every file under path (or path itself) once, so the timed command finds it cached."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        with open(file, "rb") as f:
            while f.read(8 * MiB):
                pass


class _Runner:
    def __init__(self, cli: Path, work: Path, timeout: float, cgroup: Path | None) -> None:
        self.cli, self.work, self.timeout, self.cgroup = cli, work, timeout, cgroup
        self.env = dict(os.environ) | {"APPLIANCE_PASSPHRASE": "bench"}
        self.log = work / "scaling.log"

    def cli_json(
        self, data_dir: Path, *args: str, workers: int | None = None, timed: bool = False
    ) -> tuple[float, Any, float | None]:
        argv = [str(self.cli), "--data-dir", str(data_dir), "--json"]
        argv += ["--workers", str(workers)] if workers else []
        group = self.cgroup if timed else None
        wall, out, cpu = _command([*argv, *args], self.env, self.log, self.timeout, group)
        try:
            return wall, json.loads(out), cpu
        except json.JSONDecodeError as exc:
            raise CommandFailed(f"`appliance {' '.join(args[:2])}` printed no JSON: {exc}") from exc

    def fresh(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path


def _measure(
    runner: _Runner, op: str, n: int, tree: Path, image: Path, source: Path, points: dict[str, str]
) -> Measure:
    if op.startswith("backup"):
        data = runner.fresh("run")
        runner.cli_json(data, "init")
        args = ["backup", "files", str(tree), "--asset", "tree"]
        if op == "backup image":
            args = ["backup", "image", str(image), "--asset", "vm"]
        _warm(tree if op == "backup tree" else image)
        os.sync()
        wall, document, cgroup_s = runner.cli_json(
            data, *args, "--mode", "full", workers=n, timed=True
        )
        shutil.rmtree(data, ignore_errors=True)
    else:
        target = runner.fresh("target")
        target.mkdir()
        point = points["tree" if op == "restore tree" else "vm"]
        out = target if op == "restore tree" else target / image.name
        _warm(source)
        os.sync()
        wall, document, cgroup_s = runner.cli_json(
            source, "restore", point, str(out), workers=n, timed=True
        )
        shutil.rmtree(target, ignore_errors=True)
    return Measure(wall=wall, cpu=cpu_of(document, op), cgroup_s=cgroup_s)


def _reference(runner: _Runner, source: Path, tree: Path, image: Path) -> dict[str, str]:
    """The data dir the restores read: a tree point and an image point, made untimed."""
    shutil.rmtree(source, ignore_errors=True)
    runner.cli_json(source, "init")
    _, tree_doc, _ = runner.cli_json(source, "backup", "files", str(tree), "--asset", "tree")
    _, image_doc, _ = runner.cli_json(source, "backup", "image", str(image), "--asset", "vm")
    try:
        return {"tree": str(tree_doc["point"]["id"]), "vm": str(image_doc["point"]["id"])}
    except (KeyError, TypeError) as exc:
        raise CommandFailed(f"a backup's JSON names no point id: {exc!r}") from exc


def run(
    cli: Path,
    work: Path,
    tree: Path,
    image: Path,
    *,
    tree_bytes: int,
    image_bytes: int,
    workers: Sequence[int],
    repeat: int,
    timeout: float = 3600.0,
    log: Callable[[str], None] = print,
) -> ScalingResult:
    """The phase (see the module doc); a failure is the result's ``problem``."""
    result = ScalingResult(workers=sorted(set(workers) | {1}))
    result.sizes = {
        "backup tree": tree_bytes,
        "backup image": image_bytes,
        "restore tree": tree_bytes,
        "restore image": image_bytes,
    }
    root = work / "scaling"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cgroup, note = cgroup2_root()
    runner = _Runner(cli, root, timeout, cgroup)
    result.conditions = [
        f"workers {', '.join(map(str, result.workers))}; {repeat} repetition(s), medians; "
        f"{os.cpu_count()} CPUs",
        note,
    ]
    source = root / "source"
    points: dict[str, str] = {}
    try:
        log("scaling: the reference data dir for the restores (untimed)")
        try:
            points = _reference(runner, source, tree, image)
        except CommandFailed as exc:
            result.errors.append(f"reference data dir for the restores: {exc}")
            log(f"scaling: {result.errors[-1]}; the restores are skipped")
        operations = [op for op in OPERATIONS if points or op.startswith("backup")]
        for rep in range(repeat):
            shift = rep % len(result.workers)
            order = result.workers[shift:] + result.workers[:shift]
            for op in operations:
                for n in order:
                    try:
                        m = _measure(runner, op, n, tree, image, source, points)
                    except CommandFailed as exc:
                        result.errors.append(f"{op}, {n} worker(s): {exc}")
                        log(f"[{rep + 1}] scaling {op:<13} {n:>2} workers  error: {exc}")
                        continue
                    result.runs.setdefault((op, n), []).append(m)
                    cpu = "-" if m.cpu is None else f"{m.cpu[0]:.2f} + {m.cpu[1]:.2f} s"
                    cgroup_cpu = "-" if m.cgroup_s is None else f"{m.cgroup_s:.2f} s"
                    log(
                        f"[{rep + 1}] scaling {op:<13} {n:>2} workers  {m.wall:7.2f} s  "
                        f"cpu coordinator + workers {cpu}  cgroup {cgroup_cpu}"
                    )
    finally:
        shutil.rmtree(source, ignore_errors=True)
    if result.errors:
        result.problem = (
            f"{len(result.errors)} scaling command(s) failed; first: {result.errors[0]}"
        )
    return result


# --- reporting ----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{unit}"


def _pct(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f} %"


def rows(result: ScalingResult) -> list[list[str]]:
    out = []
    for (op, n), f in figures(result).items():
        out.append(
            [
                op,
                str(n),
                f"{f.wall:.2f}",
                f"{f.mibps:.0f}",
                _num(f.speedup, unit="x"),
                _pct(f.efficiency),
                _num(f.cpu_all),
                _num(f.cpu_coordinator),
                _pct(f.serial_share, 1),
                _num(f.amdahl, unit="x"),
                _num(f.cpu_cgroup),
            ]
        )
    return out


def targets(result: ScalingResult) -> list[tuple[str, str, str]]:
    """(target, measured, PASS/FAIL/n/a): per operation, the speed-up at each N > 1 up to 8,
    then the serial share and Amdahl's 8-core speed-up at the largest worker count measured."""
    table = figures(result)
    checks = []
    for op in OPERATIONS:
        for n in (n for n in result.workers if 1 < n <= MAX_TARGET_N):
            # The issue asks 0.7·N, and "2 workers ≥ 1.8x one" on the 2-core machines: the
            # stricter of the two is judged.
            goal = max(EFFICIENCY_TARGET * n, TWO_WORKERS_TARGET if n == 2 else 0.0)
            label = f"{op}: {n} workers ≥ {goal:.1f}x one worker"
            f = table.get((op, n))
            if f is None or f.speedup is None:
                checks.append((label, "no data", "n/a"))
            else:
                verdict = "PASS" if f.speedup >= goal else "FAIL"
                checks.append((label, f"{f.speedup:.2f}x", verdict))
        # At the largest worker count that has CPU figures: the share the big machine would see.
        shares = {n: f.serial_share for (o, n), f in table.items() if o == op}
        measured = [n for n, share in shares.items() if share is not None]
        top = max(measured) if measured else max(result.workers, default=1)
        share = shares.get(top)
        label = f"{op}: serial share ≤ {SERIAL_SHARE_LIMIT:.0%} ({top} workers)"
        if share is None:
            checks.append((label, "no cpu figures", "n/a"))
        else:
            verdict = "PASS" if share <= SERIAL_SHARE_LIMIT else "FAIL"
            checks.append((label, f"{share:.1%}", verdict))
        label = f"{op}: Amdahl speed-up on {AMDAHL_CORES} cores ≥ {AMDAHL_TARGET:g}x"
        if share is None:
            checks.append((label, "no cpu figures", "n/a"))
        else:
            value = amdahl(share)
            checks.append((label, f"{value:.2f}x", "PASS" if value >= AMDAHL_TARGET else "FAIL"))
    return checks


def render(
    result: ScalingResult,
    text_table: Callable[[list[str], list[list[str]]], str],
    markdown_table: Callable[[list[str], list[list[str]]], str],
) -> tuple[list[str], list[str]]:
    sizes = result.sizes
    tree, image = sizes.get("backup tree", 0) / MiB, sizes.get("backup image", 0) / MiB
    lines = [
        f"tree {tree:.0f} MiB, image {image:.0f} MiB raw (MiB/s and CPU per GiB of these sizes)",
        *result.conditions,
    ]
    gaps = [
        m.cgroup_s - sum(m.cpu)
        for runs in result.runs.values()
        for m in runs
        if m.cgroup_s is not None and m.cpu is not None
    ]
    if gaps:
        # What the cross-check sees that the CLI's figures leave out: interpreter start-up and
        # imports, opening the data dir, threads other than the coordinating one.
        lines.append(
            f"whole-command CPU (cgroup) minus the CLI's coordinator + workers: median "
            f"{statistics.median(gaps):.2f} s per command ({min(gaps):.2f} to {max(gaps):.2f})"
        )
    table = rows(result)
    text = ["", f"== {TITLE} ==", *lines]
    md = ["", f"### {TITLE}", "", METHOD, ""] + [f"- {line}" for line in lines]
    if table:
        text.append(text_table(HEADERS, table))
        md += ["", markdown_table(HEADERS, table)]
    problems = [result.problem] if result.problem else []
    problems += result.errors[1:]
    text += [f"  ! {p}" for p in problems]
    md += ([""] + [f"- {p}" for p in problems]) if problems else []
    checks = targets(result)
    text += ["", "== targets (scaling) =="]
    text += [f"{verdict:<4}  {label}: {value}" for label, value, verdict in checks]
    md += ["", "### Targets (scaling)", ""]
    md.append(
        markdown_table(
            ["target", "measured", "result"],
            [[label, value, verdict] for label, value, verdict in checks],
        )
    )
    return text, md
