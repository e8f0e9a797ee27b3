"""``zstd``: lossless Zstandard compression of the whole payload into one array.

Every array (key, dtype, shape, raw C-order bytes) and the payload's meta are packed
into one buffer and compressed with the ``zstandard`` package (Collet & Kucherawy,
RFC 8878). The wire then carries a single ``uint8`` array ``"::zstd"`` and no meta, so
per-tensor key strings and shape metadata are compressed too.

Buffer layout (little-endian)::

    uint32 header_length | header (UTF-8 JSON) | bytes of array 0 | bytes of array 1 | ...
    header = {"version": 1, "arrays": [[key, dtype.str, shape], ...], "meta": {...}}

Lossless: decoding is bit-exact, including dtype byte order and NaN payloads.
It pays off on quantized and sparse payloads (``int8+zstd``, ``topk:0.05+int8+zstd``:
gap-coded indices and small integers compress well) and gains ~8 % on raw fp32
(ALGORITHMS.md §12.3). Specs: ``zstd`` (level 3) or ``zstd:<level>`` (1–22).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import zstandard

from fedpeft.codecs._layout import SEP, int_param, put
from fedpeft.codecs.base import CodecContext, CodecState, Payload, register_codec
from fedpeft.errors import CodecError, ConfigError

PACKED = SEP + "zstd"
"""Key of the single compressed array."""

DEFAULT_LEVEL = 3
_FORMAT_VERSION = 1
_LENGTH = np.dtype("<u4")


def pack(payload: Payload) -> bytes:
    """Serialize all arrays and meta of ``payload`` into one (uncompressed) buffer."""
    entries = []
    chunks: list[bytes | memoryview] = []
    for key, arr in payload.arrays.items():
        if arr.dtype.hasobject:
            raise CodecError(f"zstd cannot pack array {key!r} of object dtype {arr.dtype}")
        arr = np.asarray(arr, order="C")  # (keeps 0-d arrays 0-d)
        entries.append([key, arr.dtype.str, list(arr.shape)])
        chunks.append(memoryview(arr.reshape(-1).view(np.uint8)))
    header = json.dumps(
        {"version": _FORMAT_VERSION, "arrays": entries, "meta": payload.meta},
        separators=(",", ":"),
    ).encode()
    return b"".join([np.array(len(header), dtype=_LENGTH).tobytes(), header, *chunks])


def unpack(buffer: bytes) -> Payload:
    """Invert :func:`pack`; each array is an aligned, writable copy."""
    view = memoryview(buffer)
    start = _LENGTH.itemsize
    if len(view) < start:
        raise CodecError(f"zstd buffer of {len(view)} bytes is too short for its header")
    header_length = int(np.frombuffer(view[:start], dtype=_LENGTH)[0])
    try:
        header = json.loads(bytes(view[start : start + header_length]))
        entries, meta = header["arrays"], header["meta"]
        if header["version"] != _FORMAT_VERSION:
            raise ValueError(f"version {header['version']!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise CodecError(f"zstd buffer has an unreadable header: {err}") from None
    offset = start + header_length
    arrays: dict[str, np.ndarray] = {}
    for key, dtype_str, shape in entries:
        dtype = np.dtype(dtype_str)
        if dtype.hasobject:
            raise CodecError(f"zstd buffer declares object dtype for array {key!r}")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > len(view):
            raise CodecError(f"zstd buffer ends inside array {key!r}")
        arrays[key] = np.frombuffer(view[offset : offset + size], dtype=dtype).reshape(shape).copy()
        offset += size
    if offset != len(view):
        raise CodecError(f"zstd buffer has {len(view) - offset} trailing bytes")
    return Payload(arrays=arrays, meta=meta)


@dataclass(frozen=True)
class Zstd:
    """Pack the payload into one Zstandard-compressed ``uint8`` array.

    Attributes:
        level: Zstandard compression level, 1 (fast) to 22 (smallest).
    """

    level: int = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        if not 1 <= self.level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise ConfigError(
                f"Zstd.level must be in [1, {zstandard.MAX_COMPRESSION_LEVEL}], got {self.level!r}"
            )

    @property
    def name(self) -> str:
        """Spec ``"zstd"``, or ``"zstd:<level>"`` if the level is not 3."""
        return "zstd" if self.level == DEFAULT_LEVEL else f"zstd:{self.level}"

    @property
    def lossless(self) -> bool:
        """Always lossless."""
        return True

    def encode(
        self, payload: Payload, state: CodecState, ctx: CodecContext
    ) -> tuple[Payload, CodecState]:
        """Replace all arrays and meta by the single array ``"::zstd"``."""
        compressed = zstandard.ZstdCompressor(level=self.level).compress(pack(payload))
        blob = np.frombuffer(bytearray(compressed), dtype=np.uint8)
        return Payload(arrays={PACKED: blob}), state

    def decode(self, payload: Payload, ctx: CodecContext) -> Payload:
        """Restore the arrays and meta packed in ``"::zstd"`` (others pass through)."""
        if PACKED not in payload.arrays:
            return payload
        blob = payload.arrays[PACKED]
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise CodecError(f"array {PACKED!r} must be 1-D uint8, got {blob.dtype} {blob.shape}")
        try:
            raw = zstandard.ZstdDecompressor().decompress(blob.tobytes())
        except zstandard.ZstdError as err:
            raise CodecError(f"array {PACKED!r} is not a valid zstd frame: {err}") from None
        inner = unpack(raw)
        arrays: dict[str, np.ndarray] = {}
        for key, arr in payload.arrays.items():
            if key != PACKED:
                put(arrays, key, arr)
        for key, arr in inner.arrays.items():
            put(arrays, key, arr)
        clash = set(inner.meta) & set(payload.meta)
        if clash:
            raise CodecError(f"meta keys {sorted(clash)} are both packed and unpacked")
        return Payload(arrays=arrays, meta={**payload.meta, **inner.meta})


def _zstd(param: str | None) -> Zstd:
    if param is None:
        return Zstd()
    high = zstandard.MAX_COMPRESSION_LEVEL
    return Zstd(int_param("zstd", param, low=1, high=high, what="the level"))


register_codec("zstd", _zstd)
