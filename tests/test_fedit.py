"""FedIT / WeightedMean closed-form properties (ALGORITHMS.md §1)."""

from __future__ import annotations

import torch

from fedpeft import ClientPlan, ClientUpdate, WeightedMean
from fedpeft.lora import LoraFactors, aggregation_error

PLAN = ClientPlan(node_id=0, partition_id=0, rank=1, seed=0)


def _upd(tensors, n):
    return ClientUpdate(node_id=0, tensors=tensors, num_examples=n, metrics={}, plan=PLAN)


def test_weighted_mean_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    ns = [1, 2, 7]
    out = WeightedMean().aggregate({}, {"w": xs[0]}, [_upd({"w": x}, n) for x, n in zip(xs, ns, strict=True)], 1)
    expected = sum(n * x for x, n in zip(xs, ns, strict=True)) / sum(ns)
    torch.testing.assert_close(out.tensors["w"], expected)


def test_identical_updates_leave_the_adapter_unchanged_and_order_does_not_matter():
    w = torch.randn(4, 2)
    ups = [_upd({"w": w.clone()}, n) for n in (3, 5, 9)]
    out = WeightedMean().aggregate({}, {"w": torch.zeros(4, 2)}, ups, 1)
    torch.testing.assert_close(out.tensors["w"], w)
    a = WeightedMean().aggregate({}, {"w": w}, [_upd({"w": w}, 1), _upd({"w": -w}, 3)], 1)
    b = WeightedMean().aggregate({}, {"w": w}, [_upd({"w": -w}, 3), _upd({"w": w}, 1)], 1)
    torch.testing.assert_close(a.tensors["w"], b.tensors["w"])


def test_zero_weight_client_has_no_effect():
    w = torch.randn(2, 2)
    out = WeightedMean().aggregate({}, {"w": w}, [_upd({"w": w}, 4), _upd({"w": 100 * w}, 0)], 1)
    torch.testing.assert_close(out.tensors["w"], w)


def test_scalar_counterexample_has_full_aggregation_error():
    one = torch.ones(1, 1, dtype=torch.float64)
    clients = [{"m": LoraFactors(one, one)}, {"m": LoraFactors(-one, -one)}]
    fedit = {"m": LoraFactors(0 * one, 0 * one)}  # mean A = mean B = 0, product 0; ideal 1
    err = aggregation_error(clients, [0.5, 0.5], fedit)
    assert err["relative"] == 1.0
    exact = aggregation_error(clients, [0.5, 0.5], {"m": LoraFactors(one, one)})
    assert exact["relative"] < 1e-12 and abs(exact["cosine"] - 1) < 1e-12
