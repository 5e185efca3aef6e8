"""Loading ``scripts/benchlib`` modules in tests (the scripts folder is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHLIB = Path(__file__).resolve().parents[1] / "scripts" / "benchlib"


def load_benchlib(name: str) -> ModuleType:
    """``scripts/benchlib/<name>.py``, imported once as ``benchlib_<name>``."""
    module_name = f"benchlib_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCHLIB / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    # Worker pools (the data generator's) find their functions through sys.modules.
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
