"""FedEx-LoRA (ALGORITHMS.md §7, tests 1–6) and its base-delta client."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpeft import IncompatibleUpdateError, StrategyEnv, get_strategy
from fedpeft.aggregation.layers import EqualWeights
from fedpeft.lora import AdapterLayout
from fedpeft.lora.peft_io import base_delta_key
from strategies import fedex_lora
from strategies.fedex_lora import FedExLoraConfig
from tests.strategies import _factories as fx


def _fed(layout_env=None, **options):
    return fedex_lora.build(FedExLoraConfig(**options), layout_env or fx.env())


def _round(tensors, counts, glob=None, fed=None):
    fed = fed or _fed()
    glob = glob if glob is not None else fx.adapter(99)
    updates = [fx.update(t, c, i) for i, (t, c) in enumerate(zip(tensors, counts, strict=True))]
    return fed.aggregator.aggregate({}, glob, updates, 1), updates


def _effective(tensors, module, layout=fx.LAYOUT):
    """``D + s·B̄Ā`` of one module: the global model's total change of W0."""
    f = fx.factors(tensors, layout)[module]
    delta = tensors.get(base_delta_key(module))
    return f.delta() + (delta if delta is not None else 0.0)


# 1, 6 ------------------------------------------------------------------------------------
def test_every_layer_forward_equals_the_mean_of_products_non_square():
    tensors = [fx.adapter(i) for i in range(4)]
    counts = [3, 9, 4, 7]
    out, _ = _round(tensors, counts)
    w = fx.weights_of(counts)
    gen = torch.Generator().manual_seed(0)
    for module, (m, n) in fx.SHAPES.items():
        delta = out.tensors[base_delta_key(module)]
        assert delta.shape == (m, n)  # (d_out, d_in): nn.Linear layout, m != n
        w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
        layer = torch.nn.Linear(n, m, bias=False).double()
        f = fx.factors(out.tensors)[module]
        with torch.no_grad():
            layer.weight.copy_(w0 + delta)
        x = torch.randn(6, n, generator=gen, dtype=torch.float64)
        y = layer(x) + f.scaling * (x @ f.a.T @ f.b.T)  # a LoRA layer on the new base
        ideal = x @ (w0 + fx.ideal(tensors, w, module)).T
        assert (y - ideal).abs().max() < 1e-10


def test_two_rounds_keep_the_cumulative_identity():
    fed = _fed()
    glob = fx.adapter(99)
    r1 = [fx.adapter(i) for i in range(3)]
    out1, _ = _round(r1, [1, 2, 3], glob, fed)
    r2 = [fx.adapter(10 + i) for i in range(3)]
    out2, _ = _round(r2, [5, 1, 1], out1.tensors, fed)
    for module in fx.SHAPES:
        before = out1.tensors[base_delta_key(module)]
        expect = (
            before
            + fx.ideal(r2, fx.weights_of([5, 1, 1]), module)
            - fx.factors(out2.tensors)[module].delta()
        )
        assert torch.allclose(out2.tensors[base_delta_key(module)], expect, atol=1e-10)
        assert torch.allclose(
            _effective(out2.tensors, module),
            before + fx.ideal(r2, fx.weights_of([5, 1, 1]), module),
            atol=1e-10,
        )


# 2 ---------------------------------------------------------------------------------------
def test_one_client_has_exactly_zero_residual():
    t = fx.adapter(1)
    out, _ = _round([t], [5])
    for module in fx.SHAPES:
        assert torch.equal(
            out.tensors[base_delta_key(module)], torch.zeros(fx.SHAPES[module], dtype=torch.float64)
        )
    assert all(torch.equal(out.tensors[k], t[k]) for k in t)
    assert out.metrics["fedex_lora/residual_norm"] == 0.0


# 3 ---------------------------------------------------------------------------------------
def test_scalar_counterexample_gives_residual_one():
    shapes = {"s": (1, 1)}
    one = {
        "s.lora_A.weight": torch.ones(1, 1, dtype=torch.float64),
        "s.lora_B.weight": torch.ones(1, 1, dtype=torch.float64),
    }
    minus = {k: -v for k, v in one.items()}
    fed = fedex_lora.build(FedExLoraConfig(), fx.env(rank=1))
    glob = fx.adapter(0, rank=1, shapes=shapes, head=False)
    out = fed.aggregator.aggregate({}, glob, [fx.update(one, 5, 0), fx.update(minus, 5, 1)], 1)
    s = fx.LAYOUT.scaling(1)
    assert float(out.tensors["s.base_layer.delta"]) == pytest.approx(s * 1.0)  # s·R, R = 1
    assert float(out.tensors["s.lora_A.weight"]) == 0.0


# 4 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("clients", [2, 3])
def test_residual_rank_is_at_most_n_minus_one_times_r(clients):
    shapes = {"big": (30, 20)}
    tensors = [fx.adapter(i, rank=2, shapes=shapes) for i in range(clients)]
    fed = fedex_lora.build(FedExLoraConfig(), fx.env(rank=2))
    glob = fx.adapter(99, rank=2, shapes=shapes)
    out = fed.aggregator.aggregate(
        {}, glob, [fx.update(t, 3 + i, i) for i, t in enumerate(tensors)], 1
    )
    rank = int(torch.linalg.matrix_rank(out.tensors["big.base_layer.delta"]))
    assert rank == (clients - 1) * 2


# 5 ---------------------------------------------------------------------------------------
def test_rslora_scaling_variant():
    env = StrategyEnv(seed=0, num_rounds=1, clients_per_round=2, rank=4, lora_alpha=8.0, use_rslora=True)
    layout = AdapterLayout(lora_alpha=8.0, use_rslora=True)
    tensors = [fx.adapter(i) for i in range(3)]
    fed = fedex_lora.build(FedExLoraConfig(), env)
    out = fed.aggregator.aggregate(
        {}, fx.adapter(9), [fx.update(t, 2, i) for i, t in enumerate(tensors)], 1
    )
    for module in fx.SHAPES:
        ideal = sum(fx.factors(t, layout)[module].delta() / 3 for t in tensors)
        assert torch.allclose(_effective(out.tensors, module, layout), ideal, atol=1e-10)


def test_equal_weights_use_plain_means():
    tensors = [fx.adapter(i) for i in range(3)]
    fed = _fed()
    fed = dataclasses.replace(fed, aggregator=EqualWeights(fed.aggregator))  # aggregation.weighting
    out, _ = _round(tensors, [1, 50, 2], fed=fed)
    for module in fx.SHAPES:
        assert torch.allclose(
            _effective(out.tensors, module), fx.ideal(tensors, [1 / 3] * 3, module), atol=1e-10
        )
    assert torch.allclose(out.tensors[fx.HEAD], sum(t[fx.HEAD] for t in tensors) / 3)


def test_base_delta_accumulates_in_float32_for_half_uploads():
    tensors = [{k: v.to(torch.bfloat16) for k, v in fx.adapter(i).items()} for i in range(2)]
    glob = {k: v.to(torch.bfloat16) for k, v in fx.adapter(9).items()}
    out, _ = _round(tensors, [1, 1], glob)
    assert out.tensors[base_delta_key("enc.1.q")].dtype == torch.float32
    assert out.tensors["enc.1.q.lora_A.weight"].dtype == torch.bfloat16


def test_mixed_ranks_are_refused():
    with pytest.raises(IncompatibleUpdateError, match="needs one rank"):
        _round([fx.adapter(0, rank=2), fx.adapter(1)], [1, 1])


def test_client_loads_base_deltas_and_never_uploads_them():
    fed = _fed()
    out, _ = _round([fx.adapter(i) for i in range(2)], [1, 1])
    payload = fed.aggregator.client_payload({}, out.tensors, fx.plan(0))
    assert set(payload) == set(out.tensors)  # adapter, head and dense base deltas
    init = fx.adapter(50)
    start, trainable = fed.client.start(payload, init, {}, fx.plan(0))
    assert trainable == frozenset(init)
    assert torch.equal(start[base_delta_key("enc.0.q")], out.tensors[base_delta_key("enc.0.q")])
    upload, state = fed.client.finish(init, payload, {}, fx.plan(0))
    assert set(upload) == set(init) and state == {}


def test_registration_flags():
    fed = get_strategy("fedex-lora").build(FedExLoraConfig(), fx.env())
    assert fed.needs_individual_updates and not fed.mixed_ranks
