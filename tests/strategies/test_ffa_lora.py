"""FFA-LoRA (ALGORITHMS.md §2): A frozen bitwise, B averaged exactly, no A on the wire."""

from __future__ import annotations

import pytest
import torch

from fedpeft import IncompatibleUpdateError, get_strategy
from strategies import ffa_lora
from strategies.ffa_lora import FfaLoraConfig, a_keys
from tests.strategies import _factories as fx


def _fed():
    return ffa_lora.build(FfaLoraConfig(), fx.env())


def _init(rank):
    return fx.adapter(777, rank=rank, zero_b=True)  # a client's own init: a different A


def _three_rounds():
    fed = _fed()
    glob = fx.adapter(99, zero_b=True)
    plans = [fx.plan(i) for i in range(3)]
    state, tensors, cs = fed.aggregator.initialize(glob), glob, {}
    history = []
    for rnd in (1, 2, 3):
        payloads = {p.partition_id: fed.aggregator.client_payload(state, tensors, p) for p in plans}
        out, ups, cs = fx.run_round(fed, state, tensors, cs, plans, rnd, _init)
        history.append((payloads, ups, out))
        state, tensors = out.state, out.tensors
    return glob, history


def test_a_is_bitwise_unchanged_after_rounds():
    glob, history = _three_rounds()
    for _, _, out in history:
        for k in a_keys(glob):
            assert torch.equal(out.tensors[k], glob[k])


def test_the_mean_of_b_gives_the_exact_mean_product():
    glob, history = _three_rounds()
    _, ups, out = history[-1]
    w = fx.weights_of([u.num_examples for u in ups])
    for module in fx.SHAPES:
        a = glob[f"{module}.lora_A.weight"]
        ideal = sum(
            wk * u.tensors[f"{module}.lora_B.weight"] @ a for wk, u in zip(w, ups, strict=True)
        )
        got = out.tensors[f"{module}.lora_B.weight"] @ a
        assert (got - ideal).abs().max() < 1e-12


def test_payload_has_no_a_after_a_clients_first_round_and_uploads_never_do():
    glob, history = _three_rounds()
    first_payloads = history[0][0]
    assert all(a_keys(glob) <= set(p) for p in first_payloads.values())
    for payloads, _, _ in history[1:]:
        assert all(not (a_keys(glob) & set(p)) for p in payloads.values())
    for _, ups, _ in history:
        assert all(not (a_keys(glob) & set(u.tensors)) for u in ups)
        assert all(fx.HEAD in u.tensors for u in ups)  # the head is trained and averaged
    fed = _fed()
    newcomer = fed.aggregator.client_payload(
        history[-1][2].state, history[-1][2].tensors, fx.plan(9)
    )
    assert a_keys(glob) <= set(newcomer)


def test_client_trains_everything_but_a():
    fed = _fed()
    glob = fx.adapter(99, zero_b=True)
    init = _init(4)
    start, trainable = fed.client.start(glob, init, {}, fx.plan(0))
    assert trainable == frozenset(init) - a_keys(init)
    assert all(torch.equal(start[k], glob[k]) for k in a_keys(glob))
    upload, state = fed.client.finish(start, glob, {}, fx.plan(0))
    assert set(state) == a_keys(init) and not (a_keys(init) & set(upload))


def test_missing_a_is_an_explicit_error():
    fed = _fed()
    glob = fx.adapter(99)
    no_a = {k: v for k, v in glob.items() if k not in a_keys(glob)}
    with pytest.raises(IncompatibleUpdateError, match="neither received nor kept"):
        fed.client.start(no_a, _init(4), {}, fx.plan(0))
    with pytest.raises(IncompatibleUpdateError, match="ffa-lora freezes A"):
        fed.aggregator.aggregate({}, glob, [fx.update(glob)], 1)


def test_registration():
    fed = get_strategy("ffa-lora").build(FfaLoraConfig(), fx.env())
    assert not fed.needs_individual_updates and not fed.mixed_ranks
