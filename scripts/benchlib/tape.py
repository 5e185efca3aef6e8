"""The ``tape`` phase: the virtual tape drive against ``dd``, and what a single-file restore touches.

1. **Throughput.** The same bytes (incompressible, generated once) are written in the same block
   size (``hardware.tape.layout.BLOCK_SIZE``) to the same file system twice per repetition: by the
   virtual drive (``write_block`` per block, a filemark, ``close`` fsyncs) and by ``dd bs=<block>
   conv=fsync`` from a file holding them; then read back, by ``read_block`` per block and by ``dd
   of=/dev/null``. A and B alternate; medians are reported with the ratio drive / dd (target
   >= 0.8x). Both read from the page cache (just written): the ratio is the drive's own overhead.
2. **Positions.** A small appliance backs up a tree of files, writes it to a virtual library's
   tape, and restores one file from tape (``tape_restore`` with a path): the tape positions it
   touched (locates, rewinds, spaces), the objects and bytes it read, against the whole set.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1 << 20
TITLE = "Tape: virtual drive vs dd, and a single-file restore"
METHOD = (
    "The same incompressible bytes in the same block size to the same file system: the virtual "
    "drive (one record per block, filemark, fsync on close) vs `dd bs=256K conv=fsync`; reads "
    "of both from the page cache; A/B interleaved, medians. Then a tree backed up, written to a "
    "virtual tape, and one file restored from tape: the positions it touched."
)


@dataclass
class TapeResult:
    bytes: int = 0
    block: int = 0
    write_drive: list[float] = field(default_factory=list)
    write_dd: list[float] = field(default_factory=list)
    read_drive: list[float] = field(default_factory=list)
    read_dd: list[float] = field(default_factory=list)
    restore: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None


def _rate(size: int, seconds: list[float]) -> float:
    return size / MiB / statistics.median(seconds) if seconds else 0.0


def _timed(work: Callable[[], None]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _throughput(work: Path, size: int, repeat: int, result: TapeResult) -> None:
    from hardware.tape.layout import BLOCK_SIZE
    from hardware.tape.virtual import VirtualCartridge, VirtualDrive

    result.block = BLOCK_SIZE
    result.bytes = size
    source = work / "source.bin"
    with open(source, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    payload = source.read_bytes()
    view = memoryview(payload)
    for _ in range(repeat):
        cart = work / "bench.tape"
        cart.unlink(missing_ok=True)
        VirtualCartridge.create(cart, capacity=size * 2, early_warning=MiB, barcode="BENCH1")
        drive = VirtualDrive("bench")
        drive.load(cart)

        def write(drive: VirtualDrive = drive) -> None:
            for start in range(0, size, BLOCK_SIZE):
                drive.write_block(bytes(view[start : start + BLOCK_SIZE]))
            drive.write_filemarks(1)
            drive.close()

        result.write_drive.append(_timed(write))
        target = work / "dd.out"
        target.unlink(missing_ok=True)
        dd = ["dd", f"if={source}", f"of={target}", f"bs={BLOCK_SIZE}", "conv=fsync", "status=none"]
        result.write_dd.append(_timed(lambda dd=dd: subprocess.run(dd, check=True)))
        reader = VirtualDrive("bench")
        reader.load(cart)

        def read(reader: VirtualDrive = reader) -> None:
            while reader.read_block(BLOCK_SIZE):
                pass
            reader.close()

        result.read_drive.append(_timed(read))
        back = ["dd", f"if={target}", "of=/dev/null", f"bs={BLOCK_SIZE}", "status=none"]
        result.read_dd.append(_timed(lambda back=back: subprocess.run(back, check=True)))
        target.unlink()
    (work / "bench.tape").unlink(missing_ok=True)
    source.unlink()


def _single_file_restore(work: Path) -> dict[str, Any]:
    os.environ.setdefault("APPLIANCE_TEST_WEAK_KDF", "1")
    from appliance.engine import Appliance
    from hardware.tape.deck import open_deck
    from hardware.tape.jobs import backup_to_tape
    from hardware.tape.library import create_virtual_library, register_library
    from hardware.tape.restore import restore_from_tape

    tree = work / "tree"
    for d in range(4):
        (tree / f"dir{d}").mkdir(parents=True)
        for i in range(6):
            size = (i + 1) * 200 * 1024
            (tree / f"dir{d}" / f"file{i}.bin").write_bytes(os.urandom(size))
    app, _ = Appliance.init(str(work / "data"), "bench passphrase", pack_size=1 * MiB)
    with app:
        point = app.backup_files(str(tree), "bench").point.id
        library = create_virtual_library(
            work / "lib", slots=2, cartridges=[("BENCH1", 256 * MiB), ("BENCH2", 256 * MiB)]
        )
        register_library(app.catalog, library.root)
        app.catalog.put_tape_pool("bench")
        written = backup_to_tape(
            app, open_deck(app.catalog, library.drive_identity(0)), "bench", [point]
        )
        listed = app.catalog.get_tape_set(written["set"]).catalog["points"][point]
        one = restore_from_tape(
            app,
            open_deck(app.catalog, library.drive_identity(0)),
            point,
            subpath="dir2/file3.bin",
        )
    return {
        "set_objects": written["objects"],
        "set_bytes": written["bytes"],
        "point_objects": len(listed),
        "data_packs": sum(1 for n in listed if n.startswith("data/")),
        "objects_read": one["objects_read"],
        "bytes_read": one["bytes_read"],
        "locates": one["locates"],
        "positions": one["positions"],
        "blocks_read": one["blocks_read"],
    }


def run(work: Path, *, scale: float, repeat: int, log: Callable[[str], None] = print) -> TapeResult:
    """The phase (see the module doc); a failure is the result's ``problem``."""
    result = TapeResult()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    try:
        work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work, prefix="tape-") as tmp:
            size = max(64, int(512 * scale)) * MiB
            log(
                f"tape: {size // MiB} MiB through the virtual drive and dd, {max(repeat, 3)} run(s)"
            )
            _throughput(Path(tmp), size, max(repeat, 3), result)
            log("tape: a single-file restore from a virtual tape")
            result.restore = _single_file_restore(Path(tmp))
    except Exception as exc:  # the phase reports, the bench goes on
        result.problem = f"tape phase failed: {type(exc).__name__}: {exc}"
    return result


def rows(result: TapeResult) -> list[list[str]]:
    out = []
    for what, drive, dd in (
        ("write", result.write_drive, result.write_dd),
        ("read", result.read_drive, result.read_dd),
    ):
        a, b = _rate(result.bytes, drive), _rate(result.bytes, dd)
        out.append([what, f"{a:.0f} MiB/s", f"{b:.0f} MiB/s", f"{a / b:.2f}x" if b else "-"])
    return out


def targets(result: TapeResult) -> list[tuple[str, str, str]]:
    checks = []
    for what, drive, dd in (
        ("write", result.write_drive, result.write_dd),
        ("read", result.read_drive, result.read_dd),
    ):
        a, b = _rate(result.bytes, drive), _rate(result.bytes, dd)
        ratio = a / b if b else 0.0
        checks.append(
            (
                f"virtual drive {what} >= 0.8x dd",
                f"{ratio:.2f}x",
                "PASS" if ratio >= 0.8 else "FAIL",
            )
        )
    r = result.restore
    if r:
        fewer = r["objects_read"] < r["data_packs"]
        checks.append(
            (
                "single-file restore reads only what it needs",
                f"{r['objects_read']} of {r['data_packs']} data packs, {r['positions']} positions",
                "PASS" if fewer else "FAIL",
            )
        )
    return checks


def render(
    result: TapeResult,
    text_table: Callable[[list[str], list[list[str]]], str],
    markdown_table: Callable[[list[str], list[list[str]]], str],
) -> tuple[list[str], list[str]]:
    headers = ["", "virtual drive", "dd", "ratio"]
    lines = [
        f"{result.bytes // MiB} MiB in {result.block // 1024} KiB blocks, "
        f"{len(result.write_drive)} run(s), medians"
    ]
    r = result.restore
    if r:
        lines.append(
            f"single-file restore: {r['positions']} tape positions ({r['locates']} locates), "
            f"{r['objects_read']} object(s) / {r['bytes_read'] / MiB:.1f} MiB read of a set of "
            f"{r['set_objects']} objects / {r['set_bytes'] / MiB:.1f} MiB "
            f"(the point: {r['data_packs']} data packs)"
        )
    text = ["", f"== {TITLE} ==", *lines, text_table(headers, rows(result))]
    md = ["", f"### {TITLE}", "", METHOD, ""] + [f"- {line}" for line in lines]
    md += ["", markdown_table(headers, rows(result))]
    if result.problem:
        text.append(f"  ! {result.problem}")
        md += ["", f"- {result.problem}"]
    checks = targets(result)
    text += ["", "== targets (tape) =="]
    text += [f"{verdict:<4}  {label}: {value}" for label, value, verdict in checks]
    md += ["", "### Targets (tape)", ""]
    md.append(
        markdown_table(
            ["target", "measured", "result"],
            [[label, value, verdict] for label, value, verdict in checks],
        )
    )
    return text, md
