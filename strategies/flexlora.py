"""``flexlora``: aggregate in weight space, redistribute by SVD at each client's rank.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources", NeurIPS 2024; ALGORITHMS.md §5. Per layer, with client
ranks ``r_k``, scalings ``s_k`` and weights ``p_k ∝ n_k``::

    ΔW = Σ_k p_k s_k B_k A_k = U Σ Vᵀ                       # (m, n), never formed
    client k:  B_k ← U[:, :r_k] Σ[:r_k] / s_k,  A_k ← V[:, :r_k]ᵀ

so client ``k`` starts from the best rank-``r_k`` approximation of ``ΔW``
(Eckart–Young). The SVD is exact and memory-free: QR of the stacked client factors
and an SVD of the ``(Σ r_k)²`` core (:func:`fedpeft.lora.svd_factors`), no randomised
SVD and no global RNG.

The global adapter (served and evaluated) is the rank-``r_max`` truncation, stored in
SVD order with ``Σ`` in B (``sigma`` option), so a client's payload is simply its
leading ``r_k`` ranks with the scale ratio folded into B
(:func:`fedpeft.lora.truncate_adapter_to`) — the aggregator keeps no state. When
``ΔW`` has fewer than ``r_max`` directions, the right singular basis is completed
inside the span of the previous global A (zero singular values), so every A row
stays orthonormal and trainable.

Metrics: ``flexlora/energy_r<r>`` — the fraction ``Σ_{j≤r} σ_j² / Σ_j σ_j²`` kept at
each client rank and at ``r_max`` (pooled over layers; watch for rank collapse) and
``flexlora/sigma_max``.

**Wire.** Up ``Σ_ℓ r_k (m + n)·b``; down the same per client. Server compute per layer
``O((Σ r_k)² (m + n))``. Needs each client's factors (``needs_individual_updates``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedpeft import (
    AggregatorBase,
    ClientPlan,
    ClientUpdate,
    ConfigError,
    FedStrategy,
    RoundOutput,
    StrategyEnv,
    TensorDict,
    client_weights,
    register_strategy,
    weighted_mean,
)
from fedpeft.lora import (
    SIGMA_SPLITS,
    AdapterLayout,
    factors_from_svd,
    resize_adapter_to,
    split_adapter,
    stack_factors,
    svd_factors,
)
from fedpeft.lora.peft_io import factor_keys


@dataclass(frozen=True)
class FlexLoraConfig:
    """Options of ``flexlora``.

    Attributes:
        sigma: where the singular values go: ``"b"`` (paper: ``B = UΣ/s``, ``A = Vᵀ``),
            ``"a"`` or ``"sqrt"`` (split evenly).
    """

    sigma: str = "b"

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        if self.sigma not in SIGMA_SPLITS:
            return [f"flexlora.sigma must be one of {SIGMA_SPLITS}, got {self.sigma!r}"]
        return []


@dataclass(frozen=True)
class FlexLoraAggregator(AggregatorBase[Any]):
    """Product-space mean, SVD, rank-``r_max`` global; per-client truncation.

    Attributes:
        layout: scalings of the ranks.
        config: the strategy options.
    """

    layout: AdapterLayout
    config: FlexLoraConfig

    def initialize(self, global_tensors: TensorDict) -> dict[str, Any]:
        """Stateless: the global adapter is kept in SVD order."""
        return {}

    def client_payload(
        self, state: dict[str, Any], global_tensors: TensorDict, plan: ClientPlan
    ) -> TensorDict:
        """The best rank-``plan.rank`` approximation: the leading ranks of the global."""
        return resize_adapter_to(global_tensors, plan.rank, self.layout)

    def aggregate(
        self,
        state: dict[str, Any],
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[dict[str, Any]]:
        """SVD of ``Σ p_k s_k B_k A_k`` per layer; extras averaged."""
        weights = client_weights(updates)
        gfactors, gextra = split_adapter(global_tensors, self.layout)
        clients = [split_adapter(u.tensors, self.layout) for u in updates]
        new = dict(global_tensors)
        if gextra:
            extras = [{k: v for k, v in e.items() if k in gextra} for _, e in clients]
            new.update(weighted_mean(extras, weights))
        ranks = sorted(
            {u.plan.rank for u, w in zip(updates, weights, strict=True) if w}
            | {g.rank for g in gfactors.values()}
        )
        kept = {r: 0.0 for r in ranks}
        total = sigma_max = 0.0
        for module, g in gfactors.items():
            stack = stack_factors([c[module] for c, _ in clients], weights)  # product = ΔW
            u, sv, vh = svd_factors(stack, complete=g.a)  # (m, k), (k,), (k, n)
            energy = (sv * sv).cumsum(0)
            total += float(energy[-1]) if sv.numel() else 0.0
            for r in ranks:
                kept[r] += float(energy[min(r, sv.numel()) - 1]) if sv.numel() else 0.0
            sigma_max = max(sigma_max, float(sv[0]) if sv.numel() else 0.0)
            out = factors_from_svd(
                u, sv, vh, g.rank, g.scaling, split=self.config.sigma
            )  # best rank-r_max factors, SVD order
            a_key, b_key = factor_keys(module)
            new[a_key], new[b_key] = out.a.to(g.a.dtype), out.b.to(g.b.dtype)
        metrics = {f"flexlora/energy_r{r}": (kept[r] / total if total > 0 else 1.0) for r in ranks}
        metrics["flexlora/sigma_max"] = sigma_max
        return RoundOutput(state=state, tensors=new, metrics=metrics)


def build(config: FlexLoraConfig, env: StrategyEnv) -> FedStrategy:
    """FlexLoRA: heterogeneous ranks via SVD redistribution."""
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    layout = env.layout
    return FedStrategy(
        aggregator=FlexLoraAggregator(layout, config),
        needs_individual_updates=True,
        mixed_ranks=True,
    )


register_strategy(
    "flexlora",
    config_cls=FlexLoraConfig,
    build=build,
    summary="weight-space mean, SVD to each client's rank (Bai et al., NeurIPS 2024)",
)
