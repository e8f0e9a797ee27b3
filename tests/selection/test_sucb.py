"""S-UCB bandit, FedSpine reward and FedSpineSelector (§11 tests 5-7)."""

from __future__ import annotations

import hashlib
import json
import math
import random

import pytest

from fedpeft.errors import ConfigError, IncompatibleUpdateError
from fedpeft.selection.sucb import (
    AT_TARGET_KEY,
    FedSpineSelector,
    SucbConfig,
    fedspine_reward,
    fedspine_reward_terms,
    sucb_freeze_pruning,
    sucb_init,
    sucb_leaves,
    sucb_map,
    sucb_select,
    sucb_sparsity,
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


def _updates(plans, sparsity: float | dict[int, float], extra=None, seconds=None) -> list[ClientUpdate]:
    """One update per plan: ``sparsity`` one value or per partition id; client seconds
    ``1 + partition id`` unless ``seconds`` is given."""
    return [
        ClientUpdate(
            node_id=p.node_id,
            tensors={},
            num_examples=10,
            plan=p,
            metrics={
                "loss-before": 2.0,
                "loss-after": 1.5,
                "sparsity": sparsity[p.partition_id] if isinstance(sparsity, dict) else sparsity,
                "client-seconds": 1.0 + p.partition_id if seconds is None else seconds,
                "update-norm": 0.5,
                **(extra or {}),
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


# -- candidate final sparsities (issue 18) -------------------------------------------

CANDIDATES = (0.1, 0.2, 0.3, 0.5)


def closed_loop(selector: FedSpineSelector, rounds: int = 30, num: int = 6) -> dict:
    """A deterministic closed loop: each device prunes as planned (sparsity on a
    60-structure grid); loss gain, time and update norm follow from rank and sparsity."""
    nodes = [NodeInfo(node_id=50 + i, partition_id=i) for i in range(num)]
    state = selector.initialize(nodes)
    sparsity = dict.fromkeys(range(num), 0.0)
    for t in range(1, rounds + 1):
        state, plans = selector.plan(state, t, nodes)
        updates = []
        for p in plans.values():
            pid = p.partition_id
            ratio, target = float(p.options["prune-ratio"]), float(p.options["target-sparsity"])
            s_prev = sparsity[pid]
            s_new = max(s_prev, min(target, s_prev + ratio * (1 - s_prev)))
            sparsity[pid] = max(s_prev, math.floor(s_new * 60 + 1e-9) / 60)
            loss_before = 1.0 + 0.1 * pid
            loss_after = loss_before * (1 - 0.02 * p.rank / 8 - 0.05 * (1 - sparsity[pid]))
            seconds = (1 + pid) * (1 - 0.6 * sparsity[pid]) * (0.5 + p.rank / 16)
            metrics = {
                "loss-before": loss_before,
                "loss-after": loss_after,
                "sparsity": sparsity[pid],
                "client-seconds": seconds,
                "update-norm": 0.1 * p.rank * (1 - 0.5 * sparsity[pid]),
            }
            updates.append(
                ClientUpdate(node_id=p.node_id, tensors={}, num_examples=10, plan=p, metrics=metrics)
            )
        state = selector.feedback(state, updates, RoundOutput(state={}, tensors={}))
    return state


def _fingerprint(state: dict) -> str:
    seq = [
        (
            d["round"],
            d["partition_id"],
            d["rank"],
            round(d["prune_ratio"], 9),
            d["leaf"],
            round(d["reward"], 9),
            round(d["sparsity"], 9),
        )
        for d in state["log"]
    ]
    return hashlib.sha256(json.dumps(seq).encode()).hexdigest()[:16]


@pytest.mark.parametrize(
    ("selector", "want"),
    [
        (
            FedSpineSelector(clients_per_round=4, seed=5, sucb=SucbConfig(ranks=(2, 4, 8))),
            "e0b81de8c7f52439",
        ),
        (FedSpineSelector(clients_per_round=6, seed=1), "56ac48e0453537a5"),
    ],
)
def test_default_decisions_are_the_ones_recorded_before_candidate_sparsities(
    selector: FedSpineSelector, want: str
) -> None:
    """Fingerprints of the decision log (arms, leaves, rewards, sparsities) printed by
    the code before ``sparsities`` existed; the loop reaches s* and freezes."""
    state = closed_loop(selector)

    assert _fingerprint(state) == want
    assert all(b["prune_frozen"] and "s_lo" not in b["cells"] for b in state["bandits"].values())
    assert {d["target_sparsity"] for d in state["log"]} == {0.5}


def test_sparsity_map_gives_each_candidate_an_equal_share() -> None:
    config = SucbConfig(ranks=(2, 4, 8), sparsities=CANDIDATES)
    assert config.dims == 3
    got = [sucb_sparsity(config, (0.0, 0.0, s)) for s in (0.0, 0.24, 0.25, 0.6, 0.99, 1.0)]
    assert got == [0.1, 0.1, 0.2, 0.3, 0.5, 0.5]
    assert sucb_sparsity(SucbConfig(sparsities=(0.2,)), (0.0, 0.0)) == 0.2
    assert SucbConfig(sparsities=(0.2,)).dims == 2
    assert sucb_sparsity(SucbConfig(), (0.0, 0.0)) is None


def test_candidate_tree_starts_with_one_cell_per_candidate_and_partitions_the_cube() -> None:
    config = SucbConfig(ranks=(2, 4, 8), sparsities=(0.0, *CANDIDATES), play="uniform")
    fresh = sucb_leaves(sucb_init(config))
    assert sorted((s0, s1) for *_, s0, s1 in fresh) == [
        (0.0, 0.2),
        (0.2, 0.4),
        (0.4, 0.6),
        (0.6, 0.8),
        (0.8, 1.0),
    ]
    state = sucb_init(config)
    assert set(state["cells"]["depth"]) == {0}  # the cuts do not age the candidates' trees
    noise = random.Random(0)
    for t in range(300):
        state, arm, x = sucb_select(state, config, t)
        assert len(x) == 3 and arm.sparsity == sucb_sparsity(config, x)
        state = sucb_update(state, config, arm.leaf, bump(x[:2]) + noise.gauss(0.0, 0.1))
    leaves = sucb_leaves(state)

    assert len(leaves) > len(fresh)
    assert math.isclose(
        sum((p1 - p0) * (r1 - r0) * (s1 - s0) for p0, p1, r0, r1, s0, s1 in leaves), 1.0
    )
    for leaf in leaves:  # ŝ is never split by play
        assert round(leaf[5] - leaf[4], 12) == 0.2
    probe = random.Random(1)
    for _ in range(200):
        pt = (probe.random(), probe.random(), probe.random())
        inside = [
            leaf for leaf in leaves if all(leaf[2 * k] <= pt[k] < leaf[2 * k + 1] for k in range(3))
        ]
        assert len(inside) == 1


@pytest.mark.parametrize("best", CANDIDATES)
def test_bandit_tries_every_candidate_sparsity_early_and_settles_on_the_best(best: float) -> None:
    config = SucbConfig(ranks=(2, 4, 8), sparsities=CANDIDATES)
    noise = random.Random(3)
    state = sucb_init(config)
    played = []
    for t in range(400):
        state, arm, _ = sucb_select(state, config, t)
        played.append(arm.sparsity)
        mean = 0.9 - 2.0 * abs(arm.sparsity - best) - 0.3 * abs(arm.prune_ratio - 0.15)
        state = sucb_update(state, config, arm.leaf, mean + noise.gauss(0.0, 0.05))

    assert sorted(played[: len(CANDIDATES)]) == list(CANDIDATES)  # each once, first
    late = played[-100:]
    assert max(set(late), key=late.count) == best


def test_config_refuses_bad_candidate_sparsities() -> None:
    for bad in ((0.5, 0.1), (0.1, 0.1), (0.2, 1.0), (-0.1, 0.2)):
        with pytest.raises(ConfigError, match="sparsities must be distinct numbers in"):
            SucbConfig(sparsities=bad)


def test_pruning_progress_is_measured_towards_the_chosen_target() -> None:
    # chose 0.5 from 0, reached 0.2: 0.2 / 0.5 of the way
    assert fedspine_reward_terms(1.0, 1.0, 0.2, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0)[1] == (
        pytest.approx(0.4)
    )
    # chose 0.2 and stands at it (reached now, or before: gain 0) → 1
    for gain, s_prev in ((0.2, 0.0), (0.0, 0.2), (0.0, 0.3)):
        terms = fedspine_reward_terms(1.0, 1.0, gain, 0.2, s_prev, 0.0, 0.0, 0.0, 0.0, at_target=True)
        assert terms[1] == 1.0
    # the specification's single target: a device at s* scores 0 (default unchanged)
    assert fedspine_reward_terms(1.0, 1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0)[1] == 0.0


def _candidate_updates(plans, sparsity: dict[int, float], extra=None) -> list[ClientUpdate]:
    return _updates(plans, sparsity, extra, seconds=1.0)


def test_selector_plans_chosen_targets_rewards_them_and_freezes_only_at_the_largest() -> None:
    nodes = [NodeInfo(node_id=100 + i, partition_id=i) for i in range(4)]
    selector = FedSpineSelector(
        clients_per_round=4,
        seed=2,
        sucb=SucbConfig(ranks=(2, 4, 8), sparsities=CANDIDATES),
        target_sparsity=0.9,  # ignored with candidates
    )
    assert selector.final_sparsity == 0.5
    state = selector.initialize(nodes)
    seen = set()
    for t in range(1, 5):  # every candidate of every device within M = 4 rounds
        state, plans = selector.plan(state, t, nodes)
        for plan in plans.values():
            target = plan.options["target-sparsity"]
            assert target in CANDIDATES
            assert state["pending"][str(plan.partition_id)]["target_sparsity"] == target
            seen.add((plan.partition_id, target))
        # every device lands at its chosen target → the progress term is 1
        reached = {p.partition_id: float(p.options["target-sparsity"]) for p in plans.values()}
        state = selector.feedback(
            state, _candidate_updates(plans, reached), RoundOutput(state={}, tensors={})
        )
        for d in state["log"][-len(plans) :]:
            assert d["reward_terms"][1] == 1.0
            if d["sparsity"] == 0.5:  # the largest candidate: nothing left to choose
                assert state["bandits"][str(d["partition_id"])]["prune_frozen"]
    assert seen == {(i, s) for i in range(4) for s in CANDIDATES}
    json.dumps(state)

    # fresh devices that pruned half-way to their target score 0.5; a device that
    # reports at-target (the ⌊s·N⌋ rounding left it just below) scores 1
    state, plans = selector.plan(selector.initialize(nodes), 1, nodes)
    half = {p.partition_id: 0.5 * float(p.options["target-sparsity"]) for p in plans.values()}
    out = selector.feedback(state, _candidate_updates(plans, half), RoundOutput(state={}, tensors={}))
    assert [d["reward_terms"][1] for d in out["log"]] == pytest.approx([0.5] * len(plans))
    assert not any(b["prune_frozen"] for b in out["bandits"].values())
    flagged = selector.feedback(
        state,
        _candidate_updates(plans, half, {AT_TARGET_KEY: 1.0}),
        RoundOutput(state={}, tensors={}),
    )
    assert [d["reward_terms"][1] for d in flagged["log"]] == [1.0] * len(plans)
    assert all(
        flagged["bandits"][str(d["partition_id"])]["prune_frozen"] == (d["target_sparsity"] == 0.5)
        for d in flagged["log"]
    )


# -- the time term's reference (issue 18) ---------------------------------------------


def _time_terms(selector: FedSpineSelector, seconds_by_round: list[dict[int, float]]) -> list[dict[int, float]]:
    """The time term each device's decision got, round by round, when every device
    trains every round and reports the given (simulated) seconds."""
    nodes = [NodeInfo(node_id=50 + i, partition_id=i) for i in range(3)]
    state = selector.initialize(nodes)
    out = []
    for rnd, seconds in enumerate(seconds_by_round, start=1):
        state, plans = selector.plan(state, rnd, nodes)
        updates = [
            ClientUpdate(
                node_id=u.node_id, tensors={}, num_examples=u.num_examples, plan=u.plan,
                metrics={**u.metrics, "simulated-seconds": seconds[u.plan.partition_id]},
            )
            for u in _updates(plans, 0.0)
        ]
        first = len(state["log"]) - len(plans)
        state = selector.feedback(state, updates, RoundOutput(state={}, tensors={}))
        out.append({d["partition_id"]: d["reward_terms"][3] for d in state["log"][first:]})
        json.dumps(state)
    return out


def test_time_reference_round_gives_the_straggler_nothing_and_device_rewards_its_own_speed_up() -> None:
    # device 2 is the straggler; in round 2 it halves its time, still the slowest
    seconds = [{0: 1.0, 1: 2.0, 2: 8.0}, {0: 1.0, 1: 2.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 6.0}]
    spec = _time_terms(FedSpineSelector(clients_per_round=3, seed=2), seconds)
    assert [r[2] for r in spec] == [0.0, 0.0, 0.0]  # 1 − T_i / max_j T_j: always 0 for it
    assert spec[1][0] == pytest.approx(0.75) and spec[1][1] == pytest.approx(0.5)

    own = _time_terms(FedSpineSelector(clients_per_round=3, seed=2, time_reference="device"), seconds)
    assert [r[2] for r in own] == pytest.approx([0.0, 0.5, 0.25])  # 1 − T_i / its slowest so far
    assert [r[0] for r in own] == [0.0, 0.0, 0.0]  # a device that never changes: 0
    assert own[0] == {0: 0.0, 1: 0.0, 2: 0.0}  # the first round has no past


def test_time_reference_is_validated() -> None:
    with pytest.raises(ConfigError, match="fedspine.time-reference must be one of round, device"):
        FedSpineSelector(clients_per_round=1, time_reference="fleet")
