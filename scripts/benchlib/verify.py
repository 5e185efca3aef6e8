"""Check a restored tree and image against the source."""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

SAMPLE = 500
LARGE = 1 << 20  # files at least this big are always hashed: they hold most of the bytes


def listing(root: Path) -> dict[str, int]:
    """Relative path -> size of every regular file under root."""
    out: dict[str, int] = {}
    stack = [root]
    while stack:
        current = stack.pop()
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    out[os.path.relpath(entry.path, root)] = entry.stat(
                        follow_symlinks=False
                    ).st_size
    return out


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class TreePrint:
    sizes: dict[str, int]
    hashes: dict[str, str]

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())


def fingerprint(root: Path) -> TreePrint:
    sizes = listing(root)
    names = sorted(sizes)
    sample = set(random.Random("bench-verify").sample(names, min(SAMPLE, len(names))))
    sample |= {name for name in names if sizes[name] >= LARGE}
    return TreePrint(sizes, {name: file_hash(root / name) for name in sorted(sample)})


def compare_tree(source: TreePrint, restored: Path) -> list[str]:
    """Problems found in the restored tree; empty when it matches."""
    if not restored.is_dir():
        return [f"restored tree {restored} does not exist"]
    sizes = listing(restored)
    problems = []
    if len(sizes) != len(source.sizes):
        problems.append(f"{len(sizes)} files restored, {len(source.sizes)} expected")
    missing = sorted(set(source.sizes) - set(sizes))
    extra = sorted(set(sizes) - set(source.sizes))
    if missing:
        problems.append(f"{len(missing)} missing, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
    wrong_size = [
        name for name in source.sizes if name in sizes and sizes[name] != source.sizes[name]
    ]
    if wrong_size:
        problems.append(f"{len(wrong_size)} with wrong size, e.g. {wrong_size[0]}")
    wrong_hash = [
        name
        for name, digest in source.hashes.items()
        if name in sizes and file_hash(restored / name) != digest
    ]
    if wrong_hash:
        problems.append(
            f"{len(wrong_hash)} of {len(source.hashes)} sampled differ, e.g. {wrong_hash[0]}"
        )
    return problems


def compare_image(source_hash: str, source_size: int, restored: Path) -> list[str]:
    if not restored.is_file():
        return [f"restored image {restored} does not exist"]
    size = restored.stat().st_size
    if size != source_size:
        return [f"image is {size} bytes, {source_size} expected"]
    if file_hash(restored) != source_hash:
        return ["image content differs"]
    return []
