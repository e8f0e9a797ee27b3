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
at any instant leaves the previous checkpoint intact and never a torn file.

Loading uses ``torch.load(weights_only=True)``: no pickled code runs. ``state.pt``
holds only what that loader accepts (dicts, lists, strings, numbers, ``None`` and
tensors; numpy arrays and scalars are stored as tensors with a marker), and
:func:`save_checkpoint` refuses any other object, naming where it sits, so every
checkpoint fedpeft writes can be resumed. A file that is not such a checkpoint
(truncated, corrupt, or holding other pickled objects) is refused with a
:class:`~fedpeft.errors.FedPeftError` naming it; it is never loaded unsafely.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
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


_SCALARS = (str, int, float, bool, type(None))


def _to_torch(obj: Any, where: str = "states") -> Any:
    """States → what ``torch.load(weights_only=True)`` accepts, recursively.

    numpy arrays and scalars become tensors under a marker key; tuples become lists.

    Raises:
        FedPeftError: an object of another type (a set, a dataclass, …), naming
            its place, e.g. ``states['aggregator']['history'][2]``.
    """
    if isinstance(obj, torch.Tensor) or (
        isinstance(obj, _SCALARS) and not isinstance(obj, np.generic)
    ):
        return obj
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, np.generic):  # a numpy scalar keeps its dtype through a 0-d tensor
        return {"__npscalar__": torch.from_numpy(np.asarray(obj).reshape(1))}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not _plain_key(k):
                raise FedPeftError(
                    f"checkpoint: {where} has the key {k!r} of type {type(k).__name__}; "
                    "strategy states may only use strings, numbers or tuples of them as keys"
                )
            out[k] = _to_torch(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_torch(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise FedPeftError(
        f"checkpoint: {where} is a {type(obj).__module__}.{type(obj).__qualname__}; strategy "
        "states may hold only dicts, lists, tuples, strings, numbers, None, tensors and "
        "numpy arrays (what a weights-only load restores)"
    )


def _plain_key(key: Any) -> bool:
    if isinstance(key, tuple):
        return all(_plain_key(k) for k in key)
    return isinstance(key, _SCALARS) and not isinstance(key, np.generic)


def _from_torch(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__"}:
            return obj["__ndarray__"].numpy()
        if set(obj) == {"__npscalar__"}:
            return obj["__npscalar__"].numpy()[0]
        return {k: _from_torch(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_torch(v) for v in obj]
    return obj


def _reason(err: BaseException) -> str:
    """A one-line reason for a load failure, without torch's advice to load unsafely."""
    unsafe_advice = "weights_only" in str(err) or "Weights only" in str(err)
    if isinstance(err, pickle.UnpicklingError) or unsafe_advice:
        return (
            "it holds pickled objects other than the containers, numbers and tensors "
            "fedpeft writes, so it was not written by fedpeft (or was altered); refusing "
            "to load it"
        )
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, RuntimeError) and "zip archive" in text:
        return "truncated or corrupt (not a complete torch archive)"
    if isinstance(err, SafetensorError):
        return f"not a valid safetensors file ({text})"
    if isinstance(err, OSError):
        return err.strerror or text
    return text


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
    safe_states = _to_torch(dict(states))  # refuses what a weights-only load cannot restore
    directory.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{server_round:06d}"
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=directory))
    try:
        save_file({k: v.contiguous() for k, v in global_tensors.items()}, str(tmp / "global.safetensors"))
        torch.save(safe_states, tmp / "state.pt")
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


_LOAD_ERRORS = (
    OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, pickle.UnpicklingError
)


def load_latest(directory: pathlib.Path) -> Checkpoint | None:
    """The newest complete checkpoint in ``directory``, or ``None`` if there is no ``LATEST``.

    Raises:
        FedPeftError: ``LATEST`` cannot be read or names no checkpoint, or a file of
            that checkpoint cannot be read (the message names the file). ``state.pt``
            is loaded with ``weights_only=True`` only.
    """
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise FedPeftError(f"checkpoint index {pointer} cannot be read: {_reason(err)}") from err
    path = directory / name
    if not re.fullmatch(r"ckpt-\d+", name) or not path.is_dir():
        raise FedPeftError(
            f"checkpoint index {pointer} names {name!r}, which is not a checkpoint in {directory}"
        )
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_text())
        server_round = int(meta["round"])
        for key in ("results", "ledger"):
            if not isinstance(meta[key], list):
                raise ValueError(f"{key!r} is not a list")
        file = path / "global.safetensors"
        tensors = load_file(str(file))
        file = path / "state.pt"
        with warnings.catch_warnings():  # torch's notes on foreign pickles are not for users
            warnings.simplefilter("ignore")
            states = _from_torch(torch.load(file, weights_only=True))
        if not isinstance(states, dict):
            raise ValueError(f"expected a dict of states, got {type(states).__name__}")
    except _LOAD_ERRORS as err:
        if isinstance(err, KeyError):
            err = ValueError(f"no {err} field")
        raise FedPeftError(f"checkpoint file {file} cannot be read: {_reason(err)}") from err
    return Checkpoint(server_round=server_round, global_tensors=tensors, states=states, meta=meta)


def load_for_resume(directory: pathlib.Path, num_rounds: int) -> Checkpoint:
    """The checkpoint a resumed run continues from: a continuation, never a fresh start.

    Args:
        directory: the checkpoint directory.
        num_rounds: ``federation.rounds`` of the resumed run.

    Raises:
        FedPeftError: there is no ``LATEST`` (nothing to resume), a file of the
            checkpoint cannot be read, or ``num_rounds`` is below the rounds it holds.
    """
    ckpt = load_latest(directory)
    if ckpt is None:
        raise FedPeftError(
            f"nothing to resume: the checkpoint index {directory / LATEST} does not exist "
            "(the run wrote no checkpoint, or it was deleted); start a new run instead"
        )
    if num_rounds < ckpt.server_round:
        raise FedPeftError(
            f"federation.rounds={num_rounds} is less than the {ckpt.server_round} rounds the "
            f"checkpoint in {directory} already holds; a resumed run can only keep or extend them"
        )
    return ckpt


def keep_details_until(path: pathlib.Path, server_round: int) -> None:
    """Drop the lines of ``details.jsonl`` after ``server_round`` (an interrupted
    round's), so the resumed run appends each later round exactly once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["round"]) <= server_round:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line of a killed process
    atomic_write(path, "".join(kept).encode())


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


class ClientStateError(FedPeftError):
    """A client's saved state cannot be read (raised on the client, inside its ClientApp).

    The server finds the message in the error reply it receives
    (:func:`client_state_problem`) and stops the run instead of dropping the client.
    """

    def __init__(self, path: pathlib.Path, reason: str) -> None:
        super().__init__(
            f"client state file {path} cannot be read ({reason}); the run cannot "
            f"{_CLIENT_STATE_END}"
        )


_CLIENT_STATE_END = "continue exactly without it: restore the file or start the run again"


def client_state_problem(reason: str) -> str | None:
    """The message of a :class:`ClientStateError` inside an error reply's reason (as
    any runtime wraps it: Ray adds tracebacks and class names), or ``None``."""
    match = re.search(rf"client state file .*?{re.escape(_CLIENT_STATE_END)}", reason)
    return match.group(0) if match else None


def _round_of(path: pathlib.Path) -> int | None:
    match = re.fullmatch(r"round-(\d+)", path.stem)
    return int(match.group(1)) if match else None


def load_client_state(
    directory: pathlib.Path, partition_id: int, before_round: int
) -> TensorDict | None:
    """The newest saved state of a client from a round before ``before_round``.

    Raises:
        ClientStateError: that file cannot be read (it is named).
    """
    folder = directory / "clients" / f"partition-{partition_id}"
    if not folder.exists():
        return None
    candidates = sorted(
        (r, p)
        for p in folder.glob("round-*.safetensors")
        if (r := _round_of(p)) is not None and r < before_round
    )
    if not candidates:
        return None
    path = candidates[-1][1]
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise ClientStateError(path, _reason(err)) from err


def check_client_states(directory: pathlib.Path, server_round: int) -> int:
    """Before resuming after ``server_round``: drop client states of later rounds (an
    interrupted round's, which the resumed run redoes) and check that the state each
    client would load next can be read.

    Returns:
        How many client state files were checked.

    Raises:
        ClientStateError: naming the first file that cannot be read.
    """
    root = directory / "clients"
    if not root.is_dir():
        return 0
    checked = 0
    for folder in sorted(root.glob("partition-*")):
        rounds = sorted(
            (r, p) for p in folder.glob("round-*.safetensors") if (r := _round_of(p)) is not None
        )
        for r, path in rounds:
            if r > server_round:
                path.unlink(missing_ok=True)
        kept = [p for r, p in rounds if r <= server_round]
        if kept:
            try:
                load_file(str(kept[-1]))
            except (OSError, SafetensorError) as err:
                raise ClientStateError(kept[-1], _reason(err)) from err
            checked += 1
    return checked
