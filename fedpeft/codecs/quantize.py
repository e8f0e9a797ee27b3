"""``int8`` / ``int4`` / ``int2``: blockwise stochastic uniform quantization (QSGD-style).

Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
Encoding", NeurIPS 2017 (arXiv:1610.02132), with one fp32 scale per block of ``B_s``
values as in blockwise quantizers (ALGORITHMS.md §12.2). For a block ``x`` and
``L = 2^{b-1} − 1`` levels (127 for int8, 7 for int4, 1 for int2)::

    scale = max|x| / L,   y = x / scale ∈ [−L, L]
    q     = floor(y) + Bernoulli(y − floor(y))        (stochastic rounding)
    x̂     = q · scale

``int2`` has a single level: ``q ∈ {−1, 0, +1}``, ``x̂ ∈ {−max|x|, 0, +max|x|}`` with
``P(q = sign(x)) = |x| / max|x|``, the distribution of TernGrad (``ternary``,
:mod:`fedpeft.codecs.ternary`), which sends the same values 5 per byte instead of 4.

Properties (each tested):

* unbiased: ``E[x̂] = x`` (``E[q] = y``);
* error bound: ``|x̂ − x| < scale`` per element (``q`` is ``floor(y)`` or ``ceil(y)``),
  variance ``≤ scale²/4``; a block of zeros is exact;
* bytes: int8 ``n + 4·ceil(n/B_s)``; int4 (two values per byte, low nibble first)
  ``ceil(n/2) + 4·ceil(n/B_s)``; int2 (four values per byte, low bits first)
  ``ceil(n/4) + 4·ceil(n/B_s)`` — ratios ``32/(b + 32/B_s)``: 3.94×, 7.76× and 15.06×
  at ``B_s = 256``;
* deterministic: the uniforms come from ``Philox(derive_seed(ctx.seed, "quantize",
  key))``, so the same seed and key give the same bytes and the decoder needs no RNG;
  the encoder's own decode of the payload therefore equals the receiver's, which is
  what lets :class:`~fedpeft.codecs.base.Chain` feed the quantization error back
  (``int8`` alone, and after ``topk`` or ``lowrank``).

``int2`` and error feedback: the expected error of a block is
``E‖x̂ − x‖² = Σ_i |x_i|·(scale − |x_i|)`` (``scale = max|x|``), which can exceed
``‖x‖²``: up to ``(√B_s − 1)/2 · ‖x‖²`` (one large entry among ``B_s − 1`` entries of
``max|x|/(√B_s + 1)``), ≈ 1.4·‖x‖² on Gaussian blocks of 256 and 0.5·‖x‖² on uniform
ones. So ``int2`` is a contraction in expectation only for ``B_s ≤ 8``; the chain still
feeds its error back at any block size (the carried residual flattens the blocks it is
added to, and stays bounded in the tests: ≈ 6·‖u‖ on Gaussian rounds of blocks of 256).

Specs: ``int8`` (block 256), ``int8:128``; ``int4``, ``int4:64``; ``int2``, ``int2:64``
(a block size at least the tensor's size gives one scale per tensor). Encoding ``key``
produces ``key::int8`` (int8, the tensor's shape) or ``key::int4`` / ``key::int2``
(packed uint8 plus the shape in ``meta[key::int<b>]``) and ``key::scale`` (fp32, one
per block).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedpeft.codecs._layout import (
    DEFAULT_BLOCK_SIZE,
    block_spec,
    check_block_size,
    decode_blockwise,
    encode_blockwise,
    int_param,
    stage_rng,
)
from fedpeft.codecs.base import CodecContext, CodecState, Payload, register_codec
from fedpeft.errors import ConfigError


def as_blocks(flat: np.ndarray, block_size: int) -> np.ndarray:
    """``flat`` (1-D) as rows of ``block_size`` values, the last row zero-padded.

    A tensor no larger than one block is a single row of its own length (at least 1),
    so a block size far beyond the tensor's (one scale per tensor) allocates nothing.

    Returns:
        fp32 ``(ceil(n / block_size), min(block_size, max(n, 1)))``.
    """
    n = flat.size
    num_blocks = -(-n // block_size)
    width = block_size if n > block_size else max(n, 1)
    padded = np.zeros(num_blocks * width, dtype=np.float32)
    padded[:n] = flat
    return padded.reshape(num_blocks, width)  # (num_blocks, width)


def quantize_blocks(
    flat: np.ndarray, levels: int, block_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stochastically round ``flat`` (1-D fp32) onto ``levels`` steps per block.

    Returns:
        ``q`` (int8, ``flat.size`` values in ``[−levels, levels]``) and ``scale``
        (fp32, ``ceil(n / block_size)`` values).
    """
    blocks = as_blocks(flat, block_size)  # (num_blocks, B_s)
    scale = (np.abs(blocks).max(axis=1) / np.float32(levels)).astype(np.float32)  # (nb,)
    y = np.divide(
        blocks, scale[:, None], out=np.zeros_like(blocks), where=scale[:, None] > 0
    )  # (num_blocks, B_s) in [−L, L]
    low = np.floor(y)
    up = rng.random(y.shape, dtype=np.float32) < (y - low)  # Bernoulli(frac)
    q = np.clip(low + up, -levels, levels).astype(np.int8)
    return q.reshape(-1)[: flat.size], scale


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """Invert :func:`quantize_blocks`: ``q · scale`` per block, as 1-D fp32."""
    out = as_blocks(q, block_size) * scale[:, None]  # (num_blocks, B_s)
    return out.reshape(-1)[: q.size]


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack values in ``[−2^{b−1}, 2^{b−1})`` ``8/b`` per byte, low bits first.

    Each value travels as ``q + 2^{b−1}`` in ``b`` bits; value ``j`` of a byte sits in
    bits ``[j·b, (j+1)·b)``. A partial last byte is padded with ``q = 0``.

    Args:
        q: integer values (any shape; flattened).
        bits: a divisor of 8 below 8 (4 for ``int4``, 2 for ``int2``).
    """
    per_byte = 8 // bits
    codes = (q.reshape(-1).astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    pad = -codes.size % per_byte
    if pad:
        codes = np.append(codes, np.full(pad, 1 << (bits - 1), dtype=np.uint8))
    codes = codes.reshape(-1, per_byte)  # (ceil(n / per_byte), per_byte)
    packed = codes[:, 0].copy()
    for j in range(1, per_byte):
        packed |= codes[:, j] << np.uint8(j * bits)
    return packed  # (ceil(n / per_byte),)


def unpack_bits(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Invert :func:`pack_bits` for the first ``n`` values (int8)."""
    mask = np.uint8((1 << bits) - 1)
    shifts = np.arange(0, 8, bits, dtype=np.uint8)  # (per_byte,)
    codes = (packed[:, None] >> shifts[None, :]) & mask  # (bytes, per_byte)
    return codes.reshape(-1)[:n].astype(np.int8) - np.int8(1 << (bits - 1))


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Pack values in ``[−7, 7]`` two per byte (``q + 8`` as nibbles, low nibble first)."""
    return pack_bits(q, 4)


def unpack_int4(packed: np.ndarray, n: int) -> np.ndarray:
    """Invert :func:`pack_int4` for the first ``n`` values."""
    return unpack_bits(packed, n, 4)


@dataclass(frozen=True)
class StochasticQuantizer:
    """Blockwise stochastic uniform quantizer with per-block fp32 scales (QSGD-style).

    Attributes:
        bits: 8 (``int8``), 4 (``int4``, packed two per byte) or 2 (``int2``, packed
            four per byte).
        block_size: values sharing one scale; smaller blocks cost ``4/B_s`` bytes per
            value more and give tighter scales.
    """

    bits: int = 8
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ConfigError(f"StochasticQuantizer.bits must be 2, 4 or 8, got {self.bits!r}")
        check_block_size("StochasticQuantizer", self.block_size)

    @property
    def levels(self) -> int:
        """``L = 2^{bits−1} − 1``: 127, 7 or 1."""
        return 2 ** (self.bits - 1) - 1

    @property
    def _tag(self) -> str:
        return f"int{self.bits}"

    @property
    def name(self) -> str:
        """Spec ``"int8"`` / ``"int4"`` / ``"int2"``, with ``":<block_size>"`` if not 256."""
        return block_spec(self._tag, self.block_size)

    @property
    def lossless(self) -> bool:
        """Never lossless."""
        return False

    def encode(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        """Quantize each fp32 data array ``key`` into ``key::int<b>`` and ``key::scale``.

        Raises:
            CodecError: an array holds NaN or inf (no finite scale exists).
        """

        def encode_fn(key: str, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            rng = stage_rng(ctx, "quantize", key)
            q, scale = quantize_blocks(flat, self.levels, self.block_size, rng)
            return (q if self.bits == 8 else pack_bits(q, self.bits)), scale

        encoded = encode_blockwise(
            payload,
            tag=self._tag,
            stage=self.name,
            values_per_byte=8 // self.bits,
            encode_fn=encode_fn,
        )
        return encoded, state

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        """Rebuild fp32 ``key`` from ``key::int<b>`` and ``key::scale``."""

        def decode_fn(key: str, packed: np.ndarray, n: int, scale: np.ndarray) -> np.ndarray:
            q = packed if self.bits == 8 else unpack_bits(packed, n, self.bits)
            return dequantize_blocks(q, scale, self.block_size)

        return decode_blockwise(
            payload,
            tag=self._tag,
            stage=self.name,
            values_per_byte=8 // self.bits,
            block_size=self.block_size,
            decode_fn=decode_fn,
            wire_dtype=np.int8 if self.bits == 8 else np.uint8,
        )


def _factory(bits: int) -> Callable[[str | None], StochasticQuantizer]:
    tag = f"int{bits}"

    def build(param: str | None) -> StochasticQuantizer:
        if param is None:
            return StochasticQuantizer(bits=bits)
        block = int_param(tag, param, low=1, high=None, what="the block size")
        return StochasticQuantizer(bits=bits, block_size=block)

    return build


register_codec("int8", _factory(8))
register_codec("int4", _factory(4))
register_codec("int2", _factory(2))
