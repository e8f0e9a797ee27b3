"""Aggregation layers wrap any aggregator: they delegate every hook, pass the inner state
through, prefix their metrics and report what they leave out."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedpeft import ClientUpdate, RoundOutput
from fedpeft.aggregation import AggregatorBase, WeightedMean
from fedpeft.aggregation.layers import (
    ClipUpdates,
    EqualWeights,
    Layer,
    PadToRank,
    RejectOutliers,
    stack,
)
from fedpeft.aggregation.robust import update_norm
from fedpeft.lora import pad_adapter_to
from tests.strategies import _factories as fx


class Probe(AggregatorBase):
    """Records every call; its state counts aggregations."""

    def __init__(self):
        self.calls = []

    def initialize(self, global_tensors):
        self.calls.append("initialize")
        return {"n": 0}

    def aggregate(self, state, global_tensors, updates, server_round):
        self.calls.append(("aggregate", tuple(u.node_id for u in updates)))
        return RoundOutput(
            {"n": state["n"] + 1}, dict(global_tensors), {"probe/seen": float(len(updates))}
        )

    def client_payload(self, state, global_tensors, plan):
        self.calls.append("client_payload")
        return {"payload": torch.zeros(1)}

    def check_update(self, state, tensors, plan):
        self.calls.append("check_update")

    def client_failed(self, state, plan, reason):
        self.calls.append(("client_failed", reason))
        return {"n": -1}

    def upload_shape(self, key, shape, tensors, plan):
        self.calls.append("upload_shape")
        return (7,)


def _updates(scales=(1.0, 1.0, 1.0, 1.0)):
    received = fx.adapter(0)
    out = []
    for i, s in enumerate(scales):
        change = fx.adapter(10 + i)
        tensors = {k: received[k] + s * change[k] for k in received}
        out.append(ClientUpdate(100 + i, tensors, 10, {}, fx.plan(i), received))
    return received, out


def test_layers_delegate_every_hook_and_pass_the_state_through():
    probe = Probe()
    layered = RejectOutliers(ClipUpdates(probe, clip_norm=1e9), factor=10.0)
    state = layered.initialize({})
    assert state == {"n": 0}
    plan = fx.plan(0)
    assert set(layered.client_payload(state, {}, plan)) == {"payload"}
    layered.check_update(state, {}, plan)
    assert layered.client_failed(state, plan, "lost") == {"n": -1}
    assert layered.upload_shape("k", (3,), {}, plan) == (7,)
    glob, updates = _updates()
    out = layered.aggregate(state, glob, updates, 1)
    assert out.state == {"n": 1}  # the inner state, not nested: a checkpoint is unchanged
    assert out.metrics == {"clip/clipped": 0.0, "probe/seen": 4.0}
    assert [u.node_id for u in out.updates] == [100, 101, 102, 103] and out.rejected == {}
    assert probe.calls == [
        "initialize",
        "client_payload",
        "check_update",
        ("client_failed", "lost"),
        "upload_shape",
        ("aggregate", (100, 101, 102, 103)),
    ]


def test_outliers_are_left_out_with_their_reason():
    probe = Probe()
    glob, updates = _updates((1.0, 1.0, 50.0, 1.0))
    out = RejectOutliers(probe, factor=10.0).aggregate({"n": 0}, glob, updates, 1)
    assert probe.calls[-1] == ("aggregate", (100, 101, 103))
    assert (
        list(out.rejected) == [102] and "exceeds validation.norm-factor=10.0" in out.rejected[102]
    )


def test_clipping_bounds_each_change_and_a_plain_mean_of_clipped_updates_follows():
    glob, updates = _updates((1.0, 3.0, 0.01, 1.0))
    out = ClipUpdates(WeightedMean(), clip_norm=1.0).aggregate({}, glob, updates, 1)
    assert out.metrics["clip/clipped"] == 3.0  # the 0.01-scaled change is below the bound
    for u in out.updates:
        assert update_norm(u.tensors, u.received) <= 1.0 + 1e-9
    key = next(iter(glob))
    want = sum(u.tensors[key] for u in out.updates) / 4
    torch.testing.assert_close(out.tensors[key], want)


def test_stack_leaves_out_disabled_layers():
    probe = Probe()
    assert stack(probe) is probe
    assert isinstance(stack(probe, norm_factor=10.0), RejectOutliers)
    both = stack(probe, norm_factor=10.0, clip_norm=1.0)
    assert isinstance(both, RejectOutliers) and isinstance(both.inner, ClipUpdates)
    assert isinstance(both, Layer) and both.inner.inner is probe


def test_equal_weights_give_the_plain_mean_and_report_the_real_counts():
    glob, updates = _updates((1.0, 2.0, 3.0, 4.0))
    updates = [dataclasses.replace(u, num_examples=n) for u, n in zip(updates, (1, 5, 50, 0))]
    probe_seen = []

    class Counts(WeightedMean):
        def aggregate(self, state, global_tensors, ups, server_round):
            probe_seen.extend(u.num_examples for u in ups)
            return super().aggregate(state, global_tensors, ups, server_round)

    out = EqualWeights(Counts()).aggregate({}, glob, updates, 1)
    assert probe_seen == [1, 1, 1, 1]  # the inner mean sees one example per client
    key = next(iter(glob))
    torch.testing.assert_close(out.tensors[key], sum(u.tensors[key] for u in updates) / 4)
    assert [u.num_examples for u in out.updates] == [1, 5, 50, 0]  # client records stay true
    weighted = WeightedMean().aggregate({}, glob, updates, 1)  # the control differs
    assert not torch.allclose(weighted.tensors[key], out.tensors[key])


def test_pad_to_rank_pads_uploads_truncates_payloads_and_reports_the_uploads():
    rank, layout = 4, fx.LAYOUT
    glob = fx.adapter(0, rank=rank)
    small = fx.adapter(1, rank=2)
    updates = [fx.update(small, 10, 0), fx.update(fx.adapter(2, rank=rank), 10, 1)]
    seen = []

    class Shapes(WeightedMean):
        def aggregate(self, state, global_tensors, ups, server_round):
            seen.extend({tuple(v.shape) for v in u.tensors.values()} for u in ups)
            return super().aggregate(state, global_tensors, ups, server_round)

    padded = PadToRank(Shapes(), rank, layout)
    out = padded.aggregate({}, glob, updates, 1)
    assert seen[0] == seen[1]  # both at the global rank
    for module, f in fx.factors(small, layout).items():  # the rank-2 product is kept
        g = fx.factors(pad_adapter_to(small, rank, layout), layout)[module]
        torch.testing.assert_close(g.delta(), f.delta())
    assert out.updates[0].tensors is small  # reported as the client sent it
    payload = padded.client_payload({}, out.tensors, fx.plan(0, rank=2))
    assert {k: tuple(v.shape) for k, v in payload.items()} == {
        k: tuple(v.shape) for k, v in small.items()
    }


def test_stack_adds_equal_weighting_innermost_and_refuses_unknown_weightings():
    probe = Probe()
    layered = stack(probe, norm_factor=10.0, clip_norm=1.0, weighting="equal")
    assert isinstance(layered.inner.inner, EqualWeights) and layered.inner.inner.inner is probe
    with pytest.raises(ValueError, match="aggregation.weighting"):
        stack(probe, weighting="size")
