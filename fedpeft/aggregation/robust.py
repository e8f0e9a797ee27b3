"""Robustness layers applied to client updates before any aggregator.

All work on the *change* a client made, ``u_k = x_k − r_k`` (upload minus what the
client received), so they apply to every strategy whatever its tensors mean.

* :func:`outliers`: indices whose ``‖u_k‖`` exceeds ``factor`` × the low median
  of the round's norms (a norm bound relative to the round; needs ≥ 3 updates);
* :func:`clip_update`: ``u ← u · min(1, c / ‖u‖)`` (norm clipping, as in
  DP-FedAvg, McMahan et al., ICLR 2018).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch

from fedpeft.types import TensorDict


def update_norm(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """``‖x − r‖₂`` over every float tensor (keys missing from ``reference`` count
    whole; integer auxiliary tensors such as pool indices are not part of the change)."""
    total = 0.0
    for key, value in tensors.items():
        if not value.is_floating_point():
            continue
        ref = reference.get(key)
        delta = value.double() - ref.double() if ref is not None and ref.shape == value.shape else value.double()
        total += float((delta * delta).sum())
    return total**0.5


def outliers(norms: Sequence[float], factor: float) -> list[int]:
    """Indices of norms above ``factor`` × the low median (empty if < 3 norms)."""
    if factor <= 0 or len(norms) < 3:
        return []
    bound = factor * statistics.median_low(norms)
    return [i for i, n in enumerate(norms) if n > bound and bound > 0]


def clip_update(
    tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], clip_norm: float
) -> tuple[TensorDict, bool]:
    """Scale the change to at most ``clip_norm``; returns ``(tensors, clipped)``."""
    norm = update_norm(tensors, reference)
    if clip_norm <= 0 or norm <= clip_norm:
        return dict(tensors), False
    scale = clip_norm / norm
    out: TensorDict = {}
    for key, value in tensors.items():
        ref = reference.get(key)
        if not value.is_floating_point():
            out[key] = value
        elif ref is not None and ref.shape == value.shape:
            out[key] = (ref.double() + scale * (value.double() - ref.double())).to(value.dtype)
        else:
            out[key] = (scale * value.double()).to(value.dtype)
    return out, True
