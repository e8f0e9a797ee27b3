"""The Flower app bundle (FAB): environments and outputs inside the project stay out of it.

``flwr build`` / ``flwr run`` (1.41) collect every .py/.toml/.md/.yaml/.yml/.json/.jsonl
file of the project that the root ``.gitignore`` does not exclude and refuse the project
when one of them lies deeper than ``MAX_DIR_DEPTH`` directories — before flwr's own
``venv/**`` exclude or ``[tool.flwr.app] fab-exclude`` apply. A virtualenv named ``venv/``
or ``env/`` inside the project (its site-packages are deep) broke ``flwr run``; the
project's ``.gitignore`` lists those folders. These tests run the real ``flwr build`` on a
copy of the tracked files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.cli.utils import AppPathDepthError, build_pathspec, filter_paths_for_publish
from flwr.common.constant import FAB_EXCLUDE_PATTERNS, FAB_INCLUDE_PATTERNS
from flwr.supercore.constant import MAX_DIR_DEPTH

ROOT = Path(__file__).resolve().parents[2]
# flwr 1.41 builds its pathspecs with pathspec's deprecated "gitwildmatch" factory
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pathspec")

# Folders a user plausibly has inside the project: each gets a tree deeper than flwr allows.
EXCLUDED = (
    "venv", "env", ".env", "ENV", ".venv", ".venv-py311", "venv311", ".conda", ".pixi",
    ".direnv", "__pypackages__", ".tox", ".nox", "node_modules", ".cache", "outputs",
    "multirun", "wandb", "mlruns", "lightning_logs", "checkpoints", "runs", "reports",
    "simulations/venv",  # a nested one: the patterns are not anchored to the root
)


def _deep_file(top: str) -> str:
    """A site-packages-like module path whose depth exceeds flwr's limit."""
    nested = "/".join(f"d{i}" for i in range(MAX_DIR_DEPTH))
    return f"{top}/lib/python3.11/site-packages/pkg/{nested}/mod.py"


def _populate(app: Path, top: str) -> None:
    for rel in (_deep_file(top), f"{top}/pyvenv.cfg", f"{top}/config.yaml",
                f"{top}/meta.json", f"{top}/README.md", f"{top}/lib/setup.py"):
        path = app / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n" if rel.endswith(".py") else "k: v\n")


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    paths = (p for p in out.split("\0") if p)
    return [p for p in paths if (ROOT / p).is_file() and not (ROOT / p).is_symlink()]


def _flwr_build(app: Path, out: Path) -> subprocess.CompletedProcess[str]:
    flwr = Path(sys.executable).with_name("flwr")
    exe = str(flwr) if flwr.exists() else shutil.which("flwr")
    assert exe, "the flwr CLI is not installed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0",
               OMP_NUM_THREADS="1", COLUMNS="500", NO_COLOR="1", TERM="dumb")
    out.mkdir()
    return subprocess.run([exe, "build", "--app", str(app)], cwd=out, env=env,
                          capture_output=True, text=True, timeout=120)


def _flat(proc: subprocess.CompletedProcess[str]) -> str:
    """stdout + stderr without rich's box and line wrapping."""
    return " ".join((proc.stdout + proc.stderr).replace("│", " ").split())


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> tuple[Path, list[str]]:
    # flwr requires the directory name to be a valid app name (no underscores)
    app = tmp_path_factory.mktemp("bundle") / "fedpeft"
    tracked = _tracked()
    for rel in tracked:
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, app / rel)
    for top in EXCLUDED:
        _populate(app, top)
    return app, tracked


def test_flwr_build_leaves_environments_and_outputs_out_of_the_bundle(app, tmp_path):
    app_dir, tracked = app
    proc = _flwr_build(app_dir, tmp_path / "out")
    assert proc.returncode == 0, _flat(proc)
    (fab,) = (tmp_path / "out").glob("*.fab")
    with zipfile.ZipFile(fab) as zf:
        names = set(zf.namelist())

    leaked = sorted(n for n in names if any(n.startswith(top + "/") for top in EXCLUDED))
    assert not leaked, leaked
    for needed in ("pyproject.toml", "fedpeft/flower/server_app.py",
                   "fedpeft/flower/client_app.py", "strategies/__init__.py"):
        assert needed in names
    # .gitignore drops no tracked file: the bundle is exactly what flwr's own rules keep
    include, exclude = build_pathspec(FAB_INCLUDE_PATTERNS), build_pathspec(FAB_EXCLUDE_PATTERNS)
    expected = {p for p in tracked if include.match_file(p) and not exclude.match_file(p)}
    assert names == expected | {"pyproject.toml", ".info/CONTENT"}


def test_the_same_tree_under_another_name_breaks_flwr_build(app, tmp_path):
    """The control: flwr really refuses the deep tree when .gitignore does not exclude it."""
    app_dir, _ = app
    (app_dir / "venv").rename(app_dir / "myenvdir")
    try:
        proc = _flwr_build(app_dir, tmp_path / "out")
    finally:
        (app_dir / "myenvdir").rename(app_dir / "venv")
    assert proc.returncode != 0
    text = _flat(proc)
    assert "exceeds the maximum directory depth" in text, text
    assert _deep_file("myenvdir") in text
    assert not list((tmp_path / "out").glob("*.fab"))


def test_flwr_own_venv_exclude_comes_after_the_depth_check():
    """Why .gitignore lists venv/ although flwr's FAB_EXCLUDE_PATTERNS has venv/**."""
    assert "venv/**" in FAB_EXCLUDE_PATTERNS
    files = {"pyproject.toml": b"", _deep_file("venv"): b""}
    with pytest.raises(AppPathDepthError):
        filter_paths_for_publish({**files, ".gitignore": b""})
    kept = filter_paths_for_publish({**files, ".gitignore": (ROOT / ".gitignore").read_bytes()})
    assert set(kept) == {"pyproject.toml", ".gitignore"}
