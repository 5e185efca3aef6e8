"""Aggregate benchmark cells into tables, target checks and a markdown section."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

MiB = 1 << 20

PHASES = ("initial", "unchanged", "incremental", "restore")
BACKUP_PHASES = ("initial", "unchanged", "incremental")
PHASE_TITLES = {
    "initial": "initial: full backup of the tree, then the image",
    "unchanged": "unchanged: backup again, nothing changed",
    "incremental": "incremental: backup after ~2 % of files and image blocks changed",
    "restore": "restore: latest tree point into an empty dir, image to a file",
}
# (phase, most ours may take relative to restic's wall time), judged for the tree and the image
# separately: a fast tree must not hide a slow image.
WALL_TARGETS = (("initial", 0.4), ("unchanged", 0.8), ("incremental", 0.5), ("restore", 0.5))
#: The parts of a phase the wall targets judge: (label, the Summary attribute holding its wall).
PARTS = (("tree", "tree_wall"), ("image", "image_wall"))
RSS_LIMIT_MIB = 512


@dataclass
class Cell:
    """One tool in one phase of one repetition."""

    source_bytes: int = 0
    tree_wall: float | None = None
    image_wall: float | None = None
    rss_mib: float | None = None
    pss_mib: float | None = None
    store_mib: float | None = None
    errors: list[str] = field(default_factory=list)
    verify: list[str] | None = None  # restore phase only: problems found, empty when OK

    @property
    def wall(self) -> float | None:
        if self.errors or self.tree_wall is None or self.image_wall is None:
            return None
        return self.tree_wall + self.image_wall


@dataclass
class Summary:
    runs: int
    wall: float | None
    tree_wall: float | None
    image_wall: float | None
    mibps: float | None
    rss_mib: float | None
    pss_mib: float | None
    store_mib: float | None
    error: str | None
    verify: str | None

    @property
    def peak_mib(self) -> float | None:
        values = [v for v in (self.rss_mib, self.pss_mib) if v is not None]
        return max(values) if values else None


def _median(cells: Sequence[Cell], get: Callable[[Cell], float | None]) -> float | None:
    values = [v for v in map(get, cells) if v is not None]
    return statistics.median(values) if values else None


def summarize(cells: Sequence[Cell]) -> Summary:
    errors = [e for cell in cells for e in cell.errors]
    ok = [cell for cell in cells if not cell.errors]
    verify = None
    checked = [cell.verify for cell in cells if cell.verify is not None]
    if checked:
        problems = [p for found in checked for p in found]
        verify = "OK" if not problems else "MISMATCH: " + "; ".join(dict.fromkeys(problems))
    wall = _median(ok, lambda c: c.wall)
    mibps = _median(ok, lambda c: c.source_bytes / MiB / c.wall if c.wall else None)
    return Summary(
        runs=len(cells),
        wall=wall,
        tree_wall=_median(ok, lambda c: c.tree_wall),
        image_wall=_median(ok, lambda c: c.image_wall),
        mibps=mibps,
        rss_mib=_median(ok, lambda c: c.rss_mib),
        pss_mib=_median(ok, lambda c: c.pss_mib),
        store_mib=_median(ok, lambda c: c.store_mib),
        # Any failed repetition marks the cell: a median over the survivors would hide it.
        error=errors[0] if errors else None,
        verify=verify,
    )


def ratio(ours: float | None, restic: float | None) -> float | None:
    if ours is None or not restic:
        return None
    return ours / restic


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def phase_table(
    phase: str, tools: Sequence[str], summaries: dict[tuple[str, str], Summary]
) -> tuple[list[str], list[list[str]]]:
    last = "verify" if phase == "restore" else "store MiB"
    headers = [
        "tool",
        "wall s",
        "tree s",
        "image s",
        "MiB/s",
        "RSS MiB",
        "tree PSS MiB",
        last,
        "wall ours/restic",
        "tree ours/restic",
        "image ours/restic",
        "store ours/restic",
    ]
    restic = summaries.get((phase, "restic"))
    ours = summaries.get((phase, "ours"))
    rows = []
    for tool in tools:
        s = summaries[(phase, tool)]
        if s.error:
            row = [tool, "error", "-", "-", "-", "-", "-", "error"]
        else:
            final = (s.verify or "-").split(":")[0] if phase == "restore" else _fmt(s.store_mib)
            row = [
                tool,
                _fmt(s.wall),
                _fmt(s.tree_wall),
                _fmt(s.image_wall),
                _fmt(s.mibps),
                _fmt(s.rss_mib),
                _fmt(s.pss_mib),
                final,
            ]
        ratios: list[float | None] = [None] * 4
        if tool == "ours" and ours and restic and not ours.error and not restic.error:
            ratios = [
                ratio(ours.wall, restic.wall),
                ratio(ours.tree_wall, restic.tree_wall),
                ratio(ours.image_wall, restic.image_wall),
                ratio(ours.store_mib, restic.store_mib),
            ]
        row += [_fmt_ratio(value) for value in ratios]
        rows.append(row)
    return headers, rows


def targets(
    phases: Sequence[str], summaries: dict[tuple[str, str], Summary]
) -> list[tuple[str, str, str]]:
    """(target, measured, PASS/FAIL/n/a) for each target the run can judge."""

    def get(phase: str, tool: str) -> Summary | None:
        s = summaries.get((phase, tool))
        return None if s is None or s.error else s

    out = []
    for phase, limit in WALL_TARGETS:
        if phase not in phases:
            continue
        ours, restic = get(phase, "ours"), get(phase, "restic")
        for part, attr in PARTS:
            label = f"{phase} {part} wall ≤ {limit:g}x restic"
            value = ratio(
                getattr(ours, attr) if ours else None, getattr(restic, attr) if restic else None
            )
            if value is None:
                out.append((label, "no data", "n/a"))
            else:
                out.append((label, f"{value:.2f}x", "PASS" if value <= limit else "FAIL"))
    backups = [p for p in BACKUP_PHASES if p in phases]
    if backups:
        phase = backups[-1]
        label = f"store ≤ restic (after {phase})"
        ours, restic = get(phase, "ours"), get(phase, "restic")
        value = ratio(ours.store_mib if ours else None, restic.store_mib if restic else None)
        if value is None:
            out.append((label, "no data", "n/a"))
        else:
            out.append((label, f"{value:.2f}x", "PASS" if value <= 1.0 else "FAIL"))
    # Both memory measures count: wait4 sees only the largest process, the sampled PSS sees
    # worker pools but can miss a short spike.
    peaks = [s.peak_mib for p in phases if (s := get(p, "ours")) and s.peak_mib is not None]
    label = f"peak memory of the process tree < {RSS_LIMIT_MIB} MiB"
    if peaks:
        peak = max(peaks)
        out.append((label, f"{peak:.0f} MiB", "PASS" if peak < RSS_LIMIT_MIB else "FAIL"))
    else:
        out.append((label, "no data", "n/a"))
    return out


def render_checks(
    title: str, checks: Sequence[tuple[str, str, str]]
) -> tuple[list[str], list[str]]:
    """A targets block, as text lines and as markdown lines: ``(target, measured, verdict)``."""
    text = ["", f"== targets ({title}) =="]
    text += [f"{verdict:<4}  {label}: {value}" for label, value, verdict in checks]
    md = ["", f"### Targets ({title})", ""]
    md.append(
        markdown_table(
            ["target", "measured", "result"],
            [[label, value, verdict] for label, value, verdict in checks],
        )
    )
    return text, md


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(
            h.rjust(w) if i else h.ljust(w)
            for i, (h, w) in enumerate(zip(headers, widths, strict=True))
        )
    ]
    for row in rows:
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def errors_of(
    phase: str, tools: Sequence[str], summaries: dict[tuple[str, str], Summary]
) -> list[str]:
    out = []
    for tool in tools:
        s = summaries[(phase, tool)]
        if s.error:
            out.append(f"{tool}: {s.error}")
        elif s.verify and s.verify != "OK":
            out.append(f"{tool}: {s.verify}")
    return out
