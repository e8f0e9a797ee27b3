"""Byte counts of an encoded payload, for benchmarks and size tests.

The authoritative ledger is the Flower layer, which measures the serialized records.
These helpers estimate the same quantity without Flower: a Flower ``Array`` stores
``np.save`` output (an npy header plus the raw bytes) under its key, and a
``ConfigRecord`` entry is its key plus its value.
"""

from __future__ import annotations

import io

import numpy as np

from fedpeft.codecs.base import Payload


def npy_header_nbytes(arr: np.ndarray) -> int:
    """Exact size of the npy (format 1.0) header ``np.save`` writes for ``arr``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(arr))
    return buffer.tell()


def encoded_nbytes(payload: Payload) -> int:
    """Estimated wire bytes: per array ``len(key) + npy header + data``, plus meta.

    Meta entries count ``len(key) + len(str(value))`` (UTF-8). Protobuf framing (a few
    bytes per entry) is not included.
    """
    arrays = sum(
        len(key.encode()) + npy_header_nbytes(arr) + arr.nbytes
        for key, arr in payload.arrays.items()
    )
    meta = sum(len(k.encode()) + len(str(v).encode()) for k, v in payload.meta.items())
    return int(arrays + meta)
