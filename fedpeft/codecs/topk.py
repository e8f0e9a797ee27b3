"""``topk``: magnitude top-k sparsification (fed back by the chain).

Per tensor ``v`` (``n`` entries)::

    c = top_k(|v|)                (keep the k entries of largest magnitude, zero the rest)

The stage is stateless and biased on its own. Error feedback, ``v_t = u_t + e_{t−1}``,
``e_t = v_t − c_t`` (Stich, Cordonnier & Jaggi, "Sparsified SGD with Memory", NeurIPS
2018, arXiv:1809.07599; ALGORITHMS.md §12.2) is done by :class:`~fedpeft.codecs.base.Chain`
over the whole chain, so in ``topk:0.05+int8`` the quantizer's error on the kept values is
fed back together with the dropped entries and ``Σ_t c_t + e_T = Σ_t u_t`` holds for
what the receiver decodes.

Error bound: exact on kept entries (before later stages); each dropped entry is the
difference; ``‖v − c‖_F ≤ sqrt(1 − k/n)·‖v‖_F`` (a contraction, so error feedback
applies).

Specs: ``topk:0.05`` (a fraction in ``(0, 1]``: ``k = max(1, round(f·n))``) or
``topk:1000`` (a count, ``k = min(1000, n)``); a parameter with a ``.`` is a fraction.
Encoding ``key`` produces ``key::val`` (fp32, the ``k`` kept values in index order,
re-encodable by ``int8``/``fp16``) and the sorted positions in the flattened tensor as
whichever is smaller:

* ``key::idx``: gaps ``idx[0], idx[1] − idx[0], ...`` in the narrowest of uint8 /
  uint16 / uint32 that holds the largest gap (≤ ``4k`` bytes; zstd shrinks it further);
* ``key::bitmap``: one bit per element (``ceil(n/8)`` bytes, ``np.packbits`` order).

The shape goes to ``meta[key::topk]``; decoding scatters the values into zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpeft.codecs._layout import (
    SEP,
    int_param,
    is_data,
    meta_shape,
    put,
    shape_to_str,
    take,
)
from fedpeft.codecs.base import CodecContext, CodecState, Payload, register_codec
from fedpeft.errors import CodecError, ConfigError

TAG = SEP + "topk"
VAL = SEP + "val"
IDX = SEP + "idx"
BITMAP = SEP + "bitmap"

_GAP_DTYPES = (np.uint8, np.uint16, np.uint32)


def encode_indices(idx: np.ndarray, n: int) -> tuple[str, np.ndarray]:
    """Sorted positions in ``[0, n)`` as ``(suffix, array)``: gaps or a bitmap."""
    gaps = np.diff(idx, prepend=0) if idx.size else idx
    largest = int(gaps.max()) if gaps.size else 0
    gap_dtype = next(d for d in _GAP_DTYPES if largest <= np.iinfo(d).max)
    gap_bytes = idx.size * np.dtype(gap_dtype).itemsize
    if -(-n // 8) < gap_bytes:
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        return BITMAP, np.packbits(mask)
    return IDX, gaps.astype(gap_dtype)


def decode_indices(suffix: str, arr: np.ndarray, n: int) -> np.ndarray:
    """Invert :func:`encode_indices`; positions as int64."""
    if suffix == BITMAP:
        return np.flatnonzero(np.unpackbits(arr, count=n))
    return np.cumsum(arr, dtype=np.int64)


@dataclass(frozen=True)
class TopK:
    """Keep the ``k`` largest-magnitude entries of each tensor (stateless).

    Exactly one of ``fraction`` and ``count`` is set.

    Attributes:
        fraction: share of entries kept per tensor, in ``(0, 1]``.
        count: number of entries kept per tensor (all of them if the tensor is
            smaller).
    """

    fraction: float | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.count is None):
            raise ConfigError(
                f"TopK needs exactly one of fraction and count, got fraction="
                f"{self.fraction!r}, count={self.count!r}"
            )
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"TopK.fraction must be in (0, 1], got {self.fraction!r}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"TopK.count must be >= 1, got {self.count!r}")

    @property
    def name(self) -> str:
        """Spec ``"topk:<fraction>"`` or ``"topk:<count>"``."""
        return f"topk:{self.fraction!r}" if self.fraction is not None else f"topk:{self.count}"

    @property
    def lossless(self) -> bool:
        """Lossless only when every entry is kept (``fraction == 1``)."""
        return self.fraction == 1.0

    def num_kept(self, n: int) -> int:
        """``k`` for a tensor of ``n`` entries."""
        if n == 0:
            return 0
        if self.count is not None:
            return min(self.count, n)
        assert self.fraction is not None
        return min(n, max(1, round(self.fraction * n)))

    def encode(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        """Sparsify every fp32 data array; keeps no state (returns ``{}``).

        Raises:
            CodecError: a tensor has ``2**32`` entries or more (indices are uint32).
        """
        arrays: dict[str, np.ndarray] = {}
        meta = dict(payload.meta)
        for key, arr in payload.arrays.items():
            if not is_data(key, arr):
                put(arrays, key, arr)
                continue
            v = arr.reshape(-1)  # (n,)
            n, k = v.size, self.num_kept(v.size)
            if n >= 2**32:
                raise CodecError(f"topk indexes with uint32; {key!r} has {n} entries")
            if k == n:
                idx = np.arange(n, dtype=np.int64)
            else:
                idx = np.sort(np.argpartition(np.abs(v), n - k)[n - k :])  # (k,)
            suffix, encoded = encode_indices(idx, n)
            put(arrays, key + suffix, encoded)
            put(arrays, key + VAL, v[idx])  # (k,) fp32, exact
            meta[key + TAG] = shape_to_str(arr.shape)
        return Payload(arrays=arrays, meta=meta), {}

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        """Scatter each ``key::val`` into zeros of ``meta[key::topk]``'s shape."""
        meta = dict(payload.meta)
        ours = {k[: -len(TAG)] for k in payload.meta if k.endswith(TAG)}
        arrays: dict[str, np.ndarray] = {}
        for key, arr in payload.arrays.items():
            suffix = next((s for s in (IDX, BITMAP, VAL) if key.endswith(s)), None)
            base = key[: -len(suffix)] if suffix is not None else ""
            if suffix is None or base not in ours:  # a plain array or another stage's
                put(arrays, key, arr)
                continue
            if suffix == VAL:  # consumed with its indices
                continue
            shape = meta_shape(meta, base + TAG)
            del meta[base + TAG]
            n = int(np.prod(shape, dtype=np.int64))
            idx = decode_indices(suffix, arr, n)
            values = take(payload.arrays, base + VAL, key)
            if values.dtype != np.float32 or values.shape != idx.shape:
                raise CodecError(
                    f"array {base + VAL!r} must hold {idx.size} float32 values for the "
                    f"{idx.size} indices in {key!r}, got {values.size} {values.dtype}"
                )
            if idx.size and (idx[-1] >= n or idx[0] < 0):
                raise CodecError(f"indices in {key!r} fall outside a tensor of {n} entries")
            dense = np.zeros(n, dtype=np.float32)
            dense[idx] = values
            put(arrays, base, dense.reshape(shape))
        return Payload(arrays=arrays, meta=meta)


def _topk(param: str | None) -> TopK:
    if param is None:
        raise ConfigError(
            "codec 'topk' needs a parameter: a fraction such as 'topk:0.05' or a count "
            "such as 'topk:1000'"
        )
    if "." in param or "e" in param.lower():
        try:
            fraction = float(param)
        except ValueError:
            fraction = float("nan")
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(
                f"codec 'topk:{param}': the fraction must be a number in (0, 1], got {param!r}"
            )
        return TopK(fraction=fraction)
    return TopK(count=int_param("topk", param, low=1, high=None, what="the count"))


register_codec("topk", _topk)
