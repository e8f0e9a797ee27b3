"""FLoRA (ALGORITHMS.md §4): exact stacking, merge into the base, fresh LoRA per round."""

from __future__ import annotations

import torch

from fedpeft import get_strategy
from fedpeft.lora.peft_io import base_delta_key, is_base_delta_key, is_lora_key
from strategies import flora
from strategies.flora import FloraConfig
from tests.strategies import _factories as fx

RANKS = [1, 4, 2]


def _fed(**options):
    return flora.build(FloraConfig(**options), fx.env(rank=4, ranks=(1, 4, 2)))


def _hetero_round():
    tensors = [fx.adapter(i, rank=r) for i, r in enumerate(RANKS)]
    counts = [3, 5, 8]
    updates = [fx.update(t, c, i) for i, (t, c) in enumerate(zip(tensors, counts, strict=True))]
    out = _fed().aggregator.aggregate({}, fx.adapter(99), updates, 1)
    return tensors, fx.weights_of(counts), out


def test_stack_is_exact_for_heterogeneous_ranks_with_folded_scales():
    tensors, w, out = _hetero_round()
    for module in fx.SHAPES:
        ideal = fx.ideal(tensors, w, module)  # Σ p_k (α/r_k) B_k A_k
        assert (out.tensors[base_delta_key(module)] - ideal).abs().max() < 1e-12
    assert out.metrics["flora/stack_rank"] == sum(RANKS)


def test_merged_model_output_equals_w0_plus_mean_product():
    tensors, w, out = _hetero_round()
    gen = torch.Generator().manual_seed(1)
    for module, (m, n) in fx.SHAPES.items():
        w0 = torch.randn(m, n, generator=gen, dtype=torch.float64)
        f = fx.factors(out.tensors)[module]
        assert torch.equal(f.b, torch.zeros_like(f.b))  # the served LoRA adds nothing
        layer = torch.nn.Linear(n, m, bias=False).double()
        with torch.no_grad():
            layer.weight.copy_(w0 + out.tensors[base_delta_key(module)])
        x = torch.randn(4, n, generator=gen, dtype=torch.float64)
        y = layer(x) + f.scaling * (x @ f.a.T @ f.b.T)
        assert (y - x @ (w0 + fx.ideal(tensors, w, module)).T).abs().max() < 1e-10


def test_single_client_round_equals_the_local_result():
    t = fx.adapter(3)
    out = _fed().aggregator.aggregate({}, fx.adapter(99), [fx.update(t, 4)], 1)
    for module in fx.SHAPES:
        local = fx.factors(t)[module].delta()
        assert torch.allclose(out.tensors[base_delta_key(module)], local, atol=1e-12)
    assert torch.equal(out.tensors[fx.HEAD], t[fx.HEAD])


def test_clients_restart_from_a_fresh_lora_on_the_merged_base():
    fed = _fed()
    _, _, out = _hetero_round()
    payload = fed.aggregator.client_payload({}, out.tensors, fx.plan(0, rank=2))
    assert not any(is_lora_key(k) for k in payload)
    assert {k for k in payload if is_base_delta_key(k)} == {base_delta_key(m) for m in fx.SHAPES}
    init = fx.adapter(7, rank=2, zero_b=True)
    start, trainable = fed.client.start(payload, init, {}, fx.plan(0, rank=2))
    for k, v in init.items():
        if is_lora_key(k):
            assert torch.equal(start[k], v)  # random A, zero B: init
    assert torch.equal(start[fx.HEAD], out.tensors[fx.HEAD])
    assert torch.equal(start[base_delta_key("enc.1.q")], out.tensors[base_delta_key("enc.1.q")])
    assert trainable == frozenset(init)
    upload, state = fed.client.finish({**start}, payload, {}, fx.plan(0, rank=2))
    assert set(upload) == set(init) and state == {}


def test_two_simulated_rounds_accumulate_the_merges():
    fed = _fed()
    glob = fx.adapter(99, zero_b=True)
    plans = [fx.plan(i, rank=r) for i, r in enumerate(RANKS)]

    def init(rank):
        return fx.adapter(500 + rank, rank=rank, zero_b=True)

    state = fed.aggregator.initialize(glob)
    out1, up1, cs = fx.run_round(fed, state, glob, {}, plans, 1, init)
    out2, up2, _ = fx.run_round(fed, out1.state, out1.tensors, cs, plans, 2, init)
    for module in fx.SHAPES:
        total = sum(
            fx.ideal([u.tensors for u in ups], fx.weights_of([u.num_examples for u in ups]), module)
            for ups in (up1, up2)
        )
        assert torch.allclose(out2.tensors[base_delta_key(module)], total, atol=1e-12)


def test_registration_flags():
    fed = get_strategy("flora").build(FloraConfig(), fx.env())
    assert fed.needs_individual_updates and fed.mixed_ranks
