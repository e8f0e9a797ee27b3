"""Low-bit stages ``int2``, ``ternary`` and ``sign``: closed-form sizes, value sets,
unbiasedness, contraction, error feedback through the chain and composition."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from fedpeft.codecs import CodecContext, Payload, build_codec, from_payload, to_payload
from fedpeft.codecs.base import FEEDBACK
from fedpeft.codecs.quantize import pack_bits, pack_int4, unpack_bits
from fedpeft.codecs.ternary import pack_trits, unpack_trits
from fedpeft.errors import CodecError, ConfigError

STOCHASTIC = ["int2", "ternary"]
LOWBIT = [*STOCHASTIC, "sign"]
VALUES_PER_BYTE = {"int2": 4, "ternary": 5, "sign": 8}
TAGS = {"int2": "::int2", "ternary": "::tern", "sign": "::sign"}
CHAINS = [
    "int2",
    "ternary",
    "sign",
    "int2:64+zstd",
    "ternary+zstd",
    "sign:1000000000",
    "topk:0.05+sign+zstd",
    "topk:0.05+ternary+zstd",
    "topk:100+int2:16+zstd",
]


def _x(n: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float32) * 0.01).numpy()


def _per_block(x: np.ndarray, block: int, reduce) -> np.ndarray:
    """``reduce`` of each block of ``x`` (1-D), repeated to ``x``'s length (float64)."""
    starts = np.arange(0, x.size, block)
    values = np.array([reduce(np.abs(x[s : s + block]).astype(np.float64)) for s in starts])
    return np.repeat(values, block)[: x.size]


def _roundtrip(spec: str, x: np.ndarray, seed: int = 0) -> np.ndarray:
    codec = build_codec(spec)
    encoded, _ = codec.encode(Payload({"x": x}), {}, CodecContext(seed=seed))
    return codec.decode(encoded, CodecContext(seed=seed)).arrays["x"]


def _tensors() -> dict[str, torch.Tensor]:
    """LoRA-like factors, odd sizes, a zero block, a scalar, an empty and an aux int."""
    g = torch.Generator().manual_seed(0)
    odd = torch.randn(601, generator=g) * torch.logspace(-3, 1, 601)
    odd[256:512] = 0.0
    return {
        "layer.0.lora_a": (torch.rand(8, 48, generator=g) * 2 - 1) / 48**0.5,
        "layer.0.lora_b": torch.randn(48, 8, generator=g) * 0.01,
        "odd": odd,
        "scalar": torch.tensor(-2.5),
        "empty": torch.zeros(0, 4),
        "aux.seeds": torch.tensor([3, 2**40, -7], dtype=torch.int64),
    }


# --- sizes -------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOWBIT)
@pytest.mark.parametrize(("n", "block"), [(1, 256), (4, 256), (5, 256), (257, 256), (1001, 64)])
def test_bytes_match_formula(name, n, block):
    # Prepare
    codec = build_codec(f"{name}:{block}")
    # Execute
    encoded, _ = codec.encode(Payload({"x": _x(n).reshape(1, n)}), {}, CodecContext())
    # Assert: ceil(n / values per byte) + one fp32 scale per block
    per_byte = VALUES_PER_BYTE[name]
    assert encoded.nbytes() == math.ceil(n / per_byte) + 4 * math.ceil(n / block)
    assert encoded.meta == {"x" + TAGS[name]: f"1,{n}"}
    assert encoded.arrays["x" + TAGS[name]].dtype == np.uint8


@pytest.mark.parametrize(("name", "ratio"), [("int2", 15.06), ("ternary", 18.55), ("sign", 28.44)])
def test_ratio_at_block_256(name, ratio):
    n = 256 * 1000
    encoded, _ = build_codec(name).encode(Payload({"x": _x(n)}), {}, CodecContext())
    assert 4 * n / encoded.nbytes() == pytest.approx(ratio, abs=0.01)


@pytest.mark.parametrize("name", LOWBIT)
def test_block_beyond_the_tensor_is_one_scale_and_allocates_nothing(name):
    encoded, _ = build_codec(f"{name}:1000000000").encode(
        Payload({"x": _x(1000)}), {}, CodecContext()
    )
    assert encoded.arrays["x::scale"].shape == (1,)
    assert encoded.nbytes() == math.ceil(1000 / VALUES_PER_BYTE[name]) + 4


# --- packing -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_bit_packing_roundtrip_covers_every_code(bits):
    half = 1 << (bits - 1)
    q = np.arange(-half, half, dtype=np.int8).repeat(3)[:-1]  # a partial last byte
    packed = pack_bits(q, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(q.size * bits / 8)
    assert np.array_equal(unpack_bits(packed, q.size, bits), q)


def test_int4_packing_is_unchanged_by_the_generalisation():
    q = np.random.default_rng(0).integers(-7, 8, size=1001).astype(np.int8)
    nib = np.append((q.astype(np.int16) + 8).astype(np.uint8), np.uint8(8))  # the old code
    assert np.array_equal(pack_int4(q), nib[0::2] | (nib[1::2] << 4))


def test_int2_packs_four_values_low_bits_first():
    q = np.array([-1, 0, 1, 0, 1], dtype=np.int8)  # codes q + 2: 1, 2, 3, 2 | 3
    assert pack_bits(q, 2).tolist() == [1 | 2 << 2 | 3 << 4 | 2 << 6, 3 | 2 << 2 | 2 << 4 | 2 << 6]


def test_trit_packing_is_base_3_first_value_least_significant():
    # every 5-trit word, first trit least significant: the bytes 0 ... 242 in order
    words = np.array([w[::-1] for w in itertools.product((-1, 0, 1), repeat=5)], dtype=np.int8)
    packed = pack_trits(words.reshape(-1))
    assert np.array_equal(packed, np.arange(243, dtype=np.uint8))
    assert np.array_equal(unpack_trits(packed, words.size), words.reshape(-1))
    odd = words.reshape(-1)[:7]  # a partial last byte is padded with q = 0
    assert pack_trits(odd).tolist() == [
        packed[0],
        1 * (odd[5] + 1) + 3 * (odd[6] + 1) + 9 + 27 + 81,
    ]
    assert np.array_equal(unpack_trits(pack_trits(odd), 7), odd)


# --- values --------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "block"), [("int2", 256), ("ternary", 256), ("ternary:32", 32)])
def test_stochastic_values_are_zero_or_the_block_max_with_the_input_sign(spec, block):
    x = _x(1000)
    x[256:512] = 0.0  # a zero block is exact
    decoded = _roundtrip(spec, x, seed=1).astype(np.float64)
    s = _per_block(x, block, np.max)
    assert np.all((decoded == 0) | (np.abs(decoded) == s))
    assert np.all((decoded == 0) | (np.sign(decoded) == np.sign(x)))
    assert (decoded[256:512] == 0).all()
    peak = np.abs(x) == s  # each block's largest entry is exact
    assert np.array_equal(decoded[peak], x[peak].astype(np.float64))


@pytest.mark.parametrize("spec", STOCHASTIC)
def test_stochastic_rounding_is_unbiased_with_the_closed_form_variance(spec):
    # Prepare: per element x̂ ∈ {0, s·sign x}, P(s·sign x) = |x|/s, so
    # E[x̂] = x and Var[x̂] = |x|(s − |x|) ≤ s²/4
    x = _x(300)  # two blocks, the second partial
    s = _per_block(x, 256, np.max)
    var = np.abs(x) * (s - np.abs(x))
    draws = 3000
    total = np.zeros(x.size)
    total_sq = np.zeros(x.size)
    # Execute
    for seed in range(draws):
        d = _roundtrip(spec, x, seed).astype(np.float64)
        total += d
        total_sq += (d - x) ** 2
    # Assert: 4.5 standard errors (≈ 7e-6 two-sided per element), plus fp32 rounding
    bias = np.abs(total / draws - x)
    assert (bias <= 4.5 * np.sqrt(var / draws) + 1e-7 * s).all()
    assert total_sq.sum() / draws == pytest.approx(var.sum(), rel=0.03)


def test_int2_and_ternary_draw_independent_streams():
    x = _x(512)
    assert not np.array_equal(_roundtrip("int2", x, 3), _roundtrip("ternary", x, 3))


@pytest.mark.parametrize(("block", "n"), [(256, 1000), (64, 1000), (1000, 1000), (256, 1)])
def test_sign_keeps_block_mean_magnitude_and_signs(block, n):
    x = _x(n, seed=2)
    x[: n // 100] = 0.0  # sign(0) = +1
    decoded = _roundtrip(f"sign:{block}", x)
    mean = _per_block(x, block, np.mean)
    np.testing.assert_allclose(np.abs(decoded), mean, rtol=1e-6)  # the fp32 scale
    assert np.array_equal(np.sign(decoded), np.where(x < 0, -1.0, 1.0))
    for start in range(0, n, block):  # decoded mean |x̂| per block == mean |x|
        assert np.abs(decoded[start : start + block]).mean() == pytest.approx(
            np.abs(x[start : start + block]).astype(np.float64).mean(), rel=1e-6
        )


def test_sign_of_a_zero_block_is_exact_zero():
    x = np.zeros(600, dtype=np.float32)
    x[512:] = _x(88)
    decoded = _roundtrip("sign", x)
    assert (decoded[:512] == 0).all() and (decoded[512:] != 0).all()


# --- contraction ---------------------------------------------------------------------


def _inputs(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "uniform":
        return rng.uniform(-1, 1, n).astype(np.float32)
    if kind == "heavy":
        return rng.standard_t(1.5, n).astype(np.float32)
    x = np.zeros(n, dtype=np.float32)  # "spike": one non-zero entry, δ = 1/B_s
    x[rng.integers(n)] = 1.0
    return x


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "heavy", "spike"])
@pytest.mark.parametrize("block", [256, 7, 1_000_000])
def test_sign_error_is_the_closed_form_contraction(kind, block):
    x = _inputs(kind, 3000, seed=block)
    err = (_roundtrip(f"sign:{block}", x).astype(np.float64) - x) ** 2
    x64 = x.astype(np.float64)
    l1_sq = sum(
        np.abs(x64[s : s + block]).sum() ** 2 / x64[s : s + block].size
        for s in range(0, x.size, block)
    )  # Σ_blocks ‖x_b‖₁² / m_b
    assert err.sum() == pytest.approx(np.sum(x64**2) - l1_sq, rel=1e-5)
    assert err.sum() < np.sum(x64**2)


@pytest.mark.parametrize("spec", STOCHASTIC)
@pytest.mark.parametrize(("kind", "block"), [("uniform", 256), ("gaussian", 8), ("heavy", 8)])
def test_stochastic_stages_contract_on_flat_or_small_blocks(spec, kind, block):
    x = _inputs(kind, 4096, seed=1)
    for seed in range(5):
        err = np.sum((_roundtrip(f"{spec}:{block}", x, seed).astype(np.float64) - x) ** 2)
        assert err < np.sum(x.astype(np.float64) ** 2)


def test_stochastic_error_can_exceed_the_input_on_large_gaussian_blocks():
    # E‖x̂ − x‖² = s·‖x‖₁ − ‖x‖² per block (the documented caveat): ≈ 1.4·‖x‖² on
    # Gaussian blocks of 256, and (√B − 1)/2·‖x‖² for one entry s among B − 1 of s/(√B + 1)
    x = _inputs("gaussian", 256 * 64, seed=0).astype(np.float64).reshape(64, 256)
    expected = np.abs(x).max(axis=1) * np.abs(x).sum(axis=1) - (x**2).sum(axis=1)
    assert 1.2 < expected.sum() / (x**2).sum() < 1.6
    for block in (256, 8):  # the worst block: a contraction in expectation iff B ≤ 8
        worst = np.full(block, 1 / (math.sqrt(block) + 1))
        worst[0] = 1.0
        ratio = (worst.sum() - (worst**2).sum()) / (worst**2).sum()
        assert ratio == pytest.approx((math.sqrt(block) - 1) / 2)
        assert (ratio < 1) == (block <= 8)


# --- error feedback through the chain ------------------------------------------------


@pytest.mark.parametrize("spec", CHAINS)
def test_decoded_plus_residual_equals_inputs(spec):
    # Prepare
    sender, receiver = build_codec(spec), build_codec(spec)
    assert sender.feeds_back
    keys = [k for k, t in _tensors().items() if t.is_floating_point()]
    sent = {k: 0.0 for k in keys}
    total = {k: 0.0 for k in keys}
    state: dict = {}
    # Execute: 6 rounds of new inputs
    for t in range(6):
        u = {k: v * (1 + t) if v.is_floating_point() else v for k, v in _tensors().items()}
        u = {k: v + 0.01 * t if v.is_floating_point() else v for k, v in u.items()}
        previous = {k: state.get(FEEDBACK + k, 0.0) for k in keys}
        encoded, state = sender.encode(to_payload(u), state, CodecContext(seed=t))
        wire = Payload({k: v.copy() for k, v in encoded.arrays.items()}, dict(encoded.meta))
        out = from_payload(receiver.decode(wire, CodecContext(seed=t)))
        assert out["aux.seeds"].tolist() == [3, 2**40, -7]  # integers pass untouched
        for k in keys:
            c = out[k].double().numpy()
            v = u[k].double().numpy() + previous[k]
            assert np.array_equal(v - c, state.get(FEEDBACK + k, np.zeros(c.shape))), (t, k)
            sent[k] = sent[k] + c
            total[k] = total[k] + u[k].double().numpy()
    # Assert: Σ_t c_t + e_T = Σ_t u_t to float64 rounding
    for k in keys:
        gap = np.abs(sent[k] + state.get(FEEDBACK + k, 0.0) - total[k])
        assert (gap <= 1e-13 * (1 + np.abs(total[k]))).all(), k


@pytest.mark.parametrize(("spec", "bound"), [("int2", 8.0), ("ternary", 8.0), ("sign", 1.0)])
def test_residual_stays_bounded_over_50_rounds(spec, bound):
    # Measured max ‖e_t‖/‖u_t‖ over 50 Gaussian rounds: int2 6.1, ternary 6.0 (both
    # plateau near 6 up to 200 rounds), sign 0.79 (the EF-signSGD bound 2√(1−δ)/δ would
    # be ≈ 1.9 at δ = 2/π, a Gaussian block's)
    codec = build_codec(spec)
    state: dict = {}
    ratios = []
    for t in range(50):
        u = np.random.default_rng(t).standard_normal(4096).astype(np.float32)
        _, state = codec.encode(Payload({"w": u}), state, CodecContext(seed=t))
        ratios.append(np.linalg.norm(state[FEEDBACK + "w"]) / np.linalg.norm(u))
    assert max(ratios) <= bound
    assert np.mean(ratios[-10:]) <= 1.25 * np.mean(ratios[20:30]) + 0.05  # not diverging


# --- composition, determinism, decoding ----------------------------------------------


@pytest.mark.parametrize("spec", CHAINS)
def test_roundtrip_restores_keys_shapes_and_dtypes(spec):
    tensors = _tensors()
    codec = build_codec(spec)
    encoded, _ = codec.encode(to_payload(tensors), {}, CodecContext(seed=7))
    assert all(isinstance(v, int | float | str | bool) for v in encoded.meta.values())
    assert all(type(a) is np.ndarray for a in encoded.arrays.values())
    decoded = from_payload(codec.decode(encoded, CodecContext(seed=7)))
    assert list(decoded) == list(tensors)
    for key, t in tensors.items():
        assert decoded[key].shape == t.shape and decoded[key].dtype == t.dtype
    assert decoded["scalar"].item() == -2.5  # a one-value block is exact in every stage
    assert torch.equal(decoded["aux.seeds"], tensors["aux.seeds"])


@pytest.mark.parametrize(
    ("spec", "tag"),
    [("topk:0.05+sign", "::sign"), ("topk:0.05+ternary", "::tern"), ("topk:0.05+int2", "::int2")],
)
def test_after_topk_only_the_values_are_requantized(spec, tag):
    x = _x(1000)
    encoded, _ = build_codec(spec).encode(Payload({"x": x}), {}, CodecContext(seed=1))
    assert set(encoded.arrays) == {"x::idx", "x::val" + tag, "x::val::scale"}
    assert encoded.arrays["x::idx"].dtype.kind == "u"
    decoded = build_codec(spec).decode(encoded, CodecContext()).arrays["x"]
    kept = np.sort(np.argsort(np.abs(x))[-50:])
    assert (
        np.count_nonzero(decoded) <= 50 and not decoded[np.setdiff1d(np.arange(1000), kept)].any()
    )
    if spec.endswith("sign"):  # every kept entry: mean |kept| with its own sign
        assert np.allclose(decoded[kept], np.abs(x[kept]).mean() * np.sign(x[kept]), rtol=1e-6)


@pytest.mark.parametrize("spec", CHAINS)
def test_encoders_own_decode_equals_a_fresh_decoder_bit_for_bit(spec):
    encoder = build_codec(spec)
    encoded, _ = encoder.encode(to_payload(_tensors()), {}, CodecContext(seed=5))
    wire = Payload(
        {
            k: np.frombuffer(v.tobytes(), v.dtype).reshape(v.shape)
            for k, v in encoded.arrays.items()
        },
        dict(encoded.meta),
    )
    own = encoder.decode(encoded, CodecContext(seed=5)).arrays
    fresh = build_codec(spec).decode(wire, CodecContext(seed=12345)).arrays  # needs no RNG
    assert list(own) == list(fresh)
    assert all(own[k].tobytes() == fresh[k].tobytes() for k in own)


@pytest.mark.parametrize("spec", CHAINS)
def test_same_seed_same_bytes_and_only_stochastic_stages_use_it(spec):
    def wire(seed: int) -> dict[str, bytes]:
        encoded, _ = build_codec(spec).encode(to_payload(_tensors()), {}, CodecContext(seed=seed))
        return {k: v.tobytes() for k, v in encoded.arrays.items()}

    assert wire(3) == wire(3)
    assert (wire(3) != wire(4)) == any(s in spec for s in STOCHASTIC)


@pytest.mark.parametrize("name", LOWBIT)
def test_canonical_names(name):
    assert build_codec(f"{name}:256").name == name
    assert build_codec(f"{name}:64+zstd").name == f"{name}:64+zstd"
    assert not build_codec(name).lossless


@pytest.mark.parametrize(
    "spec",
    [
        "int2:0",
        "int2:x",
        "ternary:0",
        "ternary:-3",
        "ternary:1.5",
        "sign:0",
        "sign:abc",
        "sign:2.0",
    ],
)
def test_bad_parameter_names_the_spec(spec):
    with pytest.raises(ConfigError, match=f"'{spec}'"):
        build_codec(spec)


@pytest.mark.parametrize("name", LOWBIT)
def test_non_finite_input_is_refused(name):
    x = _x(10)
    x[3] = np.inf
    with pytest.raises(CodecError, match="'x'.*NaN or inf"):
        build_codec(name).encode(Payload({"x": x}), {}, CodecContext())


@pytest.mark.parametrize("name", LOWBIT)
def test_truncated_or_mismatched_payloads_are_reported(name):
    encoded, _ = build_codec(name).encode(Payload({"x": _x(1000)}), {}, CodecContext())
    packed = "x" + TAGS[name]
    short = dict(encoded.arrays, **{packed: encoded.arrays[packed][:-1]})
    with pytest.raises(CodecError, match=f"'{packed}'"):
        build_codec(name).decode(Payload(short, dict(encoded.meta)), CodecContext())
    with pytest.raises(CodecError, match="has 4 float32 scales, expected 16"):
        build_codec(f"{name}:64").decode(encoded, CodecContext())


def test_ternary_refuses_a_byte_beyond_242():
    encoded, _ = build_codec("ternary").encode(Payload({"x": _x(10)}), {}, CodecContext())
    bad = dict(encoded.arrays, **{"x::tern": np.array([243, 0], dtype=np.uint8)})
    with pytest.raises(CodecError, match="byte 243"):
        build_codec("ternary").decode(Payload(bad, dict(encoded.meta)), CodecContext())
