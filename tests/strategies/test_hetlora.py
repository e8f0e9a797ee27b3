"""HetLoRA (ALGORITHMS.md §6): padding, sparsity weights, tail penalty, rank shrinking."""

from __future__ import annotations

import pytest
import torch

from fedpeft import ConfigError, NodeInfo, RoundOutput, get_strategy
from fedpeft.flower import records as rec
from fedpeft.lora import split_adapter
from strategies import hetlora
from strategies.hetlora import (
    RANK_KEY,
    STATE_RANK,
    HetLoraConfig,
    shrunk_rank,
    sparsity_weights,
    tail_norm,
)
from tests.strategies import _factories as fx

A_KEY, B_KEY = "enc.0.q.lora_A.weight", "enc.0.q.lora_B.weight"


def _fed(ranks=(2, 4), **options):
    return hetlora.build(HetLoraConfig(**options), fx.env(rank=4, ranks=ranks))


def test_truncate_of_pad_is_the_identity():
    fed = _fed()
    t = fx.adapter(1, rank=2)
    out = fed.aggregator.aggregate({}, fx.adapter(99), [fx.update(t, 3)], 1)
    assert out.tensors[A_KEY].shape == (4, 5)
    back = fed.aggregator.client_payload({}, out.tensors, fx.plan(0, rank=2))
    assert all(torch.equal(back[k], t[k]) for k in t)


@pytest.mark.parametrize("weighting", ["norm", "blend", "data"])
def test_weights_sum_to_one_and_ignore_clients_without_examples(weighting):
    w = sparsity_weights([0.5, 0.0, 0.5], [2.0, 9.0, 1.0], weighting)
    assert sum(w) == pytest.approx(1.0) and w[1] == 0.0
    assert sparsity_weights([0.5, 0.5], [0.0, 0.0], weighting) == [0.5, 0.5]
    assert sparsity_weights([0.2, 0.8], [1.0, 1.0], "blend") == pytest.approx([0.2, 0.8])
    assert sparsity_weights([0.2, 0.8], [3.0, 1.0], "norm") == pytest.approx([0.75, 0.25])


def test_equal_norms_and_ranks_give_the_plain_average():
    t0 = fx.adapter(1)
    t1 = {k: -v if "lora_A" in k else v + 1.0 for k, v in t0.items()}
    t1.update({k: v for k, v in t0.items() if "lora_B" in k})  # same ‖BA‖ per layer
    out = _fed().aggregator.aggregate(
        {}, fx.adapter(99), [fx.update(t0, 1), fx.update(t1, 9, 1)], 1
    )
    for k in t0:
        if "lora_" in k:
            assert torch.allclose(out.tensors[k], (t0[k] + t1[k]) / 2, atol=1e-12)
    assert torch.allclose(out.tensors[fx.HEAD], 0.1 * t0[fx.HEAD] + 0.9 * t1[fx.HEAD])


def test_aggregate_pads_with_folded_scales_and_norm_weights():
    ts = [fx.adapter(1, rank=2), fx.adapter(2, rank=4)]
    out = _fed().aggregator.aggregate(
        {}, fx.adapter(99), [fx.update(t, 5, i) for i, t in enumerate(ts)], 1
    )
    norms = [sum(float(f.delta().norm()) ** 2 for f in fx.factors(t).values()) ** 0.5 for t in ts]
    w = [n / sum(norms) for n in norms]
    padded_b = torch.nn.functional.pad(ts[0][B_KEY], (0, 2)) * 2.0  # s_2 / s_4 = 2
    assert torch.allclose(out.tensors[B_KEY], w[0] * padded_b + w[1] * ts[1][B_KEY], atol=1e-12)
    assert out.metrics["hetlora/weight_max"] == pytest.approx(max(w))


def test_penalty_is_the_tail_norm_product_and_differentiable_at_zero():
    fed = _fed()
    params = {
        k: v.clone().requires_grad_(True)
        for k, v in fx.adapter(3, rank=4, zero_b=True, head=False).items()
    }
    value = fed.client.penalty(params, fx.plan(0))
    assert float(value.detach()) == 0.0
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    t = fx.adapter(3, rank=10, head=False)
    got = float(fed.client.penalty(t, fx.plan(0, rank=10)))
    expect = 1e-3 * sum(
        float(t[f"{m}.lora_B.weight"][:, 9:].norm() * t[f"{m}.lora_A.weight"][9:].norm())
        for m in fx.SHAPES
    )
    assert got == pytest.approx(expect)


def test_ranks_shrink_monotonically_down_to_r_min_and_payloads_follow():
    fed = _fed(ranks=(8,), r_min=3)
    glob = fx.adapter(99, rank=8)
    nodes = [NodeInfo(node_id=100, partition_id=0)]
    sel_state = fed.selector.initialize(nodes)
    cstate: dict = {}
    state, ranks = fed.aggregator.initialize(glob), []
    for rnd in range(1, 9):
        sel_state, plans = fed.selector.plan(sel_state, rnd, nodes)
        p = plans[100]
        received = fed.aggregator.client_payload(state, glob, p)
        assert received[A_KEY].shape == (p.rank, 5)  # payload size follows r_k
        init = fx.adapter(5, rank=p.rank, zero_b=True)
        start, trainable = fed.client.start(received, init, cstate, p)
        # a shrinking tail: later rounds push the tail towards zero
        trained = {k: v * (0.5**rnd if "lora_B" in k else 1.0) for k, v in start.items()}
        upload, cstate = fed.client.finish(trained, received, cstate, p)
        cstate = rec.record_to_tensors(rec.tensors_to_record(cstate))  # Context.state
        assert upload[A_KEY].shape == (p.rank, 5)  # the planned shape
        new_rank = round(float(upload[RANK_KEY]))
        assert torch.equal(
            upload[A_KEY][new_rank:], torch.zeros(p.rank - new_rank, 5, dtype=torch.float64)
        )
        u = fx.update({k: v for k, v in upload.items()}, 5, 0, rank=p.rank)
        out = fed.aggregator.aggregate(state, glob, [u], rnd)
        sel_state = fed.selector.feedback(sel_state, [u], out)
        state, glob = out.state, out.tensors
        ranks.append(p.rank)
        assert int(cstate[STATE_RANK]) == new_rank
    assert ranks == sorted(ranks, reverse=True) and min(ranks) >= 3
    assert ranks == [8, 8, 7, 6, 5, 4, 3, 3]


def test_client_that_missed_a_shrink_zeroes_the_dropped_ranks():
    fed = _fed()
    init = fx.adapter(5, rank=4)
    start, _ = fed.client.start(
        fx.adapter(6, rank=4), init, {STATE_RANK: torch.tensor(2)}, fx.plan(0)
    )
    assert torch.equal(start[A_KEY][2:], torch.zeros(2, 5, dtype=torch.float64))
    assert torch.equal(start[B_KEY][:, 2:], torch.zeros(7, 2, dtype=torch.float64))


def test_shrink_rule_and_tail_norm():
    assert (
        shrunk_rank(8, 0.9, 2) == 7 and shrunk_rank(2, 0.9, 2) == 2 and shrunk_rank(1, 0.9, 2) == 1
    )
    f = split_adapter(fx.adapter(0, rank=10, head=False))[0]
    assert float(tail_norm(f, 10, 0.5)) == pytest.approx(
        sum(float(x.b[:, 5:].norm() * x.a[5:].norm()) for x in f.values())
    )


def test_selector_caps_ranks_by_the_reports():
    fed = _fed(ranks=(4, 2))
    nodes = [NodeInfo(node_id=100 + i, partition_id=i) for i in range(3)]
    state = fed.selector.initialize(nodes)
    _, plans = fed.selector.plan(state, 1, nodes)
    assert [plans[100 + i].rank for i in range(3)] == [4, 2, 4]
    u = fx.update({**fx.adapter(0, rank=4), RANK_KEY: torch.tensor(3.0)}, 1, 0)
    state = fed.selector.feedback(state, [u], RoundOutput(state={}, tensors={}))
    state = fx.save_load(state)
    _, plans = fed.selector.plan(state, 2, nodes)
    assert [plans[100 + i].rank for i in range(3)] == [3, 2, 4]


def test_bad_options_are_reported_and_flags():
    with pytest.raises(ConfigError, match="hetlora.gamma"):
        hetlora.build(HetLoraConfig(gamma=1.5), fx.env())
    assert len(HetLoraConfig(gamma=0.0, lam=-1.0, r_min=0, weighting="x").problems()) == 4
    fed = get_strategy("hetlora").build(HetLoraConfig(), fx.env())
    assert fed.mixed_ranks and not fed.needs_individual_updates and fed.selector is not None
