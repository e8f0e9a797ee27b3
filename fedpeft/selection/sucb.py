"""FedSpine's S-UCB bandit and the ``FedSpineSelector`` (ALGORITHMS.md §11.4).

Paper: Yao, Xu, Xu, Liao, Xie, "Efficient Deployment of Large Language Models on
Resource-constrained Devices" (FedSpine), arXiv 2501.02438. The paper's S-UCB (Smooth
Upper Confidence Bound) is only known from summaries; what is implemented here is the
specification's ``[PROPOSAL]``: hierarchical optimistic optimisation (HOO, Bubeck et
al., JMLR 2011) with a smoothness bonus over the arm space ``x = (p̂, r̂) ∈ [0, 1]²``
— or ``x = (p̂, r̂, ŝ) ∈ [0, 1]³`` when ``SucbConfig.sparsities`` offers two or more
candidate final sparsities (issue 18; ``[PROPOSAL]`` of this implementation, off by
default).

A tree of axis-aligned cells partitions ``[0, 1]²`` (``[0, 1]³``). Each cell ``C``
keeps a count ``n_C``, a mean reward ``μ_C`` and its depth ``h_C``, and gets the
index::

    U_C = μ_C + c · sqrt(2 ln t / n_C) + ν · ρ^{h_C}      (+∞ if never played)
    B_C = U_C                                           for a leaf
    B_C = min(U_C, max(B_left, B_right))                for an internal cell

``select`` descends from the root to the child with the larger ``B`` and plays the
leaf's centre (or a uniform point in it); ``update`` adds the reward to every cell on
the path and splits the leaf in half along its longer side (ties: ``p̂``; ``ŝ`` is
never split by play, see below) once it has been played
``n_split · 2^{h_C}`` times. With ``discount γ < 1`` every cell's count and reward sum
(and ``t``) are multiplied by ``γ`` before each update, which tracks a drifting reward
(the model changes between rounds); the split rule uses undiscounted visits.

The played point maps to a pruning ratio ``p = p_min + p̂ (p_max − p_min)`` and a
LoRA rank: with ``rank_map="value"`` the rank nearest to
``r_min + r̂ (r_max − r_min)``, with ``"index"`` the ``round(r̂ (K − 1))``-th of the
``K`` allowed ranks. With ``M ≥ 2`` candidate final sparsities ``ŝ`` picks the
``min(⌊ŝ M⌋, M − 1)``-th of them (an equal share of the axis each; with one candidate
it is always that one and there is no third coordinate). The ``ŝ`` axis is cut into
the ``M`` shares when the tree is created (a balanced binary subtree whose cells
have depth 0 and whose ``B`` is the larger child's, uncapped by its own ``U``), so
each candidate roots its own ``(p̂, r̂)`` tree that splits and earns its smoothness
bonus as a fresh 2-D tree would: every candidate is tried once in the first ``M``
plays, then they compete by their ``B`` values. Halving ``ŝ``
during play instead would reach the first cut only after ~10 plays and the outer
candidates after ~40, beyond a 20-round horizon. Once a device has reached its
largest possible target its pruning coordinate is frozen: only cells touching
``p̂ = 0`` are eligible and ``p = 0``.

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
"""The bandit state: ``{"t", "pulls", "prune_frozen", "cells": {name: list}}``; the
cells carry ``s_lo``/``s_hi`` only in a three-coordinate tree."""

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
_SPARSITY_FIELDS = ("s_lo", "s_hi")

METRIC_KEYS = ("loss-before", "loss-after", "sparsity", "client-seconds", "update-norm")
"""Client metrics ``FedSpineSelector.feedback`` needs from every update."""
AT_TARGET_KEY = "at-target"
"""Optional client metric: 1 when nothing is left to prune for the plan's target
sparsity (exact at any structure count, where ``sparsity >= target`` can miss by the
rounding ``⌊s·N⌋``); used with candidate sparsities only."""


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
        sparsities: candidate final sparsities, increasing, each in ``[0, 1)``
            (``[PROPOSAL]``, issue 18). Empty (default): no sparsity coordinate, the
            selector's single ``target_sparsity`` holds (the specification). Two or
            more: a third tree coordinate ``ŝ`` chooses one per round. One: that
            target, no third coordinate.
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
    sparsities: tuple[float, ...] = ()
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
        if any(not 0.0 <= s < 1.0 for s in self.sparsities) or list(
            self.sparsities
        ) != sorted(set(self.sparsities)):
            problems.append(
                f"sucb.sparsities must be distinct numbers in [0, 1) in increasing "
                f"order, got {self.sparsities}"
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

    @property
    def dims(self) -> int:
        """Coordinates of the arm space: 3 with two or more candidate sparsities."""
        return 3 if len(self.sparsities) > 1 else 2


@dataclass(frozen=True)
class SucbArm:
    """One decision of a bandit.

    Attributes:
        leaf: index of the played cell; pass it to :func:`sucb_update`.
        x: the played point ``(p̂, r̂)`` in ``[0, 1]²`` (``(p̂, r̂, ŝ)`` in a
            three-coordinate tree).
        prune_ratio: ``p``, fraction of the remaining structures to prune this round.
        rank: the LoRA rank.
        sparsity: the chosen final sparsity; ``None`` without candidates (the
            selector's single target applies).
    """

    leaf: int
    x: tuple[float, ...]
    prune_ratio: float
    rank: int
    sparsity: float | None = None


def sucb_init(config: SucbConfig) -> SucbState:
    """A bandit whose tree is the single root cell ``[0, 1]²`` (``[0, 1]³``)."""
    fields = _CELL_FIELDS + (_SPARSITY_FIELDS if config.dims == 3 else ())
    cells: dict[str, list[Any]] = {name: [] for name in fields}
    _append_cell(cells, (0.0, 1.0) * config.dims, depth=0, parent=-1)
    if config.dims == 3:
        _cut_sparsity_axis(cells, 0, 0, len(config.sparsities), len(config.sparsities))
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


def sucb_sparsity(config: SucbConfig, x: Sequence[float]) -> float | None:
    """The candidate final sparsity of a point: the ``min(⌊ŝ M⌋, M − 1)``-th of the
    ``M`` candidates (``ŝ = x[2]``); the only one if ``M = 1``; ``None`` if ``M = 0``."""
    choices = config.sparsities
    if not choices:
        return None
    if len(choices) == 1:
        return choices[0]
    return choices[min(len(choices) - 1, int(math.floor(float(x[2]) * len(choices))))]


def sucb_select(
    state: SucbState, config: SucbConfig, rng_seed: int
) -> tuple[SucbState, SucbArm, tuple[float, ...]]:
    """Choose the next arm; the state is returned unchanged (selection does not learn).

    Args:
        state: the bandit state.
        config: its constants.
        rng_seed: seeds tie-breaking between equal ``B`` values and, with
            ``play="uniform"``, the point drawn in the leaf.

    Returns:
        ``(state, arm, x)`` with ``x = arm.x`` (two or three coordinates).
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
    box = _box(cells, node)  # (lo, hi) per coordinate: p̂, r̂[, ŝ]
    if config.play == "uniform":
        x = tuple(lo + rng.random() * (hi - lo) for lo, hi in box[:2])
    else:
        x = tuple(0.5 * (lo + hi) for lo, hi in box[:2])
    x += tuple(0.5 * (lo + hi) for lo, hi in box[2:])  # ŝ: one candidate per cell
    if frozen:
        x = (0.0, *x[1:])
    ratio, rank = sucb_map(config, x, frozen)
    arm = SucbArm(
        leaf=node, x=x, prune_ratio=ratio, rank=rank, sparsity=sucb_sparsity(config, x)
    )
    return state, arm, x


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


def sucb_leaves(state: SucbState) -> list[tuple[float, ...]]:
    """The leaves as ``(p_lo, p_hi, r_lo, r_hi)`` (``+ (s_lo, s_hi)`` in a
    three-coordinate tree); they partition ``[0, 1]²`` (``[0, 1]³``)."""
    cells = state["cells"]
    return [
        tuple(v for side in _box(cells, i) for v in side)
        for i in range(len(cells["depth"]))
        if cells["left"][i] < 0
    ]


def _bound_names(cells: Mapping[str, list[Any]]) -> tuple[tuple[str, str], ...]:
    """``(lo, hi)`` field names per coordinate: ``p̂``, ``r̂`` and, if present, ``ŝ``."""
    names = (("p_lo", "p_hi"), ("r_lo", "r_hi"))
    return (*names, ("s_lo", "s_hi")) if "s_lo" in cells else names


def _box(cells: Mapping[str, list[Any]], i: int) -> tuple[tuple[float, float], ...]:
    return tuple((cells[lo][i], cells[hi][i]) for lo, hi in _bound_names(cells))


def _append_cell(
    cells: dict[str, list[Any]],
    box: tuple[float, ...],
    depth: int,
    parent: int,
) -> int:
    names = [name for pair in _bound_names(cells) for name in pair]
    for name, value in zip(names, box, strict=True):
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
    """Halve ``leaf`` along its longer ``p̂``/``r̂`` side (ties: ``p̂``)."""
    p_len = cells["p_hi"][leaf] - cells["p_lo"][leaf]
    r_len = cells["r_hi"][leaf] - cells["r_lo"][leaf]
    axis = 0 if p_len >= r_len else 1
    lo, hi = _box(cells, leaf)[axis]
    _halve(cells, leaf, axis, 0.5 * (lo + hi), cells["depth"][leaf] + 1)


def _halve(
    cells: dict[str, list[Any]], leaf: int, axis: int, cut: float, depth: int
) -> None:
    """Give ``leaf`` two children, cut at ``cut`` along ``axis``, at ``depth``."""
    box = _box(cells, leaf)
    lo, hi = box[axis]
    halves = []
    for part in ((lo, cut), (cut, hi)):
        sides = list(box)
        sides[axis] = part
        halves.append(tuple(v for side in sides for v in side))
    cells["left"][leaf] = _append_cell(cells, halves[0], depth, leaf)
    cells["right"][leaf] = _append_cell(cells, halves[1], depth, leaf)


def _cut_sparsity_axis(
    cells: dict[str, list[Any]], node: int, first: int, end: int, count: int
) -> None:
    """Cut ``node`` (candidates ``first..end-1`` of ``count``) along ``ŝ`` at the
    candidates' share boundaries ``k / count`` until each cell holds one candidate;
    all these cells keep depth 0 (the candidates' own trees start fresh)."""
    if end - first <= 1:
        return
    mid = (first + end) // 2
    _halve(cells, node, 2, mid / count, depth=0)
    _cut_sparsity_axis(cells, cells["left"][node], first, mid, count)
    _cut_sparsity_axis(cells, cells["right"][node], mid, end, count)


def _b_values(
    cells: Mapping[str, list[Any]], config: SucbConfig, t: float, frozen: bool
) -> list[float]:
    """``B_C`` of every cell; children always have larger indices than parents.

    A cut of the ``ŝ`` axis (children as deep as their parent) only chooses between
    candidates: its ``B`` is the larger child's, not capped by its own ``U``.
    """
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
        if left[i] < 0:
            b[i] = u
        elif depth[left[i]] == depth[i]:  # an ŝ cut
            b[i] = max(b[left[i]], b[right[i]])
        else:
            b[i] = min(u, max(b[left[i]], b[right[i]]))
    return b


TIME_REFERENCES = ("round", "device")
"""Values of ``fedspine.time-reference`` (:attr:`FedSpineSelector.time_reference`)."""


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
    *,
    at_target: bool = False,
) -> tuple[float, float, float, float]:
    """The four reward terms of §11.4, each clipped to ``[0, 1]`` (the one place
    FedSpine's reward is computed; FedSpine: Yao et al., arXiv 2501.02438 — the paper
    names the four ingredients, the formula is ALGORITHMS.md §11.4 ``[PROPOSAL]``).

    All arguments are scalars of one device and one round: probe-batch losses before
    and after local training, the sparsity it gained (``s_after − s_prev``), its
    target ``s*`` and round-start sparsity ``s_prev``, the Frobenius norm of its
    product change and the round's largest one, its (simulated) round time and the
    round's largest one.

    Pruning progress, ``gain / (s* − s_prev + 1e-8)``, is the specification's formula
    with ``s*`` the device's target. With candidate final sparsities (issue 18,
    ``[PROPOSAL]``) ``s*`` is the target the bandit chose for this round, and a device
    that stands at it after the round (``at_target``) scores 1 — also when it was
    there before: a low target that is reached is not penalised against a higher one
    still being pruned towards. With a single target (the default) ``at_target``
    stays false, so a device at ``s*`` scores 0 as in the specification (its pruning
    coordinate is frozen then, so every arm gets the same 0).

    Returns:
        ``(loss, pruning, importance, time)``:
        ``(L_before − L_after) / L_before``, ``1`` if ``at_target`` else
        ``gain / (s* − s_prev + 1e-8)``, ``‖ΔP_i‖ / max_j ‖ΔP_j‖`` and
        ``1 − T_i / max_j T_j``. A term whose denominator is not positive
        (``L_before``, ``max_update_norm``, ``max_time``) is 0.

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
    prune = 1.0 if at_target else sparsity_gain / (s_target - s_prev + 1e-8)
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
    *,
    at_target: bool = False,
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
        at_target=at_target,
    )
    return sum(w * term for w, term in zip(weights, terms, strict=True))


@dataclass(frozen=True)
class FedSpineSelector:
    """FedSpine's server controller: uniform sampling + one S-UCB bandit per device.

    ``plan`` samples ``clients_per_round`` nodes exactly like ``UniformSelector`` and
    asks each device's bandit (keyed by partition id) for a rank, a pruning ratio and
    — with candidate sparsities (``sucb.sparsities``) — a final sparsity; the plan
    carries the rank in ``ClientPlan.rank`` and the options ``"prune-ratio"``,
    ``"target-sparsity"`` (the chosen candidate, else ``target_sparsity``) and
    ``"prune-interval"``. ``feedback`` turns each update's metrics
    (:data:`METRIC_KEYS`) into the reward of :func:`fedspine_reward_terms` (maxima
    over this round's updates; pruning progress towards the decision's own target)
    and updates that device's bandit; a device whose sparsity reached its largest
    possible target (``target_sparsity``, or the largest candidate) gets its pruning
    coordinate frozen.

    The state is JSON-serialisable: ``{"bandits": {pid: SucbState}, "sparsity":
    {pid: float}, "pending": {pid: decision}, "log": [decision, ...]}`` (partition
    ids as strings). Every decision is logged with ``round``, ``partition_id``,
    ``node_id``, ``rank``, ``prune_ratio``, ``target_sparsity``, ``x`` and ``leaf``;
    ``feedback`` adds ``reward``, ``reward_terms`` and ``sparsity`` to the logged
    decision.

    Attributes:
        clients_per_round: how many nodes train per round.
        seed: the run seed.
        sucb: the bandit constants.
        target_sparsity: ``s*``, the final structure sparsity of every device
            (ignored when ``sucb.sparsities`` offers candidates).
        prune_interval: local steps between two pruning steps (20 was best in the
            paper's ablation).
        reward_weights: ``(w_L, w_P, w_I, w_T)``.
        freeze_tolerance: the pruning coordinate freezes once
            ``sparsity >= target_sparsity − freeze_tolerance`` (the largest
            candidate's); with candidates, a device also stands at its chosen target
            when ``sparsity >= target − freeze_tolerance`` (or the client reports
            :data:`AT_TARGET_KEY`).
        time_reference: what the time term divides a device's round time by:
            ``"round"`` (the specification, §11.4): the round's slowest device,
            ``1 − T_i / max_j T_j``; ``"device"`` (issue 18, ``[PROPOSAL]`` of this
            implementation, off by default): the device's own slowest round so far,
            ``1 − T_i / max_{t' ≤ t} T_i(t')``. Why: under the round reference the
            slowest device — the one that sets the round's duration — scores 0
            whatever arm it plays, so its bandit gets no signal for being faster;
            the device reference rewards every device for beating its own past
            round time (the first round scores 0).
        options: extra options put in every plan.
    """

    clients_per_round: int
    seed: int = 0
    sucb: SucbConfig = field(default_factory=SucbConfig)
    target_sparsity: float = 0.5
    prune_interval: int = 20
    reward_weights: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25)
    freeze_tolerance: float = 1e-3
    time_reference: str = "round"
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
        if self.time_reference not in TIME_REFERENCES:
            problems.append(
                f"fedspine.time-reference must be one of {', '.join(TIME_REFERENCES)}, "
                f"got {self.time_reference!r}"
            )
        if problems:
            raise ConfigError(problems)

    @property
    def final_sparsity(self) -> float:
        """The largest target a device can be given (its pruning freezes there)."""
        return max(self.sucb.sparsities, default=self.target_sparsity)

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
        """Sample clients uniformly; each device's bandit picks its arm."""
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
            target = self.target_sparsity if arm.sparsity is None else arm.sparsity
            decision = {
                "round": server_round,
                "partition_id": plan.partition_id,
                "node_id": node_id,
                "rank": arm.rank,
                "prune_ratio": arm.prune_ratio,
                "target_sparsity": target,
                "x": list(x),
                "leaf": arm.leaf,
            }
            new["pending"][pid] = {**decision, "log_index": len(new["log"])}
            new["log"].append(decision)
            options: dict[str, Scalar] = {
                **self.options,
                "prune-ratio": arm.prune_ratio,
                "target-sparsity": target,
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
        chosen = bool(self.sucb.sparsities)  # targets are arms, not one fixed s*
        new = copy.deepcopy(state)
        for u in updates:
            pid = str(u.plan.partition_id)
            decision = new["pending"].pop(pid)
            reference = max_time
            if self.time_reference == "device":  # the device's own slowest round so far
                slowest = new.setdefault("max_time", {})
                reference = max(float(slowest.get(pid, 0.0)), _seconds(u))
                slowest[pid] = reference
            s_prev = float(new["sparsity"].get(pid, 0.0))
            sparsity = float(u.metrics["sparsity"])
            target = float(decision.get("target_sparsity", self.target_sparsity))
            at_target = chosen and (
                sparsity >= target - self.freeze_tolerance
                or bool(u.metrics.get(AT_TARGET_KEY, 0.0))
            )
            terms = fedspine_reward_terms(
                float(u.metrics["loss-before"]),
                float(u.metrics["loss-after"]),
                sparsity - s_prev,
                target,
                s_prev,
                float(u.metrics["update-norm"]),
                max_norm,
                _seconds(u),
                reference,
                at_target=at_target,
            )
            reward = sum(w * t for w, t in zip(self.reward_weights, terms, strict=True))
            bandit = sucb_update(
                new["bandits"][pid], self.sucb, decision["leaf"], reward
            )
            final = self.final_sparsity
            if sparsity >= final - self.freeze_tolerance or (
                at_target and target >= final
            ):
                bandit = sucb_freeze_pruning(bandit)
            new["bandits"][pid] = bandit
            new["sparsity"][pid] = sparsity
            new["log"][decision["log_index"]].update(
                reward=reward, reward_terms=list(terms), sparsity=sparsity
            )
        return new
