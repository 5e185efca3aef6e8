"""Run the backup tools under measurement: our appliance CLI, restic and borg."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PAGE = resource.getpagesize()


class ToolError(Exception):
    """A tool command failed; the message says which and why."""


@dataclass
class Run:
    argv: list[str]
    status: int
    wall: float
    maxrss_kib: int  # ru_maxrss from wait4: the largest single process of the tool
    tree_pss_kib: int  # sampled sum over the tool's process tree, which catches worker pools
    stdout: str
    log: Path

    def check(self) -> Run:
        if self.status != 0:
            err = self.log.with_suffix(".err")
            # The first line is the command itself; the last line usually names the failure.
            lines = [line for line in err.read_text(errors="replace").splitlines()[1:] if line]
            reason = lines[-1][:300] if lines else "no output"
            raise ToolError(f"`{' '.join(self.argv[:4])} …` exited {self.status}: {reason} ({err})")
        return self


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces; the fields after its closing ')' are fixed.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE // 1024
    except (OSError, ValueError, IndexError):
        return 0


def _tree_pss_kib(root: int) -> int:
    children = _children()
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += _pss_kib(pid)
        stack.extend(children.get(pid, ()))
    return total


def run(
    argv: list[str],
    log: Path,
    env: dict[str, str],
    cwd: Path | None = None,
    timeout: float = 3600.0,
) -> Run:
    """Run one command to completion and measure wall time and peak memory."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        err.write(f"$ {' '.join(argv)}\n".encode())
        err.flush()
        started = time.perf_counter()
        try:
            # Own session, so a timeout can stop the tool together with any workers it forked.
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            err.write(f"cannot start: {exc}\n".encode())
            return Run(argv, 127, 0.0, 0, 0, "", log)
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1):
                peak[0] = max(peak[0], _tree_pss_kib(proc.pid))

        def kill() -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        timer = threading.Timer(timeout, kill)
        timer.start()
        _, wait_status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        timer.cancel()
        done.set()
        sampler.join()
        status = os.waitstatus_to_exitcode(wait_status)
        proc.returncode = status  # wait4 reaped it; keep Popen from waiting again
    stdout = out_path.read_text(errors="replace")
    return Run(argv, status, wall, usage.ru_maxrss, peak[0], stdout, log)


def tree_blocks(path: Path) -> int | None:
    """Bytes allocated under path (st_blocks * 512), which is what a repository costs on disk."""
    if not path.exists():
        return None
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _under(target: Path, source: Path) -> Path:
    """Where a tool that keeps absolute paths put `source` below `target`."""
    return target / str(source).lstrip("/")


class Tool:
    name = ""

    def __init__(self, work: Path, timeout: float) -> None:
        self.work = work
        self.timeout = timeout
        self.repo = work / "repos" / self.name
        self.cache = work / "cache" / self.name
        self.logs = work / "logs" / self.name
        self.env = dict(os.environ)
        self.counter = 0

    def _run(self, argv: list[str], label: str, cwd: Path | None = None) -> Run:
        self.counter += 1
        log = self.logs / f"{self.counter:03d}-{label}"
        return run(argv, log, self.env, cwd, self.timeout)

    def version(self) -> str:
        raise NotImplementedError

    def prepare(self) -> None:
        """Start from an empty repository (untimed)."""
        raise NotImplementedError

    def backup(self, path: Path, asset: str, kind: str, full: bool) -> Run:
        raise NotImplementedError

    def restore_tree(self, source: Path, target: Path) -> tuple[Run, Path]:
        raise NotImplementedError

    def restore_image(self, source: Path, target: Path) -> tuple[Run, Path]:
        raise NotImplementedError

    def store(self) -> Path:
        return self.repo


class Restic(Tool):
    name = "restic"

    def __init__(self, work: Path, timeout: float) -> None:
        super().__init__(work, timeout)
        self.env |= {"RESTIC_PASSWORD": "bench", "RESTIC_CACHE_DIR": str(self.cache)}

    def version(self) -> str:
        out = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout
        return " ".join(out.split()[:2]) or "restic (unknown version)"

    def prepare(self) -> None:
        shutil.rmtree(self.repo, ignore_errors=True)
        shutil.rmtree(self.cache, ignore_errors=True)
        self._run(["restic", "init", "--repo", str(self.repo)], "init").check()

    def backup(self, path: Path, asset: str, kind: str, full: bool) -> Run:
        # restic picks the parent snapshot by host and path, so --host keeps that stable; it has
        # no image mode, so the disk is backed up as the regular file it is.
        argv = [
            "restic",
            "backup",
            "--repo",
            str(self.repo),
            "--host",
            "bench",
            "--tag",
            asset,
            str(path),
        ]
        return self._run(argv, f"backup-{asset}").check()

    def _restore(self, source: Path, target: Path, label: str) -> tuple[Run, Path]:
        argv = [
            "restic",
            "restore",
            "latest",
            "--repo",
            str(self.repo),
            "--host",
            "bench",
            "--path",
            str(source),
            "--target",
            str(target),
        ]
        return self._run(argv, label).check(), _under(target, source)

    def restore_tree(self, source: Path, target: Path) -> tuple[Run, Path]:
        return self._restore(source, target, "restore-tree")

    def restore_image(self, source: Path, target: Path) -> tuple[Run, Path]:
        return self._restore(source, target, "restore-image")


class Borg(Tool):
    name = "borg"

    def __init__(self, work: Path, timeout: float) -> None:
        super().__init__(work, timeout)
        self.env |= {
            "BORG_PASSPHRASE": "bench",
            "BORG_BASE_DIR": str(self.cache),
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }
        self.latest: dict[str, str] = {}

    def version(self) -> str:
        out = subprocess.run(["borg", "--version"], capture_output=True, text=True).stdout
        return out.strip() or "borg (unknown version)"

    def prepare(self) -> None:
        shutil.rmtree(self.repo, ignore_errors=True)
        shutil.rmtree(self.cache, ignore_errors=True)
        self.latest.clear()
        self._run(["borg", "init", "-e", "repokey-blake2", str(self.repo)], "init").check()

    def backup(self, path: Path, asset: str, kind: str, full: bool) -> Run:
        # borg has no full/incremental switch: every archive deduplicates against the repository
        # and skips unchanged files through its files cache.
        name = f"{asset}-{self.counter + 1:03d}"
        argv = ["borg", "create", "--compression", "zstd,3", f"{self.repo}::{name}", str(path)]
        result = self._run(argv, f"backup-{asset}").check()
        self.latest[asset] = name
        return result

    def _extract(self, asset: str, source: Path, target: Path, sparse: bool) -> tuple[Run, Path]:
        if asset not in self.latest:
            raise ToolError(f"no {asset} archive to extract")
        argv = [
            "borg",
            "extract",
            *(["--sparse"] if sparse else []),
            f"{self.repo}::{self.latest[asset]}",
        ]
        return self._run(argv, f"restore-{asset}", cwd=target).check(), _under(target, source)

    def restore_tree(self, source: Path, target: Path) -> tuple[Run, Path]:
        return self._extract("tree", source, target, sparse=False)

    def restore_image(self, source: Path, target: Path) -> tuple[Run, Path]:
        # --sparse is how a borg user restores a disk image: zero chunks become holes.
        return self._extract("vm", source, target, sparse=True)


class Ours(Tool):
    name = "ours"

    def __init__(self, work: Path, timeout: float, cli: Path) -> None:
        super().__init__(work, timeout)
        self.cli = cli
        self.source = Path(__file__).resolve().parent.parent.parent
        self.env |= {"APPLIANCE_PASSPHRASE": "bench"}

    def _cmd(self, *args: str, json: bool = False) -> list[str]:
        # --json is an option of the CLI itself, so it goes before the subcommand.
        return [str(self.cli), "--data-dir", str(self.repo), *(["--json"] if json else []), *args]

    def version(self) -> str:
        try:
            out = subprocess.run(
                [str(self.cli), "--version"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            return "appliance (not runnable)"
        text = out.stdout.strip() if out.returncode == 0 else ""
        return text or "appliance (version unknown)"

    def prepare(self) -> None:
        if not os.access(self.cli, os.X_OK):
            raise ToolError(f"appliance CLI not found at {self.cli}")
        shutil.rmtree(self.repo, ignore_errors=True)
        # An installed appliance has its modules compiled (pip does it); a checkout run with
        # PYTHONDONTWRITEBYTECODE would compile them again at every command.
        packages = [
            str(self.source / p) for p in ("appliance", "api", "image", "hardware", "tiering")
        ]
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", *packages], capture_output=True, check=False
        )
        self._run(self._cmd("init"), "init").check()

    def backup(self, path: Path, asset: str, kind: str, full: bool) -> Run:
        mode = "full" if full else "incremental"
        argv = self._cmd("backup", kind, str(path), "--asset", asset, "--mode", mode, json=True)
        return self._run(argv, f"backup-{asset}").check()

    def _latest_point(self, asset: str) -> str:
        result = self._run(self._cmd("points", "--asset", asset, json=True), f"points-{asset}")
        result.check()
        try:
            points = json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise ToolError(f"points --json printed no JSON: {exc}") from exc
        points = [p for p in points if p.get("asset", asset) == asset]
        if not points:
            raise ToolError(f"no {asset} recovery point")
        # ISO timestamps sort as text; on a tie the later entry in the list wins.
        latest = max(enumerate(points), key=lambda item: (str(item[1]["created_at"]), item[0]))
        return str(latest[1]["id"])

    def _restored(self, target: Path, source: Path) -> Path:
        for candidate in (_under(target, source), target / source.name):
            if candidate.exists():
                return candidate
        return target

    def restore_tree(self, source: Path, target: Path) -> tuple[Run, Path]:
        point = self._latest_point("tree")
        result = self._run(self._cmd("restore", point, str(target)), "restore-tree").check()
        return result, self._restored(target, source)

    def restore_image(self, source: Path, target: Path) -> tuple[Run, Path]:
        point = self._latest_point("vm")
        out = target / source.name
        result = self._run(self._cmd("restore", point, str(out)), "restore-image").check()
        # A point with several disks restores into a directory named by the target.
        if out.is_dir():
            out = self._restored(out, source)
        return result, out

    def store(self) -> Path:
        return self.repo / "pools" / "default" / "store"
