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

The blockwise quantizers (``int8``/``int4``/``int2``, ``ternary``, ``sign``) share one
wire layout, ``key::<tag>`` (packed values) plus ``key::scale`` (fp32, one per block),
and one loop over the payload each way (:func:`encode_blockwise`,
:func:`decode_blockwise`); each stage supplies only its math and packing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from fedpeft.codecs.base import CodecContext, Payload
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


DEFAULT_BLOCK_SIZE = 256
"""Values per scale of the blockwise stages unless their spec says otherwise."""


def check_block_size(owner: str, block_size: int) -> None:
    """Refuse a block size below 1, naming the stage's class."""
    if block_size < 1:
        raise ConfigError(f"{owner}.block_size must be >= 1, got {block_size!r}")


def block_spec(tag: str, block_size: int) -> str:
    """A blockwise stage's spec: ``tag``, with ``":<block_size>"`` if not the default."""
    return tag if block_size == DEFAULT_BLOCK_SIZE else f"{tag}:{block_size}"


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


BlockEncodeFn = Callable[[str, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``(key, flat fp32 values) -> (packed values, fp32 per-block scales)``."""

BlockDecodeFn = Callable[[str, np.ndarray, int, np.ndarray], np.ndarray]
"""``(key, packed values (1-D), n, fp32 per-block scales) -> n fp32 values``."""


def encode_blockwise(
    payload: Payload, *, tag: str, stage: str, values_per_byte: int, encode_fn: BlockEncodeFn
) -> Payload:
    """Replace each fp32 data array ``key`` by ``key::<tag>`` and ``key::scale``.

    The skeleton of the blockwise quantizers (``int8``/``int4``/``int2``, ``ternary``,
    ``sign``); ``encode_fn`` holds the stage's own math and packing. Packed values
    (``values_per_byte > 1``) travel 1-D with the tensor's shape in ``meta[key::<tag>]``;
    unpacked ones (``int8``) keep the tensor's shape and need no meta.

    Args:
        payload: arrays to encode; non-data arrays (:func:`is_data`) pass through.
        tag: the stage's array tag (``"int8"``, ``"tern"``, ``"sign"``, ...).
        stage: the stage's spec, named in error messages.
        values_per_byte: values packed into one element of the packed array.
        encode_fn: turns one flattened array into its packed values and scales.

    Raises:
        CodecError: an array holds NaN or inf (no finite scale exists).
    """
    suffix = SEP + tag
    arrays: dict[str, np.ndarray] = {}
    meta = dict(payload.meta)
    for key, arr in payload.arrays.items():
        if not is_data(key, arr):
            put(arrays, key, arr)
            continue
        if not np.isfinite(arr).all():
            raise CodecError(f"{stage} cannot encode array {key!r}: it holds NaN or inf")
        packed, scale = encode_fn(key, arr.reshape(-1))
        if values_per_byte == 1:
            packed = packed.reshape(arr.shape)
        else:
            meta[key + suffix] = shape_to_str(arr.shape)
        put(arrays, key + suffix, packed)
        put(arrays, key + SCALE, scale)
    return Payload(arrays=arrays, meta=meta)


def decode_blockwise(
    payload: Payload,
    *,
    tag: str,
    stage: str,
    values_per_byte: int,
    block_size: int,
    decode_fn: BlockDecodeFn,
    wire_dtype: type[np.generic] = np.uint8,
) -> Payload:
    """Rebuild fp32 ``key`` from ``key::<tag>`` and ``key::scale`` (see :func:`encode_blockwise`).

    Checks that the packed array holds ``ceil(n / values_per_byte)`` values of
    ``wire_dtype`` and the scales ``ceil(n / block_size)`` fp32 values before
    ``decode_fn`` turns them back into ``n`` values.

    Raises:
        CodecError: a shape entry or scale array is missing, or an array has the wrong
            dtype or length (a truncated payload, or another block size or stage).
    """
    suffix = SEP + tag
    bases = [k[: -len(suffix)] for k in payload.arrays if k.endswith(suffix)]
    consumed = {b + SCALE for b in bases}
    arrays: dict[str, np.ndarray] = {}
    meta = dict(payload.meta)
    for key, arr in payload.arrays.items():
        if key in consumed:
            continue
        if not key.endswith(suffix):
            put(arrays, key, arr)
            continue
        base = key[: -len(suffix)]
        if values_per_byte == 1:  # unpacked: the array carries the tensor's shape
            shape = arr.shape
        else:
            shape = meta_shape(meta, key)
            del meta[key]
        n = int(np.prod(shape, dtype=np.int64))
        expected = -(-n // values_per_byte)
        packed_shape = shape if values_per_byte == 1 else (expected,)
        if arr.dtype != wire_dtype or arr.shape != packed_shape:
            packing = f" packed {values_per_byte} per byte" if values_per_byte > 1 else ""
            raise CodecError(
                f"array {key!r} has {arr.size} {arr.dtype} values, expected {expected} "
                f"{np.dtype(wire_dtype)} for {n} values{packing}"
            )
        scale = take(payload.arrays, base + SCALE, key)
        if scale.dtype != np.float32 or scale.size != -(-n // block_size):
            raise CodecError(
                f"array {base + SCALE!r} has {scale.size} {scale.dtype} scales, "
                f"expected {-(-n // block_size)} float32 for {n} values "
                f"in blocks of {block_size}; was it encoded with {stage!r}?"
            )
        values = decode_fn(key, arr.reshape(-1), n, scale)
        put(arrays, base, values.reshape(shape))
    return Payload(arrays=arrays, meta=meta)
