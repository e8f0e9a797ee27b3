"""Server optimizers (``server-opt.*``): closed forms, the layer's state nesting, the engine
and the config refusals. Flower parity is in tests/flower/test_server_opt_matches_flower.py."""

from __future__ import annotations

import io

import pytest
import torch

from fedpeft import ClientUpdate, ConfigError, WeightedMean
from fedpeft.aggregation.server_opt import ServerOptimizer
from fedpeft.config import ServerOptConfig, parse_run_config
from fedpeft.server import RoundEngine, ServerState, build_strategy
from tests.strategies import _factories as fx
from tests.test_aggregation_layers import Probe
from tests.test_engine import NODES, _reply, _start


def _updates(glob, scales, counts=(1, 1)):
    return [
        ClientUpdate(100 + i, {k: v + s for k, v in glob.items()}, n, {}, fx.plan(i))
        for i, (s, n) in enumerate(zip(scales, counts, strict=True))
    ]


def test_adam_first_step_is_the_papers_closed_form():
    glob = {"w": torch.zeros(3, dtype=torch.float64)}
    s = ServerOptConfig(name="adam", lr=0.5, beta1=0.9, beta2=0.99, tau=1e-3)
    layer = ServerOptimizer(WeightedMean(), s)
    out = layer.aggregate(layer.initialize(glob), glob, _updates(glob, (0.2, 0.4)), 1)
    delta = 0.3  # the mean's change
    m, v = 0.1 * delta, 0.01 * delta**2
    want = 0.5 * m / (v**0.5 + 1e-3)
    torch.testing.assert_close(out.tensors["w"], torch.full((3,), want, dtype=torch.float64))
    torch.testing.assert_close(out.state["m"]["w"], torch.full((3,), m, dtype=torch.float64))


def test_avgm_with_rate_one_and_no_momentum_is_the_plain_mean_and_momentum_accumulates():
    glob = {"w": torch.zeros(2)}
    plain = ServerOptimizer(WeightedMean(), ServerOptConfig(name="avgm", lr=1.0, momentum=0.0))
    out = plain.aggregate(plain.initialize(glob), glob, _updates(glob, (1.0, 3.0)), 1)
    torch.testing.assert_close(out.tensors["w"], torch.full((2,), 2.0))
    heavy = ServerOptimizer(WeightedMean(), ServerOptConfig(name="avgm", lr=1.0, momentum=0.5))
    state = heavy.initialize(glob)
    first = heavy.aggregate(state, glob, _updates(glob, (1.0, 1.0)), 1)
    second = heavy.aggregate(first.state, first.tensors, _updates(first.tensors, (1.0, 1.0)), 2)
    # v₁ = −1, v₂ = 0.5·v₁ − 1 = −1.5: x = 1 + 1.5
    torch.testing.assert_close(second.tensors["w"], torch.full((2,), 2.5))


def test_the_layer_nests_the_inner_state_and_delegates_every_hook_with_it():
    probe = Probe()
    layer = ServerOptimizer(probe, ServerOptConfig(name="yogi"))
    state = layer.initialize({})
    assert state == {"inner": {"n": 0}, "m": {}, "v": {}}
    plan = fx.plan(0)
    assert set(layer.client_payload(state, {}, plan)) == {"payload"}
    layer.check_update(state, {}, plan)
    assert layer.client_failed(state, plan, "lost") == {"inner": {"n": -1}, "m": {}, "v": {}}
    assert layer.upload_shape("k", (3,), {}, plan) == (7,)
    glob = {"w": torch.ones(2)}
    out = layer.aggregate(state, glob, _updates(glob, (0.0, 0.0)), 1)
    assert out.state["inner"] == {"n": 1} and "probe/seen" in out.metrics
    assert out.metrics["server_opt/pseudo_gradient_norm"] == 0.0


def test_the_engine_runs_the_optimizer_and_a_checkpointed_state_continues_identically():
    cfg = parse_run_config(
        {"federation.clients": 3, "lora.r": 4, "server-opt.name": "adam", "server-opt.lr": 0.01}
    )
    fed, up, down = build_strategy(cfg)
    engine = RoundEngine(cfg, fed, up, down, NODES, fx.LAYOUT, lambda t: {})
    state, work = _start(engine)
    uploads = {n.node_id: fx.adapter(10 + n.partition_id, dtype=torch.float32) for n in NODES}
    engine.receive(work, [_reply(engine, work, i, t) for i, t in uploads.items()], list(work.plans.values()))
    assert engine.aggregate(work)
    after = engine.finish_round(work).state
    key = next(iter(uploads[100]))
    mean = sum(uploads[i][key].double() for i in uploads) / 3
    delta = mean - state.global_tensors[key].double()
    want = state.global_tensors[key].double() + 0.01 * (0.1 * delta) / ((0.01 * delta**2).sqrt() + 1e-3)
    torch.testing.assert_close(after.global_tensors[key].double(), want, rtol=1e-5, atol=1e-6)
    assert set(after.aggregator) == {"inner", "m", "v"}
    buf = io.BytesIO()
    torch.save((after.checkpoint_states(), dict(after.global_tensors)), buf)
    buf.seek(0)
    states, tensors = torch.load(buf, weights_only=False)
    restored = ServerState.from_checkpoint(after.round, tensors, states, [list(e) for e in after.ledger])
    for key in after.aggregator["m"]:
        assert torch.equal(restored.aggregator["m"][key], after.aggregator["m"][key])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"strategy.name": "flora"}, "FLoRA re-initialises the LoRA factors"),
        ({"strategy.name": "ferret"}, "Ferret's clients rebuild the global adapter"),
        ({"privacy.dp": "server-fixed"}, "use one or the other"),
    ],
)
def test_compositions_that_cannot_work_are_refused_with_the_reason(overrides, message):
    cfg = parse_run_config({"server-opt.name": "avgm", **overrides})
    with pytest.raises(ConfigError, match=message):
        build_strategy(cfg)
