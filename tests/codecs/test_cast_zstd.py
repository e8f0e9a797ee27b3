"""fp16 / bf16 casts and the zstd packer: exact rounding rules, sizes, bit-exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard

from fedpeft.codecs import CodecContext, Payload, build_codec, to_payload
from fedpeft.codecs.analysis import encoded_nbytes, npy_header_nbytes
from fedpeft.codecs.cast import from_bf16_bits, to_bf16_bits
from fedpeft.errors import CodecError


def _edge_values() -> np.ndarray:
    """Ties (even and odd kept lsb), near-max, subnormals, zeros, infinities, randoms."""
    ties = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F80_8001, 0x7F7F_FFFF], np.uint32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, -3e-39, 3.4e38], np.float32)
    randoms = torch.randn(1000, generator=torch.Generator().manual_seed(0)).numpy() * 1e3
    return np.concatenate([ties.view(np.float32), special, randoms.astype(np.float32)])


def test_bf16_matches_torch_round_to_nearest_even():
    x = _edge_values()
    expected = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(to_bf16_bits(x), expected.view(np.uint16))
    assert np.array_equal(
        from_bf16_bits(to_bf16_bits(x)), torch.from_numpy(x.copy()).bfloat16().float().numpy()
    )


def test_bf16_keeps_nan_and_sign():
    x = np.array([np.nan, -np.nan], np.float32)
    back = from_bf16_bits(to_bf16_bits(x))
    assert np.isnan(back).all() and np.array_equal(np.signbit(back), np.signbit(x))


@pytest.mark.parametrize(("spec", "bound"), [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_casts_halve_bytes_and_meet_relative_bound(spec, bound):
    x = torch.randn(48, 8, generator=torch.Generator().manual_seed(1)).numpy()
    codec = build_codec(spec)
    encoded, _ = codec.encode(Payload({"x": x}), {}, CodecContext())
    assert encoded.nbytes() == 2 * x.size and encoded.arrays[f"x::{spec}"].shape == x.shape
    back = codec.decode(encoded, CodecContext()).arrays["x"]
    assert (np.abs(back.astype(np.float64) - x) <= bound * np.abs(x)).all()


def test_fp16_overflow_is_refused_with_a_hint():
    with pytest.raises(CodecError, match="'x'.*70000.*bf16"):
        build_codec("fp16").encode(
            Payload({"x": np.array([1.0, 7e4], np.float32)}), {}, CodecContext()
        )


def test_zstd_is_bit_exact_for_every_dtype_and_meta():
    arrays = {
        "f32": np.array([np.nan, -0.0, 1.5], np.float32),
        "f16": np.arange(6, dtype=np.float16).reshape(2, 3),
        "u16": np.array([0, 65535], np.uint16),
        "i8": np.array([-127, 127], np.int8).reshape(2, 1, 1),
        "u32": np.array([2**32 - 1], np.uint32),
        "scalar": np.array(3.0, np.float32),
        "empty": np.zeros((0, 5), np.float32),
    }
    meta = {"s": "384,8", "i": 3, "f": 0.1, "b": True}
    codec = build_codec("zstd")
    encoded, _ = codec.encode(Payload(arrays, meta), {}, CodecContext())
    assert list(encoded.arrays) == ["::zstd"] and encoded.meta == {}
    decoded = codec.decode(encoded, CodecContext())
    assert decoded.meta == meta
    assert [type(v) for v in decoded.meta.values()] == [str, int, float, bool]
    assert list(decoded.arrays) == list(arrays)
    for key, arr in arrays.items():
        out = decoded.arrays[key]
        assert out.dtype == arr.dtype and out.shape == arr.shape
        assert out.tobytes() == arr.tobytes() and out.flags.writeable


def test_zstd_shrinks_quantized_payloads():
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(2)).numpy()
    plain, _ = build_codec("int8").encode(Payload({"x": x}), {}, CodecContext())
    packed, _ = build_codec("int8+zstd").encode(Payload({"x": x}), {}, CodecContext())
    assert packed.nbytes() < plain.nbytes()


def test_zstd_rejects_corrupted_input():
    bad = Payload({"::zstd": np.frombuffer(b"not a frame", np.uint8)})
    with pytest.raises(CodecError, match="not a valid zstd frame"):
        build_codec("zstd").decode(bad, CodecContext())
    truncated = zstandard.ZstdCompressor().compress(b"\x10\x00\x00\x00{}")
    with pytest.raises(CodecError, match="header"):
        build_codec("zstd").decode(
            Payload({"::zstd": np.frombuffer(truncated, np.uint8)}), CodecContext()
        )


def test_encoded_nbytes_counts_npy_headers_keys_and_meta():
    import io

    x = np.zeros((384, 8), np.float32)
    buffer = io.BytesIO()
    np.save(buffer, x, allow_pickle=False)
    assert npy_header_nbytes(x) + x.nbytes == buffer.tell()
    payload = Payload({"w": x}, {"w::topk": "384,8"})
    assert encoded_nbytes(payload) == 1 + buffer.tell() + len("w::topk") + len("384,8")
    empty, _ = build_codec("identity").encode(to_payload({}), {}, CodecContext())
    assert encoded_nbytes(empty) == 0
