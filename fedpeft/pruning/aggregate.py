"""Mask-aware aggregation of structurally pruned LoRA updates (ALGORITHMS.md §11.3).

FedSpine (arXiv 2501.02438) clients prune different rows and columns and train
different ranks. For one LoRA layer with full shape ``(m, n)`` the server (a
``[PROPOSAL]`` of the specification):

1. scatters client ``i``'s factors into full coordinates — zero rows/columns where it
   pruned, zero-padded ranks — and forms ``P_i = s_i B̃_i Ã_i`` and the mask
   ``M_i = row_keep_i ⊗ col_keep_i``;
2. averages entry-wise over the clients that kept the entry::

       ΔW[a, b] = Σ_i w_i M_i[a, b] P_i[a, b] / Σ_i w_i M_i[a, b]

   and entries nobody kept keep their previous value;
3. gives client ``i`` the best rank-``r_i`` approximation of ``ΔW`` restricted to its
   kept rows and columns (FlexLoRA-style SVD, ALGORITHMS.md §5:
   ``B = U_r Σ_r / s``, ``A = V_rᵀ``).

With identical full masks this is FlexLoRA's product average. Masks and factors are
in ``nn.Linear`` layout (``ΔW`` is ``(d_out, d_in)``) whatever the module's storage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedpeft.errors import IncompatibleUpdateError
from fedpeft.lora.factors import LoraFactors


@dataclass(frozen=True)
class MaskedFactors:
    """One client's factors of one layer, on its kept coordinates only.

    Attributes:
        factors: ``a`` ``(r, n_kept)``, ``b`` ``(m_kept, r)`` and the scaling ``s``.
        row_keep: ``(m,)`` bool over the full output rows, ``None`` = all kept.
        col_keep: ``(n,)`` bool over the full input columns, ``None`` = all kept.
    """

    factors: LoraFactors
    row_keep: torch.Tensor | None = None
    col_keep: torch.Tensor | None = None

    def indices(self, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept ``(rows, cols)`` as long tensors, checked against the factors.

        Raises:
            IncompatibleUpdateError: masks of the wrong length or factors whose
                shape does not match the number of kept rows/columns.
        """
        rows = _kept(self.row_keep, d_out, "row")
        cols = _kept(self.col_keep, d_in, "column")
        got = (self.factors.d_out, self.factors.d_in)
        if got != (rows.numel(), cols.numel()):
            raise IncompatibleUpdateError(
                f"factors cover {got[0]} rows x {got[1]} columns but the masks keep "
                f"{rows.numel()} x {cols.numel()} of a ({d_out}, {d_in}) layer"
            )
        return rows, cols


def _kept(mask: torch.Tensor | None, size: int, what: str) -> torch.Tensor:
    if mask is None:
        return torch.arange(size)
    if tuple(mask.shape) != (size,):
        raise IncompatibleUpdateError(
            f"{what} keep-mask must have shape ({size},), got {tuple(mask.shape)}"
        )
    return torch.nonzero(mask.to(torch.bool), as_tuple=False).reshape(-1)


def scatter_factors(
    client: MaskedFactors, d_out: int, d_in: int, rank: int | None = None
) -> LoraFactors:
    """Full-coordinate factors: zeros at pruned rows/columns, rank zero-padded.

    Returns ``a`` ``(rank, d_in)`` and ``b`` ``(d_out, rank)`` with the same scaling,
    so ``delta()`` equals ``P_i`` on kept entries and 0 elsewhere.
    """
    rows, cols = client.indices(d_out, d_in)
    f = client.factors
    rank = f.rank if rank is None else rank
    if rank < f.rank:
        raise ValueError(f"cannot pad rank {f.rank} down to {rank}")
    a = f.a.new_zeros(rank, d_in)  # (R, n)
    b = f.b.new_zeros(d_out, rank)  # (m, R)
    a[: f.rank, cols] = f.a  # (r, n_kept) into (R, n)
    b[rows, : f.rank] = f.b  # (m_kept, r) into (m, R)
    return f.with_factors(a, b)


def mask_aware_mean(
    clients: Sequence[MaskedFactors], weights: Sequence[float], previous: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ΔW = Σ w_i M_i P_i / Σ w_i M_i``; entries nobody kept keep ``previous``.

    Computed in float64.

    Args:
        clients: each client's factors on its kept coordinates and its masks.
        weights: ``w_i >= 0`` (need not sum to 1; e.g. example counts).
        previous: the layer's previous dense update ``(d_out, d_in)``.

    Returns:
        ``(delta, coverage)``: the new dense update in ``previous.dtype`` and the
        float64 denominator ``Σ_i w_i M_i`` (0 where nobody kept the entry).

    Raises:
        ValueError: bad weights.
        IncompatibleUpdateError: a client's factors or masks do not fit the layer.
    """
    if len(clients) != len(weights):
        raise ValueError(f"got {len(clients)} clients but {len(weights)} weights")
    if any(not (math.isfinite(w) and w >= 0.0) for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {list(weights)}")
    d_out, d_in = previous.shape
    num = torch.zeros(d_out, d_in, dtype=torch.float64)
    den = torch.zeros(d_out, d_in, dtype=torch.float64)
    for client, w in zip(clients, weights, strict=True):
        rows, cols = client.indices(d_out, d_in)
        if w == 0.0 or rows.numel() == 0 or cols.numel() == 0:
            continue
        f = client.factors
        product = f.scaling * (
            f.b.to(torch.float64) @ f.a.to(torch.float64)
        )  # (m', r) @ (r, n')
        grid = (rows[:, None], cols[None, :])  # (m', 1), (1, n')
        num[grid] += w * product
        den[grid] += w
    safe = torch.where(den > 0.0, den, torch.ones_like(den))
    delta = torch.where(den > 0.0, num / safe, previous.to(torch.float64))  # (m, n)
    return delta.to(previous.dtype), den


def restricted_lowrank(
    delta: torch.Tensor,
    rank: int,
    scaling: float,
    row_keep: torch.Tensor | None = None,
    col_keep: torch.Tensor | None = None,
) -> LoraFactors:
    """Best rank-``rank`` factors of ``delta`` restricted to kept rows and columns.

    With the thin SVD ``delta[rows][:, cols] = U Σ Vᵀ`` (Eckart–Young):
    ``B = U_r Σ_r / s`` ``(m_kept, rank)`` and ``A = V_rᵀ`` ``(rank, n_kept)``, so
    ``s·B A`` is the best rank-``rank`` approximation. Components beyond
    ``min(m_kept, n_kept)`` are zero. Computed in ``delta``'s dtype.
    """
    if rank < 1 or not scaling > 0.0:
        raise ValueError(
            f"need rank >= 1 and scaling > 0, got rank={rank}, scaling={scaling}"
        )
    d_out, d_in = delta.shape
    rows = _kept(row_keep, d_out, "row")
    cols = _kept(col_keep, d_in, "column")
    sub = delta[rows][:, cols]  # (m', n')
    u, s, vh = torch.linalg.svd(sub, full_matrices=False)  # (m', k), (k,), (k, n')
    k = min(rank, s.numel())
    b = sub.new_zeros(rows.numel(), rank)  # (m', rank)
    a = sub.new_zeros(rank, cols.numel())  # (rank, n')
    b[:, :k] = u[:, :k] * (s[:k] / scaling)  # (m', k) * (k,)
    a[:k] = vh[:k]  # (k, n')
    return LoraFactors(a=a, b=b, scaling=scaling)
