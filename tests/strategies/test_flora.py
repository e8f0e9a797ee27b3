"""FLoRA (ALGORITHMS.md §4): exact stacking, merge into the base, a fresh LoRA (new A per
client and round, B = 0) every round."""

from __future__ import annotations

import math

import pytest
import torch

from fedpeft import UniformSelector, get_strategy
from fedpeft.lora.peft_io import base_delta_key, factor_keys, is_base_delta_key, is_lora_key
from fedpeft.types import NodeInfo
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
    for module in fx.SHAPES:
        a_key, b_key = factor_keys(module)
        assert start[a_key].shape == init[a_key].shape and start[a_key].dtype == init[a_key].dtype
        assert not torch.equal(start[a_key], init[a_key])  # a new A, not the run's initial one
        assert torch.equal(start[b_key], torch.zeros_like(init[b_key]))  # B = 0
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


# --------------------------------------------------------------------------- fresh A
NODES = [NodeInfo(node_id=900 + pid, partition_id=pid, properties={}) for pid in range(4)]


def _round_plans(server_round, run_seed=0, rank=4):
    """The plans the framework's default selector makes (plan.seed from the run seed,
    round and partition id)."""
    selector = UniformSelector(clients_per_round=len(NODES), rank=rank, seed=run_seed)
    _, plans = selector.plan(selector.initialize(NODES), server_round, NODES)
    return {p.partition_id: p for p in plans.values()}


def _fresh_a(plan):
    init = fx.adapter(7, rank=plan.rank, zero_b=True)
    start, _ = flora.FreshLora().start({}, init, {}, plan)
    return {m: start[factor_keys(m)[0]] for m in fx.SHAPES}, {
        m: start[factor_keys(m)[1]] for m in fx.SHAPES
    }


def test_fresh_a_differs_across_clients_rounds_and_modules_and_b_is_zero():
    a = {(t, pid): _fresh_a(p)[0] for t in (1, 2) for pid, p in _round_plans(t).items()}
    keys = list(a)
    for i, x in enumerate(keys):
        for y in keys[i + 1 :]:
            for m in fx.SHAPES:  # two clients of a round, or one client in two rounds
                assert not torch.equal(a[x][m], a[y][m]), (x, y, m)
    first = a[(1, 0)]
    assert not torch.equal(first["enc.0.q"], first["enc.0.v"])  # same shape, own draw
    for plan in _round_plans(1).values():
        _, b = _fresh_a(plan)
        assert all(torch.count_nonzero(v) == 0 for v in b.values())


def test_fresh_a_is_reproducible_from_run_seed_round_and_partition():
    # a new selector (server restart / resume) plans the same seeds: the same A
    for t in (1, 3):
        again = _round_plans(t)
        for pid, plan in _round_plans(t).items():
            mine, theirs = _fresh_a(plan)[0], _fresh_a(again[pid])[0]
            assert all(torch.equal(mine[m], theirs[m]) for m in fx.SHAPES)
    other_run, this_run = _round_plans(1, run_seed=1)[0], _round_plans(1)[0]
    assert not torch.equal(_fresh_a(other_run)[0]["enc.1.q"], _fresh_a(this_run)[0]["enc.1.q"])


@pytest.mark.parametrize(("rank", "d_in"), [(64, 512), (8, 9)])
def test_fresh_a_follows_peft_default_init(rank, d_in):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # peft initialises from the global RNG
    base = torch.nn.Sequential()
    base.add_module("lin", torch.nn.Linear(d_in, 3))
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=8, target_modules=["lin"]))
    peft_a = model.base_model.model.lin.lora_A["default"].weight.detach()  # (r, d_in)
    ours = flora.fresh_lora_a((rank, d_in), seed=123)
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5): U(±1/√d_in)
    assert ours.shape == peft_a.shape and ours.dtype == peft_a.dtype == torch.float32
    for a in (peft_a, ours):
        assert a.abs().max().item() <= bound
    if rank * d_in >= 10_000:  # enough entries for moments: var = bound²/3
        for a in (peft_a, ours):
            assert abs(a.var().item() / (bound**2 / 3) - 1) < 0.05
            assert a.abs().max().item() > 0.99 * bound
    assert torch.equal(ours, flora.fresh_lora_a((rank, d_in), seed=123))
