"""The round engine runs rounds with no Flower and no model: fake replies in, state and
record out (``fedpeft.server.engine``)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from fedpeft.aggregation import AggregatorBase
from fedpeft.codecs import CodecContext
from fedpeft.codecs.tensors import encode_tensors
from fedpeft.config import parse_run_config
from fedpeft.results import ClientRecord, RoundRecord, parse_round
from fedpeft.server import Reply, RoundEngine, RoundFailed, ServerState, build_strategy
from fedpeft.types import NodeInfo
from tests.strategies import _factories as fx

NODES = [NodeInfo(node_id=100 + i, partition_id=i) for i in range(3)]


def _engine(**overrides):
    cfg = parse_run_config({"federation.clients": 3, "lora.r": 4, **overrides})
    fed, uplink, downlink = build_strategy(cfg)

    def evaluate(tensors):  # a stand-in for the task's evaluation: any function of the adapter
        return {"loss": float(sum(v.double().sum() for v in tensors.values()))}

    return RoundEngine(cfg, fed, uplink, downlink, NODES, fx.LAYOUT, evaluate)


def _reply(engine, work, node_id, tensors, num_examples=10):
    plan = work.plans[node_id]
    ctx = CodecContext(seed=0, direction="uplink", reference=work.sent[node_id])
    payload, _ = encode_tensors(tensors, engine.uplink, {}, ctx)
    return Reply(
        node_id,
        payload=payload,
        metrics={"num-examples": num_examples, "train-loss": 0.5 + plan.partition_id},
        nbytes=payload.nbytes() + 100,
        payload_nbytes=payload.nbytes(),
    )


def _start(engine):
    state = engine.initial_state(fx.adapter(0, dtype=torch.float32))
    work = engine.plan_round(state)
    for out in engine.outgoing(work, list(work.plans.values()), attempt=0):
        engine.sent(work, out.plan.node_id, out.payload.nbytes() + 50, out.payload.nbytes())
    return state, work


def test_a_fedit_round_is_the_example_weighted_mean_and_the_old_state_is_untouched():
    engine = _engine()
    state, work = _start(engine)
    before = {k: v.clone() for k, v in state.global_tensors.items()}
    uploads = {n.node_id: fx.adapter(10 + n.partition_id, dtype=torch.float32) for n in NODES}
    counts = {100: 10, 101: 30, 102: 60}
    failed = engine.receive(
        work, [_reply(engine, work, nid, t, counts[nid]) for nid, t in uploads.items()], list(work.plans.values())
    )
    assert failed == [] and len(work.updates) == 3
    assert engine.aggregate(work)
    result = engine.finish_round(work)
    for key in before:
        want = sum(counts[nid] * uploads[nid][key].double() for nid in uploads) / 100
        torch.testing.assert_close(result.state.global_tensors[key].double(), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(state.global_tensors[key], before[key])  # the old state is a value
    assert result.state.round == 1 and state.round == 0
    record = result.record
    assert record["round"] == 1 and record["sampled"] == 0 and record["rejected"] == 0
    assert record["loss"] == pytest.approx(engine.evaluate(result.state.global_tensors)["loss"])
    assert record["train_loss"] == pytest.approx((10 * 0.5 + 30 * 1.5 + 60 * 2.5) / 100)
    assert record["uplink_bytes"] == sum(r[3] for r in result.state.ledger if r[1] == "uplink") > 0
    assert [c["node_id"] for c in record["clients"]] == [100, 101, 102]
    assert 0.01 < record["aggregation_error"] < 1.5  # different A per client: FedIT is inexact
    assert math.isfinite(record["aggregation_cosine"])


def test_the_round_record_follows_the_shared_schema():
    engine = _engine(**{"eval.client": True})
    state, work = _start(engine)
    replies = [_reply(engine, work, n.node_id, fx.adapter(10 + n.partition_id, dtype=torch.float32)) for n in NODES]
    engine.receive(work, replies, list(work.plans.values()))
    assert engine.aggregate(work)
    for record in (engine.initial_result(state).record, engine.finish_round(work).record):
        assert set(record) <= set(RoundRecord.__annotations__), set(record) - set(RoundRecord.__annotations__)
        parsed = parse_round(json.loads(json.dumps(record)), "record")  # what compare reads
        assert {k: parsed[k] for k in record} == record
    client = engine.finish_round(work).record["clients"][0]
    assert ClientRecord.__required_keys__ <= set(client)


def test_equal_weighting_averages_plainly_and_keeps_each_clients_count():
    engine = _engine(**{"aggregation.weighting": "equal"})
    _, work = _start(engine)
    uploads = {n.node_id: fx.adapter(10 + n.partition_id, dtype=torch.float32) for n in NODES}
    counts = {100: 10, 101: 30, 102: 60}
    replies = [_reply(engine, work, nid, t, counts[nid]) for nid, t in uploads.items()]
    engine.receive(work, replies, list(work.plans.values()))
    assert engine.aggregate(work)
    result = engine.finish_round(work)
    for key in uploads[100]:
        want = sum(uploads[nid][key].double() for nid in uploads) / 3
        got = result.state.global_tensors[key].double()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert [c["num_examples"] for c in result.record["clients"]] == [10, 30, 60]


def test_a_bad_update_is_rejected_with_its_reason_and_the_rest_aggregate():
    engine = _engine()
    _, work = _start(engine)
    good = {nid: fx.adapter(10 + i, dtype=torch.float32) for i, nid in enumerate((100, 101))}
    bad = fx.adapter(12, dtype=torch.float32)
    bad[next(iter(bad))][0, 0] = float("nan")
    replies = [_reply(engine, work, nid, t) for nid, t in good.items()] + [_reply(engine, work, 102, bad)]
    engine.receive(work, replies, list(work.plans.values()))
    assert work.rejected == 1 and "non-finite" in work.reasons[0] and "node 102" in work.reasons[0]
    assert engine.aggregate(work)
    result = engine.finish_round(work)
    key = next(iter(good[100]))
    torch.testing.assert_close(result.state.global_tensors[key], (good[100][key] + good[101][key]) / 2)
    assert result.record["rejected"] == 1


def test_missing_and_error_replies_fail_and_are_retried_until_min_replies():
    engine = _engine(**{"federation.min-replies": 3, "federation.max-retries": 1})
    _, work = _start(engine)
    replies = [_reply(engine, work, 100, fx.adapter(10, dtype=torch.float32)), Reply(101, error="boom")]
    failed = engine.receive(work, replies, list(work.plans.values()))
    assert sorted(p.node_id for p in failed) == [101, 102] and work.failed == 2
    retry = engine.retry_plans(work, failed, attempt=0)
    assert sorted(p.node_id for p in retry) == [101, 102]
    engine.receive(work, [_reply(engine, work, 101, fx.adapter(11, dtype=torch.float32))], retry)
    assert engine.retry_plans(work, [], attempt=1) == []  # retries used up
    with pytest.raises(RoundFailed, match="got 2 valid updates, federation.min-replies is 3"):
        engine.require_enough(work, 1)


def test_a_state_saved_and_loaded_continues_identically():
    engine = _engine(**{"strategy.name": "lora-fair", "codec.downlink": "int8"})
    _, work = _start(engine)
    engine.receive(
        work,
        [_reply(engine, work, n.node_id, fx.adapter(10 + n.partition_id, dtype=torch.float32)) for n in NODES],
        list(work.plans.values()),
    )
    engine.aggregate(work)
    state = engine.finish_round(work).state
    buf = io.BytesIO()
    torch.save((state.checkpoint_states(), dict(state.global_tensors)), buf)
    buf.seek(0)
    states, tensors = torch.load(buf, weights_only=False)
    restored = ServerState.from_checkpoint(state.round, tensors, states, [list(e) for e in state.ledger])
    a, b = engine.plan_round(state), engine.plan_round(restored)
    assert a.server_round == b.server_round == 2 and a.plans == b.plans
    pa = engine.outgoing(a, list(a.plans.values()), 0)
    pb = engine.outgoing(b, list(b.plans.values()), 0)
    for x, y in zip(pa, pb, strict=True):
        assert x.payload.meta == y.payload.meta
        assert all((x.payload.arrays[k] == y.payload.arrays[k]).all() for k in x.payload.arrays)


def test_a_failing_aggregator_leaves_the_global_adapter_unchanged():
    engine = _engine()
    state, work = _start(engine)
    engine.receive(
        work,
        [_reply(engine, work, n.node_id, fx.adapter(10, dtype=torch.float32)) for n in NODES],
        list(work.plans.values()),
    )

    class Broken(AggregatorBase):
        def aggregate(self, *args, **kwargs):
            raise RuntimeError("solver diverged")

    engine.aggregator = Broken()
    assert not engine.aggregate(work)
    result = engine.finish_round(work)
    assert "aggregation failed: solver diverged" in work.reasons
    for key, value in state.global_tensors.items():
        assert torch.equal(result.state.global_tensors[key], value)


def test_a_scaled_update_is_left_out_by_the_outlier_layer_and_counted_in_the_record():
    engine = _engine(**{"federation.clients": 3})
    _, work = _start(engine)
    replies = []
    for n in NODES:
        sent = work.sent[n.node_id]
        scale = 100.0 if n.node_id == 101 else 1.0
        change = fx.adapter(20 + n.partition_id, dtype=torch.float32)
        replies.append(_reply(engine, work, n.node_id, {k: sent[k] + scale * change[k] for k in sent}))
    engine.receive(work, replies, list(work.plans.values()))
    assert engine.aggregate(work)
    record = engine.finish_round(work).record
    assert record["rejected"] == 1 and [c["node_id"] for c in record["clients"]] == [100, 102]
    assert any("node 101: update norm" in r for r in work.reasons)
