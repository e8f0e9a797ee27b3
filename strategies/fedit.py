"""``fedit``: FedAvg on the LoRA factors A and B (and any trainable head).

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024. Per layer, with example-count weights ``p_k``:

    Ā = Σ_k p_k A_k    # (r, d_in)
    B̄ = Σ_k p_k B_k    # (d_out, r)

and every client starts the next round from ``(Ā, B̄)``. The product ``B̄Ā`` is not
``Σ_k p_k B_k A_k``; the gap is reported as ``aggregation_error``.

Mixed ranks (``lora.ranks``): the global adapter has the largest rank ``R``; a
rank-``r_k`` client receives the first ``r_k`` ranks and its upload is zero-padded
back to ``R`` (the :class:`fedpeft.PadToRank` layer: scales folded into B so ``s·B·A`` is
preserved) before the weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedpeft import FedStrategy, PadToRank, StrategyEnv, WeightedMean, register_strategy


@dataclass(frozen=True)
class FedItConfig:
    """Options of ``fedit``: none of its own (client weighting is the framework key
    ``aggregation.weighting``)."""


def build(config: FedItConfig, env: StrategyEnv) -> FedStrategy:
    """FedAvg of every uploaded tensor; every client trains the full adapter."""
    mixed = len(set(env.ranks)) > 1
    aggregator: Any = PadToRank(WeightedMean(), env.rank, env.layout) if mixed else WeightedMean()
    return FedStrategy(aggregator=aggregator, mixed_ranks=True, dp_compatible=not mixed)


register_strategy(
    "fedit",
    config_cls=FedItConfig,
    build=build,
    summary="FedAvg on LoRA A and B (Zhang et al., ICASSP 2024)",
)
