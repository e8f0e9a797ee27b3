"""Seeded random bases for shared-randomness projection (Ferret, ICML 2025).

Ferret (Shu et al., "Ferret: Federated Full-Parameter Tuning at Scale for Large Language
Models", arXiv 2409.06277) sends the coordinates ``γ_j`` of a block update ``Δ ∈ R^d`` on
random directions ``v_j`` that both ends regenerate from seeds, and rebuilds
``Δ̃ = Σ_j γ_j v_j``. The directions are part of the protocol: client and server must
produce them bit for bit, on any machine.

**Distribution.** The reference code draws ``N(0, 1)`` truncated to ``[−1/√d, 1/√d]`` by
reseeding the *global* torch RNG on the update's device (ALGORITHMS.md §10, pitfalls).
Here every entry is a point of a symmetric 2^24-point grid on ``(−a, a)``::

    v_i = a · m_i / 2^24,   m_i uniform on the odd integers −(2^24 − 1), …, −1, 1, …, 2^24 − 1
    a   = 1/√d rounded down to float32

which is the ``a → 0`` limit of the reference's truncated normal (its density varies by a
factor ``exp(−a²/2) ≥ 1 − 1/(2d)`` across the interval). Mean 0, ``|v_i| < a ≤ 1/√d``, and
the per-entry variance is known in closed form (``E m² = (N² − 1)/3`` for the odd
integers below ``N = 2^24``)::

    σ² = a² (1 − 4^−24) / 3

**Reproducibility.** The integers come from the raw output of Philox4x64-10 (Salmon et al.,
SC 2011), a counter-based generator that is a fixed function of ``(key, counter)``: NumPy's
``Philox(key=seed)`` emits the Random123 blocks ``philox4x64_10(counter=c, key=(seed, 0))``
for ``c = 1, 2, …`` (no seed-sequence hashing; a test checks Random123's known-answer
vector). Each 64-bit word gives two entries (low half first, then high half; the top 24
bits of each half). The map ``k ↦ w = k·2^−23 − (1 − 2^−24)`` is exact in float32 and in
float64 and ``a·w`` is exact in float64, so every IEEE machine produces the same bits. No
global RNG is touched; a golden hash in the tests pins the stream.

**Memory.** Nothing here holds more than ``max_elements`` basis entries (one row if a row
is larger): bases are generated row by row (``basis``) or in chunks of rows
(``bases_for_block``), never as a whole ``K × d`` matrix; ``reconstruct`` holds three
``(d,)`` arrays (accumulator, row, grid integers).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from fedpeft.errors import ConfigError

GRID_BITS = 24
"""Bits of each grid integer; entries are multiples of ``a / 2^24``."""

DEFAULT_MAX_ELEMENTS = 1 << 17
"""Entries per generated chunk in ``bases_for_block``/``project`` (1 MB in float64, cache-sized)."""

Normalisation = Literal["unbiased", "reference"]

_OFFSET = 1.0 - 2.0**-GRID_BITS  # exactly representable in float32 (24 one-bits)
_STEP = 2.0 ** (1 - GRID_BITS)  # 2^-23: k·2^-23 − (1 − 2^-24) = (2k + 1 − 2^24) / 2^24
_SQUARE_CHUNK = 1 << 14  # Σ m² over 2^14 entries stays below 2^62: exact in int64


def _check(seed: int, d: int) -> None:
    if not 0 <= seed < 1 << 64:
        raise ConfigError(f"basis seed must be in [0, 2**64), got {seed}")
    if d < 1:
        raise ConfigError(f"basis dimension d must be >= 1, got {d}")


def basis_scale(d: int) -> float:
    """The half-width ``a``: the largest float32 that is ``<= 1/√d``."""
    if d < 1:
        raise ConfigError(f"basis dimension d must be >= 1, got {d}")
    a = np.float32(1.0 / math.sqrt(d))
    if float(a) > 1.0 / math.sqrt(d):
        a = np.nextafter(a, np.float32(0.0))
    return float(a)


def basis_variance(d: int) -> float:
    """Exact per-entry variance ``σ² = a² (1 − 4^−24) / 3`` of a basis of dimension ``d``."""
    a = basis_scale(d)
    return a * a * (1.0 - 4.0**-GRID_BITS) / 3.0


class _Stream:
    """One Philox bit generator re-keyed per seed (a few µs, vs ~16 µs for a new object)."""

    def __init__(self) -> None:
        self._bitgen = np.random.Philox(key=0)

    def integers(self, seed: int, d: int) -> np.ndarray:
        """The ``d`` grid integers ``k ∈ [0, 2^24)`` of ``seed`` as ``uint32``."""
        _check(seed, d)
        self._bitgen.state = {
            "bit_generator": "Philox",
            "state": {
                "counter": np.zeros(4, dtype=np.uint64),
                "key": np.array([seed, 0], dtype=np.uint64),
            },
            "buffer": np.zeros(4, dtype=np.uint64),
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        raw = self._bitgen.random_raw((d + 1) // 2)  # (ceil(d/2),) uint64
        words = raw.astype("<u8", copy=False).view("<u4")[:d]  # (d,) low half, high half
        np.right_shift(words, 32 - GRID_BITS, out=words)
        return words

    def unit(self, seed: int, d: int, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (``(d,)`` float32/float64) with ``w = v / a``, exact grid values."""
        return _to_unit(self.integers(seed, d), out)


def _to_unit(k: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``w = (2k + 1 − 2^24) / 2^24`` written into ``out``; both steps are exact."""
    np.multiply(k, out.dtype.type(_STEP), out=out, dtype=out.dtype)
    np.subtract(out, out.dtype.type(_OFFSET), out=out)
    return out


def _to_scaled(k: np.ndarray, scale: float, out: np.ndarray) -> np.ndarray:
    """``scale·w`` into float64 ``out`` in two passes: ``k·(s·2^−23) − s·(1 − 2^−24)``.

    Exact when ``scale`` has at most 24 significant bits (``scale = a``); otherwise two
    IEEE roundings, the same on every machine.
    """
    np.multiply(k, scale * _STEP, out=out, dtype=np.float64)
    np.subtract(out, scale * _OFFSET, out=out)
    return out


def _unit_norm(k: np.ndarray) -> float:
    """Exact ``‖w‖`` from the grid integers: ``Σ m²`` in integers, then one sqrt."""
    total = 0
    for start in range(0, k.shape[0], _SQUARE_CHUNK):
        m = k[start : start + _SQUARE_CHUNK].astype(np.int64) * 2 + (1 - (1 << GRID_BITS))
        total += int(np.dot(m, m))
    return math.sqrt(total / float(1 << (2 * GRID_BITS)))


def basis(seed: int, d: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One basis vector ``v ∈ R^d`` (see the module docstring for its distribution).

    Args:
        seed: the basis seed, an integer in ``[0, 2**64)``.
        d: dimension (the block size ``d_l``).
        dtype: ``torch.float64`` gives ``a·w`` exactly; ``torch.float32`` its rounding.

    Returns:
        ``(d,)`` tensor with ``|v_i| <= 1/√d``, identical on every platform.
    """
    w = _Stream().unit(seed, d, np.empty(d, dtype=np.float64))  # (d,) exact
    w *= basis_scale(d)  # exact: 24-bit a times 24-bit w fits float64
    return torch.from_numpy(w).to(dtype)


def bases_for_block(
    seeds: Sequence[int],
    d: int,
    *,
    dtype: torch.dtype = torch.float32,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Iterator[torch.Tensor]:
    """Basis rows of one block in chunks, for throughput (one matmul per chunk).

    Args:
        seeds: basis seeds, one per row, in the order rows are produced.
        d: dimension of every row.
        dtype: dtype of the chunks (float32 or float64, same values as ``basis``).
        max_elements: entries per chunk; a chunk holds ``max(1, max_elements // d)`` rows.

    Yields:
        ``(c, d)`` tensors whose rows equal ``basis(seeds[i], d, dtype)``.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ConfigError(f"bases_for_block dtype must be float32 or float64, got {dtype}")
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    for chunk in _chunks(seeds, d, np_dtype, max_elements, reuse=False):
        yield torch.from_numpy(chunk)


def _chunks(
    seeds: Sequence[int], d: int, np_dtype: type, max_elements: int, *, reuse: bool
) -> Iterator[np.ndarray]:
    """``(c, d)`` chunks of ``a·w`` rows; ``reuse`` recycles one buffer (internal use)."""
    rows = max(1, max_elements // d)
    a = np_dtype(basis_scale(d))
    stream = _Stream()
    buffer = np.empty((min(rows, len(seeds)), d), dtype=np_dtype) if reuse else None
    for start in range(0, len(seeds), rows):
        count = min(rows, len(seeds) - start)
        chunk = buffer[:count] if buffer is not None else np.empty((count, d), np_dtype)
        for i, seed in enumerate(seeds[start : start + count]):
            if np_dtype is np.float64:
                _to_scaled(stream.integers(int(seed), d), float(a), chunk[i])  # exact
            else:
                stream.unit(int(seed), d, chunk[i])
        if np_dtype is not np.float64:
            np.multiply(chunk, a, out=chunk)  # one rounding of the exact a·w
        yield chunk


def normalisation_constant(
    d: int, num_terms: int, normalisation: Normalisation, variance: float
) -> float:
    """Factor ``c`` with ``γ_j = c·⟨Δ, v_j⟩`` for ``num_terms`` (= ``K_l``) directions.

    ``unbiased``: ``c = 1/(K_l σ²)`` so that ``E[Σ_j γ_j v_j] = Δ`` exactly.
    ``reference``: ``c = d/K_l`` as in the authors' code (as if ``σ² = 1/d``); the
    expected reconstruction is then ``d σ² Δ ≈ Δ/3`` (see ``reference_shrinkage``).
    """
    if num_terms < 1:
        raise ConfigError(f"num_terms (K_l) must be >= 1, got {num_terms}")
    if normalisation == "unbiased":
        return 1.0 / (num_terms * variance)
    if normalisation == "reference":
        return d / num_terms
    raise ConfigError(f"normalisation must be 'unbiased' or 'reference', got {normalisation!r}")


def reference_shrinkage(d: int) -> float:
    """``E⟨Δ̃, Δ⟩/‖Δ‖² = d σ²`` under the reference normalisation (``≈ 1/3``)."""
    return d * basis_variance(d)


def project(
    delta: torch.Tensor,
    seeds: Sequence[int],
    normalisation: Normalisation = "unbiased",
    *,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Coordinates ``γ_j = c·⟨Δ, v_j⟩`` of one block update on the bases of ``seeds``.

    Inner products are taken in float64, one chunk of rows at a time.

    Args:
        delta: ``(d,)`` block update.
        seeds: the ``K_l`` basis seeds.
        normalisation: see ``normalisation_constant``.
        max_elements: chunk size, as in ``bases_for_block``.

    Returns:
        ``(K_l,)`` float64 coordinates.
    """
    d = delta.numel()
    target = delta.detach().reshape(-1).to("cpu", torch.float64).numpy()  # (d,)
    const = normalisation_constant(d, len(seeds), normalisation, basis_variance(d))
    inner = np.zeros(len(seeds), dtype=np.float64)  # (K_l,)
    start = 0
    for chunk in _chunks(seeds, d, np.float64, max_elements, reuse=True):
        # (c, d) · (d,) -> (c,); einsum's own loop, not BLAS: a multithreaded gemv woken
        # between short bursts of generation costs more than the products themselves.
        inner[start : start + chunk.shape[0]] = np.einsum("cd,d->c", chunk, target)
        start += chunk.shape[0]
    return torch.from_numpy(inner * const)


def reconstruct(
    coeffs: Sequence[float] | torch.Tensor,
    seeds: Sequence[int],
    d: int,
    *,
    clip_norm: float | None = None,
) -> torch.Tensor:
    """``Δ̃ = Σ_j clip(γ_j v_j)`` streamed one row at a time, bit-reproducibly.

    The sum runs in seed order in float64, each term ``γ_j a w`` formed as
    ``k·(γ_j a 2^−23) − γ_j a (1 − 2^−24)`` and added with separate IEEE operations (no
    BLAS, no fused multiply-add), so every machine returns the same bits; a lagging client that
    replays the server's coordinates therefore reaches exactly the server's parameters.
    Zero coefficients are skipped.

    Args:
        coeffs: ``(K_l,)`` coordinates ``γ_j``.
        seeds: the matching basis seeds.
        d: block dimension.
        clip_norm: if set, each term ``γ_j v_j`` is scaled to L2 norm ``<= clip_norm``
            (reference code: 10); ``‖v_j‖`` is computed exactly from the grid integers.

    Returns:
        ``(d,)`` float64 reconstruction.
    """
    values = [float(c) for c in coeffs]
    if len(values) != len(seeds):
        raise ConfigError(
            f"reconstruct got {len(values)} coefficients for {len(seeds)} seeds; "
            "expected one coefficient per seed"
        )
    a = basis_scale(d)
    acc = np.zeros(d, dtype=np.float64)  # (d,)
    row = np.empty(d, dtype=np.float64)  # (d,)
    stream = _Stream()
    for gamma, seed in zip(values, seeds, strict=True):
        if gamma == 0.0:
            continue
        scale = gamma * a
        k = stream.integers(int(seed), d)  # (d,) uint32
        if clip_norm is not None:
            norm = abs(scale) * _unit_norm(k)
            if norm > clip_norm:
                scale *= clip_norm / norm
        _to_scaled(k, scale, row)  # (d,) γ_j·v_j
        np.add(acc, row, out=acc)
    return torch.from_numpy(acc)


def orthonormal_basis(seed: int, d: int) -> torch.Tensor:
    """Haar-random orthonormal ``(d, d)`` float64 matrix; its columns are the bases.

    For tests: with all ``d`` columns the projection is invertible (``Δ̃ = Δ``) and the
    per-entry variance of a column is ``1/d``. ``Q`` comes from the QR factorisation
    of a seeded Gaussian with ``R``'s diagonal made positive. It is reproducible on a
    given machine only (LAPACK differs between builds); never use it on the wire.
    """
    _check(seed, d)
    gen = torch.Generator().manual_seed(seed & ((1 << 63) - 1))
    gauss = torch.randn((d, d), generator=gen, dtype=torch.float64)  # (d, d)
    q, r = torch.linalg.qr(gauss)  # (d, d), (d, d)
    signs = torch.sign(torch.diagonal(r))  # (d,)
    signs[signs == 0] = 1.0
    return q * signs  # (d, d): column j times sign(R_jj)
