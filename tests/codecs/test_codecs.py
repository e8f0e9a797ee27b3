"""Contract tests run against every registered codec stage and a set of chains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.codecs import (
    CodecContext,
    Payload,
    available_codecs,
    build_codec,
    from_payload,
    to_payload,
)
from fedpeft.errors import CodecError, ConfigError

LOSSLESS = ["identity", "zstd", "zstd:19", "topk:1.0"]
ELEMENTWISE = [
    "fp16",
    "bf16",
    "int8",
    "int8:128",
    "int4",
    "int4:64",
    "topk:0.05",
    "topk:100",
    "fp16+zstd",
    "bf16+zstd",
    "int8+zstd",
    "int4+zstd",
    "topk:0.05+int8+zstd",
    "topk:0.05+fp16",
    "topk:100+int4:64+zstd",
]
NORM_BOUNDED = ["lowrank:2", "lowrank:2+zstd", "lowrank:3+fp16+zstd"]
LOWBIT = ["int2", "ternary:64", "sign", "topk:0.05+sign+zstd"]  # tests/codecs/test_lowbit.py
PROJECTED = ["ferret:16", "ferret:16+zstd"]  # unbiased, not bounded: tests/codecs/test_ferret_codec.py
SPECS = LOSSLESS + ELEMENTWISE + NORM_BOUNDED + LOWBIT + PROJECTED
STOCHASTIC = [
    "int8",
    "int4",
    "int8+zstd",
    "topk:0.05+int8+zstd",
    "lowrank:2",
    "ferret:16",
    "int2",
    "ternary:64",
]
DETERMINISTIC = ["fp16", "bf16", "topk:0.05", "zstd", "fp16+zstd", "sign", "topk:0.05+sign+zstd"]


def test_specs_cover_every_registered_stage():
    used = {part.partition(":")[0] for spec in SPECS for part in spec.split("+")}
    assert used == set(available_codecs())


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    """LoRA-like shapes (non-square), a head, odd sizes, a scalar and an empty tensor."""
    g = torch.Generator().manual_seed(0)
    return {
        "layer.0.lora_a": (torch.rand(8, 48, generator=g) * 2 - 1) / 48**0.5,
        "layer.0.lora_b": torch.randn(48, 8, generator=g) * 0.01,
        "head.weight": torch.randn(3, 48, generator=g) * 0.02,
        "head.bias": torch.randn(3, generator=g),
        "odd": torch.randn(601, generator=g) * torch.logspace(-3, 1, 601),
        "scalar": torch.tensor(-2.5),
        "empty": torch.zeros(0, 4),
    }


def roundtrip(spec: str, tensors, seed: int = 7):
    codec = build_codec(spec)
    ctx = CodecContext(seed=seed)
    encoded, state = codec.encode(to_payload(tensors), {}, ctx)
    decoded = codec.decode(encoded, ctx)
    for payload in (encoded, decoded):  # Flower's Array accepts only real ndarrays
        assert all(type(a) is np.ndarray for a in payload.arrays.values())
    assert all(type(a) is np.ndarray for a in state.values())
    return from_payload(decoded), encoded, state


def _stages(spec: str) -> list[str]:
    return [s for s in spec.split("+") if not s.startswith("zstd")]


def _value_bound(stage: str, v: np.ndarray) -> np.ndarray:
    """Elementwise error bound of a value stage (fp16, bf16, int<b>[:B]) on 1-D ``v``."""
    if stage == "fp16":
        return 2.0**-11 * np.abs(v) + 2.0**-25
    if stage == "bf16":
        return 2.0**-8 * np.abs(v) + 1e-38
    name, _, param = stage.partition(":")
    levels = {"int8": 127, "int4": 7}[name]
    block = int(param) if param else 256
    padded = np.zeros(-(-v.size // block) * block)
    padded[: v.size] = np.abs(v)
    scale = padded.reshape(-1, block).max(axis=1) / levels  # (num_blocks,)
    return (np.repeat(scale, block)[: v.size] * (1 + 1e-6)) + 1e-12


def elementwise_bound(spec: str, x: np.ndarray) -> np.ndarray:
    """The documented bound of ``spec`` for each entry of ``x`` (a fresh state)."""
    stages = _stages(spec)
    flat = x.reshape(-1).astype(np.float64)
    if not stages[0].startswith("topk"):
        assert len(stages) == 1
        return _value_bound(stages[0], flat).reshape(x.shape)
    param = stages[0].partition(":")[2]
    n = flat.size
    k = min(int(param), n) if "." not in param else max(1, round(float(param) * n))
    kept = np.sort(np.argsort(np.abs(flat), kind="stable")[n - k :]) if n else []
    bound = np.abs(flat)  # dropped entries are decoded as 0
    bound[kept] = _value_bound(stages[1], flat[kept]) if len(stages) > 1 else 0.0
    return bound.reshape(x.shape)


@pytest.mark.parametrize("spec", SPECS)
def test_roundtrip_restores_keys_shapes_and_dtype(spec, tensors):
    decoded, encoded, _ = roundtrip(spec, tensors)
    assert list(decoded) == list(tensors)
    for key, t in tensors.items():
        assert decoded[key].shape == t.shape and decoded[key].dtype == torch.float32
    assert all(isinstance(v, int | float | str | bool) for v in encoded.meta.values())


@pytest.mark.parametrize("spec", LOSSLESS)
def test_lossless_codecs_are_bit_exact(spec, tensors):
    decoded, _, _ = roundtrip(spec, tensors)
    assert build_codec(spec).lossless
    for key, t in tensors.items():
        assert decoded[key].numpy().tobytes() == t.numpy().tobytes()


@pytest.mark.parametrize("spec", ELEMENTWISE)
def test_error_within_documented_elementwise_bound(spec, tensors):
    decoded, _, _ = roundtrip(spec, tensors)
    assert not build_codec(spec).lossless
    for key, t in tensors.items():
        x = t.numpy()
        err = np.abs(decoded[key].numpy().astype(np.float64) - x)
        assert (err <= elementwise_bound(spec, x)).all(), key


@pytest.mark.parametrize("spec", NORM_BOUNDED)
def test_lowrank_error_within_projection_bound(spec, tensors):
    decoded, _, _ = roundtrip(spec, tensors)
    for key, t in tensors.items():
        err = torch.linalg.vector_norm(decoded[key].double() - t.double())
        if t.ndim == 2 and t.numel() > 0:
            assert err <= torch.linalg.vector_norm(t.double()) * (1 + 1e-3)
        else:  # 1-D, scalar and empty tensors pass through lowrank
            assert err <= 2.0**-11 * torch.linalg.vector_norm(t.double()) + 1e-12


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_gives_identical_bytes(spec, tensors):
    _, first, state1 = roundtrip(spec, tensors, seed=3)
    _, second, state2 = roundtrip(spec, tensors, seed=3)
    assert first.meta == second.meta and list(first.arrays) == list(second.arrays)
    for key in first.arrays:
        assert first.arrays[key].tobytes() == second.arrays[key].tobytes()
    assert {k: v.tobytes() for k, v in state1.items()} == {
        k: v.tobytes() for k, v in state2.items()
    }


@pytest.mark.parametrize("spec", STOCHASTIC)
def test_stochastic_codecs_depend_on_the_seed(spec, tensors):
    _, first, _ = roundtrip(spec, tensors, seed=3)
    _, second, _ = roundtrip(spec, tensors, seed=4)
    assert any(first.arrays[k].tobytes() != second.arrays[k].tobytes() for k in first.arrays)


@pytest.mark.parametrize("spec", DETERMINISTIC)
def test_deterministic_codecs_ignore_the_seed(spec, tensors):
    _, first, _ = roundtrip(spec, tensors, seed=3)
    _, second, _ = roundtrip(spec, tensors, seed=4)
    assert all(first.arrays[k].tobytes() == second.arrays[k].tobytes() for k in first.arrays)


@pytest.mark.parametrize("spec", SPECS)
def test_encode_does_not_mutate_its_input(spec, tensors):
    payload = to_payload(tensors)
    before = {k: v.copy() for k, v in payload.arrays.items()}
    state = {"ef/layer.0.lora_a": np.zeros((8, 48))}
    build_codec(spec).encode(payload, state, CodecContext(seed=1))
    assert list(payload.arrays) == list(before) and payload.meta == {}
    assert all(np.array_equal(payload.arrays[k], v) for k, v in before.items())
    assert all(not v.any() for v in state.values())


@pytest.mark.parametrize("spec", SPECS)
def test_name_is_the_canonical_spec(spec):
    assert build_codec(spec).name == spec
    assert build_codec(build_codec(spec).name).name == spec


@pytest.mark.parametrize(
    ("spec", "canonical"), [("int8:256", "int8"), ("zstd:3", "zstd"), ("int4:256", "int4")]
)
def test_default_parameters_are_dropped_from_the_name(spec, canonical):
    assert build_codec(spec).name == canonical


def test_chain_name_of_the_headline_stack():
    assert build_codec("topk:0.05+int8+zstd").name == "topk:0.05+int8+zstd"


def test_unknown_stage_names_the_stage_and_lists_available():
    with pytest.raises(ConfigError, match="'int3'") as info:
        build_codec("topk:0.05+int3")
    listing = ", ".join(available_codecs())
    assert f"available: {listing}" in str(info.value)
    for name in ("bf16", "fp16", "int4", "int8", "lowrank", "topk", "zstd"):
        assert name in listing


@pytest.mark.parametrize(
    ("spec", "stage"),
    [
        ("int8:0", "int8"),
        ("int8:x", "int8"),
        ("int4:-4", "int4"),
        ("topk", "topk"),
        ("topk:0", "topk"),
        ("topk:1.5", "topk"),
        ("topk:0.0", "topk"),
        ("topk:abc", "topk"),
        ("lowrank", "lowrank"),
        ("lowrank:0", "lowrank"),
        ("zstd:0", "zstd"),
        ("zstd:99", "zstd"),
        ("fp16:1", "fp16"),
        ("bf16:rne", "bf16"),
    ],
)
def test_bad_parameter_names_the_stage(spec, stage):
    with pytest.raises(ConfigError, match=f"'{stage}"):
        build_codec(spec)


def test_chain_state_is_namespaced_per_stage(tensors):
    _, _, state = roundtrip("identity+lowrank:2+topk:0.05+zstd", tensors)
    assert state and all(k.startswith(("1/", "ef/")) for k in state)
    assert any(k.startswith("1/") for k in state)  # lowrank's warm starts
    assert any(k.startswith("ef/") for k in state)  # the chain's residuals


def test_decoding_with_the_wrong_chain_is_detected(tensors):
    encoded, _ = build_codec("int8").encode(to_payload(tensors), {}, CodecContext())
    with pytest.raises(CodecError, match="did not fully decode"):
        from_payload(build_codec("fp16").decode(encoded, CodecContext()))
    with pytest.raises(CodecError, match="has 2 float32 scales, expected 6"):
        build_codec("int8:64").decode(encoded, CodecContext())  # 384 values: 2 or 6 blocks


def test_missing_companion_array_is_reported(tensors):
    encoded, _ = build_codec("topk:0.05").encode(to_payload(tensors), {}, CodecContext())
    arrays = {k: v for k, v in encoded.arrays.items() if k != "head.weight::val"}
    with pytest.raises(CodecError, match="'head.weight::val'"):
        build_codec("topk:0.05").decode(Payload(arrays, encoded.meta), CodecContext())
