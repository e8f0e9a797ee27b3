"""FlexLoRA (ALGORITHMS.md §5, tests 1–4): SVD redistribution at each client's rank."""

from __future__ import annotations

import pytest
import torch

from fedpeft import ConfigError, get_strategy
from strategies import flexlora
from strategies.flexlora import FlexLoraConfig
from tests.strategies import _factories as fx

RANKS = [2, 4, 3]
SHAPES = {"wide": (6, 11), "tall": (12, 5)}  # non-square both ways: orientation matters


def _fed(**options):
    return flexlora.build(FlexLoraConfig(**options), fx.env(rank=4, ranks=(2, 4, 3)))


def _round(tensors, counts, fed=None, glob=None):
    fed = fed or _fed()
    glob = glob if glob is not None else fx.adapter(99, shapes=SHAPES)
    updates = [fx.update(t, c, i) for i, (t, c) in enumerate(zip(tensors, counts, strict=True))]
    return fed, fed.aggregator.aggregate({}, glob, updates, 1)


def _client_product(fed, out, rank, module):
    payload = fed.aggregator.client_payload(out.state, out.tensors, fx.plan(0, rank=rank))
    return fx.factors(payload)[module], payload


# 1 ---------------------------------------------------------------------------------------
def test_equal_ranks_and_low_rank_delta_w_give_every_client_delta_w_exactly():
    shared = fx.adapter(0, shapes=SHAPES)
    tensors = []
    for i in range(3):
        t = fx.adapter(10 + i, shapes=SHAPES)
        t.update({k: v for k, v in shared.items() if "lora_A" in k})  # rank(ΔW) ≤ r
        tensors.append(t)
    fed = flexlora.build(FlexLoraConfig(), fx.env(rank=4))
    fed, out = _round(tensors, [1, 2, 3], fed)
    w = fx.weights_of([1, 2, 3])
    for module in SHAPES:
        f, _ = _client_product(fed, out, 4, module)
        assert (f.delta() - fx.ideal(tensors, w, module)).abs().max() < 1e-12


# 2, 4 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", ["b", "a", "sqrt"])
def test_each_client_gets_the_best_approximation_at_its_rank(sigma):
    tensors = [fx.adapter(i, rank=r, shapes=SHAPES) for i, r in enumerate(RANKS)]
    counts = [4, 1, 3]
    fed, out = _round(tensors, counts, _fed(sigma=sigma))
    w = fx.weights_of(counts)
    for module, (m, n) in SHAPES.items():
        target = fx.ideal(tensors, w, module)
        sv = torch.linalg.svdvals(target)
        for r in (1, 2, 3, 4):
            f, payload = _client_product(fed, out, r, module)
            assert payload[f"{module}.lora_A.weight"].shape == (r, n)
            assert payload[f"{module}.lora_B.weight"].shape == (m, r)
            assert f.scaling == fx.LAYOUT.scaling(r)
            err = float((f.delta() - target).norm())
            assert err == pytest.approx(float(sv[r:].pow(2).sum().sqrt()), rel=1e-9)
    assert 0 < out.metrics["flexlora/energy_r2"] < out.metrics["flexlora/energy_r4"] <= 1


# 3 ---------------------------------------------------------------------------------------
def test_one_client_keeps_its_product():
    t = fx.adapter(5, rank=3, shapes=SHAPES)
    fed, out = _round([t], [7])
    for module in SHAPES:
        local = fx.factors(t)[module].delta()
        assert (fx.factors(out.tensors)[module].delta() - local).abs().max() < 1e-12
        f, _ = _client_product(fed, out, 3, module)
        assert (f.delta() - local).abs().max() < 1e-12
    assert torch.equal(out.tensors[fx.HEAD], t[fx.HEAD])


def test_missing_directions_are_completed_with_orthonormal_trainable_rows():
    t = fx.adapter(5, rank=2, shapes=SHAPES)
    fed, out = _round([t], [1])
    for module in SHAPES:
        a = out.tensors[f"{module}.lora_A.weight"]  # rank 4 from a rank-2 product
        assert torch.allclose(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_global_adapter_is_the_rank_r_max_truncation_in_svd_order():
    tensors = [fx.adapter(i, rank=r, shapes=SHAPES) for i, r in enumerate(RANKS)]
    fed, out = _round(tensors, [1, 1, 1])
    for module in SHAPES:
        target = fx.ideal(tensors, [1 / 3] * 3, module)
        sv = torch.linalg.svdvals(target)
        g = fx.factors(out.tensors)[module]
        assert float((g.delta() - target).norm()) == pytest.approx(
            float(sv[4:].pow(2).sum().sqrt())
        )
        col = g.b.norm(dim=0) * g.scaling  # Σ in B, A orthonormal: column norms are σ_j
        assert torch.allclose(col, sv[:4], atol=1e-12)


def test_bad_sigma_is_reported():
    with pytest.raises(ConfigError, match="flexlora.sigma"):
        flexlora.build(FlexLoraConfig(sigma="u"), fx.env())


def test_registration_flags():
    fed = get_strategy("flexlora").build(FlexLoraConfig(), fx.env())
    assert fed.needs_individual_updates and fed.mixed_ranks
