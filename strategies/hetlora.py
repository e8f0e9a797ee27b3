"""``hetlora``: heterogeneous ranks, zero-padding, norm-weighted mean, rank self-pruning.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024; ALGORITHMS.md §6. The global factors are kept at ``r_max``.

* **Distribute.** Client ``k`` receives ``A[:r_k, :]`` and ``B[:, :r_k]`` (scale ratio
  folded into B, :func:`fedpeft.lora.truncate_adapter_to`).
* **Local objective.** ``F_k + λ·Σ_ℓ ‖B_k[:, t:]‖_F·‖A_k[t:, :]‖_F`` with
  ``t = ⌊γ r_k⌋`` (the ``penalty`` hook of the client algorithm).
* **Self-pruning.** After training, if that tail norm product is smaller than at the
  client's previous participation, the client shrinks
  ``r_k ← max(r_min, ⌊γ r_k⌋)``: the dropped ranks are zeroed in this round's upload
  and the new rank is reported as the auxiliary tensor ``aux.hetlora.rank``. The
  client keeps its rank and last tail value in its state; :class:`HetLoraSelector`
  learns the reported ranks (``feedback``) and plans every later round at that rank,
  so model, payload and upload sizes follow ``r_k`` from the next participation on
  (the upload of the round in which a client shrinks still has the planned shape,
  with zeros in the dropped ranks).
* **Aggregate.** Zero-pad every upload to ``r_max`` (scale folded into B,
  :func:`fedpeft.lora.pad_rank`) and average with sparsity weights
  ``w_k = ‖s_k B_k A_k‖_F / Σ_j ‖s_j B_j A_j‖_F`` (norm over all layers, computed
  factored). ``weighting="blend"`` uses ``w_k ∝ p_k·‖…‖`` (damps a diverging client),
  ``"data"`` plain ``p_k``. Clients with zero examples always get weight 0. Extras
  (heads) are averaged with ``p_k``.

Defaults γ = 0.9, λ = 1e-3, ``r_min = 2`` are ALGORITHMS.md §6 proposals.

**Wire.** Up and down ``Σ_ℓ r_k (m + n)·b``. Sum-compatible when each client
pre-scales by its own norm and the norms are summed too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft import (
    AUX_PREFIX,
    AggregatorBase,
    ClientAlgorithmBase,
    ClientPlan,
    ClientUpdate,
    ConfigError,
    FedStrategy,
    NodeInfo,
    RoundOutput,
    StrategyEnv,
    TensorDict,
    UniformSelector,
    client_weights,
    register_strategy,
    weighted_mean,
)
from fedpeft.lora import (
    AdapterLayout,
    LoraFactors,
    join_adapter,
    pad_rank,
    product_frobenius_inner,
    resize_adapter_to,
    split_adapter,
)
from fedpeft.lora.peft_io import factor_keys, is_lora_key, lora_modules

RANK_KEY = AUX_PREFIX + "hetlora.rank"
"""Uploaded auxiliary tensor (0-dim float) with the client's rank for later rounds."""
STATE_RANK = "hetlora.rank"
STATE_TAIL = "hetlora.tail"
WEIGHTINGS = ("norm", "blend", "data")


@dataclass(frozen=True)
class HetLoraConfig:
    """Options of ``hetlora``.

    Attributes:
        gamma: kept fraction γ: the tail starts at ``⌊γ r⌋`` and a shrink keeps that many.
        lam: weight λ of the tail penalty.
        r_min: the smallest rank a client shrinks to.
        weighting: ``"norm"`` (paper), ``"blend"`` (``p_k``·norm) or ``"data"`` (``p_k``).
    """

    gamma: float = 0.9
    lam: float = 1e-3
    r_min: int = 2
    weighting: str = "norm"

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = []
        if not 0.0 < self.gamma < 1.0:
            out.append(f"hetlora.gamma must be in (0, 1), got {self.gamma}")
        if not self.lam >= 0.0:
            out.append(f"hetlora.lam must be >= 0, got {self.lam}")
        if self.r_min < 1:
            out.append(f"hetlora.r-min must be >= 1, got {self.r_min}")
        if self.weighting not in WEIGHTINGS:
            out.append(f"hetlora.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        return out


def tail_start(rank: int, gamma: float) -> int:
    """``⌊γ r⌋``: the first rank index of the penalised tail."""
    return math.floor(gamma * rank + 1e-9)


def shrunk_rank(rank: int, gamma: float, r_min: int) -> int:
    """``max(r_min, ⌊γ r⌋)``, never above ``rank``."""
    return min(rank, max(r_min, tail_start(rank, gamma)))


def tail_norm(factors: Mapping[str, LoraFactors], rank: int, gamma: float) -> torch.Tensor:
    """``Σ_ℓ ‖B[:, t:r]‖_F · ‖A[t:r, :]‖_F`` with ``t = ⌊γ r⌋`` (differentiable)."""
    t = tail_start(rank, gamma)
    terms = [
        torch.linalg.matrix_norm(f.b[:, t:rank]) * torch.linalg.matrix_norm(f.a[t:rank, :])
        for f in factors.values()
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def sparsity_weights(p: Sequence[float], norms: Sequence[float], weighting: str) -> list[float]:
    """Aggregation weights ``w_k`` (sum to 1).

    Args:
        p: data weights ``p_k`` (0 for a client without examples).
        norms: ``‖s_k B_k A_k‖_F`` per client.
        weighting: ``"norm"`` (``w_k ∝ ‖…‖``), ``"blend"`` (``∝ p_k‖…‖``) or ``"data"``
            (``p_k``). Falls back to ``p_k`` when every norm is 0.
    """
    if weighting == "data":
        return list(p)
    if weighting == "blend":
        raw = [pk * nk for pk, nk in zip(p, norms, strict=True)]
    else:
        raw = [nk if pk > 0 else 0.0 for pk, nk in zip(p, norms, strict=True)]
    total = sum(raw)
    return [r / total for r in raw] if total > 0 else list(p)


@dataclass(frozen=True)
class HetLoraAggregator(AggregatorBase[Any]):
    """Zero-pad to ``r_max`` and average with norm (sparsity) weights.

    Attributes:
        layout: scalings of the ranks.
        config: the strategy options.
    """

    layout: AdapterLayout
    config: HetLoraConfig

    def initialize(self, global_tensors: TensorDict) -> dict[str, Any]:
        """Stateless (ranks are planned by :class:`HetLoraSelector`)."""
        return {}

    def client_payload(
        self, state: dict[str, Any], global_tensors: TensorDict, plan: ClientPlan
    ) -> TensorDict:
        """The leading ``plan.rank`` ranks of the global factors, plus the extras."""
        return resize_adapter_to(global_tensors, plan.rank, self.layout)

    def aggregate(
        self,
        state: dict[str, Any],
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[dict[str, Any]]:
        """``A = Σ w_k pad(A_k)``, ``B = Σ w_k pad(B_k)``; extras by ``p_k``."""
        p = client_weights(updates)
        gfactors, gextra = split_adapter(global_tensors, self.layout)
        padded: list[TensorDict] = []
        extras: list[TensorDict] = []
        norms: list[float] = []
        for u in updates:
            factors, extra = split_adapter(
                {k: v for k, v in u.tensors.items() if k in global_tensors}, self.layout
            )
            norms.append(
                sum(product_frobenius_inner([(1.0, f)], [(1.0, f)]) for f in factors.values())
                ** 0.5
            )
            fixed = {m: pad_rank(factors[m], g.rank, g.scaling) for m, g in gfactors.items()}
            padded.append(join_adapter(fixed, {}))
            extras.append({k: v for k, v in extra.items() if k in gextra})
        w = sparsity_weights(p, norms, self.config.weighting)
        new = dict(global_tensors)
        new.update(weighted_mean(padded, w))
        if gextra:
            new.update(weighted_mean(extras, p))
        counted = [u.plan.rank for u, pk in zip(updates, p, strict=True) if pk > 0]
        metrics = {
            "hetlora/weight_max": max(w),
            "hetlora/rank_mean": sum(counted) / len(counted) if counted else 0.0,
            "hetlora/rank_min": float(min(counted)) if counted else 0.0,
        }
        return RoundOutput(state=state, tensors=new, metrics=metrics)


@dataclass(frozen=True)
class HetLoraClient(ClientAlgorithmBase):
    """Train at the client's rank with the tail penalty; shrink when the tail fades.

    Attributes:
        layout: scalings of the ranks (a shrink folds ``s_r / s_r'`` into B).
        config: the strategy options.
    """

    layout: AdapterLayout
    config: HetLoraConfig

    def start(
        self, received: TensorDict, init: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> tuple[TensorDict, frozenset[str]]:
        """The received factors at the model's rank; ranks beyond the kept rank zeroed.

        The kept rank is ``min(model rank, state rank)``; it is below the model's rank
        only when the server has not learned of a shrink (a lost reply). Zeroed ranks
        get zero gradients and stay zero.
        """
        model_rank = _rank(init)
        start = dict(init)
        got = {k: v for k, v in received.items() if k in init}
        start.update(resize_adapter_to(got, model_rank, self.layout))
        keep = min(model_rank, int(state[STATE_RANK])) if STATE_RANK in state else model_rank
        if keep < model_rank:
            start = _zero_tail(start, keep)
        return start, frozenset(init)

    def penalty(self, params: Mapping[str, torch.Tensor], plan: ClientPlan) -> torch.Tensor | None:
        """``λ·Σ_ℓ ‖B[:, ⌊γr⌋:]‖·‖A[⌊γr⌋:, :]‖`` at the live factors' rank."""
        modules = lora_modules(params)
        if not modules or self.config.lam == 0.0:
            return None
        factors = {}
        for m in modules:
            a_key, b_key = factor_keys(m)
            factors[m] = LoraFactors(a=params[a_key], b=params[b_key])
        return self.config.lam * tail_norm(factors, _rank(params), self.config.gamma)

    def finish(
        self, trained: TensorDict, received: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> tuple[TensorDict, TensorDict]:
        """Upload the trained adapter (dropped ranks zeroed) and the rank to use next."""
        cfg = self.config
        model_rank = _rank(trained)
        rank = min(model_rank, int(state[STATE_RANK])) if STATE_RANK in state else model_rank
        factors, _ = split_adapter({k: v for k, v in trained.items() if is_lora_key(k)})
        with torch.no_grad():
            tail = float(tail_norm(factors, rank, cfg.gamma))
        if STATE_TAIL in state and tail < float(state[STATE_TAIL]):
            rank = shrunk_rank(rank, cfg.gamma, cfg.r_min)
        upload = _zero_tail(dict(trained), rank) if rank < model_rank else dict(trained)
        upload[RANK_KEY] = torch.tensor(float(rank), dtype=torch.float64)
        new_state = {
            STATE_RANK: torch.tensor(rank, dtype=torch.int64),
            STATE_TAIL: torch.tensor(tail, dtype=torch.float64),
        }
        return upload, new_state


@dataclass(frozen=True)
class HetLoraSelector:
    """Uniform sampling; each node is planned at the last rank it reported.

    State: ``{"inner": <inner selector state>, "rank/<partition id>": int}``.

    Attributes:
        inner: the sampler (and source of the initial ranks).
        r_min: lower bound of a reported rank.
    """

    inner: UniformSelector
    r_min: int = 1

    def initialize(self, nodes: Sequence[NodeInfo]) -> dict[str, Any]:
        """No rank reported yet."""
        return {"inner": self.inner.initialize(nodes)}

    def plan(
        self, state: dict[str, Any], server_round: int, nodes: Sequence[NodeInfo]
    ) -> tuple[dict[str, Any], Mapping[int, ClientPlan]]:
        """The inner plans, with every rank capped by the node's reported rank."""
        inner_state, plans = self.inner.plan(state["inner"], server_round, nodes)
        out = {}
        for node_id, p in plans.items():
            reported = state.get(f"rank/{p.partition_id}")
            rank = p.rank if reported is None else min(p.rank, int(reported))
            out[node_id] = ClientPlan(
                node_id=p.node_id,
                partition_id=p.partition_id,
                rank=rank,
                seed=p.seed,
                options=p.options,
            )
        return {**state, "inner": inner_state}, out

    def feedback(
        self, state: dict[str, Any], updates: Sequence[ClientUpdate], output: RoundOutput[Any]
    ) -> dict[str, Any]:
        """Remember each client's reported rank (``aux.hetlora.rank``)."""
        new = dict(state)
        for u in updates:
            if RANK_KEY in u.tensors:
                reported = round(float(u.tensors[RANK_KEY]))
                new[f"rank/{u.plan.partition_id}"] = max(self.r_min, min(u.plan.rank, reported))
        new["inner"] = self.inner.feedback(state["inner"], updates, output)
        return new


def _rank(tensors: Mapping[str, torch.Tensor]) -> int:
    modules = lora_modules(tensors)
    return int(tensors[factor_keys(modules[0])[0]].shape[0]) if modules else 0


def _zero_tail(tensors: TensorDict, rank: int) -> TensorDict:
    """Zero ``A[rank:, :]`` and ``B[:, rank:]`` of every module (a copy)."""
    out = dict(tensors)
    for m in lora_modules(tensors):
        a_key, b_key = factor_keys(m)
        a, b = tensors[a_key].clone(), tensors[b_key].clone()
        a[rank:] = 0.0
        b[:, rank:] = 0.0
        out[a_key], out[b_key] = a, b
    return out


def build(config: HetLoraConfig, env: StrategyEnv) -> FedStrategy:
    """HetLoRA with its rank-tracking selector and self-pruning client."""
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    layout = env.layout
    inner = UniformSelector(
        clients_per_round=env.clients_per_round, rank=env.rank, ranks=env.ranks, seed=env.seed
    )
    return FedStrategy(
        aggregator=HetLoraAggregator(layout, config),
        client=HetLoraClient(layout, config),
        selector=HetLoraSelector(inner, r_min=min(config.r_min, env.rank)),
        mixed_ranks=True,
    )


register_strategy(
    "hetlora",
    config_cls=HetLoraConfig,
    build=build,
    summary="heterogeneous ranks, zero-padding, rank self-pruning (Cho et al., EMNLP 2024)",
)
