"""FedSA-LoRA (ALGORITHMS.md §3): A shared, B local and persistent, no B on the wire."""

from __future__ import annotations

import torch

from fedpeft import WeightedMean, get_strategy
from fedpeft.flower import records as rec
from strategies import fedsa_lora
from strategies.fedsa_lora import FedSaLoraConfig
from tests.strategies import _factories as fx

B_KEYS = {f"{m}.lora_B.weight" for m in fx.SHAPES}
A_KEYS = {f"{m}.lora_A.weight" for m in fx.SHAPES}


def _fed(**options):
    return fedsa_lora.build(FedSaLoraConfig(**options), fx.env())


def _init(rank):
    return fx.adapter(321, rank=rank, zero_b=True)


def _through_flower_state(state):
    """What Context.state does with the client state between two rounds."""
    return rec.record_to_tensors(rec.tensors_to_record(state))


def test_uploads_and_payloads_have_no_b_and_a_is_the_weighted_mean():
    fed = _fed()
    glob = fx.adapter(99, zero_b=True)
    plans = [fx.plan(i) for i in range(3)]
    payload = fed.aggregator.client_payload({}, glob, plans[0])
    assert not (B_KEYS & set(payload)) and A_KEYS <= set(payload)
    out, ups, _ = fx.run_round(fed, {}, glob, {}, plans, 1, _init)
    assert all(not (B_KEYS & set(u.tensors)) for u in ups)
    mean = WeightedMean().aggregate({}, glob, ups, 1).tensors
    for k in A_KEYS | {fx.HEAD}:
        assert torch.equal(out.tensors[k], mean[k])
    for k in B_KEYS:  # without report-b the served B stays the initial one
        assert torch.equal(out.tensors[k], glob[k])


def test_b_persists_across_two_rounds_through_the_flower_state():
    fed = _fed()
    glob = fx.adapter(99, zero_b=True)
    p = fx.plan(0)
    init = _init(4)
    start, trainable = fed.client.start(glob, init, {}, p)
    assert trainable == frozenset(init)
    assert all(torch.equal(start[k], init[k]) for k in B_KEYS)  # zero B at first
    trained = fx.perturb(start, trainable, seed=1)
    upload, state = fed.client.finish(trained, glob, {}, p)
    assert set(state) == B_KEYS
    state = _through_flower_state(state)
    out = fed.aggregator.aggregate({}, glob, [fx.update(upload, 5)], 1)
    received = fed.aggregator.client_payload(out.state, out.tensors, p)
    start2, _ = fed.client.start(received, init, state, p)
    for k in B_KEYS:
        assert torch.equal(start2[k], trained[k])  # its own B, not the server's
    for k in A_KEYS:
        assert torch.equal(start2[k], trained[k])  # one client: Ā is its A


def test_report_b_defines_a_reporting_global_from_the_latest_b():
    fed = _fed(report_b=True)
    glob = fx.adapter(99, zero_b=True)
    t = [fx.adapter(i) for i in range(3)]
    out1 = fed.aggregator.aggregate({}, glob, [fx.update(t[0], 2, 0), fx.update(t[1], 6, 1)], 1)
    out2 = fed.aggregator.aggregate(out1.state, out1.tensors, [fx.update(t[2], 4, 2)], 2)
    for k in B_KEYS:  # clients 0 and 1 still count with their latest B
        expect = (2 * t[0][k] + 6 * t[1][k] + 4 * t[2][k]) / 12
        assert torch.allclose(out2.tensors[k], expect, atol=1e-12)
    restored = fx.save_load(out2.state)
    again = fed.aggregator.aggregate(restored, out1.tensors, [fx.update(t[2], 4, 2)], 2)
    assert fx.allclose(again.tensors, out2.tensors, atol=0)
    upload, _ = fed.client.finish(t[0], {}, {}, fx.plan(0))
    assert B_KEYS <= set(upload)


def test_local_extras_keep_the_head_on_the_client():
    fed = _fed(local_extras=True)
    glob = fx.adapter(99, zero_b=True)
    assert fx.HEAD not in fed.aggregator.client_payload({}, glob, fx.plan(0))
    trained = fx.adapter(5)
    upload, state = fed.client.finish(trained, {}, {}, fx.plan(0))
    assert fx.HEAD in state and fx.HEAD not in upload
    out = fed.aggregator.aggregate({}, glob, [fx.update(upload, 3)], 1)
    assert torch.equal(out.tensors[fx.HEAD], glob[fx.HEAD])


def test_registration():
    fed = get_strategy("fedsa-lora").build(FedSaLoraConfig(), fx.env())
    assert not fed.needs_individual_updates and not fed.mixed_ranks


def test_client_evaluation_is_personalised_with_each_clients_own_b(tiny_config):
    """``eval.client``: each client evaluates the shared A with its own B on its own
    held-out share (``client_accuracy`` beside the global ``accuracy``)."""
    from fedpeft.client.round import evaluate_client
    from fedpeft.config import parse_run_config
    from fedpeft.flower.inprocess import run_in_process
    from fedpeft.tasks import get_task

    flat = {**tiny_config, "strategy.name": "fedsa-lora", "eval.client": True}
    results = run_in_process(flat)
    last = results.rounds[-1]
    assert 0.0 <= last["client_accuracy"] <= 1.0 and last["accuracy"] is not None
    cfg = parse_run_config(flat)
    glob = get_task(cfg).model(8).initial
    b_keys = [k for k in glob if "lora_B" in k]
    own = {k: glob[k] + 0.5 for k in b_keys}  # a client's trained B
    shared = {k: v for k, v in glob.items() if k not in b_keys}
    plan = fx.plan(0, rank=8)
    with_b = evaluate_client(cfg, plan, (0, 3), shared, own)
    without = evaluate_client(cfg, plan, (0, 3), shared, {})
    assert with_b["loss"] != without["loss"]  # the client's B is what it is evaluated with
