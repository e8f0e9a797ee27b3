"""Weighted mean of named tensors (FedAvg, McMahan et al., AISTATS 2017).

``mean[key] = Σ_k w_k · x_k[key] / Σ_k w_k`` with ``w_k`` the clients' example counts
(``aggregation.weighting=equal`` sets every count to 1 in a layer,
:class:`fedpeft.aggregation.layers.EqualWeights`). Computed in float64 and cast back, so the result
does not depend on client order beyond float64 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft.aggregation.base import AggregatorBase, broadcast
from fedpeft.errors import IncompatibleUpdateError
from fedpeft.types import ClientPlan, ClientUpdate, RoundOutput, TensorDict


def client_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """Normalised aggregation weights ``p_k`` (sum to 1).

    Clients with zero examples get weight 0. If every client has zero examples the
    weights fall back to equal, so an all-empty round still yields a defined mean.
    """
    if not updates:
        raise IncompatibleUpdateError("cannot aggregate an empty list of updates")
    raw = [float(u.num_examples) for u in updates]
    total = sum(raw)
    if total <= 0.0:
        return [1.0 / len(updates)] * len(updates)
    return [w / total for w in raw]


def weighted_mean(
    tensors: Sequence[TensorDict], weights: Sequence[float]
) -> TensorDict:
    """Key-wise weighted sum ``Σ_k p_k x_k`` of tensor dicts with identical keys.

    Args:
        tensors: one tensor dict per client, all with the same keys and shapes.
        weights: ``p_k``, already normalised.
    """
    keys = tensors[0].keys()
    out: TensorDict = {}
    for key in keys:
        acc = torch.zeros(tensors[0][key].shape, dtype=torch.float64)
        for t, w in zip(tensors, weights, strict=True):
            if w != 0.0:
                acc += w * t[key].to(torch.float64)
        out[key] = acc.to(tensors[0][key].dtype)
    return out


@dataclass(frozen=True)
class WeightedMean(AggregatorBase[Any]):
    """FedAvg over every uploaded tensor; the aggregator behind ``fedit``.

    Keys the clients did not upload keep their global value.
    """

    def initialize(self, global_tensors: TensorDict) -> dict[str, Any]:
        """FedAvg is stateless."""
        return {}

    def aggregate(
        self,
        state: dict[str, Any],
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[dict[str, Any]]:
        """Return the weighted mean of the uploaded tensors."""
        weights = client_weights(updates)
        new = dict(global_tensors)
        new.update(weighted_mean([u.tensors for u in updates], weights))
        return RoundOutput(state=state, tensors=new, metrics={})

    def client_payload(
        self, state: dict[str, Any], global_tensors: TensorDict, plan: ClientPlan
    ) -> TensorDict:
        """Every client receives the global adapter."""
        return broadcast(global_tensors)
