"""Crash-safe checkpoints of a run: global adapter, strategy state, ledger, results.

Layout of a checkpoint directory::

    LATEST                     name of the newest complete checkpoint
    ckpt-000003/global.safetensors   the global adapter after round 3
    ckpt-000003/state.pt             aggregator / selector / codec states (torch.save
                                     of plain dicts, lists, numbers and tensors)
    ckpt-000003/meta.json            round, results so far, byte ledger
    clients/partition-0/round-000003.safetensors   a client's own state (simulation)

A checkpoint is written into a temporary directory, flushed, renamed into place,
and only then named in ``LATEST`` (itself replaced atomically), so a process killed
at any instant leaves the previous checkpoint intact and never a torn file. Loading
uses ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedpeft.errors import FedPeftError
from fedpeft.results import atomic_write
from fedpeft.types import TensorDict

LATEST = "LATEST"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        server_round: the last completed round.
        global_tensors: the global adapter after that round.
        states: the saved strategy states (see :func:`save_checkpoint`).
        meta: results rows and byte ledger.
    """

    server_round: int
    global_tensors: TensorDict
    states: dict[str, Any]
    meta: dict[str, Any]


def _to_torch(obj: Any) -> Any:
    """numpy arrays → tensors, recursively (``weights_only`` loading allows tensors)."""
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, Mapping):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_torch(v) for v in obj]
    return obj


def _from_torch(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        return {k: _from_torch(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_torch(v) for v in obj]
    return obj


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    directory: pathlib.Path,
    server_round: int,
    global_tensors: Mapping[str, torch.Tensor],
    states: Mapping[str, Any],
    meta: Mapping[str, Any],
    keep: int = 2,
) -> pathlib.Path:
    """Write the checkpoint of ``server_round`` and point ``LATEST`` at it.

    Args:
        directory: the checkpoint directory.
        server_round: the round just completed.
        global_tensors: the global adapter.
        states: strategy/selector/codec states (plain containers of numbers,
            strings, tensors and numpy arrays).
        meta: JSON-serialisable run facts (results rows, ledger).
        keep: how many complete checkpoints to keep.
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{server_round:06d}"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    try:
        save_file({k: v.contiguous() for k, v in global_tensors.items()}, str(tmp / "global.safetensors"))
        torch.save(_to_torch(dict(states)), tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"round": server_round, **meta}, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        final = directory / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write(directory / LATEST, name.encode())
    complete = sorted(p for p in directory.glob("ckpt-*") if p.is_dir() and not p.name.startswith("."))
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return directory / name


def load_latest(directory: pathlib.Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``directory``, or ``None`` if there is none.

    Raises:
        FedPeftError: ``LATEST`` names a checkpoint that cannot be read.
    """
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    path = directory / pointer.read_text().strip()
    try:
        meta = json.loads((path / "meta.json").read_text())
        tensors = load_file(str(path / "global.safetensors"))
        states = _from_torch(torch.load(path / "state.pt", weights_only=True))
    except (OSError, ValueError, RuntimeError) as err:
        raise FedPeftError(f"checkpoint {path} cannot be read: {err}") from err
    return Checkpoint(server_round=int(meta["round"]), global_tensors=tensors, states=states, meta=meta)


def client_state_path(directory: pathlib.Path, partition_id: int, server_round: int) -> pathlib.Path:
    """Where a client's state after ``server_round`` is kept."""
    return directory / "clients" / f"partition-{partition_id}" / f"round-{server_round:06d}.safetensors"


def save_client_state(
    directory: pathlib.Path, partition_id: int, server_round: int, tensors: Mapping[str, torch.Tensor], keep: int = 3
) -> None:
    """Atomically save a client's state after a round (keeps the last ``keep``)."""
    path = client_state_path(directory, partition_id, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in sorted(path.parent.glob("round-*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)


def load_client_state(directory: pathlib.Path, partition_id: int, before_round: int) -> TensorDict | None:
    """The newest saved state of a client from a round before ``before_round``."""
    folder = directory / "clients" / f"partition-{partition_id}"
    if not folder.exists():
        return None
    candidates = sorted(
        p for p in folder.glob("round-*.safetensors") if int(p.stem.split("-")[1]) < before_round
    )
    return load_file(str(candidates[-1])) if candidates else None
