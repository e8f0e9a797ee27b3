"""Finding strategies: every ``fedpeft.plugins`` entry point, then named modules.

fedpeft never imports a strategy by name. The built-in strategies are found exactly
as an outside package's are: ``pyproject.toml`` declares the ``strategies`` package as
a ``fedpeft.plugins`` entry point, and importing it registers them
(:func:`fedpeft.registry.register_strategy`). ``strategy.plugins`` names more modules
(for code that is not an installed package).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from fedpeft.errors import RegistryError

GROUP = "fedpeft.plugins"
_loaded = False


def load_entry_points() -> None:
    """Import every ``fedpeft.plugins`` entry point (once per process).

    Raises:
        RegistryError: an entry point failed to import (named, with the reason);
            the others are still imported.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    failed = []
    for ep in entry_points(group=GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken third-party plug-in must not hide the others
            failed.append(f"{ep.name} = {ep.value!r}: {type(err).__name__}: {err}")
    if failed:
        raise RegistryError(f"'{GROUP}' entry point(s) failed to load: " + "; ".join(failed))


def import_modules(spec: str) -> list[str]:
    """Import the comma-separated modules of ``spec``; the problems, one per module."""
    problems = []
    for module in [m.strip() for m in spec.split(",") if m.strip()]:
        try:
            importlib.import_module(module)
        except ImportError as err:
            problems.append(f"strategy.plugins: cannot import {module!r}: {err}")
    return problems
