"""Blockwise stochastic quantization: unbiasedness, error bound, sizes, packing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpeft.codecs import CodecContext, Payload, build_codec
from fedpeft.codecs.quantize import StochasticQuantizer, pack_int4, unpack_int4
from fedpeft.errors import CodecError


def _x(n: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float32) * 0.01).numpy()


def _block_scale(x: np.ndarray, levels: int, block: int) -> np.ndarray:
    padded = np.zeros(-(-x.size // block) * block)
    padded[: x.size] = np.abs(x)
    return np.repeat(padded.reshape(-1, block).max(axis=1) / levels, block)[: x.size]


def _decode_once(codec, x: np.ndarray, seed: int) -> np.ndarray:
    ctx = CodecContext(seed=seed)
    encoded, _ = codec.encode(Payload({"x": x}), {}, ctx)
    return codec.decode(encoded, ctx).arrays["x"]


@pytest.mark.parametrize(("spec", "levels", "block"), [("int4", 7, 256), ("int8:64", 127, 64)])
def test_stochastic_rounding_is_unbiased(spec, levels, block):
    codec = build_codec(spec).stages[0]
    x = _x(300)  # two blocks, the second partial
    draws = 3000
    total = np.zeros(x.size)
    total_sq = np.zeros(x.size)
    for seed in range(draws):
        d = _decode_once(codec, x, seed).astype(np.float64)
        total += d
        total_sq += (d - x) ** 2
    scale = _block_scale(x, levels, block)
    bias = np.abs(total / draws - x)
    assert (bias <= 3 * scale / math.sqrt(draws)).all()
    assert (total_sq / draws <= scale**2 / 4 * 1.2).all()  # variance <= scale^2 / 4


@pytest.mark.parametrize(("spec", "levels", "block"), [("int8", 127, 256), ("int4:32", 7, 32)])
def test_error_below_one_scale_and_zero_block_exact(spec, levels, block):
    x = _x(1000)
    x[256:512] = 0.0
    decoded = _decode_once(build_codec(spec).stages[0], x, seed=1)
    err = np.abs(decoded.astype(np.float64) - x)
    assert (err <= _block_scale(x, levels, block) * (1 + 1e-6)).all()
    assert (decoded[256:512] == 0).all()


@pytest.mark.parametrize("n", [1, 255, 256, 257, 4096, 100_000])
def test_int8_bytes_match_formula(n):
    encoded, _ = build_codec("int8").encode(Payload({"x": _x(n)}), {}, CodecContext())
    assert encoded.nbytes() == n + 4 * math.ceil(n / 256)
    assert encoded.arrays["x::int8"].shape == (n,) and encoded.meta == {}


@pytest.mark.parametrize(("n", "block"), [(1, 256), (257, 256), (1001, 64)])
def test_int4_bytes_match_formula(n, block):
    codec = StochasticQuantizer(bits=4, block_size=block)
    encoded, _ = codec.encode(Payload({"x": _x(n).reshape(1, n)}), {}, CodecContext())
    assert encoded.nbytes() == math.ceil(n / 2) + 4 * math.ceil(n / block)
    assert encoded.meta == {"x::int4": f"1,{n}"}


def test_int8_ratio_near_the_formula():
    n = 256 * 1000
    encoded, _ = build_codec("int8").encode(Payload({"x": _x(n)}), {}, CodecContext())
    assert 4 * n / encoded.nbytes() == pytest.approx(32 / (8 + 32 / 256), rel=0.01)


def test_int4_packing_roundtrip_covers_every_level():
    q = np.arange(-7, 8, dtype=np.int8).repeat(3)[:-1]  # odd length
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(q.size / 2)
    assert np.array_equal(unpack_int4(packed, q.size), q)


def test_quantized_values_stay_in_range():
    x = _x(5000) * 1e3
    encoded, _ = build_codec("int8").encode(Payload({"x": x}), {}, CodecContext(seed=2))
    q = encoded.arrays["x::int8"]
    assert q.min() >= -127 and q.max() <= 127


def test_seed_stream_is_keyed_by_tensor_name():
    x = _x(512)
    encoded, _ = build_codec("int8").encode(Payload({"a": x, "b": x}), {}, CodecContext(seed=5))
    assert not np.array_equal(encoded.arrays["a::int8"], encoded.arrays["b::int8"])


def test_non_finite_input_is_refused():
    x = _x(10)
    x[3] = np.nan
    with pytest.raises(CodecError, match="'x'.*NaN or inf"):
        build_codec("int4").encode(Payload({"x": x}), {}, CodecContext())


def test_scales_and_integer_arrays_pass_through_later_stages():
    x = _x(600)
    encoded, _ = build_codec("int8+fp16+int4").encode(Payload({"x": x}), {}, CodecContext())
    assert set(encoded.arrays) == {"x::int8", "x::scale"}
    assert encoded.arrays["x::scale"].dtype == np.float32
