"""Crash-safe checkpoints of a run: global adapter, strategy state, ledger, results.

Layout of a checkpoint directory::

    LATEST                     name of the newest complete checkpoint
    ckpt-000003/global.safetensors   the global adapter after round 3
    ckpt-000003/state.pt             aggregator / selector / codec states (torch.save
                                     of plain dicts, lists, numbers and tensors)
    ckpt-000003/meta.json            round, results so far, byte ledger, identity
    ckpt-identity.json               what the run belongs to (see below)
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

Files from elsewhere. Adapters are read only as safetensors; a pickle (a ``.bin`` /
``.pt`` adapter, or a pickle renamed ``.safetensors``) is refused with the reason and
never unpickled. Before a tensor file is read into memory its size and its
safetensors header are checked: the file must be at most the limit below, and with
an :class:`Expected` (a resume, which knows this run's model) every tensor the
header declares must be one of this run's adapter tensors with its shape, so a
checkpoint of another model, rank or targets is refused naming the first key that
differs and both shapes. Limits (module constants, not config keys):

* :data:`MAX_HEADER_BYTES` — the JSON header of a safetensors file;
* global adapter: exactly the declared shapes of this run's adapter (header check);
* ``state.pt``: :data:`FILE_SLACK_BYTES` + :data:`STATE_ADAPTERS_PER_CLIENT` ×
  (clients + 1) × the adapter's fp32 bytes (its zip entries must be stored, not
  compressed, and their declared sizes count);
* a client state: :data:`FILE_SLACK_BYTES` + :data:`CLIENT_STATE_ADAPTERS` × the
  adapter's bytes;
* ``meta.json``: :data:`MAX_META_BYTES`; any file when the adapter is not known
  (``load_latest`` alone, the checks before a run starts, a client loading its
  state): :data:`MAX_FILE_BYTES`.

Identity. A run that checkpoints writes ``ckpt-identity.json`` (:func:`write_identity`)
— task, model name and a fingerprint of the base model's architecture (class, hidden
size, layers, vocabulary), LoRA rank and target modules, strategy — and every
checkpoint saved afterwards copies it into its ``meta.json``. A resume compares it
with this run's (:func:`identity_problems`) and refuses a mismatch naming each field
with both values. A checkpoint without an identity (written before identities
existed) is still resumed; its tensors are checked against this run's shapes all the
same.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedpeft.errors import FedPeftError
from fedpeft.results import atomic_write
from fedpeft.types import TensorDict

LATEST = "LATEST"
IDENTITY = "ckpt-identity.json"

MAX_HEADER_BYTES = 16 * 2**20
"""Largest safetensors JSON header read (the safetensors library itself allows 100 MB)."""
FILE_SLACK_BYTES = 64 * 2**20
"""Allowance on top of the adapter-relative limits (small adapters, bookkeeping)."""
STATE_ADAPTERS_PER_CLIENT = 4
"""``state.pt`` may hold this many adapters' worth of bytes per client, plus one set
(per-client control variates, downlink references, momentum)."""
CLIENT_STATE_ADAPTERS = 8
"""A client's state file may hold this many adapters' worth of bytes (residuals,
private factors, codec states)."""
MAX_META_BYTES = 256 * 2**20
"""Largest ``meta.json`` / ``ckpt-identity.json`` read."""
MAX_FILE_BYTES = 4 * 2**30
"""Largest tensor file read when the expected adapter is not known."""

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


@dataclass(frozen=True)
class Expected:
    """What a checkpoint must hold to fit this run (built by the resuming server).

    Attributes:
        identity: this run's identity (:func:`run_identity`).
        shapes: every tensor of this run's adapter and its shape; a checkpoint's
            global adapter must hold each of them.
        optional: tensors a global adapter may also hold (base deltas of the LoRA
            modules) and their shapes.
        clients: ``federation.clients``, for the size limit of ``state.pt``.
    """

    identity: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    optional: dict[str, tuple[int, ...]] = field(default_factory=dict)
    clients: int = 1

    @property
    def adapter_bytes(self) -> int:
        """fp32 bytes of the adapter with every optional tensor."""
        return 4 * sum(math.prod(s) for s in (*self.shapes.values(), *self.optional.values()))

    @property
    def state_limit(self) -> int:
        """Largest ``state.pt`` accepted."""
        return FILE_SLACK_BYTES + STATE_ADAPTERS_PER_CLIENT * (self.clients + 1) * self.adapter_bytes

    @property
    def client_state_limit(self) -> int:
        """Largest client state file accepted."""
        return FILE_SLACK_BYTES + CLIENT_STATE_ADAPTERS * self.adapter_bytes

    @property
    def global_limit(self) -> int:
        """Largest global adapter file accepted (its header is checked as well)."""
        return FILE_SLACK_BYTES + 2 * self.adapter_bytes


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



# ------------------------------------------------------------------ files from elsewhere
class HostileFileError(ValueError):
    """A file is refused before it is read into memory or unpickled (the reason)."""


_PICKLE_REASON = (
    "fedpeft reads adapters and client states only as safetensors, and a pickle can run "
    "code when it is loaded; it was not read"
)


def _sniff(head: bytes) -> str | None:
    """What a file that should be safetensors is instead, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "a torch/zip archive (pickle-based, like a .bin or .pt adapter)"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "a pickle"
    return None


def _check_size(path: pathlib.Path, limit: int, what: str) -> int:
    size = path.stat().st_size
    if size > limit:
        raise HostileFileError(
            f"{size} bytes, more than the {limit} bytes {what} may have; refusing to read it "
            "(a file of another run or model, or crafted to exhaust memory)"
        )
    return size


def safetensors_header(path: pathlib.Path, limit: int = MAX_FILE_BYTES) -> dict[str, tuple[int, ...]]:
    """The tensors a safetensors file declares, ``{name: shape}``, read from its header only.

    Refuses (before reading any tensor) a file larger than ``limit``, a pickle or torch
    archive (a ``.bin`` / ``.pt`` file, whatever its name), a header longer than
    :data:`MAX_HEADER_BYTES` or than the file, and a header whose tensors do not add
    up to the file's size.

    Raises:
        HostileFileError: a file refused unread (too large, a pickle), with the reason.
        ValueError: not a valid safetensors file (truncated, corrupt), with the reason.
        OSError: the file cannot be read.
    """
    if path.suffix != ".safetensors":
        raise HostileFileError(f"not a .safetensors file; {_PICKLE_REASON}")
    size = _check_size(path, limit, "this file")
    with open(path, "rb") as handle:
        head = handle.read(8)
        kind = _sniff(head + handle.read(8))
        if kind:
            raise HostileFileError(f"{kind}, not safetensors; {_PICKLE_REASON}")
        if len(head) < 8:
            raise ValueError("not a valid safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise ValueError(
                f"not a valid safetensors file (its header claims {n} bytes; the file has "
                f"{size}, the limit is {MAX_HEADER_BYTES})"
            )
        handle.seek(8)
        raw = handle.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not an object")
        shapes: dict[str, tuple[int, ...]] = {}
        end = 0
        for key, info in header.items():
            if key == "__metadata__":
                continue
            shape = tuple(int(d) for d in info["shape"])
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {key!r} has a negative dimension")
            begin, stop = (int(x) for x in info["data_offsets"])
            if stop - begin != _DTYPE_BYTES[info["dtype"]] * math.prod(shape):
                raise ValueError(f"tensor {key!r}: its offsets do not match its shape and dtype")
            shapes[key] = shape
            end = max(end, stop)
    except (ValueError, KeyError, TypeError) as err:
        text = f"{err}" if not isinstance(err, KeyError) else f"no {err} field"
        raise ValueError(f"not a valid safetensors file ({text})") from err
    if 8 + n + end != size:
        raise ValueError(
            f"not a valid safetensors file (its header declares {end} bytes of tensors, the "
            f"file holds {size - 8 - n})"
        )
    return shapes


def load_safetensors(path: pathlib.Path, limit: int = MAX_FILE_BYTES) -> TensorDict:
    """:func:`safetensors_header`'s checks, then the tensors."""
    safetensors_header(path, limit)
    return load_file(str(path))


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Expected, file: pathlib.Path) -> None:
    """Refuse a global adapter whose tensors are not this run's (names and shapes).

    Raises:
        FedPeftError: naming the first key that differs (in this model's order) and
            both shapes, a key this run's adapter lacks, or one it needs.
    """
    hint = (
        "the checkpoint was written for another model, LoRA rank or target modules; "
        "resume only a checkpoint of this run"
    )
    for key, want in (*expected.shapes.items(), *expected.optional.items()):
        if key in found and tuple(found[key]) != tuple(want):
            raise FedPeftError(
                f"checkpoint file {file}: tensor {key!r} has shape {tuple(found[key])}, this "
                f"run's model has {tuple(want)}; {hint}"
            )
    extra = [k for k in found if k not in expected.shapes and k not in expected.optional]
    if extra:
        raise FedPeftError(
            f"checkpoint file {file} holds {extra[0]!r}"
            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}, which this run's "
            f"model has no tensor for; {hint}"
        )
    missing = [k for k in expected.shapes if k not in found]
    if missing:
        raise FedPeftError(
            f"checkpoint file {file} lacks {missing[0]!r}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} of this run's "
            f"adapter; {hint}"
        )


def _check_torch_archive(path: pathlib.Path, limit: int) -> None:
    """Size, kind and declared entry sizes of ``state.pt``, before torch reads it."""
    _check_size(path, limit, "this state.pt")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head.startswith(b"PK\x03\x04"):
        kind = _sniff(head)
        if kind == "a pickle":
            raise HostileFileError(
                "a bare pickle, not the torch archive fedpeft writes; it was not unpickled"
            )
        raise ValueError("truncated or corrupt (not a complete torch archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ValueError("truncated or corrupt (not a complete torch archive)") from err
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise HostileFileError(
            f"its entry {packed[0]!r} is compressed; torch.save never compresses, so it was "
            "not written by fedpeft (and could expand beyond the size limit); refusing to load it"
        )
    declared = sum(e.file_size for e in entries)
    if declared > limit:
        raise HostileFileError(
            f"its entries declare {declared} bytes, more than the {limit} bytes a state.pt "
            "of this run may have; refusing to read it"
        )


def _read_json(path: pathlib.Path) -> Any:
    _check_size(path, MAX_META_BYTES, "a checkpoint's JSON file")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------- identity
_IDENTITY_FIELDS = ("task", "model", "lora-rank", "lora-targets", "strategy")


def architecture_of(model: Any) -> dict[str, Any]:
    """A fingerprint of a base model's architecture: its class and, when its config
    has them, hidden size, layers and vocabulary size."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, Any] = {"class": type(base).__name__}
    config = getattr(base, "config", None)
    for name, attrs in (
        ("hidden", ("hidden_size", "d_model", "n_embd")),
        ("layers", ("num_hidden_layers", "n_layer")),
        ("vocab", ("vocab_size",)),
    ):
        for attr in attrs:
            value = getattr(config, attr, None) if config is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                out[name] = value
                break
    return out


def run_identity(
    task: str, model: str, architecture: Mapping[str, Any], rank: int, targets: Any, strategy: str
) -> dict[str, Any]:
    """What a checkpoint belongs to (stored in it, compared on resume)."""
    return {
        "task": task,
        "model": {"name": model, **dict(architecture)},
        "lora-rank": int(rank),
        "lora-targets": sorted(str(t) for t in targets),
        "strategy": strategy,
    }


def _describe(name: str, value: Any) -> str:
    if name == "model" and isinstance(value, dict):
        parts = [str(value.get("class", "?"))]
        parts += [f"{k} {value[k]}" for k in ("hidden", "layers", "vocab") if k in value]
        return f"model {value.get('name')!r} ({', '.join(parts)})"
    if name == "lora-targets" and isinstance(value, list):
        return f"LoRA targets {','.join(map(str, value))}"
    if name == "lora-rank":
        return f"LoRA rank {value}"
    return f"{name} {value!r}"


def identity_problems(found: Mapping[str, Any], this: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(checkpoint's, this run's)`` descriptions of each field that differs (fields
    one side lacks are not compared)."""
    return [
        (_describe(k, found[k]), _describe(k, this[k]))
        for k in _IDENTITY_FIELDS
        if k in found and k in this and found[k] != this[k]
    ]


def write_identity(directory: pathlib.Path, identity: Mapping[str, Any]) -> None:
    """Record what the checkpoints in ``directory`` belong to; :func:`save_checkpoint`
    copies it into each checkpoint it writes."""
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / IDENTITY, json.dumps(dict(identity), sort_keys=True).encode())


def _directory_identity(directory: pathlib.Path) -> dict[str, Any] | None:
    try:
        found = _read_json(directory / IDENTITY)
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


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
    identity: Mapping[str, Any] | None = None,
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
        identity: what the run belongs to (:func:`run_identity`); by default the
            directory's ``ckpt-identity.json`` (:func:`write_identity`), if any.
    """
    safe_states = _to_torch(dict(states))  # refuses what a weights-only load cannot restore
    if identity is None:
        identity = _directory_identity(directory)
    if identity is not None:
        meta = {**meta, "identity": dict(identity)}
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


def load_latest(directory: pathlib.Path, expected: Expected | None = None) -> Checkpoint | None:
    """The newest complete checkpoint in ``directory``, or ``None`` if there is no ``LATEST``.

    Args:
        directory: the checkpoint directory.
        expected: this run's identity and adapter shapes: the checkpoint's identity
            (if it has one) and its global adapter's header must match before any
            tensor is read, and the size limits are relative to this adapter.
            ``None``: only the fixed limits (:data:`MAX_FILE_BYTES`).

    Raises:
        FedPeftError: ``LATEST`` cannot be read or names no checkpoint, a file of
            that checkpoint cannot be read or is refused (the message names the file
            and why), or the checkpoint belongs to another run (naming what differs).
            ``state.pt`` is loaded with ``weights_only=True`` only.
    """
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    try:
        with open(pointer, "rb") as handle:
            name = handle.read(64).decode().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise FedPeftError(f"checkpoint index {pointer} cannot be read: {_reason(err)}") from err
    path = directory / name
    if not re.fullmatch(r"ckpt-\d+", name) or not path.is_dir():
        raise FedPeftError(
            f"checkpoint index {pointer} names {name!r}, which is not a checkpoint in {directory}"
        )
    file = path / "meta.json"
    try:
        meta = _read_json(file)
        server_round = int(meta["round"])
        for key in ("results", "ledger"):
            if not isinstance(meta[key], list):
                raise ValueError(f"{key!r} is not a list")
        if expected is not None:
            _check_identity(meta.get("identity"), expected.identity, path)
        file = path / "global.safetensors"
        if not file.exists():
            _refuse_pickled_adapter(path)
        if expected is not None:
            check_shapes(safetensors_header(file, expected.global_limit), expected, file)
            tensors = load_file(str(file))
        else:
            tensors = load_safetensors(file)
        file = path / "state.pt"
        _check_torch_archive(file, expected.state_limit if expected else MAX_FILE_BYTES)
        with warnings.catch_warnings():  # torch's notes on foreign pickles are not for users
            warnings.simplefilter("ignore")
            states = _from_torch(torch.load(file, weights_only=True))
        if not isinstance(states, dict):
            raise ValueError(f"expected a dict of states, got {type(states).__name__}")
    except _LOAD_ERRORS as err:
        if isinstance(err, KeyError):
            err = ValueError(f"no {err} field")
        verb = "is refused" if isinstance(err, HostileFileError) else "cannot be read"
        raise FedPeftError(f"checkpoint file {file} {verb}: {_reason(err)}") from err
    return Checkpoint(server_round=server_round, global_tensors=tensors, states=states, meta=meta)


def _check_identity(found: Any, this: Mapping[str, Any], path: pathlib.Path) -> None:
    if found is None:  # written before checkpoints carried an identity: shapes decide
        return
    if not isinstance(found, dict):
        raise ValueError("its 'identity' field is not an object")
    problems = identity_problems(found, this)
    if problems:
        theirs = ", ".join(a for a, _ in problems)
        ours = ", ".join(b for _, b in problems)
        raise FedPeftError(
            f"checkpoint {path} was written for {theirs}; this run uses {ours}. A checkpoint "
            "continues only the run that wrote it: resume that run, or start a new one"
        )


def _refuse_pickled_adapter(path: pathlib.Path) -> None:
    """``global.safetensors`` is missing: name a pickle-based adapter in its place."""
    for pattern in ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"):
        for other in sorted(path.glob(pattern)):
            if other.name != "state.pt":
                raise FedPeftError(
                    f"checkpoint {path} has no global.safetensors but {other.name}: {_PICKLE_REASON}"
                )


def load_for_resume(
    directory: pathlib.Path, num_rounds: int, expected: Expected | None = None
) -> Checkpoint:
    """The checkpoint a resumed run continues from: a continuation, never a fresh start.

    Args:
        directory: the checkpoint directory.
        num_rounds: ``federation.rounds`` of the resumed run.
        expected: see :func:`load_latest`.

    Raises:
        FedPeftError: there is no ``LATEST`` (nothing to resume), a file of the
            checkpoint cannot be read or is refused, it belongs to another run, or
            ``num_rounds`` is below the rounds it holds.
    """
    ckpt = load_latest(directory, expected)
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
    directory: pathlib.Path, partition_id: int, before_round: int, limit: int = MAX_FILE_BYTES
) -> TensorDict | None:
    """The newest saved state of a client from a round before ``before_round``.

    Raises:
        ClientStateError: that file cannot be read or is refused (larger than
            ``limit``, not safetensors; it is named with the reason).
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
        return load_safetensors(path, limit)
    except (OSError, SafetensorError, ValueError) as err:
        raise ClientStateError(path, _reason(err)) from err


def check_client_states(
    directory: pathlib.Path, server_round: int, expected: Expected | None = None
) -> int:
    """Before resuming after ``server_round``: drop client states of later rounds (an
    interrupted round's, which the resumed run redoes) and check that the state each
    client would load next can be read (and, with ``expected``, is within
    :attr:`Expected.client_state_limit`).

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
            limit = expected.client_state_limit if expected else MAX_FILE_BYTES
            try:
                load_safetensors(kept[-1], limit)
            except (OSError, SafetensorError, ValueError) as err:
                raise ClientStateError(kept[-1], _reason(err)) from err
            checked += 1
    return checked
