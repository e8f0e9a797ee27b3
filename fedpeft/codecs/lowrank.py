"""``lowrank``: PowerSGD-style rank-q re-factoring of 2-D tensors (fed back by the chain).

Vogels, Karimireddy & Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for
Distributed Optimization", NeurIPS 2019 (arXiv:1905.13727), Algorithm 1. Per 2-D
tensor ``V`` (``m × n``) and round ``t``, with ``Q_{t−1}`` (``n × q``) the previous
round's right factor (warm start; a seeded Gaussian in the first round)::

    P = orthonormalize(V · Q_{t−1})      # (m, q), reduced QR
    Q = Vᵀ · P                           # (n, q)
    send P, Q;   decoded = P · Qᵀ         # (m, n)

``P Qᵀ = P Pᵀ V`` is the orthogonal projection of ``V`` onto ``span(P)``, so
``‖V − P Qᵀ‖_F ≤ ‖V‖_F`` and a tensor of rank ``≤ q`` is recovered exactly (to fp32
rounding); warm starting makes repeated rounds a subspace iteration that converges to
the best rank-q approximation. Bytes: ``4·q·(m + n)`` instead of ``4·m·n``.

Algorithm 1's error feedback (``V = U + e_{t−1}``, ``e_t = V − decoded``) is done by
:class:`~fedpeft.codecs.base.Chain` over the whole chain, so in ``lowrank:2+int8`` the
quantizer's error on ``P`` and ``Q`` is fed back too and ``Σ_t decoded_t + e_T =
Σ_t U_t`` holds for what the receiver decodes. The stage's own state is only the warm
start ``Q`` (state key ``key::Q``, float64, ``(n, q)``).

Only 2-D fp32 data arrays whose factor form is smaller (``q·(m + n) < m·n``) are
re-factored, into ``key::P`` and ``key::Q`` (fp32; a later ``int8`` or ``fp16`` stage
may quantize them); 1-D tensors and matrices too thin for rank ``q`` pass unchanged.
ALGORITHMS.md §12.2: meant for dense updates (FedAvg / Ferret baselines, FedEx-LoRA
residuals) — LoRA factors of rank ``r ≤ q`` are already low-rank.

Spec: ``lowrank:<q>``, e.g. ``lowrank:4``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpeft.codecs._layout import SEP, int_param, is_data, put, stage_rng, take
from fedpeft.codecs.base import CodecContext, CodecState, Payload, register_codec
from fedpeft.errors import CodecError, ConfigError

LEFT = SEP + "P"
RIGHT = SEP + "Q"


def product(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The decoded matrix ``P · Qᵀ`` as fp32 (computed in float64 at both ends)."""
    return (p.astype(np.float64) @ q.astype(np.float64).T).astype(np.float32)  # (m, n)


@dataclass(frozen=True)
class PowerSgdLowRank:
    """Rank-``q`` re-factoring ``M ≈ P Qᵀ`` by one warm-started power iteration.

    Attributes:
        rank: the rank ``q`` of the sent factors.
    """

    rank: int

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"PowerSgdLowRank.rank must be >= 1, got {self.rank!r}")

    @property
    def name(self) -> str:
        """Spec ``"lowrank:<q>"``."""
        return f"lowrank:{self.rank}"

    @property
    def lossless(self) -> bool:
        """Not lossless in general (exact only on rank-``≤ q`` tensors)."""
        return False

    def compresses(self, shape: tuple[int, ...]) -> bool:
        """True if a tensor of ``shape`` is sent as factors (2-D, factor form smaller)."""
        return len(shape) == 2 and self.rank * (shape[0] + shape[1]) < shape[0] * shape[1]

    def encode(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        """Re-factor each eligible matrix; the state holds the warm starts.

        State keys: ``key::Q`` (warm start, float64, ``(n, q)``); entries of keys absent
        from this payload are carried over.

        Raises:
            CodecError: a tensor holds NaN or inf.
        """
        arrays: dict[str, np.ndarray] = {}
        new_state: CodecState = {k: v for k, v in state.items() if k.endswith(RIGHT)}
        for key, arr in payload.arrays.items():
            if not (is_data(key, arr) and self.compresses(arr.shape)):
                put(arrays, key, arr)
                continue
            n = arr.shape[1]
            v = arr.astype(np.float64)  # (m, n)
            if not np.isfinite(v).all():
                raise CodecError(f"{self.name} cannot factor {key!r}: it holds NaN or inf")
            warm = state.get(key + RIGHT)
            if warm is None or warm.shape != (n, self.rank) or not _usable(warm):
                warm = stage_rng(ctx, "lowrank", key).standard_normal((n, self.rank))
            p, _ = np.linalg.qr(v @ warm)  # (m, q) orthonormal columns
            q = v.T @ p  # (n, q)
            put(arrays, key + LEFT, p.astype(np.float32))
            put(arrays, key + RIGHT, q.astype(np.float32))
            new_state[key + RIGHT] = q
        return Payload(arrays=arrays, meta=dict(payload.meta)), new_state

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        """Rebuild each ``key`` as ``key::P · key::Qᵀ``."""
        arrays: dict[str, np.ndarray] = {}
        bases = {k[: -len(LEFT)] for k in payload.arrays if k.endswith(LEFT)}
        for key, arr in payload.arrays.items():
            if key.endswith(RIGHT) and key[: -len(RIGHT)] in bases:
                continue  # consumed with its P
            if not key.endswith(LEFT):
                put(arrays, key, arr)
                continue
            base = key[: -len(LEFT)]
            right = take(payload.arrays, base + RIGHT, key)
            if (
                arr.dtype != np.float32
                or right.dtype != np.float32
                or arr.ndim != 2
                or right.ndim != 2
                or arr.shape[1] != right.shape[1]
            ):
                raise CodecError(
                    f"factors {key!r} {arr.shape} {arr.dtype} and {base + RIGHT!r} "
                    f"{right.shape} {right.dtype} must be float32 (m, q) and (n, q)"
                )
            put(arrays, base, product(arr, right))
        return Payload(arrays=arrays, meta=dict(payload.meta))


def _usable(warm: np.ndarray) -> bool:
    """A warm start must be finite with no all-zero column (else the iteration stalls)."""
    return bool(np.isfinite(warm).all() and (np.abs(warm).max(axis=0) > 0).all())


def _lowrank(param: str | None) -> PowerSgdLowRank:
    if param is None:
        raise ConfigError("codec 'lowrank' needs a rank, e.g. 'lowrank:4'")
    return PowerSgdLowRank(int_param("lowrank", param, low=1, high=None, what="the rank"))


register_codec("lowrank", _lowrank)
