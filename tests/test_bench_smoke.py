"""The benchmark's data generator is deterministic and its mutation is the size it claims."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCALE = 0.002
BENCHLIB = Path(__file__).resolve().parents[1] / "scripts" / "benchlib"


def _load(name: str) -> ModuleType:
    module_name = f"benchlib_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHLIB / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    # The generator's worker pool finds its functions through sys.modules.
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


datagen = _load("datagen")


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _image_blocks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    block = datagen.BLOCK
    return [data[i : i + block] for i in range(0, len(data), block)]


def test_generator_is_deterministic_and_mutation_touches_two_percent(tmp_path: Path) -> None:
    first = datagen.ensure(tmp_path / "a", SCALE, jobs=2, log=False)
    second = datagen.ensure(tmp_path / "b", SCALE, jobs=2, log=False)
    tree = _digests(first.tree)
    assert len(tree) == first.files > 50
    assert tree == _digests(second.tree)
    assert first.image.read_bytes() == second.image.read_bytes()
    # The image is sparse: a good part of it is never written.
    assert first.image.stat().st_blocks * 512 < first.image_bytes * 0.8

    blocks = _image_blocks(first.image)
    summary = datagen.mutate(first)
    mutated = _digests(first.tree)
    changed = [rel for rel in tree if rel in mutated and mutated[rel] != tree[rel]]
    assert len(changed) == summary["modified"]
    assert 0.01 <= len(changed) / len(tree) <= 0.04
    assert len(set(tree) - set(mutated)) == summary["deleted"] >= 1
    assert len(set(mutated) - set(tree)) == summary["added"] >= 1
    rewritten = sum(a != b for a, b in zip(blocks, _image_blocks(first.image), strict=True))
    assert 0.015 <= rewritten / len(blocks) <= 0.025

    # Reusing the data dir undoes the mutation exactly.
    again = datagen.ensure(tmp_path / "a", SCALE, jobs=2, log=False)
    assert _digests(again.tree) == tree
    assert _image_blocks(again.image) == blocks
