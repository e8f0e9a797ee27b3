"""FedSpine's S-UCB bandit and the ``FedSpineSelector`` (ALGORITHMS.md §11.4).

Paper: Yao, Xu, Xu, Liao, Xie, "Efficient Deployment of Large Language Models on
Resource-constrained Devices" (FedSpine), arXiv 2501.02438. The paper's S-UCB (Smooth
Upper Confidence Bound) is only known from summaries; what is implemented here is the
specification's ``[PROPOSAL]``: hierarchical optimistic optimisation (HOO, Bubeck et
al., JMLR 2011) with a smoothness bonus over the arm space ``x = (p̂, r̂) ∈ [0, 1]²``.

A tree of axis-aligned cells partitions ``[0, 1]²``. Each cell ``C`` keeps a count
``n_C``, a mean reward ``μ_C`` and its depth ``h_C``, and gets the index::

    U_C = μ_C + c · sqrt(2 ln t / n_C) + ν · ρ^{h_C}      (+∞ if never played)
    B_C = U_C                                           for a leaf
    B_C = min(U_C, max(B_left, B_right))                for an internal cell

``select`` descends from the root to the child with the larger ``B`` and plays the
leaf's centre (or a uniform point in it); ``update`` adds the reward to every cell on
the path and splits the leaf in half along its longer side once it has been played
``n_split · 2^{h_C}`` times. With ``discount γ < 1`` every cell's count and reward sum
(and ``t``) are multiplied by ``γ`` before each update, which tracks a drifting reward
(the model changes between rounds); the split rule uses undiscounted visits.

The played point maps to a pruning ratio ``p = p_min + p̂ (p_max − p_min)`` and a
LoRA rank: with ``rank_map="value"`` the rank nearest to
``r_min + r̂ (r_max − r_min)``, with ``"index"`` the ``round(r̂ (K − 1))``-th of the
``K`` allowed ranks. Once a device has reached the target sparsity its pruning
coordinate is frozen: only cells touching ``p̂ = 0`` are eligible and ``p = 0``.

The bandit is pure: its state is a JSON-serialisable dict of lists and scalars,
passed in and returned (``sucb_init`` / ``sucb_select`` / ``sucb_update``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from fedpeft.errors import ConfigError, IncompatibleUpdateError
from fedpeft.seeding import derive_seed
from fedpeft.selection.uniform import UniformSelector
from fedpeft.types import ClientPlan, ClientUpdate, NodeInfo, RoundOutput, Scalar

SucbState = dict[str, Any]
"""The bandit state: ``{"t", "pulls", "prune_frozen", "cells": {name: list}}``."""

_CELL_FIELDS = (
    "p_lo",
    "p_hi",
    "r_lo",
    "r_hi",
    "depth",
    "parent",
    "left",
    "right",
    "n",
    "total",
    "visits",
)

METRIC_KEYS = ("loss-before", "loss-after", "sparsity", "client-seconds", "update-norm")
"""Client metrics ``FedSpineSelector.feedback`` needs from every update."""


@dataclass(frozen=True)
class SucbConfig:
    """Constants of one S-UCB bandit (all ``[PROPOSAL]`` defaults of §11.4).

    Attributes:
        c: weight of the confidence term ``c · sqrt(2 ln t / n_C)``.
        nu: smoothness bonus scale ``ν``.
        rho: smoothness bonus decay ``ρ`` per depth, in ``(0, 1)``.
        n_split: a leaf splits after ``n_split · 2^{h_C}`` plays.
        discount: ``γ`` applied to counts and sums before each update (1 = none).
            Default differs from the specification: 1 (ALGORITHMS.md §11 pitfalls
            suggest 0.95 for the drifting reward) because on this tree 0.95 was worse
            in every test: the counts never exceed ``1/(1 − γ) = 20``, so the
            confidence term stops shrinking while leaves keep splitting on
            undiscounted visits and exploration never ends. Mean reward over seeds
            0–2 on the problems of ``tests/selection/test_sucb.py``: stationary, last
            400 of 2,000 pulls 0.966 (γ = 1) vs 0.545 (γ = 0.95); maximiser jumping
            after 200 of 400 pulls, last 80 pulls 0.862 vs 0.574; maximiser moving
            steadily over 200 pulls, whole run 0.687 vs 0.523.
        p_min: pruning ratio at ``p̂ = 0`` (fraction of the remaining structures).
        p_max: pruning ratio at ``p̂ = 1``.
        ranks: allowed LoRA ranks, increasing.
        rank_map: ``"value"`` (nearest rank to the linear map onto
            ``[min(ranks), max(ranks)]``) or ``"index"`` (equal share per rank).
        play: ``"centre"`` plays the leaf centre, ``"uniform"`` a seeded uniform
            point of the leaf.
        max_depth: leaves at this depth never split.
    """

    c: float = 0.5
    nu: float = 1.0
    rho: float = 0.5
    n_split: int = 2
    discount: float = 1.0
    p_min: float = 0.0
    p_max: float = 0.3
    ranks: tuple[int, ...] = (2, 4, 8, 16, 32)
    rank_map: Literal["value", "index"] = "value"
    play: Literal["centre", "uniform"] = "centre"
    max_depth: int = 24

    def __post_init__(self) -> None:
        """Validate the fields; report every problem at once."""
        problems: list[str] = []
        if not self.c >= 0.0:
            problems.append(f"sucb.c must be >= 0, got {self.c}")
        if not self.nu >= 0.0:
            problems.append(f"sucb.nu must be >= 0, got {self.nu}")
        if not 0.0 < self.rho < 1.0:
            problems.append(f"sucb.rho must be in (0, 1), got {self.rho}")
        if self.n_split < 1:
            problems.append(f"sucb.n-split must be >= 1, got {self.n_split}")
        if not 0.0 < self.discount <= 1.0:
            problems.append(f"sucb.discount must be in (0, 1], got {self.discount}")
        if not 0.0 <= self.p_min <= self.p_max < 1.0:
            problems.append(
                f"sucb.p-min/p-max must satisfy 0 <= p_min <= p_max < 1, "
                f"got {self.p_min}/{self.p_max}"
            )
        if (
            not self.ranks
            or any(r < 1 for r in self.ranks)
            or list(self.ranks) != sorted(set(self.ranks))
        ):
            problems.append(
                f"sucb.ranks must be distinct positive integers in increasing order, "
                f"got {self.ranks}"
            )
        if self.rank_map not in ("value", "index"):
            problems.append(
                f"sucb.rank-map must be 'value' or 'index', got {self.rank_map!r}"
            )
        if self.play not in ("centre", "uniform"):
            problems.append(
                f"sucb.play must be 'centre' or 'uniform', got {self.play!r}"
            )
        if self.max_depth < 0:
            problems.append(f"sucb.max-depth must be >= 0, got {self.max_depth}")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True)
class SucbArm:
    """One decision of a bandit.

    Attributes:
        leaf: index of the played cell; pass it to :func:`sucb_update`.
        x: the played point ``(p̂, r̂)`` in ``[0, 1]²``.
        prune_ratio: ``p``, fraction of the remaining structures to prune this round.
        rank: the LoRA rank.
    """

    leaf: int
    x: tuple[float, float]
    prune_ratio: float
    rank: int


def sucb_init(config: SucbConfig) -> SucbState:
    """A bandit whose tree is the single root cell ``[0, 1]²``."""
    cells: dict[str, list[Any]] = {name: [] for name in _CELL_FIELDS}
    _append_cell(cells, (0.0, 1.0, 0.0, 1.0), depth=0, parent=-1)
    return {"t": 0.0, "pulls": 0, "prune_frozen": False, "cells": cells}


def sucb_map(
    config: SucbConfig, x: Sequence[float], prune_frozen: bool = False
) -> tuple[float, int]:
    """Map a point ``(p̂, r̂)`` of ``[0, 1]²`` to ``(prune_ratio, rank)``."""
    p_hat, r_hat = float(x[0]), float(x[1])
    ratio = (
        0.0 if prune_frozen else config.p_min + p_hat * (config.p_max - config.p_min)
    )
    ranks = config.ranks
    if config.rank_map == "index":
        rank = ranks[
            min(len(ranks) - 1, int(math.floor(r_hat * (len(ranks) - 1) + 0.5)))
        ]
    else:
        target = ranks[0] + r_hat * (ranks[-1] - ranks[0])
        rank = min(ranks, key=lambda r: (abs(r - target), r))
    return ratio, rank


def sucb_select(
    state: SucbState, config: SucbConfig, rng_seed: int
) -> tuple[SucbState, SucbArm, tuple[float, float]]:
    """Choose the next arm; the state is returned unchanged (selection does not learn).

    Args:
        state: the bandit state.
        config: its constants.
        rng_seed: seeds tie-breaking between equal ``B`` values and, with
            ``play="uniform"``, the point drawn in the leaf.

    Returns:
        ``(state, arm, x)`` with ``x = arm.x``.
    """
    rng = random.Random(rng_seed)
    cells = state["cells"]
    frozen = bool(state["prune_frozen"])
    b_values = _b_values(cells, config, float(state["t"]) + 1.0, frozen)
    node = 0
    while cells["left"][node] >= 0:
        left, right = cells["left"][node], cells["right"][node]
        b_left, b_right = b_values[left], b_values[right]
        if b_left == b_right:
            node = left if rng.random() < 0.5 else right
        else:
            node = left if b_left > b_right else right
    p_lo, p_hi = cells["p_lo"][node], cells["p_hi"][node]
    r_lo, r_hi = cells["r_lo"][node], cells["r_hi"][node]
    if config.play == "uniform":
        x = (p_lo + rng.random() * (p_hi - p_lo), r_lo + rng.random() * (r_hi - r_lo))
    else:
        x = (0.5 * (p_lo + p_hi), 0.5 * (r_lo + r_hi))
    if frozen:
        x = (0.0, x[1])
    ratio, rank = sucb_map(config, x, frozen)
    return state, SucbArm(leaf=node, x=x, prune_ratio=ratio, rank=rank), x


def sucb_update(
    state: SucbState, config: SucbConfig, leaf: int, reward: float
) -> SucbState:
    """Add ``reward`` for the arm played in ``leaf``; maybe split that leaf.

    Raises:
        ValueError: ``leaf`` is not a cell of the tree or ``reward`` is not finite.
    """
    cells = state["cells"]
    if not 0 <= leaf < len(cells["depth"]):
        raise ValueError(
            f"leaf must index a cell in [0, {len(cells['depth'])}), got {leaf}"
        )
    if not math.isfinite(reward):
        raise ValueError(f"reward must be finite, got {reward}")
    new_cells = {name: list(values) for name, values in cells.items()}
    n, total, visits = new_cells["n"], new_cells["total"], new_cells["visits"]
    gamma = config.discount
    t = float(state["t"])
    if gamma < 1.0:
        for i in range(len(n)):
            n[i] *= gamma
            total[i] *= gamma
        t *= gamma
    node = leaf
    while node >= 0:
        n[node] += 1.0
        total[node] += reward
        visits[node] += 1
        node = new_cells["parent"][node]
    depth = new_cells["depth"][leaf]
    if (
        new_cells["left"][leaf] < 0
        and depth < config.max_depth
        and visits[leaf] >= config.n_split * 2**depth
    ):
        _split(new_cells, leaf)
    return {
        "t": t + 1.0,
        "pulls": int(state["pulls"]) + 1,
        "prune_frozen": bool(state["prune_frozen"]),
        "cells": new_cells,
    }


def sucb_freeze_pruning(state: SucbState) -> SucbState:
    """Freeze the pruning coordinate at ``p = 0`` (the device reached ``s*``)."""
    return {**state, "prune_frozen": True}


def sucb_leaves(state: SucbState) -> list[tuple[float, float, float, float]]:
    """The leaves as ``(p_lo, p_hi, r_lo, r_hi)``; they partition ``[0, 1]²``."""
    cells = state["cells"]
    return [
        (cells["p_lo"][i], cells["p_hi"][i], cells["r_lo"][i], cells["r_hi"][i])
        for i in range(len(cells["depth"]))
        if cells["left"][i] < 0
    ]


def _append_cell(
    cells: dict[str, list[Any]],
    box: tuple[float, float, float, float],
    depth: int,
    parent: int,
) -> int:
    for name, value in zip(("p_lo", "p_hi", "r_lo", "r_hi"), box, strict=True):
        cells[name].append(value)
    cells["depth"].append(depth)
    cells["parent"].append(parent)
    cells["left"].append(-1)
    cells["right"].append(-1)
    cells["n"].append(0.0)
    cells["total"].append(0.0)
    cells["visits"].append(0)
    return len(cells["depth"]) - 1


def _split(cells: dict[str, list[Any]], leaf: int) -> None:
    """Halve ``leaf`` along its longer side (ties: the pruning side)."""
    p_lo, p_hi = cells["p_lo"][leaf], cells["p_hi"][leaf]
    r_lo, r_hi = cells["r_lo"][leaf], cells["r_hi"][leaf]
    depth = cells["depth"][leaf] + 1
    if p_hi - p_lo >= r_hi - r_lo:
        mid = 0.5 * (p_lo + p_hi)
        boxes = ((p_lo, mid, r_lo, r_hi), (mid, p_hi, r_lo, r_hi))
    else:
        mid = 0.5 * (r_lo + r_hi)
        boxes = ((p_lo, p_hi, r_lo, mid), (p_lo, p_hi, mid, r_hi))
    cells["left"][leaf] = _append_cell(cells, boxes[0], depth, leaf)
    cells["right"][leaf] = _append_cell(cells, boxes[1], depth, leaf)


def _b_values(
    cells: Mapping[str, list[Any]], config: SucbConfig, t: float, frozen: bool
) -> list[float]:
    """``B_C`` of every cell; children always have larger indices than parents."""
    count = len(cells["depth"])
    log_t = math.log(max(t, 1.0))
    n, total, depth = cells["n"], cells["total"], cells["depth"]
    left, right, p_lo = cells["left"], cells["right"], cells["p_lo"]
    bonus = [config.nu * config.rho**h for h in range(max(depth) + 1)]
    b = [0.0] * count
    for i in range(count - 1, -1, -1):
        if frozen and p_lo[i] > 0.0:
            b[i] = -math.inf
            continue
        if n[i] > 0.0:
            u = (
                total[i] / n[i]
                + config.c * math.sqrt(2.0 * log_t / n[i])
                + bonus[depth[i]]
            )
        else:
            u = math.inf
        b[i] = u if left[i] < 0 else min(u, max(b[left[i]], b[right[i]]))
    return b


def _seconds(update: ClientUpdate) -> float:
    """The round time the reward uses: ``simulated-seconds`` (the device profile's
    time, added by the server under ``devices.profile``) when present, else the
    measured ``client-seconds`` (a real deployment)."""
    metrics = update.metrics
    return float(metrics.get("simulated-seconds", metrics["client-seconds"]))


def _clip01(value: float) -> float:
    return min(1.0, max(0.0, value))


def fedspine_reward_terms(
    loss_before: float,
    loss_after: float,
    sparsity_gain: float,
    s_target: float,
    s_prev: float,
    update_norm: float,
    max_update_norm: float,
    time: float,
    max_time: float,
) -> tuple[float, float, float, float]:
    """The four reward terms of §11.4, each clipped to ``[0, 1]``.

    Returns:
        ``(loss, pruning, importance, time)``:
        ``(L_before − L_after) / L_before``, ``gain / (s* − s_prev + 1e-8)``,
        ``‖ΔP_i‖ / max_j ‖ΔP_j‖`` and ``1 − T_i / max_j T_j``. A term whose
        denominator is not positive (``L_before``, ``max_update_norm``, ``max_time``)
        is 0.

    Raises:
        ValueError: an input is not finite.
    """
    values = {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "sparsity_gain": sparsity_gain,
        "s_target": s_target,
        "s_prev": s_prev,
        "update_norm": update_norm,
        "max_update_norm": max_update_norm,
        "time": time,
        "max_time": max_time,
    }
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise ValueError(f"reward inputs must be finite, got {bad}")
    loss = (loss_before - loss_after) / loss_before if loss_before > 0.0 else 0.0
    prune = sparsity_gain / (s_target - s_prev + 1e-8)
    importance = update_norm / max_update_norm if max_update_norm > 0.0 else 0.0
    speed = 1.0 - time / max_time if max_time > 0.0 else 0.0
    return _clip01(loss), _clip01(prune), _clip01(importance), _clip01(speed)


def fedspine_reward(
    loss_before: float,
    loss_after: float,
    sparsity_gain: float,
    s_target: float,
    s_prev: float,
    update_norm: float,
    max_update_norm: float,
    time: float,
    max_time: float,
    weights: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25),
) -> float:
    """``R = w_L·loss + w_P·pruning + w_I·importance + w_T·time`` (§11.4).

    Each term is computed and clipped by :func:`fedspine_reward_terms`; with weights
    summing to 1 the reward lies in ``[0, 1]``.
    """
    terms = fedspine_reward_terms(
        loss_before,
        loss_after,
        sparsity_gain,
        s_target,
        s_prev,
        update_norm,
        max_update_norm,
        time,
        max_time,
    )
    return sum(w * term for w, term in zip(weights, terms, strict=True))


@dataclass(frozen=True)
class FedSpineSelector:
    """FedSpine's server controller: uniform sampling + one S-UCB bandit per device.

    ``plan`` samples ``clients_per_round`` nodes exactly like ``UniformSelector`` and
    asks each device's bandit (keyed by partition id) for a rank and a pruning ratio;
    the plan carries the rank in ``ClientPlan.rank`` and the options
    ``"prune-ratio"``, ``"target-sparsity"`` and ``"prune-interval"``.
    ``feedback`` turns each update's metrics (:data:`METRIC_KEYS`) into the reward of
    :func:`fedspine_reward` (maxima over this round's updates) and updates that
    device's bandit; a device whose sparsity reached ``target_sparsity`` gets its
    pruning coordinate frozen.

    The state is JSON-serialisable: ``{"bandits": {pid: SucbState}, "sparsity":
    {pid: float}, "pending": {pid: decision}, "log": [decision, ...]}`` (partition
    ids as strings). Every decision is logged with ``round``, ``partition_id``,
    ``node_id``, ``rank``, ``prune_ratio``, ``x`` and ``leaf``; ``feedback`` adds
    ``reward``, ``reward_terms`` and ``sparsity`` to the logged decision.

    Attributes:
        clients_per_round: how many nodes train per round.
        seed: the run seed.
        sucb: the bandit constants.
        target_sparsity: ``s*``, the final structure sparsity of every device.
        prune_interval: local steps between two pruning steps (20 was best in the
            paper's ablation).
        reward_weights: ``(w_L, w_P, w_I, w_T)``.
        freeze_tolerance: the pruning coordinate freezes once
            ``sparsity >= target_sparsity − freeze_tolerance``.
        options: extra options put in every plan.
    """

    clients_per_round: int
    seed: int = 0
    sucb: SucbConfig = field(default_factory=SucbConfig)
    target_sparsity: float = 0.5
    prune_interval: int = 20
    reward_weights: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25)
    freeze_tolerance: float = 1e-3
    options: Mapping[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate the fields; report every problem at once."""
        problems: list[str] = []
        if self.clients_per_round < 1:
            problems.append(
                f"clients-per-round must be >= 1, got {self.clients_per_round}"
            )
        if not 0.0 <= self.target_sparsity < 1.0:
            problems.append(
                f"fedspine.target-sparsity must be in [0, 1), "
                f"got {self.target_sparsity}"
            )
        if self.prune_interval < 1:
            problems.append(
                f"fedspine.prune-interval must be >= 1, got {self.prune_interval}"
            )
        if len(self.reward_weights) != 4 or any(w < 0.0 for w in self.reward_weights):
            problems.append(
                f"fedspine.reward-weights must be 4 non-negative numbers, "
                f"got {self.reward_weights}"
            )
        if problems:
            raise ConfigError(problems)

    def initialize(self, nodes: Sequence[NodeInfo]) -> dict[str, Any]:
        """One fresh bandit per connected device."""
        bandits = {str(n.partition_id): sucb_init(self.sucb) for n in nodes}
        return {
            "bandits": bandits,
            "sparsity": {pid: 0.0 for pid in bandits},
            "pending": {},
            "log": [],
        }

    def plan(
        self, state: dict[str, Any], server_round: int, nodes: Sequence[NodeInfo]
    ) -> tuple[dict[str, Any], Mapping[int, ClientPlan]]:
        """Sample clients uniformly; each device's bandit picks its rank and ratio."""
        sampler = UniformSelector(
            self.clients_per_round, rank=self.sucb.ranks[0], seed=self.seed
        )
        _, sampled = sampler.plan({}, server_round, nodes)
        new = copy.deepcopy(state)
        new["pending"] = {}
        plans: dict[int, ClientPlan] = {}
        for node_id, plan in sampled.items():
            pid = str(plan.partition_id)
            bandit = new["bandits"].get(pid) or sucb_init(self.sucb)
            rng_seed = derive_seed(self.seed, "sucb", server_round, plan.partition_id)
            bandit, arm, x = sucb_select(bandit, self.sucb, rng_seed)
            new["bandits"][pid] = bandit
            new["sparsity"].setdefault(pid, 0.0)
            decision = {
                "round": server_round,
                "partition_id": plan.partition_id,
                "node_id": node_id,
                "rank": arm.rank,
                "prune_ratio": arm.prune_ratio,
                "x": [x[0], x[1]],
                "leaf": arm.leaf,
            }
            new["pending"][pid] = {**decision, "log_index": len(new["log"])}
            new["log"].append(decision)
            options: dict[str, Scalar] = {
                **self.options,
                "prune-ratio": arm.prune_ratio,
                "target-sparsity": self.target_sparsity,
                "prune-interval": self.prune_interval,
            }
            plans[node_id] = dataclasses.replace(plan, rank=arm.rank, options=options)
        return new, plans

    def feedback(
        self,
        state: dict[str, Any],
        updates: Sequence[ClientUpdate],
        output: RoundOutput[Any],
    ) -> dict[str, Any]:
        """Reward each reporting device's decision and update its bandit.

        Raises:
            IncompatibleUpdateError: an update lacks one of :data:`METRIC_KEYS` or
                comes from a device that was not planned this round.
        """
        for u in updates:
            missing = [k for k in METRIC_KEYS if k not in u.metrics]
            if missing:
                raise IncompatibleUpdateError(
                    f"client {u.node_id} (partition {u.plan.partition_id}) did not "
                    f"report the FedSpine metrics {missing}; expected all of "
                    f"{list(METRIC_KEYS)}"
                )
            if str(u.plan.partition_id) not in state["pending"]:
                raise IncompatibleUpdateError(
                    f"client {u.node_id} (partition {u.plan.partition_id}) sent an "
                    f"update but has no pending FedSpine decision; planned partitions: "
                    f"{sorted(state['pending'])}"
                )
        if not updates:
            return state
        max_norm = max(float(u.metrics["update-norm"]) for u in updates)
        max_time = max(_seconds(u) for u in updates)
        new = copy.deepcopy(state)
        for u in updates:
            pid = str(u.plan.partition_id)
            decision = new["pending"].pop(pid)
            s_prev = float(new["sparsity"].get(pid, 0.0))
            sparsity = float(u.metrics["sparsity"])
            terms = fedspine_reward_terms(
                float(u.metrics["loss-before"]),
                float(u.metrics["loss-after"]),
                sparsity - s_prev,
                self.target_sparsity,
                s_prev,
                float(u.metrics["update-norm"]),
                max_norm,
                _seconds(u),
                max_time,
            )
            reward = sum(w * t for w, t in zip(self.reward_weights, terms, strict=True))
            bandit = sucb_update(
                new["bandits"][pid], self.sucb, decision["leaf"], reward
            )
            if sparsity >= self.target_sparsity - self.freeze_tolerance:
                bandit = sucb_freeze_pruning(bandit)
            new["bandits"][pid] = bandit
            new["sparsity"][pid] = sparsity
            new["log"][decision["log_index"]].update(
                reward=reward, reward_terms=list(terms), sparsity=sparsity
            )
        return new
