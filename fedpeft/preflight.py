"""Checks a run passes before the simulation engine (or anything else) starts.

``fedpeft simulate`` and ``fedpeft deploy-local`` call :func:`prepare_run`;
``fedpeft config`` calls :func:`check_config`, so both report the same problems.
Each problem is a :class:`~fedpeft.errors.FedPeftError` (``error:`` line, exit 2):

* the config parses and its keys are valid; strategy, codecs and privacy options
  are compatible (``privacy.secagg=true`` is refused here too);
* your data files (``data.path``, ``data.test-path``) exist, parse, have the columns
  and values the task reads and, for a classifier, at least two classes
  (:func:`fedpeft.tasks.files.check_files`);
* ``train.device`` exists on this machine and ``model.quantization`` can run on it;
* ``model.name`` is a model of the task's kind and ``lora.target-modules`` exist in
  it (:func:`fedpeft.tasks.checks.check_model`);
* the results directory is a writable directory;
* a new run never lands on another run's files: a results directory that already
  holds a run is refused unless ``overwrite`` (then that run's files, checkpoints
  included, are deleted first, after every other check has passed);
* no run starts on a directory a live run holds (its lock, :mod:`fedpeft.server.lock`):
  neither ``overwrite`` nor a resume touches a run in progress;
* a resumed run has a readable checkpoint (``LATEST`` and its files) and client
  states, and ``federation.rounds`` does not go below the rounds it holds.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

from fedpeft.config import FlatConfig, RunConfig, parse_run_config
from fedpeft.errors import FedPeftError

RUN_FILES = ("config.json", "summary.json", "metrics.csv", "curves.png", "details.jsonl")
"""Files a run writes in its results directory."""
RUN_DIRS = ("adapter", "checkpoint")
"""Folders a run writes in its results directory."""
_CHECKPOINT_ENTRIES = ("LATEST", "ckpt-*", ".ckpt-*", ".LATEST.*", "clients")


def check_config(flat: FlatConfig) -> RunConfig:
    """Everything about a config that can be checked without running it.

    Raises:
        ConfigError: invalid keys or values, incompatible options, or a model that
            does not fit the task or the target modules.
    """
    cfg = parse_run_config(flat)
    from fedpeft.server.setup import build_strategy
    from fedpeft.tasks.checks import check_model
    from fedpeft.tasks.files import check_files

    build_strategy(cfg)
    check_files(cfg)
    check_devices(cfg)
    check_model(cfg)
    return cfg


def check_devices(cfg: RunConfig) -> None:
    """``train.device`` exists here and ``model.quantization`` can run on it
    (:mod:`fedpeft.tasks.device`; a deployment's nodes check their own again).

    Raises:
        ConfigError: naming the key and what this machine has.
    """
    from fedpeft.tasks.device import check_quantization, resolve_device

    check_quantization(cfg.model.quantization, resolve_device(cfg.train.device))


def prepare_run(flat: FlatConfig, *, overwrite: bool = False) -> FlatConfig:
    """Check a run before it starts; return ``flat`` with ``output.dir`` (and
    ``data.path`` / ``data.test-path``) resolved to absolute paths.

    Args:
        flat: the run config.
        overwrite: a results directory that already holds a run may be reused; that
            run's files are deleted (only once every check has passed).

    Raises:
        FedPeftError: the first problem found (see the module docstring).
    """
    from fedpeft.checkpoint import check_client_states, load_for_resume
    from fedpeft.server.lock import check_unlocked
    from fedpeft.server.setup import checkpoint_dir, resolve_output_dir

    cfg = check_config(flat)
    out_dir = resolve_output_dir(cfg)
    ckpt_dir = checkpoint_dir(cfg)
    writable_dir(out_dir, "--out (output.dir)")
    if cfg.checkpoint.dir:
        writable_dir(ckpt_dir, "checkpoint.dir")
    for directory in {out_dir, ckpt_dir}:  # a live run's files are neither resumed nor deleted
        check_unlocked(directory)
    if cfg.checkpoint.resume:
        ckpt = load_for_resume(ckpt_dir, cfg.federation.rounds)
        check_client_states(ckpt_dir, ckpt.server_round)
    else:
        found = existing_run(out_dir, ckpt_dir)
        if found and not overwrite:
            raise FedPeftError(
                f"--out (output.dir) {out_dir} already holds a run ({', '.join(found)}); pass "
                "--overwrite to replace it (its files are deleted first), continue it with "
                f"--resume {out_dir}, or choose another --out"
            )
        if found:
            clear_run(out_dir, ckpt_dir)
    # worker processes (Ray actors, SuperNodes started here) may run in another directory
    files = {k: str(pathlib.Path(v).expanduser().resolve()) for k, v in
             (("data.path", cfg.data.path), ("data.test-path", cfg.data.test_path)) if v}
    return {**flat, **files, "output.dir": str(out_dir)}


def writable_dir(path: pathlib.Path, key: str) -> None:
    """Create ``path`` if needed and check a file can be written in it.

    Raises:
        FedPeftError: naming ``key`` and the path when it is a file, lies under a
            file, or cannot be written.
    """
    if path.exists() and not path.is_dir():
        raise FedPeftError(f"{key}: {path} is a file, not a directory; choose a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fedpeft-write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        why = err.strerror or str(err)
        if isinstance(err, (NotADirectoryError, FileExistsError)):
            why = "a part of the path is a file"
        raise FedPeftError(
            f"{key}: cannot write in {path} ({why}); choose a writable directory"
        ) from err


def existing_run(out_dir: pathlib.Path, ckpt_dir: pathlib.Path) -> list[str]:
    """The files of an earlier run in ``out_dir`` (and in ``ckpt_dir``), by name."""
    found = [n for n in (*RUN_FILES, *RUN_DIRS) if (out_dir / n).exists()]
    if ckpt_dir != out_dir / "checkpoint" and ckpt_dir.is_dir():
        found += [
            str(p) for pattern in _CHECKPOINT_ENTRIES for p in sorted(ckpt_dir.glob(pattern))[:1]
        ]
    return found


def clear_run(out_dir: pathlib.Path, ckpt_dir: pathlib.Path) -> None:
    """Delete an earlier run's files: results, adapter, details, checkpoints and client
    states (files of other programs in the directory are left alone)."""
    for name in RUN_FILES:
        for path in [out_dir / name, *out_dir.glob(f".{name}.*")]:  # + atomic-write leftovers
            path.unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    if ckpt_dir.is_dir():
        for pattern in _CHECKPOINT_ENTRIES:
            for path in ckpt_dir.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
    leftovers = [n for n in (*RUN_FILES, *RUN_DIRS) if (out_dir / n).exists()]
    if leftovers:
        raise FedPeftError(f"--overwrite: cannot delete {', '.join(leftovers)} in {out_dir}")
