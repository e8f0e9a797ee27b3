"""A complete fedpeft plug-in: coordinate-wise median of the client adapters.

Run it with:
    PYTHONPATH=simulations/plugins fedpeft simulate --strategy median-lora \
        --set strategy.plugins=median_lora
"""

from dataclasses import dataclass

import torch

from fedpeft import AggregatorBase, FedStrategy, RoundOutput, StrategyEnv, register_strategy


@dataclass(frozen=True)
class MedianConfig:
    """Options of ``median-lora`` (set as ``median-lora.<option>``)."""

    min_clients: int = 1  # skip the update when fewer clients replied


@dataclass(frozen=True)
class CoordinateMedian(AggregatorBase):
    """Each tensor entry becomes the median of the clients' values."""

    min_clients: int = 1

    def aggregate(self, state, global_tensors, updates, server_round):
        new = dict(global_tensors)
        if len(updates) >= self.min_clients:
            for key in updates[0].tensors:
                stacked = torch.stack([u.tensors[key] for u in updates])  # (N, *shape)
                new[key] = stacked.median(dim=0).values
        return RoundOutput(state=state, tensors=new, metrics={"median/clients": len(updates)})


def build(config: MedianConfig, env: StrategyEnv) -> FedStrategy:
    return FedStrategy(aggregator=CoordinateMedian(config.min_clients))


register_strategy("median-lora", config_cls=MedianConfig, build=build,
                  summary="coordinate-wise median of client adapters (plug-in example)")
