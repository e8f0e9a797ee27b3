"""``fedit``: FedAvg on the LoRA factors A and B (and any trainable head).

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024. Per layer, with example-count weights ``p_k``:

    Ā = Σ_k p_k A_k    # (r, d_in)
    B̄ = Σ_k p_k B_k    # (d_out, r)

and every client starts the next round from ``(Ā, B̄)``. The product ``B̄Ā`` is not
``Σ_k p_k B_k A_k``; the gap is reported as ``aggregation_error``.

Mixed ranks (``lora.ranks``): the global adapter has the largest rank ``R``; a
rank-``r_k`` client receives the first ``r_k`` ranks and its upload is zero-padded
back to ``R`` (``fedpeft.lora.resize_adapter_to`` / ``pad_adapter_to``, scales folded
into B so ``s·B·A`` is preserved) before the weighted mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedpeft import (
    AggregatorBase,
    ClientPlan,
    ClientUpdate,
    FedStrategy,
    RoundOutput,
    StrategyEnv,
    TensorDict,
    WeightedMean,
    register_strategy,
)
from fedpeft.lora import AdapterLayout, pad_adapter_to, resize_adapter_to


@dataclass(frozen=True)
class FedItConfig:
    """Options of ``fedit``.

    Attributes:
        equal_weights: weight clients equally instead of by example count.
    """

    equal_weights: bool = False


@dataclass(frozen=True)
class MixedRankMean(AggregatorBase[Any]):
    """``WeightedMean`` over uploads zero-padded to the global rank.

    Attributes:
        rank: the global rank ``R``.
        layout: scaling facts (α, rsLoRA) for moving factors between ranks.
        equal_weights: weight clients equally.
    """

    rank: int
    layout: AdapterLayout
    equal_weights: bool = False

    def initialize(self, global_tensors: TensorDict) -> dict[str, Any]:
        """Stateless."""
        return {}

    def aggregate(
        self,
        state: dict[str, Any],
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[dict[str, Any]]:
        """Pad every upload to ``R``, then FedAvg."""
        padded = [
            ClientUpdate(u.node_id, pad_adapter_to(u.tensors, self.rank, self.layout),
                         u.num_examples, u.metrics, u.plan)
            for u in updates
        ]
        return WeightedMean(self.equal_weights).aggregate(state, global_tensors, padded, server_round)

    def client_payload(
        self, state: dict[str, Any], global_tensors: TensorDict, plan: ClientPlan
    ) -> TensorDict:
        """The global adapter truncated to the client's rank."""
        return resize_adapter_to(global_tensors, plan.rank, self.layout)


def build(config: FedItConfig, env: StrategyEnv) -> FedStrategy:
    """FedAvg of every uploaded tensor; every client trains the full adapter."""
    if len(set(env.ranks)) > 1:
        layout = env.layout
        aggregator: Any = MixedRankMean(env.rank, layout, config.equal_weights)
    else:
        aggregator = WeightedMean(equal_weights=config.equal_weights)
    return FedStrategy(aggregator=aggregator, mixed_ranks=True, dp_compatible=len(set(env.ranks)) <= 1)


register_strategy(
    "fedit",
    config_cls=FedItConfig,
    build=build,
    summary="FedAvg on LoRA A and B (Zhang et al., ICASSP 2024)",
)
