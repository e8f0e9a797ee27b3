"""Statistics of the seeded projection: unbiasedness, error scale, reference shrinkage.

ALGORITHMS.md §10 tests 2, 3 and 7 with the specified sizes (d = 4096, K = 512, 200 seed
sets); the seed sets are fixed, so the outcome is deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpeft.projection import bases


@pytest.fixture(scope="module")
def unbiased_draws():
    """200 independent seed sets, d = 4096, K = 512 (ALGORITHMS.md §10 tests 2-3)."""
    d, k, sets = 4096, 512, 200
    delta = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    const = bases.normalisation_constant(d, k, "unbiased", bases.basis_variance(d))
    total = torch.zeros(d, dtype=torch.float64)
    errors = []
    for s in range(sets):
        rebuilt = torch.zeros(d, dtype=torch.float64)
        seeds = [s * k + j for j in range(k)]
        for v in bases.bases_for_block(seeds, d, dtype=torch.float64):  # (c, d) rows
            rebuilt += v.T @ (const * (v @ delta))  # (d,)
        total += rebuilt
        errors.append(((rebuilt - delta).norm() / delta.norm()).item() ** 2)
    return d, k, sets, delta, total / sets, errors


def test_unbiased(unbiased_draws):
    d, k, sets, delta, mean, _ = unbiased_draws
    assert (mean - delta).norm() / delta.norm() <= 3 * math.sqrt((d / k) / sets)


def test_relative_squared_error_is_d_over_k(unbiased_draws):
    d, k, _, _, _, errors = unbiased_draws
    assert 0.7 * d / k <= float(np.mean(errors)) <= 1.3 * d / k


def test_reference_normalisation_shrinks_to_a_third():
    d, k, draws = 2048, 128, 50
    delta = torch.randn(d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ratios = []
    for s in range(draws):
        seeds = [10_000 + s * k + j for j in range(k)]
        rebuilt = bases.reconstruct(bases.project(delta, seeds, "reference"), seeds, d)
        ratios.append((rebuilt @ delta / (delta @ delta)).item())
    expected = bases.reference_shrinkage(d)
    assert abs(expected - 1.0 / 3.0) < 1e-6
    assert abs(float(np.mean(ratios)) - expected) < 0.05
