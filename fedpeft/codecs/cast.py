"""``fp16`` and ``bf16``: fp32 data arrays rounded to a 16-bit float (ALGORITHMS.md §12.2).

Both halve the bytes (``2·numel`` per tensor) and keep the tensor's shape.

* ``fp16`` (IEEE binary16, numpy's round-to-nearest-even cast) has an 11-bit
  significand: ``|x̂ − x| ≤ 2^-11·|x|`` for ``2^-14 ≤ |x| ≤ 65504`` and
  ``|x̂ − x| ≤ 2^-25`` below (subnormals). A finite value above 65504 in magnitude
  would become ``inf``, so encoding raises :class:`~fedpeft.errors.CodecError` instead
  (use ``bf16`` for large values).
* ``bf16`` keeps fp32's 8-bit exponent (no overflow short of fp32's own range) with an
  8-bit significand: ``|x̂ − x| ≤ 2^-8·|x|`` for normal ``x`` (round to nearest, ties
  to even, on the top 16 bits of the fp32 pattern). Flower's ``Array`` has no
  bfloat16 dtype, so the 16-bit patterns travel as ``uint16``; decoding shifts them
  back into the high half of an fp32 word, which is exact.

Neither is unbiased, but the bias is far below the rounding error of later local
training, and in a chain the rounding error is fed back like any other stage's
(:class:`~fedpeft.codecs.base.Chain`), so ``fp16`` alone keeps a residual per tensor
and the bias does not accumulate over rounds. ``NaN`` and ``±inf`` pass through
unchanged (and are not carried).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedpeft.codecs._layout import SEP, is_data, no_param, put
from fedpeft.codecs.base import CodecContext, CodecState, Payload, register_codec
from fedpeft.errors import CodecError, ConfigError

HalfFormat = Literal["fp16", "bf16"]

_FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 → bfloat16 bit patterns (``uint16``), round to nearest, ties to even.

    The 16 dropped mantissa bits are rounded by adding ``0x7FFF + lsb`` (``lsb`` the
    lowest kept bit) before truncation; a carry into the exponent is the correct
    rounding up (to ``inf`` beyond bf16's largest finite value). NaNs are mapped to
    a quiet NaN of the same sign, since the carry could otherwise turn them into inf.
    """
    bits = np.asarray(x, dtype=np.float32, order="C").view(np.uint32)
    lsb = (bits >> 16) & np.uint32(1)
    rounded = np.asarray((bits + np.uint32(0x7FFF) + lsb) >> 16).astype(np.uint16)  # 0-d stays
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)
    return rounded


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) → fp32, exactly."""
    return np.asarray(bits.astype(np.uint32) << 16).view(np.float32)  # 0-d stays an array


@dataclass(frozen=True)
class HalfCast:
    """Round every fp32 data array to fp16 or bf16; stateless and deterministic.

    Attributes:
        format: ``"fp16"`` (IEEE half, carried as ``float16``) or ``"bf16"``
            (bfloat16, carried as its ``uint16`` bit pattern).
    """

    format: HalfFormat = "fp16"

    def __post_init__(self) -> None:
        if self.format not in ("fp16", "bf16"):
            raise ConfigError(f"HalfCast.format must be 'fp16' or 'bf16', got {self.format!r}")

    @property
    def name(self) -> str:
        """Spec ``"fp16"`` or ``"bf16"``."""
        return self.format

    @property
    def lossless(self) -> bool:
        """Never lossless (the low 13 or 16 mantissa bits are rounded away)."""
        return False

    def encode(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        """Replace each fp32 data array ``key`` by ``key::fp16`` (or ``key::bf16``).

        Raises:
            CodecError: ``fp16`` and a finite value beyond ±65504 (it would overflow).
        """
        suffix = SEP + self.format
        arrays: dict[str, np.ndarray] = {}
        for key, arr in payload.arrays.items():
            if not is_data(key, arr):
                put(arrays, key, arr)
                continue
            if self.format == "bf16":
                put(arrays, key + suffix, to_bf16_bits(arr))
                continue
            with np.errstate(over="ignore"):  # overflow is reported below
                half = arr.astype(np.float16)
            inf = np.isinf(half)
            overflow = inf & np.isfinite(arr) if inf.any() else None
            if overflow is not None and overflow.any():
                raise CodecError(
                    f"fp16 cannot represent array {key!r}: max |x| = "
                    f"{float(np.abs(arr[overflow]).max()):.6g} > {_FP16_MAX:g}; "
                    "use 'bf16' (fp32 range) or an 'int8' quantizer instead"
                )
            put(arrays, key + suffix, half)
        return Payload(arrays=arrays, meta=dict(payload.meta)), state

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        """Widen every ``key::fp16`` / ``key::bf16`` array back to fp32 ``key``."""
        suffix = SEP + self.format
        wire_dtype = np.float16 if self.format == "fp16" else np.uint16
        arrays: dict[str, np.ndarray] = {}
        for key, arr in payload.arrays.items():
            if not key.endswith(suffix):
                put(arrays, key, arr)
                continue
            if arr.dtype != wire_dtype:
                raise CodecError(
                    f"array {key!r} has dtype {arr.dtype}, expected {np.dtype(wire_dtype)}"
                )
            base = key[: -len(suffix)]
            if self.format == "fp16":
                put(arrays, base, arr.astype(np.float32))
            else:
                put(arrays, base, from_bf16_bits(arr))
        return Payload(arrays=arrays, meta=dict(payload.meta))


def _fp16(param: str | None) -> HalfCast:
    no_param("fp16", param)
    return HalfCast("fp16")


def _bf16(param: str | None) -> HalfCast:
    no_param("bf16", param)
    return HalfCast("bf16")


register_codec("fp16", _fp16)
register_codec("bf16", _bf16)
