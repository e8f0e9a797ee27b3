"""PowerSGD low-rank codec: exactness on low rank, projection, warm start, EF, sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.codecs import CodecContext, build_codec, from_payload, to_payload


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rank_q(m: int, n: int, q: int, seed: int) -> torch.Tensor:
    g = _g(seed)
    return torch.randn(m, q, generator=g) @ torch.randn(q, n, generator=g)  # (m, n)


def _roundtrip(spec, tensors, state=None, seed=0):
    codec = build_codec(spec)
    ctx = CodecContext(seed=seed)
    encoded, state = codec.encode(to_payload(tensors), state or {}, ctx)
    return from_payload(codec.decode(encoded, ctx)), encoded, state


def test_rank_q_matrix_is_recovered():
    m = _rank_q(96, 40, 3, 0)
    out, _, _ = _roundtrip("lowrank:3", {"m": m})
    torch.testing.assert_close(out["m"], m, rtol=0, atol=1e-5 * float(m.abs().max()))


def test_decoded_is_an_orthogonal_projection():
    m = torch.randn(64, 32, generator=_g(1), dtype=torch.float64).float()
    out, encoded, _ = _roundtrip("lowrank:4", {"m": m})
    p = encoded.arrays["m::P"].astype(np.float64)  # (64, 4)
    np.testing.assert_allclose(p.T @ p, np.eye(4), atol=1e-6)
    residual = m.double().numpy() - out["m"].double().numpy()
    np.testing.assert_allclose(p.T @ residual, 0.0, atol=1e-5)  # residual ⟂ span(P)


def test_warm_start_converges_to_best_rank_q():
    g = _g(2)
    u, _ = torch.linalg.qr(torch.randn(80, 20, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(30, 20, generator=g, dtype=torch.float64))
    sigma = 0.5 ** torch.arange(20, dtype=torch.float64)
    m = (u * sigma) @ v.T  # (80, 30), known spectrum
    optimal = float(torch.linalg.vector_norm(sigma[2:]))
    state: dict = {}
    for _ in range(15):  # residual dropped, warm start kept: a subspace iteration
        out, _, state = _roundtrip("lowrank:2", {"m": m.float()}, state)
        state = {k: v for k, v in state.items() if k.endswith("::Q")}
    err = float(torch.linalg.vector_norm(out["m"].double() - m))
    assert err <= optimal * 1.01 + 1e-6


def test_error_feedback_telescopes():
    state: dict = {}
    sent = np.zeros((40, 24))
    total = np.zeros((40, 24))
    for t in range(20):
        u = torch.randn(40, 24, generator=_g(10 + t))
        out, _, state = _roundtrip("lowrank:2", {"w": u}, state, seed=t)
        sent += out["w"].double().numpy()
        total += u.double().numpy()
    np.testing.assert_allclose(sent + state["ef/w"], total, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("shape", "compressed"), [((384, 8), True), ((4, 3), False), ((3,), False)]
)
def test_only_smaller_factor_forms_are_sent(shape, compressed):
    t = torch.randn(*shape, generator=_g(3))
    out, encoded, state = _roundtrip("lowrank:2", {"w": t})
    if compressed:
        assert encoded.nbytes() == 4 * 2 * (shape[0] + shape[1])
        assert set(state) == {"ef/w", "0/w::Q"}  # chain residual, stage warm start
    else:
        assert list(encoded.arrays) == ["w"] and state == {}  # a zero residual is not kept
        assert torch.equal(out["w"], t)


def test_zero_matrix_does_not_stall_the_warm_start():
    state: dict = {}
    _, _, state = _roundtrip("lowrank:2", {"w": torch.zeros(30, 20)}, state)
    m = _rank_q(30, 20, 2, 4)
    out, _, _ = _roundtrip("lowrank:2", {"w": m}, {k: v for k, v in state.items() if "::Q" in k})
    torch.testing.assert_close(out["w"], m, rtol=0, atol=1e-4)
