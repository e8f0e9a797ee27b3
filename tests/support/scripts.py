"""Import a script of ``simulations/`` as a module (they are not a package)."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_script(name: str) -> ModuleType:
    """``simulations/<name>.py``, registered in ``sys.modules`` under ``name``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "simulations" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
