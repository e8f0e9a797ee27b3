"""LoRA-guided structure importance (LoRAPrune criterion, ALGORITHMS.md §11.1).

LoRAPrune (Zhang et al., ACL Findings 2024; code ``aim-uofa/LoRAPrune``) scores a
frozen weight without its gradient, from the LoRA gradients only::

    G = G_B · A + B · G_A − G_B · G_A           # ≈ change of W after one step, (m, n)
    S = | G ⊙ (W0 + s · B A) |                   # element scores, (m, n)

A structure's score is the sum of its elements' scores: head group ``g`` sums rows of
``W_q``, ``W_k``, ``W_v``; FFN channel ``c`` sums row ``c`` of up (and gate) and
column ``c`` of down. Each layer's score vector is L2-normalised and smoothed over
local steps with ``I ← β I + (1 − β) S`` (``β = 0.9``). FedSpine (arXiv 2501.02438)
uses this score; projections without LoRA (or without gradients) contribute 0.
"""

from __future__ import annotations

import torch

from fedpeft.pruning.blocks import AttentionBlock, FFNBlock, Projection


def lora_weight_change(
    a: torch.Tensor, b: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor
) -> torch.Tensor:
    """``G = G_B A + B G_A − G_B G_A``, shape ``(d_out, d_in)``."""
    return grad_b @ a + b @ grad_a - grad_b @ grad_a  # (m, r) @ (r, n) each


def element_scores(proj: Projection) -> torch.Tensor | None:
    """``S = |G ⊙ (W0 + s·B A)|`` of one projection, ``(d_out, d_in)``.

    ``None`` when the projection has no LoRA factors or no gradients for them.
    """
    lora = proj.lora
    if lora is None or proj.grad_a is None or proj.grad_b is None:
        return None
    dtype = proj.weight.dtype
    a, b = lora.a.to(dtype), lora.b.to(dtype)
    change = lora_weight_change(
        a, b, proj.grad_a.to(dtype), proj.grad_b.to(dtype)
    )  # (m, n)
    merged = proj.weight + lora.scaling * (b @ a)  # (m, r) @ (r, n) -> (m, n)
    return (change * merged).abs()


def _row_scores(proj: Projection, groups: int) -> torch.Tensor | None:
    scores = element_scores(proj)
    if scores is None:
        return None
    return scores.sum(dim=1).reshape(groups, -1).sum(dim=1)  # (m,) -> (G, m/G) -> (G,)


def head_scores(block: AttentionBlock) -> torch.Tensor:
    """Raw (unnormalised) score per head group, ``(num_groups,)``."""
    total = torch.zeros(block.num_groups, dtype=block.q.weight.dtype)
    for proj in (block.q, block.k, block.v):
        rows = _row_scores(proj, block.num_groups)
        if rows is not None:
            total = total + rows
    return total


def channel_scores(block: FFNBlock) -> torch.Tensor:
    """Raw (unnormalised) score per FFN channel, ``(d_ff,)``."""
    total = torch.zeros(block.num_channels, dtype=block.up.weight.dtype)
    for proj in (block.up, block.gate):
        rows = _row_scores(proj, block.num_channels) if proj is not None else None
        if rows is not None:
            total = total + rows
    down = element_scores(block.down)
    if down is not None:
        total = total + down.sum(dim=0)  # (d_model, d_ff) -> (d_ff,)
    return total


def normalize_scores(scores: torch.Tensor) -> torch.Tensor:
    """``S / ‖S‖₂`` (a zero vector stays zero)."""
    norm = torch.linalg.vector_norm(scores)
    return scores / norm if float(norm) > 0.0 else scores.clone()


def ema_update(
    previous: torch.Tensor | None, scores: torch.Tensor, beta: float = 0.9
) -> torch.Tensor:
    """``I ← β·I + (1 − β)·S``; ``previous=None`` starts from ``I = 0``.

    Raises:
        ValueError: ``beta`` outside ``[0, 1)`` or mismatched shapes.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"EMA beta must be in [0, 1), got {beta}")
    if previous is None:
        return (1.0 - beta) * scores
    if previous.shape != scores.shape:
        raise ValueError(
            f"importance EMA has shape {tuple(previous.shape)} but the new scores "
            f"{tuple(scores.shape)}; slice the EMA with the same keep-mask as the model"
        )
    return beta * previous + (1.0 - beta) * scores
