"""S-UCB bandit, FedSpine reward and FedSpineSelector (§11 tests 5-7)."""

from __future__ import annotations

import json
import math
import random

import pytest

from fedpeft.errors import ConfigError, IncompatibleUpdateError
from fedpeft.selection.sucb import (
    FedSpineSelector,
    SucbConfig,
    fedspine_reward,
    fedspine_reward_terms,
    sucb_freeze_pruning,
    sucb_init,
    sucb_leaves,
    sucb_map,
    sucb_select,
    sucb_update,
)
from fedpeft.types import ClientUpdate, NodeInfo, RoundOutput

X_STAR = (0.3, 0.7)


def bump(x: tuple[float, float]) -> float:
    """Stationary reward in [0, 1] with its maximum 1 at X_STAR."""
    return math.exp(-((x[0] - X_STAR[0]) ** 2 + (x[1] - X_STAR[1]) ** 2) / 0.1)


def run(
    config: SucbConfig, pulls: int, seed: int, state: dict | None = None
) -> tuple[dict, list]:
    noise = random.Random(seed)
    state = sucb_init(config) if state is None else state
    history = []
    for t in range(pulls):
        state, arm, x = sucb_select(state, config, seed * 100_000 + t)
        history.append((arm, bump(x)))
        state = sucb_update(state, config, arm.leaf, bump(x) + noise.gauss(0.0, 0.1))
    return state, history


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converges_to_maximiser_and_regret_per_step_decreases(seed: int) -> None:
    _, history = run(SucbConfig(), 2000, seed)
    means = [m for _, m in history]

    assert 1.0 - sum(means[-400:]) / 400 <= 0.05
    regret_per_t = [sum(1.0 - m for m in means[:t]) / t for t in (250, 500, 1000, 2000)]
    assert all(a > b for a, b in zip(regret_per_t, regret_per_t[1:], strict=False))


def drifting_run(config: SucbConfig, pulls: int, seed: int, scenario: str) -> list[float]:
    """Mean rewards of the played arms while the maximiser moves from (0.3, 0.7) to
    (0.8, 0.2): at once half-way (``jump``) or linearly over the run (``steady``)."""
    noise = random.Random(seed)
    state = sucb_init(config)
    means = []
    for t in range(pulls):
        f = (1.0 if t >= pulls // 2 else 0.0) if scenario == "jump" else t / pulls
        centre = (0.3 + 0.5 * f, 0.7 - 0.5 * f)
        state, arm, x = sucb_select(state, config, seed * 100_000 + t)
        mean = math.exp(-((x[0] - centre[0]) ** 2 + (x[1] - centre[1]) ** 2) / 0.1)
        means.append(mean)
        state = sucb_update(state, config, arm.leaf, mean + noise.gauss(0.0, 0.1))
    return means


@pytest.mark.parametrize(("scenario", "pulls", "window"), [("jump", 400, 80), ("steady", 200, 200)])
def test_discount_095_does_not_help_on_a_drifting_reward(
    scenario: str, pulls: int, window: int
) -> None:
    """Why SucbConfig.discount defaults to 1 and not the spec's suggested 0.95."""
    late = {
        gamma: sum(
            sum(drifting_run(SucbConfig(discount=gamma), pulls, s, scenario)[-window:]) / window
            for s in range(3)
        )
        / 3
        for gamma in (1.0, 0.95)
    }
    assert late[1.0] > late[0.95] + 0.1, late


def test_finds_best_discrete_arm() -> None:
    config = SucbConfig()
    noise = random.Random(5)
    state = sucb_init(config)
    late_ranks = []
    for t in range(2000):
        state, arm, _ = sucb_select(state, config, t)
        mean = math.exp(-(((arm.prune_ratio - 0.1) / 0.1) ** 2)) * (
            1.0 - 0.15 * abs(math.log2(arm.rank / 8))
        )
        state = sucb_update(state, config, arm.leaf, mean + noise.gauss(0.0, 0.1))
        if t >= 1600:
            late_ranks.append(arm.rank)

    assert max(set(late_ranks), key=late_ranks.count) == 8


def test_leaves_partition_unit_square() -> None:
    state, _ = run(SucbConfig(play="uniform"), 600, seed=3)
    leaves = sucb_leaves(state)

    assert len(leaves) > 10
    assert math.isclose(sum((p1 - p0) * (r1 - r0) for p0, p1, r0, r1 in leaves), 1.0)
    for i, (a0, a1, b0, b1) in enumerate(leaves):
        assert 0.0 <= a0 < a1 <= 1.0 and 0.0 <= b0 < b1 <= 1.0
        for c0, c1, d0, d1 in leaves[i + 1 :]:
            overlap = max(0.0, min(a1, c1) - max(a0, c0)) * max(
                0.0, min(b1, d1) - max(b0, d0)
            )
            assert overlap == 0.0
    probe = random.Random(0)
    for _ in range(200):
        p, r = probe.random(), probe.random()
        assert sum(a0 <= p < a1 and b0 <= r < b1 for a0, a1, b0, b1 in leaves) == 1


def test_same_seed_same_arms_different_seed_differs() -> None:
    config = SucbConfig(play="uniform")
    _, h1 = run(config, 300, seed=7)
    _, h2 = run(config, 300, seed=7)
    _, h3 = run(config, 300, seed=8)

    assert [a for a, _ in h1] == [a for a, _ in h2]
    assert [a.x for a, _ in h1] != [a.x for a, _ in h3]


def test_json_round_trip_gives_same_future_decisions() -> None:
    config = SucbConfig(play="uniform", discount=0.95)
    state, _ = run(config, 150, seed=4)
    restored = json.loads(json.dumps(state))

    _, direct = run(config, 100, seed=9, state=state)
    _, resumed = run(config, 100, seed=9, state=restored)
    assert [a for a, _ in direct] == [a for a, _ in resumed]


def test_update_is_pure_and_discount_formula() -> None:
    config = SucbConfig(discount=0.5)
    state = sucb_update(sucb_init(config), config, 0, 1.0)
    snapshot = json.dumps(state)
    new = sucb_update(state, config, 0, 0.0)

    assert json.dumps(state) == snapshot
    assert new["cells"]["n"][0] == pytest.approx(0.5 * 1.0 + 1.0)
    assert new["cells"]["total"][0] == pytest.approx(0.5 * 1.0 + 0.0)
    assert new["cells"]["visits"][0] == 2
    assert new["t"] == pytest.approx(1.5)


def test_split_rule_halves_longer_side() -> None:
    config = SucbConfig(n_split=2)
    state = sucb_init(config)
    state = sucb_update(state, config, 0, 0.5)
    assert len(sucb_leaves(state)) == 1  # 1 < 2·2^0
    state = sucb_update(state, config, 0, 0.5)
    assert sorted(sucb_leaves(state)) == [(0.0, 0.5, 0.0, 1.0), (0.5, 1.0, 0.0, 1.0)]


def test_mapping_to_ratio_and_rank() -> None:
    config = SucbConfig()
    assert sucb_map(config, (0.0, 0.0)) == (0.0, 2)
    assert sucb_map(config, (1.0, 1.0)) == (pytest.approx(0.3), 32)
    assert sucb_map(config, (0.5, 0.2)) == (pytest.approx(0.15), 8)  # 2 + 0.2·30 = 8
    assert sucb_map(SucbConfig(rank_map="index"), (0.0, 0.5))[1] == 8
    assert sucb_map(config, (0.9, 0.0), prune_frozen=True) == (0.0, 2)


def test_frozen_pruning_plays_zero_ratio_in_edge_cells() -> None:
    config = SucbConfig(p_min=0.05)
    state, _ = run(config, 200, seed=1)
    state = sucb_freeze_pruning(state)
    for t in range(50):
        state, arm, x = sucb_select(state, config, t)
        assert arm.prune_ratio == 0.0 and x[0] == 0.0
        assert state["cells"]["p_lo"][arm.leaf] == 0.0
        state = sucb_update(state, config, arm.leaf, 0.5)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="rho must be in"):
        SucbConfig(rho=1.5)
    with pytest.raises(ConfigError, match="ranks must be distinct"):
        SucbConfig(ranks=(8, 4))


def test_reward_terms_clipped_and_weighted() -> None:
    terms = fedspine_reward_terms(1.0, 3.0, 0.9, 0.5, 0.1, 5.0, 2.0, 9.0, 3.0)
    assert terms == (0.0, 1.0, 1.0, 0.0)
    reward = fedspine_reward(2.0, 1.0, 0.1, 0.5, 0.1, 1.0, 2.0, 1.0, 4.0)
    assert reward == pytest.approx(0.25 * (0.5 + 0.1 / (0.4 + 1e-8) + 0.5 + 0.75))
    assert (
        fedspine_reward(2.0, 1.0, 0.0, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0, (1, 0, 0, 0))
        == 0.5
    )
    with pytest.raises(ValueError, match="finite"):
        fedspine_reward(float("nan"), 1.0, 0.0, 0.5, 0.1, 1.0, 1.0, 1.0, 1.0)


def _updates(plans, sparsity: float) -> list[ClientUpdate]:
    return [
        ClientUpdate(
            node_id=p.node_id,
            tensors={},
            num_examples=10,
            plan=p,
            metrics={
                "loss-before": 2.0,
                "loss-after": 1.5,
                "sparsity": sparsity,
                "client-seconds": 1.0 + p.partition_id,
                "update-norm": 0.5,
            },
        )
        for p in plans.values()
    ]


def test_selector_plans_logs_and_learns() -> None:
    nodes = [NodeInfo(node_id=100 + i, partition_id=i) for i in range(5)]
    selector = FedSpineSelector(clients_per_round=3, seed=11, target_sparsity=0.4)
    state = selector.initialize(nodes)

    state, plans = selector.plan(state, 1, nodes)
    assert len(plans) == 3
    for node_id, plan in plans.items():
        assert plan.node_id == node_id and plan.rank in selector.sucb.ranks
        assert 0.0 <= plan.options["prune-ratio"] <= 0.3
        assert (
            plan.options["target-sparsity"] == 0.4
            and plan.options["prune-interval"] == 20
        )
    assert [(d["round"], d["node_id"], d["rank"]) for d in state["log"]] == sorted(
        (1, p.node_id, p.rank) for p in plans.values()
    )
    json.dumps(state)

    state = selector.feedback(
        state, _updates(plans, 0.4), RoundOutput(state={}, tensors={})
    )
    for decision in state["log"]:
        assert 0.0 <= decision["reward"] <= 1.0
    for plan in plans.values():
        bandit = state["bandits"][str(plan.partition_id)]
        assert bandit["pulls"] == 1 and bandit["prune_frozen"]
    state, plans2 = selector.plan(state, 2, nodes)
    for plan in plans2.values():
        if state["bandits"][str(plan.partition_id)]["prune_frozen"]:
            assert plan.options["prune-ratio"] == 0.0
    json.dumps(state)


def test_selector_deterministic_and_checks_metrics() -> None:
    nodes = [NodeInfo(node_id=7 + 3 * i, partition_id=i) for i in range(6)]
    selector = FedSpineSelector(clients_per_round=2, seed=3)
    s1, p1 = selector.plan(selector.initialize(nodes), 4, nodes)
    s2, p2 = selector.plan(selector.initialize(nodes), 4, nodes)
    assert p1 == p2 and s1 == s2

    bad = [
        ClientUpdate(
            node_id=u.node_id, tensors={}, num_examples=1, metrics={}, plan=u.plan
        )
        for u in _updates(p1, 0.1)
    ]
    with pytest.raises(IncompatibleUpdateError, match="loss-before"):
        selector.feedback(s1, bad, RoundOutput(state={}, tensors={}))
