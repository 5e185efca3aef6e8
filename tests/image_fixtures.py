"""The disk images the image plug-in's tests read: one raw source with known content and holes,
and that source converted by plain qemu-img (independently of ``write_disk``) into every format.
Plain functions: each test module wraps them in its own session fixtures."""

from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from image import qemu_img

MiB = 1 << 20
FORMATS = ("raw", "qcow2", "vmdk", "vhdx", "vdi", "vpc")


def require_qemu_utils() -> None:
    """Fail (never skip) with the install step when the tools are missing."""
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing: install it with `{qemu_img.INSTALL_HINT}`")


@dataclass(frozen=True)
class Source:
    path: Path
    content: bytes
    holes: tuple[tuple[int, int], ...]  # never written: sparse in the raw file

    @property
    def size(self) -> int:
        return len(self.content)


def make_source(folder: Path) -> Source:
    """20 MiB raw disk: random data (some unaligned), explicit zeros, and 2 MiB-aligned holes."""
    rng = random.Random(20240601)
    size = 20 * MiB
    content = bytearray(size)
    writes = [
        (0, MiB),
        (6 * MiB + 12345, 300_000),
        (16 * MiB, 64 * 1024),
        (size - 100 * 1024, 100 * 1024),
    ]
    path = folder / "disk.raw"
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in writes:
            data = rng.randbytes(length)
            content[offset : offset + length] = data
            f.seek(offset)
            f.write(data)
        f.seek(MiB)
        f.write(bytes(MiB))  # written zeros: data in the raw file, a hole after conversion
    return Source(path, bytes(content), holes=((2 * MiB, 6 * MiB), (8 * MiB, 16 * MiB)))


def convert_all(source: Source, folder: Path) -> dict[str, Path]:
    made = {"raw": source.path}
    for fmt in FORMATS[1:]:
        target = folder / f"disk.{fmt}"
        options = ["-o", "force_size=on"] if fmt == "vpc" else []
        subprocess.run(
            [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                fmt,
                *options,
                str(source.path),
                str(target),
            ],
            check=True,
        )
        made[fmt] = target
    return made
