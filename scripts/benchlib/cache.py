"""The page cache before each measured step: warm (the data and the store read once) or cold."""

from __future__ import annotations

import os
from pathlib import Path


class CacheDropper:
    """Sets the page cache before each measured step: warm (the default, as issue 16 measures:
    the data and the store are read once, so every tool is CPU-bound) or cold (dropped, so every
    tool starts from the disk, its own program files included)."""

    def __init__(self, cold: bool = False) -> None:
        self.cold = cold
        self.problem: str | None = None if os.geteuid() == 0 or not cold else "not running as root"
        self.reported = False

    def __call__(self, warm: list[Path] | None = None) -> None:
        os.sync()  # also keeps one tool's unwritten restore from slowing the next tool
        if not self.cold:
            for path in warm or []:
                _read_all(path)
            return
        if self.problem is None:
            try:
                Path("/proc/sys/vm/drop_caches").write_text("3\n")
            except OSError as exc:
                self.problem = f"writing /proc/sys/vm/drop_caches failed: {exc}"
        if self.problem and not self.reported:
            print(f"note: page cache NOT dropped between phases ({self.problem}); continuing")
            self.reported = True

    @property
    def note(self) -> str:
        if not self.cold:
            return "page cache warm: the data and the tool's store read once before every step"
        if self.problem:
            return f"page cache not dropped ({self.problem})"
        return "page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every step"


def _read_all(path: Path) -> None:
    files = [path] if path.is_file() else [Path(d, f) for d, _, fs in os.walk(path) for f in fs]
    for name in files:
        try:
            with open(name, "rb", buffering=0) as f:
                while f.read(1 << 20):
                    pass
        except OSError:
            pass  # a file removed meanwhile, or not readable: nothing to warm
