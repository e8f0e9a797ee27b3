"""Which structures to prune and when (ALGORITHMS.md §11.1–11.2, ``[PROPOSAL]``).

* :func:`select_prune` drops the lowest-importance structures (global ranking over
  layers by default, as in LoRAPrune, whose per-layer L2 normalisation makes scores
  comparable), never touches protected layers and keeps ``min_keep`` per layer.
* :func:`round_sparsity_goal`: ``s_goal = min(s*, s_prev + p·(1 − s_prev))`` — the
  bandit's ratio ``p`` is a fraction of the *remaining* structures.
* :func:`cubic_sparsity`: the cubic ramp (Zhu & Gupta 2017, used by LoRAPrune)
  ``s(k) = s_end + (s_start − s_end)·(1 − k/K)³``.
* :func:`num_to_prune` turns a sparsity target into a count.

Masks are ``(n,)`` bool keep-vectors; ``compose_keep`` maps a mask over the current
structures back to the original indices, which is what a client keeps in its state
and uploads as bitmaps.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Mapping
from typing import Literal, TypeVar

import torch

K = TypeVar("K", bound=Hashable)


def protected_layers(
    num_layers: int, first_fraction: float = 0.1, protect_last: bool = True
) -> frozenset[int]:
    """Layers never pruned: the first ``⌊first_fraction·L⌋``, optionally the last."""
    first = _floor(first_fraction * num_layers)
    layers = set(range(min(first, num_layers)))
    if protect_last and num_layers > 0:
        layers.add(num_layers - 1)
    return frozenset(layers)


def select_prune_count(
    importance: Mapping[K, torch.Tensor],
    num_remove: int,
    protected: Collection[K] = (),
    min_keep: int = 1,
    scope: Literal["global", "layer"] = "global",
) -> dict[K, torch.Tensor]:
    """Keep-masks after removing ``num_remove`` lowest-importance structures.

    With ``scope="global"`` the ``num_remove`` lowest scores over all unprotected
    layers go (ties: lower layer order, then lower index); with ``"layer"`` every
    unprotected layer loses ``num_remove`` of its own. No layer drops below
    ``min_keep`` structures, so fewer may be removed than asked.

    Returns:
        ``{layer: (n,) bool}``, ``True`` = keep; protected layers keep everything.
    """
    if min_keep < 1:
        raise ValueError(f"min_keep must be >= 1, got {min_keep}")
    if num_remove < 0:
        raise ValueError(f"num_remove must be >= 0, got {num_remove}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    keep = {
        layer: torch.ones(s.numel(), dtype=torch.bool)
        for layer, s in importance.items()
    }
    prunable = [layer for layer in importance if layer not in protected]
    if scope == "layer":
        for layer in prunable:
            keep[layer] = _drop_lowest(importance[layer], num_remove, min_keep)
        return keep
    candidates = sorted(
        (float(score), rank, index, layer)
        for rank, layer in enumerate(prunable)
        for index, score in enumerate(
            importance[layer].detach().to(torch.float64).tolist()
        )
    )
    remaining = {layer: importance[layer].numel() for layer in prunable}
    removed = 0
    for _, _, index, layer in candidates:
        if removed >= num_remove:
            break
        if remaining[layer] > min_keep:
            keep[layer][index] = False
            remaining[layer] -= 1
            removed += 1
    return keep


def select_prune(
    importance: Mapping[K, torch.Tensor],
    ratio: float,
    protected: Collection[K] = (),
    min_keep: int = 1,
    scope: Literal["global", "layer"] = "global",
) -> dict[K, torch.Tensor]:
    """Keep-masks after pruning the fraction ``ratio`` of the current structures.

    ``⌊ratio · n⌋`` structures are removed, where ``n`` counts the unprotected
    structures (all layers for ``scope="global"``, each layer for ``"layer"``),
    subject to ``min_keep`` per layer (see :func:`select_prune_count`).

    Raises:
        ValueError: ``ratio`` outside ``[0, 1]``.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"prune ratio must be in [0, 1], got {ratio}")
    if min_keep < 1 or scope not in ("global", "layer"):
        raise ValueError(
            f"need min_keep >= 1 and scope 'global'/'layer', got {min_keep}, {scope!r}"
        )
    if scope == "layer":
        return {
            layer: scores.new_ones(scores.numel(), dtype=torch.bool)
            if layer in protected
            else _drop_lowest(scores, _floor(ratio * scores.numel()), min_keep)
            for layer, scores in importance.items()
        }
    total = sum(s.numel() for layer, s in importance.items() if layer not in protected)
    return select_prune_count(importance, _floor(ratio * total), protected, min_keep)


def _floor(value: float) -> int:
    """``⌊value⌋`` robust to float error (``0.29 · 100`` is 29, not 28)."""
    return int(math.floor(value + 1e-9))


def _drop_lowest(scores: torch.Tensor, count: int, min_keep: int) -> torch.Tensor:
    """Keep-mask without the ``count`` lowest scores (ties: lower index first)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    order = torch.sort(scores.detach().to(torch.float64), stable=True).indices  # (n,)
    count = min(count, scores.numel() - min_keep)
    if count > 0:
        keep[order[:count]] = False
    return keep


def round_sparsity_goal(s_prev: float, prune_ratio: float, s_target: float) -> float:
    """``min(s*, s_prev + p·(1 − s_prev))``."""
    return min(s_target, s_prev + prune_ratio * (1.0 - s_prev))


def cubic_sparsity(step: int, total_steps: int, s_start: float, s_end: float) -> float:
    """Cubic ramp ``s_end + (s_start − s_end)·(1 − min(step, K)/K)³`` (``K`` steps)."""
    if total_steps <= 0:
        return s_end
    frac = min(max(step, 0), total_steps) / total_steps
    return s_end + (s_start - s_end) * (1.0 - frac) ** 3


def num_to_prune(target_sparsity: float, num_original: int, num_kept: int) -> int:
    """How many more structures to remove so that ``⌊s·N⌋`` are gone in total."""
    return max(0, _floor(target_sparsity * num_original) - (num_original - num_kept))


def compose_keep(previous: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """Map a keep-mask over the currently kept structures back to original indices.

    Args:
        previous: ``(N_orig,)`` bool, structures kept so far.
        current: ``(N_kept,)`` bool over those kept structures.

    Returns:
        ``(N_orig,)`` bool.
    """
    previous = previous.to(torch.bool)
    if int(previous.sum()) != current.numel():
        raise ValueError(
            f"current mask has {current.numel()} entries but {int(previous.sum())} "
            f"structures are kept"
        )
    out = previous.clone()
    out[previous] = current.to(torch.bool)
    return out


def structure_sparsity(
    keep: Mapping[K, torch.Tensor], protected: Collection[K] = ()
) -> float:
    """Fraction of unprotected structures removed, over original-index masks."""
    total = sum(m.numel() for layer, m in keep.items() if layer not in protected)
    kept = sum(
        int(m.to(torch.bool).sum())
        for layer, m in keep.items()
        if layer not in protected
    )
    return 1.0 - kept / total if total else 0.0
