"""Mask-aware aggregation (ALGORITHMS.md §11 test 4)."""

from __future__ import annotations

import pytest
import torch

from fedpeft.errors import IncompatibleUpdateError
from fedpeft.lora.factors import LoraFactors
from fedpeft.pruning.aggregate import (
    MaskedFactors,
    mask_aware_mean,
    restricted_lowrank,
    scatter_factors,
)

F64 = torch.float64


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def test_hand_computed_case() -> None:
    # Layer (3, 2). Client 1 keeps rows {0, 1}, all columns, rank 1, s = 1.
    c1 = MaskedFactors(
        LoraFactors(a=t([[1.0, 2.0]]), b=t([[1.0], [3.0]]), scaling=1.0),
        row_keep=torch.tensor([True, True, False]),
    )  # P1 rows 0-1: [[1, 2], [3, 6]]
    # Client 2 keeps rows {1, 2}, column {1}, rank 2, s = 0.5.
    c2 = MaskedFactors(
        LoraFactors(a=t([[2.0], [4.0]]), b=t([[1.0, 1.0], [0.0, 1.0]]), scaling=0.5),
        row_keep=torch.tensor([False, True, True]),
        col_keep=torch.tensor([False, True]),
    )  # P2 on (rows 1-2, col 1): 0.5 * [[6], [4]] = [[3], [2]]
    previous = t([[9.0, 9.0], [9.0, 9.0], [7.0, 8.0]])

    delta, coverage = mask_aware_mean([c1, c2], [1.0, 3.0], previous)

    expected = t([[1.0, 2.0], [3.0, (1 * 6.0 + 3 * 3.0) / 4], [7.0, 2.0]])
    torch.testing.assert_close(delta, expected)
    torch.testing.assert_close(coverage, t([[1.0, 1.0], [1.0, 4.0], [0.0, 3.0]]))


def test_identical_masks_reduce_to_product_average() -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([True, False, True, True, False])
    cols = torch.tensor([True, True, False, True])
    clients, dense = [], []
    for rank, s in ((2, 1.0), (3, 0.5), (1, 2.0)):
        f = LoraFactors(
            a=torch.randn(rank, 3, generator=gen, dtype=F64),
            b=torch.randn(3, rank, generator=gen, dtype=F64),
            scaling=s,
        )
        clients.append(MaskedFactors(f, rows, cols))
        dense.append(scatter_factors(clients[-1], 5, 4, rank=4).delta())
    weights = [0.2, 0.5, 0.3]
    previous = torch.randn(5, 4, generator=gen, dtype=F64)

    delta, _ = mask_aware_mean(clients, weights, previous)

    mean = sum(w * d for w, d in zip(weights, dense, strict=True))
    grid = rows[:, None] & cols[None, :]
    torch.testing.assert_close(delta[grid], mean[grid])
    torch.testing.assert_close(delta[~grid], previous[~grid])


def test_scatter_zero_pads() -> None:
    f = LoraFactors(a=t([[1.0, 2.0]]), b=t([[3.0]]), scaling=2.0)
    full = scatter_factors(
        MaskedFactors(
            f, torch.tensor([False, True]), torch.tensor([True, False, True])
        ),
        2,
        3,
        rank=3,
    )
    assert full.a.shape == (3, 3) and full.b.shape == (2, 3)
    torch.testing.assert_close(full.delta(), t([[0.0, 0.0, 0.0], [6.0, 0.0, 12.0]]))


def test_restricted_lowrank_is_best_approximation() -> None:
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(6, 5, generator=gen, dtype=F64)
    rows = torch.tensor([True, True, False, True, True, True])
    cols = torch.tensor([True, False, True, True, True])
    sub = delta[rows][:, cols]  # (5, 4)
    sigma = torch.linalg.svdvals(sub)

    f2 = restricted_lowrank(delta, 2, 0.25, rows, cols)
    exact = restricted_lowrank(delta, 4, 0.25, rows, cols)
    padded = restricted_lowrank(delta, 7, 1.0, rows, cols)

    assert f2.a.shape == (2, 4) and f2.b.shape == (5, 2) and f2.scaling == 0.25
    assert float(torch.linalg.norm(f2.delta() - sub)) == pytest.approx(
        float(sigma[2:].norm())
    )
    torch.testing.assert_close(exact.delta(), sub)
    assert padded.rank == 7 and torch.count_nonzero(padded.a[4:]) == 0
    torch.testing.assert_close(padded.delta(), sub)


def test_shape_mismatch_is_reported() -> None:
    f = LoraFactors(a=torch.zeros(1, 2, dtype=F64), b=torch.zeros(3, 1, dtype=F64))
    with pytest.raises(IncompatibleUpdateError, match="masks keep 2 x 2"):
        mask_aware_mean(
            [MaskedFactors(f, torch.tensor([True, True, False]))],
            [1.0],
            torch.zeros(3, 2, dtype=F64),
        )
