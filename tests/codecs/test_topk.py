"""Top-k sparsification: selection, index coding, sizes and error-feedback telescoping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedpeft.codecs import CodecContext, Payload, build_codec, from_payload, to_payload
from fedpeft.codecs.topk import decode_indices, encode_indices
from fedpeft.errors import CodecError


def _u(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_keeps_exactly_the_largest_entries():
    x = _u((48, 8), 0)
    codec = build_codec("topk:10")
    encoded, _ = codec.encode(to_payload({"w": x}), {}, CodecContext())
    out = from_payload(codec.decode(encoded, CodecContext()))["w"]
    kept = out != 0
    assert int(kept.sum()) == 10
    assert torch.equal(out[kept], x[kept])  # exact on kept entries
    assert x.abs()[kept].min() >= x.abs()[~kept].max()


@pytest.mark.parametrize(("spec", "n", "k"), [("topk:0.05", 3072, 154), ("topk:0.5", 3, 2)])
def test_fraction_rounds_to_a_count(spec, n, k):
    encoded, _ = build_codec(spec).encode(Payload({"w": _u((n,), 1).numpy()}), {}, CodecContext())
    assert encoded.arrays["w::val"].size == k


@pytest.mark.parametrize(("n", "k"), [(100, 1), (3072, 154), (65536, 1000), (10**6, 50)])
def test_bytes_values_4k_and_indices_at_most_4k(n, k):
    encoded, _ = build_codec(f"topk:{k}").encode(
        Payload({"w": _u((n,), 2).numpy()}), {}, CodecContext()
    )
    assert encoded.arrays["w::val"].nbytes == 4 * k
    (idx_key,) = [key for key in encoded.arrays if key != "w::val"]
    idx_bytes = encoded.arrays[idx_key].nbytes
    assert idx_bytes <= min(4 * k, max(math.ceil(n / 8), k))


def test_bitmap_chosen_when_dense():
    idx = np.arange(0, 1000, 2)
    suffix, arr = encode_indices(idx, 1000)
    assert suffix == "::bitmap" and arr.nbytes == 125
    assert np.array_equal(decode_indices(suffix, arr, 1000), idx)


@pytest.mark.parametrize(
    ("idx", "dtype"),
    [([0, 5, 255], np.uint8), ([3, 300, 70_000], np.uint32), ([1000, 2000, 60_000], np.uint16)],
)
def test_gaps_use_the_narrowest_dtype(idx, dtype):
    idx = np.array(idx)
    suffix, arr = encode_indices(idx, 10**6)
    assert suffix == "::idx" and arr.dtype == dtype
    assert np.array_equal(decode_indices(suffix, arr, 10**6), idx)


@pytest.mark.parametrize("spec", ["topk:0.05", "topk:3+zstd", "topk:0.3+zstd:1"])
def test_error_feedback_telescopes(spec):
    codec = build_codec(spec)
    shapes = {"a": (8, 48), "b": (48, 8), "bias": (3,)}
    state: dict = {}
    sent = {k: np.zeros(s) for k, s in shapes.items()}
    total = {k: np.zeros(s) for k, s in shapes.items()}
    for t in range(25):
        ctx = CodecContext(seed=t)
        u = {k: _u(s, 100 * t + i) for i, (k, s) in enumerate(shapes.items())}
        encoded, state = codec.encode(to_payload(u), state, ctx)
        out = from_payload(codec.decode(encoded, ctx))
        for k in shapes:
            sent[k] += out[k].double().numpy()
            total[k] += u[k].double().numpy()
    for k in shapes:
        residual = state.get(f"ef/{k}", np.zeros(shapes[k]))  # the chain's; absent = 0
        assert residual.dtype == np.float64
        np.testing.assert_allclose(sent[k] + residual, total[k], rtol=0, atol=1e-12)
    assert not any(key.startswith("0/") for key in state)


def test_residual_eventually_sends_everything():
    u = {"w": torch.full((10,), 1.0)}
    codec = build_codec("topk:2")
    state: dict = {}
    sent = np.zeros(10)
    for _ in range(5):
        encoded, state = codec.encode(to_payload(u), state, CodecContext())
        sent += from_payload(codec.decode(encoded, CodecContext()))["w"].numpy()
    assert (sent > 0).all()  # every coordinate was sent once its residual grew


def test_residuals_of_absent_keys_are_carried_over():
    codec = build_codec("topk:1")
    _, state = codec.encode(to_payload({"a": _u((4,), 0), "b": _u((4,), 1)}), {}, CodecContext())
    _, new_state = codec.encode(to_payload({"a": _u((4,), 2)}), state, CodecContext())
    assert np.array_equal(new_state["ef/b"], state["ef/b"])


def test_residual_shape_change_is_refused():
    codec = build_codec("topk:1")
    _, state = codec.encode(to_payload({"a": _u((4, 2), 0)}), {}, CodecContext())
    with pytest.raises(CodecError, match="'a' has shape \\(4, 2\\).*\\(2, 4\\)"):
        codec.encode(to_payload({"a": _u((2, 4), 0)}), state, CodecContext())
