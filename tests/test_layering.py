"""Math knows nothing about transport: only fedpeft/flower imports flwr."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PURE = ["fedpeft", "fedpeft.lora", "fedpeft.aggregation", "fedpeft.codecs", "fedpeft.selection",
        "fedpeft.config", "fedpeft.registry", "fedpeft.client", "fedpeft.server", "strategies"]


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


def test_fedpeft_never_imports_the_builtin_strategies_by_name():
    """Dependency direction: ``strategies`` imports ``fedpeft``, never the other way; the
    built-ins are found through their ``fedpeft.plugins`` entry point, as plug-ins are."""
    offenders = [
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "fedpeft").rglob("*.py")
        if "strategies" in _imports(p)
        or re.search(r"(import_module|__import__)\(\s*[\"']strategies", p.read_text())
    ]
    assert offenders == []
    from importlib.metadata import entry_points

    assert "strategies" in {ep.value for ep in entry_points(group="fedpeft.plugins")}


def test_the_client_app_does_not_import_the_server_app():
    imported = set()
    for node in ast.walk(ast.parse((ROOT / "fedpeft/flower/client_app.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert "fedpeft.flower.server_app" not in imported
