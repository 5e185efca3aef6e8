"""Real filesystems on loop devices for tests: each helper detaches only the device it attached."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def mounted_disk(image: Path, where: Path, size: int = 256 << 20) -> Iterator[str]:
    """A fresh ext4 on a loop device of ``image``, mounted at ``where``; the device."""
    with open(image, "wb") as f:
        f.truncate(size)
    with attached(image) as device:
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
        where.mkdir(exist_ok=True)
        subprocess.run(["mount", device, str(where)], check=True)
        try:
            yield device
        finally:
            subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


@contextlib.contextmanager
def attached(image: Path) -> Iterator[str]:
    """``image`` on a loop device of its own (read-write); detached afterwards."""
    device = subprocess.run(
        ["losetup", "--find", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=False)
