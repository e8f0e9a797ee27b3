"""Seeded bases: reproducibility, support, variance and the projection estimator."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.projection import bases

REPO = Path(__file__).resolve().parents[2]
CASES = [(0, 1), (7, 3), (12345, 1000), (2**63 - 5, 4096), (99, 100_003)]

# sha256 of basis(12345, 1000) in float32; changes only if the stream or the map changes.
GOLDEN = "8110532dd44e3ec0e74c1a22e6d6bcfcb573b498726aa21203d8aac1cf5220f3"

_CHILD = """
import hashlib
from fedpeft.projection.bases import basis, reconstruct
for seed, d in {cases}:
    print(hashlib.sha256(basis(seed, d).numpy().tobytes()).hexdigest())
print(hashlib.sha256(reconstruct([0.5, -2.0, 3.0], [1, 2, 3], 777, clip_norm=1.0)
                     .numpy().tobytes()).hexdigest())
"""


def _digests() -> list[str]:
    out = [hashlib.sha256(bases.basis(s, d).numpy().tobytes()).hexdigest() for s, d in CASES]
    rec = bases.reconstruct([0.5, -2.0, 3.0], [1, 2, 3], 777, clip_norm=1.0)
    return [*out, hashlib.sha256(rec.numpy().tobytes()).hexdigest()]


def test_two_processes_generate_bitwise_identical_bases():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD.format(cases=CASES)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    assert child.stdout.split() == _digests()


def test_stream_is_pinned():
    assert hashlib.sha256(bases.basis(12345, 1000).numpy().tobytes()).hexdigest() == GOLDEN


def test_numpy_philox_is_random123_philox4x64_10():
    # Random123 kat_vectors: philox4x64 10, counter 0, key 0. NumPy increments the counter
    # before each block, so start one below zero (mod 2^256) to see block 0.
    bitgen = np.random.Philox(key=0, counter=(1 << 256) - 1)
    expected = [0x16554D9ECA36314C, 0xDB20FE9D672D0FDC, 0xD7E772CEE186176B, 0x7E68B68AEC7BA23B]
    assert bitgen.random_raw(4).tolist() == expected


def test_global_rng_untouched():
    torch.manual_seed(3)
    np.random.seed(3)
    expected_t, expected_n = torch.rand(4), np.random.rand(4)
    torch.manual_seed(3)
    np.random.seed(3)
    bases.basis(5, 100)
    list(bases.bases_for_block([1, 2], 50))
    bases.reconstruct([1.0], [4], 30)
    assert torch.equal(torch.rand(4), expected_t)
    assert np.array_equal(np.random.rand(4), expected_n)


@pytest.mark.parametrize("d", [1, 2, 3, 5, 768, 4096, 10_007])
def test_entries_bounded_and_on_the_odd_grid(d):
    v = bases.basis(d * 31 + 1, d, torch.float64)
    assert v.abs().max().item() <= 1.0 / math.sqrt(d)
    assert bases.basis(d, d).double().abs().max().item() <= 1.0 / math.sqrt(d)
    m = v / bases.basis_scale(d) * 2**24
    assert torch.equal(m, m.round()) and bool((m.remainder(2) == 1).all())


def test_float32_is_rounded_float64():
    v64 = bases.basis(11, 5000, torch.float64)
    assert torch.equal(bases.basis(11, 5000, torch.float32), v64.to(torch.float32))


def test_variance_matches_closed_form():
    d = 1_000_000
    v = bases.basis(2024, d, torch.float64)
    var = bases.basis_variance(d)
    assert abs(var * 3 * d - 1.0) < 1e-6 and var <= 1.0 / (3 * d)
    assert abs(v.mean().item()) < 5 * math.sqrt(var / d)
    # Var(x²) = μ4 − σ⁴ = (9/5 − 1) σ⁴ for a uniform law.
    assert abs((v**2).mean().item() - var) < 5 * math.sqrt(0.8 * var**2 / d)


def test_chunks_equal_single_rows():
    seeds = [3, 1, 4, 1, 5, 9, 2]
    for dtype in (torch.float32, torch.float64):
        chunks = list(bases.bases_for_block(seeds, 257, dtype=dtype, max_elements=3 * 257))
        assert [c.shape[0] for c in chunks] == [3, 3, 1]
        rows = torch.stack([bases.basis(s, 257, dtype) for s in seeds])
        assert torch.equal(torch.cat(chunks), rows)


def test_project_and_reconstruct_match_dense_algebra():
    d, seeds = 300, list(range(40, 60))
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(d, generator=gen, dtype=torch.float64)
    v = torch.stack([bases.basis(s, d, torch.float64) for s in seeds])  # (K, d)
    const = 1.0 / (len(seeds) * bases.basis_variance(d))
    gamma = bases.project(delta, seeds, "unbiased", max_elements=7 * d)
    torch.testing.assert_close(gamma, const * (v @ delta), rtol=1e-12, atol=0)
    reference = bases.project(delta, seeds, "reference")
    torch.testing.assert_close(reference, gamma * d * bases.basis_variance(d), rtol=1e-12, atol=0)
    rebuilt = bases.reconstruct(gamma, seeds, d)
    torch.testing.assert_close(rebuilt, v.T @ gamma, rtol=1e-10, atol=1e-12)
    terms = gamma[:, None] * v  # (K, d)
    scale = (2.0 / terms.norm(dim=1)).clamp(max=1.0)  # (K,)
    clipped = bases.reconstruct(gamma, seeds, d, clip_norm=2.0)
    torch.testing.assert_close(clipped, (terms * scale[:, None]).sum(0), rtol=1e-10, atol=1e-12)


def test_orthonormal_reconstruction_is_exact_with_k_equal_d():
    d = 64
    q = bases.orthonormal_basis(8, d)  # (d, d)
    delta = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    const = bases.normalisation_constant(d, d, "unbiased", 1.0 / d)
    rebuilt = q @ (const * (q.T @ delta))  # (d,)
    assert (rebuilt - delta).abs().max().item() < 1e-10


def test_rejects_bad_arguments():
    from fedpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="seed must be in"):
        bases.basis(-1, 10)
    with pytest.raises(ConfigError, match="d must be >= 1, got 0"):
        bases.basis(1, 0)
    with pytest.raises(ConfigError, match="2 coefficients for 3 seeds"):
        bases.reconstruct([1.0, 2.0], [1, 2, 3], 10)
