"""Architecture-free descriptions of prunable blocks and the masks applied to them.

FedSpine (arXiv 2501.02438, ALGORITHMS.md §11.1) removes whole attention heads and
FFN channels, and the LoRA factors of the affected layers shrink with them:

* head group ``g`` of an attention block: rows ``g`` of ``W_q``, ``W_k``, ``W_v``
  (and their biases and LoRA ``B`` rows) and the matching columns of ``W_o`` (and
  its LoRA ``A`` columns). With grouped-query attention a group is one K/V head
  together with all query heads that share it; with multi-head attention a group is
  one head. The number of groups is ``k.weight.shape[0] // head_dim``.
* FFN channel ``c``: row ``c`` of the up projection (BERT ``intermediate.dense``,
  LLaMA ``up_proj`` and ``gate_proj``) and column ``c`` of the down projection
  (BERT ``output.dense``, LLaMA ``down_proj``).

Everything is in ``nn.Linear`` layout: ``weight`` is ``(d_out, d_in)``. Masks are
boolean keep-vectors (``True`` = keep) over the block's *current* groups.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from fedpeft.lora.factors import LoraFactors


@dataclass(frozen=True)
class Projection:
    """One linear map ``y = (W0 + s·B A) x + b`` with optional LoRA and gradients.

    Attributes:
        weight: frozen base weight ``W0``, ``(d_out, d_in)``.
        bias: ``(d_out,)`` or ``None``.
        lora: the LoRA factors (``a`` ``(r, d_in)``, ``b`` ``(d_out, r)``) or ``None``.
        grad_a: ``∂L/∂A``, ``(r, d_in)``, or ``None``.
        grad_b: ``∂L/∂B``, ``(d_out, r)``, or ``None``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    lora: LoraFactors | None = None
    grad_a: torch.Tensor | None = None
    grad_b: torch.Tensor | None = None

    def __post_init__(self) -> None:
        """Validate shapes and values."""
        d_out, d_in = self.weight.shape
        if self.bias is not None and tuple(self.bias.shape) != (d_out,):
            raise ValueError(f"bias must be ({d_out},), got {tuple(self.bias.shape)}")
        if self.lora is not None and (self.lora.d_out, self.lora.d_in) != (d_out, d_in):
            raise ValueError(
                f"LoRA factors are ({self.lora.d_out}, {self.lora.d_in}) but the "
                f"weight is ({d_out}, {d_in}); factors must be in nn.Linear layout"
            )
        for name, grad, ref in (
            ("grad_a", self.grad_a, "a"),
            ("grad_b", self.grad_b, "b"),
        ):
            if grad is not None:
                if self.lora is None:
                    raise ValueError(f"{name} given without LoRA factors")
                expected = tuple(getattr(self.lora, ref).shape)
                if tuple(grad.shape) != expected:
                    raise ValueError(
                        f"{name} must be {expected}, got {tuple(grad.shape)}"
                    )

    def select(
        self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
    ) -> Projection:
        """Keep the output ``rows`` and input ``cols`` (index tensors; ``None`` = all).

        Rows drop rows of ``W0``, ``bias``, LoRA ``B`` and ``∂L/∂B``; columns drop
        columns of ``W0``, LoRA ``A`` and ``∂L/∂A``.
        """
        weight, bias, lora = self.weight, self.bias, self.lora
        grad_a, grad_b = self.grad_a, self.grad_b
        if rows is not None:
            weight = weight[rows]  # (d_out', d_in)
            bias = bias[rows] if bias is not None else None
            if lora is not None:
                lora = lora.with_factors(lora.a, lora.b[rows])  # b: (d_out', r)
            grad_b = grad_b[rows] if grad_b is not None else None
        if cols is not None:
            weight = weight[:, cols]  # (d_out', d_in')
            if lora is not None:
                lora = lora.with_factors(lora.a[:, cols], lora.b)  # a: (r, d_in')
            grad_a = grad_a[:, cols] if grad_a is not None else None
        return replace(
            self, weight=weight, bias=bias, lora=lora, grad_a=grad_a, grad_b=grad_b
        )


@dataclass(frozen=True)
class AttentionBlock:
    """The four projections of one self-attention block.

    Attributes:
        q: query projection, ``(num_heads·head_dim, d_model)``.
        k: key projection, ``(num_groups·head_dim, d_model)``.
        v: value projection, same shape as ``k``.
        o: output projection, ``(d_model, num_heads·head_dim)``.
        head_dim: ``d_h``.
    """

    q: Projection
    k: Projection
    v: Projection
    o: Projection
    head_dim: int

    def __post_init__(self) -> None:
        """Validate shapes and values."""
        rows_q, rows_kv = self.q.weight.shape[0], self.k.weight.shape[0]
        if self.head_dim < 1 or rows_kv % self.head_dim or rows_kv == 0:
            raise ValueError(
                f"key rows ({rows_kv}) must be a positive multiple of "
                f"head_dim ({self.head_dim})"
            )
        if self.v.weight.shape[0] != rows_kv or rows_q % rows_kv:
            raise ValueError(
                f"value rows ({self.v.weight.shape[0]}) must equal key rows "
                f"({rows_kv}) and "
                f"query rows ({rows_q}) must be a multiple of them"
            )
        if self.o.weight.shape[1] != rows_q:
            raise ValueError(
                f"output projection has {self.o.weight.shape[1]} columns, "
                f"expected {rows_q}"
            )

    @property
    def num_groups(self) -> int:
        """Prunable units: heads (MHA) or K/V groups (GQA)."""
        return int(self.k.weight.shape[0]) // self.head_dim

    @property
    def num_heads(self) -> int:
        """Query heads."""
        return int(self.q.weight.shape[0]) // self.head_dim


@dataclass(frozen=True)
class FFNBlock:
    """The projections of one feed-forward block.

    Attributes:
        up: ``(d_ff, d_model)`` (BERT ``intermediate.dense``, LLaMA ``up_proj``).
        down: ``(d_model, d_ff)`` (BERT ``output.dense``, LLaMA ``down_proj``).
        gate: LLaMA ``gate_proj`` ``(d_ff, d_model)``, or ``None``.
    """

    up: Projection
    down: Projection
    gate: Projection | None = None

    def __post_init__(self) -> None:
        """Validate shapes and values."""
        d_ff = self.up.weight.shape[0]
        if self.down.weight.shape[1] != d_ff:
            raise ValueError(
                f"down projection has {self.down.weight.shape[1]} columns, "
                f"expected {d_ff}"
            )
        if self.gate is not None and self.gate.weight.shape[0] != d_ff:
            raise ValueError(
                f"gate projection has {self.gate.weight.shape[0]} rows, expected {d_ff}"
            )

    @property
    def num_channels(self) -> int:
        """``d_ff``."""
        return int(self.up.weight.shape[0])


def group_indices(keep: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the kept blocks of ``size`` consecutive rows.

    ``keep`` is ``(G,)`` bool; returns a ``(G_kept·size,)`` long tensor.
    """
    rows = torch.arange(keep.numel() * size).reshape(keep.numel(), size)  # (G, size)
    return rows[keep.to(torch.bool)].reshape(-1)  # (G_kept·size,)


def _check_keep(keep: torch.Tensor, count: int, what: str) -> torch.Tensor:
    keep = keep.to(torch.bool)
    if tuple(keep.shape) != (count,):
        raise ValueError(
            f"{what} keep-mask must be ({count},), got {tuple(keep.shape)}"
        )
    if not bool(keep.any()):
        raise ValueError(f"{what} keep-mask removes everything; keep at least one")
    return keep


def prune_attention(block: AttentionBlock, keep: torch.Tensor) -> AttentionBlock:
    """Remove the head groups with ``keep[g] == False``.

    Rows of q/k/v (bias, LoRA ``B``) and columns of o (LoRA ``A``) are removed.

    Raises:
        ValueError: ``keep`` has the wrong length or keeps nothing.
    """
    keep = _check_keep(keep, block.num_groups, "head")
    rows_q = group_indices(keep, block.q.weight.shape[0] // block.num_groups)
    rows_kv = group_indices(keep, block.head_dim)
    return replace(
        block,
        q=block.q.select(rows=rows_q),
        k=block.k.select(rows=rows_kv),
        v=block.v.select(rows=rows_kv),
        o=block.o.select(cols=rows_q),
    )


def prune_ffn(block: FFNBlock, keep: torch.Tensor) -> FFNBlock:
    """Remove the FFN channels with ``keep[c] == False``.

    Rows of up/gate (bias, LoRA ``B``) and columns of down (LoRA ``A``) go.

    Raises:
        ValueError: ``keep`` has the wrong length or keeps nothing.
    """
    idx = group_indices(_check_keep(keep, block.num_channels, "channel"), 1)
    return replace(
        block,
        up=block.up.select(rows=idx),
        gate=block.gate.select(rows=idx) if block.gate is not None else None,
        down=block.down.select(cols=idx),
    )
