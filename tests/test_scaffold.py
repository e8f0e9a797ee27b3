"""SCAFFOLD (``scaffold.enabled``): option II's closed forms, the server layer, the claim
that it removes client drift on a quadratic, and a run through the Flower adapter."""

from __future__ import annotations

import pytest
import torch

from fedpeft import ClientUpdate, ConfigError, IncompatibleUpdateError, WeightedMean
from fedpeft.aggregation import scaffold
from fedpeft.config import parse_run_config
from fedpeft.flower.inprocess import run_in_process
from fedpeft.server.setup import build_strategy
from tests.strategies import _factories as fx


def test_the_correction_term_adds_c_minus_c_i_to_the_gradient():
    w = torch.randn(3, 2, requires_grad=True)
    c, c_i = {"w": torch.full((3, 2), 0.5)}, {"w": torch.full((3, 2), 0.2)}
    scaffold.correction_term({"w": w}, c, c_i).backward()
    torch.testing.assert_close(w.grad, torch.full((3, 2), 0.3))
    assert scaffold.correction_term({"other": w}, c, c_i) is None


def test_option_two_variate_update():
    x, y = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.5, 2.5])}
    c, c_i = {"w": torch.tensor([0.1, 0.1])}, {"w": torch.tensor([0.3, -0.2])}
    new, delta = scaffold.client_variates(x, y, c, c_i, steps=5, lr=0.1)
    want = c_i["w"] - c["w"] + (x["w"] - y["w"]) / 0.5
    torch.testing.assert_close(new["w"], want)
    torch.testing.assert_close(delta["w"], want - c_i["w"])


def _update(node, tensors, dc, n=10):
    up = {**tensors, **{f"{scaffold.UPLOAD}{k}": v for k, v in dc.items()}}
    return ClientUpdate(node, up, n, {}, fx.plan(node - 100))


def test_the_layer_sends_c_strips_the_uploads_and_moves_c_by_the_sampled_share():
    glob = {"w": torch.zeros(2), "idx": torch.zeros(2, dtype=torch.long)}
    layer = scaffold.Scaffold(WeightedMean(), num_clients=4)
    state = layer.initialize(glob)
    assert set(state["c"]) == {"w"}  # float tensors only
    payload = layer.client_payload(state, glob, fx.plan(0))
    assert set(payload) == {"w", "idx", f"{scaffold.SERVER}w"}
    ups = [
        _update(100, {"w": torch.ones(2)}, {"w": torch.full((2,), 1.0)}),
        _update(101, {"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)}),
    ]
    out = layer.aggregate(state, glob, ups, 1)
    assert set(out.tensors) == {"w", "idx"}  # the inner mean never saw the variates
    torch.testing.assert_close(out.state["c"]["w"], torch.full((2,), 0.5 * 2.0))  # |S|/N · mean
    with pytest.raises(IncompatibleUpdateError, match="scaffold"):
        layer.check_update(state, {"w": torch.ones(2), f"{scaffold.UPLOAD}w": torch.ones(3)}, fx.plan(0))


def _rounds(use_scaffold: bool, rounds: int = 60, steps: int = 10, lr: float = 0.05):
    """Two clients with quadratics of different curvature, f_i(w) = ½(w − a_i)ᵀH_i(w − a_i),
    K local SGD steps, FedAvg of w (through the layer when SCAFFOLD is on)."""
    h = [torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([4.0, 1.0]))]
    a = [torch.tensor([1.0, -1.0]), torch.tensor([-2.0, 3.0])]
    optimum = torch.linalg.solve(h[0] + h[1], h[0] @ a[0] + h[1] @ a[1])
    glob = {"w": torch.zeros(2, dtype=torch.float64)}
    agg = scaffold.Scaffold(WeightedMean(), num_clients=2) if use_scaffold else WeightedMean()
    state = agg.initialize(glob)
    c_i = [{}, {}]
    for r in range(1, rounds + 1):
        ups = []
        for i in range(2):
            payload = agg.client_payload(state, glob, fx.plan(i))
            received, c = scaffold.split(payload, scaffold.SERVER)
            w = received["w"].clone().requires_grad_(True)
            for _ in range(steps):
                loss = 0.5 * (w - a[i].double()) @ h[i].double() @ (w - a[i].double())
                if c:
                    loss = loss + scaffold.correction_term({"w": w}, c, c_i[i])
                (g,) = torch.autograd.grad(loss, w)
                w = (w - lr * g).detach().requires_grad_(True)
            tensors = {"w": w.detach()}
            dc = {}
            if c:
                c_i[i], dc = scaffold.client_variates(received, tensors, c, c_i[i], steps, lr)
            ups.append(_update(100 + i, tensors, dc))
        out = agg.aggregate(state, glob, ups, r)
        state, glob = out.state, out.tensors
    return float((glob["w"] - optimum.double()).norm())


def test_scaffold_removes_client_drift_on_a_quadratic():
    drift = _rounds(use_scaffold=False)
    corrected = _rounds(use_scaffold=True)
    assert drift > 0.1  # FedAvg's fixed point is not the optimum (different curvatures)
    assert corrected < 1e-6, corrected


def test_a_run_through_flower_sends_the_variates_both_ways(tiny_config):
    sgd = {**tiny_config, "train.optimizer": "sgd", "train.lr": 0.05}
    plain = run_in_process({**sgd, "output.dir": tiny_config["output.dir"] + "-plain"})
    with_c = run_in_process({**sgd, "scaffold.enabled": True})
    for r in with_c.rounds[1:]:
        assert r["rejected"] == 0 and r["failed"] == 0
        assert "scaffold/variate_step_norm" in r["strategy_metrics"]
    up_plain, up_c = plain.rounds[2]["uplink_bytes"], with_c.rounds[2]["uplink_bytes"]
    down_plain, down_c = plain.rounds[2]["downlink_bytes"], with_c.rounds[2]["downlink_bytes"]
    assert 1.8 < up_c / up_plain < 2.2 and 1.8 < down_c / down_plain < 2.2  # y and Δc, x and c
    assert with_c.rounds[2]["strategy_metrics"]["scaffold/variate_step_norm"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy.name": "flora"}, "FLoRA re-initialises"),
        ({"strategy.name": "fedspine"}, "own local_round"),
        ({"lora.ranks": "4,8"}, "needs one rank"),
        ({"train.optimizer": "adamw"}, "needs train.optimizer=sgd"),
        ({"privacy.dp": "server-fixed", "train.optimizer": "sgd"}, "outside what Flower's DP"),
    ],
)
def test_scaffold_is_refused_where_it_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_strategy(parse_run_config({"scaffold.enabled": True, **overrides}))
