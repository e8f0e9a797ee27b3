"""Where and in which precision a task's model runs (issue 19).

* ``train.device`` — ``auto`` (CUDA when ``torch.cuda.is_available()``, else the
  CPU), ``cpu``, ``cuda`` or ``cuda:N``: client training and the server's evaluation.
  A SuperNode's ``node-config`` may set its own (``train.device="cuda:1"``).
* ``train.precision`` — ``fp32`` (default), ``bf16`` or ``fp16``: mixed precision by
  ``torch.autocast`` around the forward pass; ``fp16`` adds a gradient scaler
  (``torch.amp.GradScaler``) so small gradients do not underflow.
* ``model.dtype`` — the frozen base weights' dtype (``fp32``, ``bf16``, ``fp16``).
* ``model.quantization`` — ``none``, ``8bit`` or ``4bit`` (QLoRA: NF4 base with
  double quantisation, bf16 compute) through bitsandbytes, an optional extra
  (``pip install "fedpeft[gpu]"``) that needs CUDA.

Whatever runs on the device, the adapter tensors the client sends and the server
aggregates are fp32 CPU tensors (:meth:`fedpeft.tasks.model.AdapterModel.tensors`).
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

import torch

from fedpeft.config import DEVICE_PATTERN
from fedpeft.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``model.dtype`` / ``train.precision`` names → torch dtypes."""


def resolve_device(text: str, key: str = "train.device") -> torch.device:
    """The device ``text`` names on this machine.

    Raises:
        ConfigError: naming ``key`` — a malformed value, CUDA asked for where torch
            has none, or a GPU index this machine does not have.
    """
    if not DEVICE_PATTERN.match(text):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {text!r}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{key}={text!r} but torch {torch.__version__} sees no CUDA device on this "
                "machine; use train.device=auto or cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{key}={text!r} but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision for a forward pass (a no-op for ``fp32``)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A gradient scaler for ``fp16`` training (``None`` otherwise)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def check_quantization(mode: str, device: torch.device) -> None:
    """``model.quantization`` can run here.

    Raises:
        ConfigError: quantization asked for without CUDA, or without bitsandbytes.
    """
    if mode == "none":
        return
    if device.type != "cuda":
        raise ConfigError(
            f"model.quantization={mode!r} needs a CUDA device (bitsandbytes' kernels), but "
            f"train.device resolves to {str(device)!r}; use model.quantization=none on this machine"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"model.quantization={mode!r} needs bitsandbytes: pip install \"fedpeft[gpu]\" "
            "(or bitsandbytes) in the environment that runs the clients"
        )


def quantization_config(mode: str) -> Any:
    """The transformers ``BitsAndBytesConfig`` of ``mode`` (``None`` for ``none``):
    4-bit is QLoRA's (Dettmers et al., 2023): NF4, double quantisation, bf16 compute."""
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
