"""``fedit``: FedAvg on the LoRA factors A and B (and any trainable head).

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024. Per layer, with example-count weights ``p_k``:

    Ā = Σ_k p_k A_k    # (r, d_in)
    B̄ = Σ_k p_k B_k    # (d_out, r)

and every client starts the next round from ``(Ā, B̄)``. The product ``B̄Ā`` is not
``Σ_k p_k B_k A_k``; the gap is reported as ``aggregation_error``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedpeft import FedStrategy, StrategyEnv, WeightedMean, register_strategy


@dataclass(frozen=True)
class FedItConfig:
    """Options of ``fedit``.

    Attributes:
        equal_weights: weight clients equally instead of by example count.
    """

    equal_weights: bool = False


def build(config: FedItConfig, env: StrategyEnv) -> FedStrategy:
    """FedAvg of every uploaded tensor; every client trains the full adapter."""
    return FedStrategy(aggregator=WeightedMean(equal_weights=config.equal_weights))


register_strategy(
    "fedit",
    config_cls=FedItConfig,
    build=build,
    summary="FedAvg on LoRA A and B (Zhang et al., ICASSP 2024)",
)
