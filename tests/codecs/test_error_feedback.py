"""Error feedback over the whole lossy chain: Σ decoded + residual == Σ inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.codecs import Chain, CodecContext, Payload, build_codec, from_payload, to_payload
from fedpeft.codecs.base import FEEDBACK

SHAPES = {"a": (8, 48), "b": (48, 8), "w": (64, 32), "bias": (3,), "scalar": (), "empty": (0, 4)}
STEPS = 6
TOL = 1e-5  # relative to max |Σ u|

# The three chains of the issue, lowrank's ranks and block sizes, and single lossy stages.
HEADLINE = ["topk:0.05+int8", "topk:0.05+int4+zstd", "lowrank:2+int8"]
LOSSY = HEADLINE + [
    "lowrank:1+int8",
    "lowrank:4+int8:64",
    "lowrank:3+fp16+zstd",
    "lowrank:2",
    "topk:0.05",
    "topk:100+int4:64+zstd",
    "int8",
    "int4",
    "fp16",
    "bf16+zstd",
]
LOSSLESS = ["identity", "zstd", "topk:1.0", "identity+zstd:1"]


def _inputs(t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    return {k: torch.randn(s, generator=g) * (1 + t) for k, s in SHAPES.items()}


def _residual(state: dict, key: str) -> np.ndarray:
    return state.get(FEEDBACK + key, np.zeros(SHAPES[key]))  # absent means zero


def _run(encode, decode, steps: int = STEPS):
    """Send ``steps`` rounds; returns Σ decoded, Σ inputs (float64) and the final state."""
    sent = {k: np.zeros(s) for k, s in SHAPES.items()}
    total = {k: np.zeros(s) for k, s in SHAPES.items()}
    state: dict = {}
    for t in range(steps):
        ctx = CodecContext(seed=t)
        u = _inputs(t)
        encoded, state = encode(to_payload(u), state, ctx)
        out = from_payload(decode(encoded, ctx))
        for k in SHAPES:
            sent[k] += out[k].double().numpy()
            total[k] += u[k].double().numpy()
    return sent, total, state


def _conservation_error(sent, total, state) -> float:
    """max |Σ decoded + e_T − Σ u| relative to max |Σ u|."""
    err = [np.abs(sent[k] + _residual(state, k) - total[k]).max(initial=0) for k in SHAPES]
    return float(max(err)) / max(float(np.abs(total[k]).max(initial=0)) for k in SHAPES)


def _stage_only_feedback(spec: str) -> tuple:
    """The former behaviour: only the first stage's error is fed back; later stages
    (the quantizer) re-encode its output without feedback."""
    head, *rest = build_codec(spec).stages
    first, after = Chain((head,)), Chain(tuple(rest), error_feedback=False)

    def encode(payload, state, ctx):
        encoded, state = first.encode(payload, state, ctx)
        return after.encode(encoded, {}, ctx)[0], state

    def decode(payload, ctx):
        return first.decode(after.decode(payload, ctx), ctx)

    return encode, decode


@pytest.mark.parametrize("spec", LOSSY)
def test_decoded_plus_residual_equals_inputs(spec):
    codec = build_codec(spec)
    assert codec.feeds_back
    sent, total, state = _run(codec.encode, codec.decode)
    assert _conservation_error(sent, total, state) <= TOL
    assert all(v.dtype == np.float64 and type(v) is np.ndarray for v in state.values())
    assert any(k.startswith(FEEDBACK) for k in state)


@pytest.mark.parametrize("spec", HEADLINE)
def test_feeding_back_only_the_first_stage_loses_the_quantizer_error(spec):
    encode, decode = _stage_only_feedback(spec)
    sent, total, state = _run(encode, decode)
    assert _conservation_error(sent, total, state) > 100 * TOL


@pytest.mark.parametrize("spec", ["topk:0.05+int8", "lowrank:2+int4+zstd", "int8"])
def test_residual_is_against_what_the_receiver_decodes(spec):
    sender, receiver = build_codec(spec), build_codec(spec)
    state: dict = {}
    for t in range(3):
        u = _inputs(t)
        previous = {k: _residual(state, k) for k in SHAPES}
        encoded, state = sender.encode(to_payload(u), state, CodecContext(seed=t))
        wire = Payload({k: v.copy() for k, v in encoded.arrays.items()}, dict(encoded.meta))
        out = from_payload(receiver.decode(wire, CodecContext(seed=t)))
        for k in SHAPES:
            v = u[k].double().numpy() + previous[k]
            assert np.array_equal(v - out[k].double().numpy(), _residual(state, k)), (t, k)


@pytest.mark.parametrize("spec", LOSSY)
def test_wire_format_is_that_of_the_stages(spec):
    u = to_payload(_inputs(0))
    with_ef, state = build_codec(spec).encode(u, {}, CodecContext(seed=3))
    plain, _ = Chain(build_codec(spec).stages, error_feedback=False).encode(
        u, {}, CodecContext(seed=3)
    )
    assert with_ef.meta == plain.meta and list(with_ef.arrays) == list(plain.arrays)
    assert all(with_ef.arrays[k].tobytes() == plain.arrays[k].tobytes() for k in plain.arrays)
    assert state  # the first round already leaves a residual


@pytest.mark.parametrize("spec", LOSSLESS)
def test_lossless_chains_keep_no_state(spec):
    codec = build_codec(spec)
    assert not codec.feeds_back
    sent, total, state = _run(codec.encode, codec.decode)
    assert state == {}
    assert all(np.array_equal(sent[k], total[k]) for k in SHAPES)


@pytest.mark.parametrize("spec", ["ferret:16", "ferret:16+zstd"])
def test_ferret_is_not_fed_back(spec):
    codec = build_codec(spec)
    assert not codec.lossless and not codec.feeds_back
    _, _, state = _run(codec.encode, codec.decode, steps=2)
    assert state == {}


def test_feedback_can_be_turned_off():
    codec = Chain(build_codec("lowrank:2+int8").stages, error_feedback=False)
    assert not codec.feeds_back
    _, _, state = _run(codec.encode, codec.decode, steps=2)
    assert state and all(k.startswith("0/") and k.endswith("::Q") for k in state)


def test_quantizer_error_is_sent_in_a_later_round():
    codec = build_codec("int4")
    u = {"w": torch.full((256,), 0.5)}  # int4 cannot hit 0.5 exactly: scale 0.5/7
    u["w"][0] = 3.5
    sent = np.zeros(256)
    state: dict = {}
    for t in range(40):
        encoded, state = codec.encode(to_payload(u), state, CodecContext(seed=t))
        sent += from_payload(codec.decode(encoded, CodecContext(seed=t)))["w"].double().numpy()
    # the average of what was sent drifts from u by at most |e_T| / T
    np.testing.assert_allclose(sent / 40, u["w"].double().numpy(), rtol=0, atol=0.5 / 7 / 40 * 2)


def test_non_finite_entries_are_passed_on_but_not_carried():
    codec = build_codec("fp16")
    x = torch.tensor([float("nan"), 1.0001, float("inf")])
    encoded, state = codec.encode(to_payload({"x": x}), {}, CodecContext())
    out = from_payload(codec.decode(encoded, CodecContext()))["x"]
    assert out[0].isnan() and out[2].isinf()
    assert np.isfinite(state["ef/x"]).all() and state["ef/x"][1] != 0
    assert state["ef/x"][0] == 0 and state["ef/x"][2] == 0
