"""``sign``: scaled sign compression, one bit per value (fed back by the chain).

Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient Compression
Schemes", ICML 2019 (arXiv:1901.09847), with one fp32 scale per block of ``B_s``
values (ALGORITHMS.md §12.2). For a block ``x`` of ``m`` values (``m = B_s``, or fewer
in a tensor's last block)::

    scale = ‖x‖₁ / m                      (the block's mean |x|)
    c     = scale · sign(x)               with sign(0) = +1

Properties (each tested):

* biased and deterministic: ``c`` does not depend on ``ctx.seed`` and ``E[c] ≠ x``
  (``unbiased`` is not claimed); what makes it work is error feedback, which
  :class:`~fedpeft.codecs.base.Chain` does over the whole chain (the stage keeps no
  residual);
* the decoded block keeps the mean magnitude and the signs: ``mean|c| = mean|x|``,
  ``sign(c_i) = sign(x_i)``;
* contractive, per block and exactly: ``⟨c, x⟩ = ‖c‖² = ‖x‖₁²/m``, so
  ``‖c − x‖² = ‖x‖² − ‖x‖₁²/m = (1 − δ)·‖x‖²`` with ``δ = ‖x‖₁²/(m·‖x‖²) ∈ [1/m, 1]``
  (``≈ 2/π`` for Gaussian blocks): the error is smaller than the block unless the block
  is zero, which is decoded exactly. For a δ-contraction the carried residual obeys
  ``‖e_t‖² ≤ 4(1 − δ)/δ² · max_s ‖u_s‖²`` (Karimireddy et al.), with δ the smallest over
  the blocks sent;
* bytes: ``ceil(n/8) + 4·ceil(n/B_s)`` (bits from ``np.packbits`` in little bit order,
  1 for a negative value), a ratio of ``32/(1 + 32/B_s)``: 28.4× at ``B_s = 256``.

Specs: ``sign`` (block 256), ``sign:64``; a block size at least the tensor's size gives
one scale per tensor (``sign:1000000000``). Encoding ``key`` produces ``key::sign``
(packed uint8, the shape in ``meta[key::sign]``) and ``key::scale`` (fp32, one per
block).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpeft.codecs._layout import (
    DEFAULT_BLOCK_SIZE,
    block_spec,
    check_block_size,
    decode_blockwise,
    encode_blockwise,
    int_param,
)
from fedpeft.codecs.base import CodecContext, CodecState, Payload, register_codec
from fedpeft.codecs.quantize import as_blocks

TAG = "sign"


def sign_blocks(flat: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Scaled sign of ``flat`` (1-D fp32), one scale per block.

    Returns:
        ``negative`` (bool, ``flat.size``: ``x < 0``) and ``scale`` (fp32,
        ``ceil(n / block_size)`` values: the mean ``|x|`` of each block).
    """
    n = flat.size
    if n == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.float32)
    blocks = as_blocks(flat, block_size)  # (num_blocks, B_s), zero-padded
    counts = np.full(blocks.shape[0], blocks.shape[1], dtype=np.float64)  # (num_blocks,)
    counts[-1] = n - (blocks.shape[0] - 1) * blocks.shape[1]  # the last block's own size
    l1 = np.abs(blocks).sum(axis=1, dtype=np.float64)  # (num_blocks,)
    return flat < 0, (l1 / counts).astype(np.float32)


def unsign_blocks(negative: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """Invert :func:`sign_blocks`: ``scale · (±1)`` per block, as 1-D fp32."""
    signs = np.where(negative, np.float32(-1), np.float32(1))  # (n,)
    out = as_blocks(signs, block_size) * scale[:, None]  # (num_blocks, B_s)
    return out.reshape(-1)[: negative.size]


@dataclass(frozen=True)
class ScaledSign:
    """Scaled sign with per-block fp32 scales, packed 8 signs per byte (stateless).

    Attributes:
        block_size: values sharing one scale (their mean ``|x|``); smaller blocks cost
            ``4/B_s`` bytes per value more and follow the magnitudes more closely.
    """

    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        check_block_size("ScaledSign", self.block_size)

    @property
    def name(self) -> str:
        """Spec ``"sign"``, with ``":<block_size>"`` if not 256."""
        return block_spec("sign", self.block_size)

    @property
    def lossless(self) -> bool:
        """Never lossless."""
        return False

    @property
    def contractive(self) -> bool:
        """Always: ``‖c − x‖² = (1 − δ)‖x‖²`` per block with ``δ ≥ 1/B_s``."""
        return True

    def encode(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        """Replace each fp32 data array ``key`` by ``key::sign`` and ``key::scale``.

        Raises:
            CodecError: an array holds NaN or inf (no finite scale exists).
        """

        def encode_fn(key: str, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            negative, scale = sign_blocks(flat, self.block_size)
            return np.packbits(negative, bitorder="little"), scale

        encoded = encode_blockwise(
            payload, tag=TAG, stage=self.name, values_per_byte=8, encode_fn=encode_fn
        )
        return encoded, state

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        """Rebuild fp32 ``key`` from ``key::sign`` and ``key::scale``."""

        def decode_fn(key: str, packed: np.ndarray, n: int, scale: np.ndarray) -> np.ndarray:
            negative = np.unpackbits(packed, count=n, bitorder="little").astype(bool)
            return unsign_blocks(negative, scale, self.block_size)

        return decode_blockwise(
            payload,
            tag=TAG,
            stage=self.name,
            values_per_byte=8,
            block_size=self.block_size,
            decode_fn=decode_fn,
        )


def _sign(param: str | None) -> ScaledSign:
    if param is None:
        return ScaledSign()
    block = int_param("sign", param, low=1, high=None, what="the block size")
    return ScaledSign(block_size=block)


register_codec("sign", _sign)
