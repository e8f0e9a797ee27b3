"""How codec stages name the arrays and metadata they add to a payload (private).

A stage that encodes the fp32 array under ``key`` replaces it with derived arrays
named ``key + "::<tag>"`` (``"::int8"``, ``"::scale"``, ``"::idx"``, ...) and, if it
needs scalars to decode, meta entries under the same names. Because every name is
derived from the original key, stages compose: ``topk`` turns ``key`` into
``key::idx`` (unsigned ints) and ``key::val`` (fp32), ``int8`` then turns ``key::val``
into ``key::val::int8`` and ``key::val::scale``, and each decoder restores exactly
the name its encoder consumed.

Lossy stages only touch *data* arrays (:func:`is_data`): float32 arrays that are not
quantization scales, so a later ``fp16`` or ``topk`` never degrades the scales an
earlier ``int8`` relies on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedpeft.codecs.base import CodecContext
from fedpeft.errors import CodecError, ConfigError
from fedpeft.seeding import derive_seed

SEP = "::"
"""Separator between a tensor key and the tag of an array derived from it."""

SCALE = SEP + "scale"
"""Suffix of per-block fp32 quantization scales; never re-encoded by lossy stages."""


def is_data(key: str, arr: np.ndarray) -> bool:
    """True for float32 arrays a lossy stage may encode (everything but scales)."""
    return arr.dtype == np.float32 and not key.endswith(SCALE)


def shape_to_str(shape: Iterable[int]) -> str:
    """``(384, 8)`` as ``"384,8"`` (a ``ConfigRecord``-safe scalar); ``()`` as ``""``."""
    return ",".join(str(int(d)) for d in shape)


def shape_from_str(text: str, *, key: str) -> tuple[int, ...]:
    """Invert :func:`shape_to_str`; ``key`` names the entry in the error message."""
    try:
        return tuple(int(d) for d in text.split(",")) if text else ()
    except ValueError:
        raise CodecError(f"meta {key!r} must be a shape like '384,8', got {text!r}") from None


def meta_shape(meta: Mapping[str, object], key: str) -> tuple[int, ...]:
    """The shape stored in ``meta[key]``; :class:`CodecError` if it is missing."""
    if key not in meta or not isinstance(meta[key], str):
        raise CodecError(
            f"payload meta has no shape string under {key!r} (got {meta.get(key)!r}); "
            "was it encoded with the same codec spec?"
        )
    return shape_from_str(str(meta[key]), key=key)


def put(arrays: dict[str, np.ndarray], key: str, value: np.ndarray) -> None:
    """``arrays[key] = value``, refusing to overwrite an array already in the payload."""
    if key in arrays:
        raise CodecError(
            f"cannot add array {key!r}: the payload already holds an array of that "
            f"name; tensor keys must not end in '{SEP}<tag>' names used by codecs"
        )
    arrays[key] = value


def take(arrays: Mapping[str, np.ndarray], key: str, owner: str) -> np.ndarray:
    """``arrays[key]``; :class:`CodecError` naming the decoding array ``owner`` if absent."""
    if key not in arrays:
        raise CodecError(f"array {owner!r} needs its companion {key!r}, which is missing")
    return arrays[key]


def stage_rng(ctx: CodecContext, purpose: str, key: str) -> np.random.Generator:
    """A dedicated Philox generator for one tensor: ``derive_seed(ctx.seed, purpose, key)``."""
    return np.random.Generator(np.random.Philox(derive_seed(ctx.seed, purpose, key)))


def no_param(name: str, param: str | None) -> None:
    """Reject a parameter for a stage that takes none."""
    if param is not None:
        raise ConfigError(f"codec {name!r} takes no parameter, got '{name}:{param}'")


def int_param(name: str, param: str, *, low: int, high: int | None, what: str) -> int:
    """Parse ``param`` as an integer in ``[low, high]`` for stage ``name``."""
    try:
        value = int(param)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(
            f"codec '{name}:{param}': {what} must be an integer {bound}, got {param!r}"
        )
    return value
