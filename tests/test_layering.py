"""Math knows nothing about transport: only fedpeft/flower imports flwr."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PURE = ["fedpeft", "fedpeft.lora", "fedpeft.aggregation", "fedpeft.codecs", "fedpeft.selection",
        "fedpeft.config", "fedpeft.registry", "fedpeft.client", "strategies"]


def test_pure_modules_do_not_import_flower_or_transformers():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in PURE)
        + "import fedpeft.registry as r; r.available_strategies()\n"
        + "bad = [m for m in ('flwr', 'transformers', 'peft', 'ray') if m in sys.modules]\n"
        + "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_flower_package_imports_flwr():
    offenders = []
    for path in list((ROOT / "fedpeft").rglob("*.py")) + list((ROOT / "strategies").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("fedpeft/flower/"):
            continue
        if "flwr" in _imports(path):
            offenders.append(rel)
    assert offenders == []


def test_transformers_only_in_tasks():
    offenders = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "fedpeft").rglob("*.py")
        if {"transformers", "peft"} & _imports(p)
        and not p.relative_to(ROOT).as_posix().startswith("fedpeft/tasks/")
    ]
    assert offenders == []


def test_strategies_use_only_public_api():
    """Built-in strategies import fedpeft's public modules, never private names."""
    for path in (ROOT / "strategies").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedpeft"):
                assert not node.module.startswith("fedpeft.flower"), path
                for alias in node.names:
                    assert not alias.name.startswith("_"), (path, alias.name)
