"""Uniform sampling without replacement, with an optional fixed rank per client."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedpeft.seeding import derive_seed
from fedpeft.types import ClientPlan, ClientUpdate, NodeInfo, RoundOutput, Scalar


@dataclass(frozen=True)
class UniformSelector:
    """Sample ``clients_per_round`` nodes uniformly each round (FedAvg's sampler).

    Nodes are ordered by partition id and sampled with a generator seeded by
    ``(seed, "sample", round)``, so the same run samples the same clients in
    simulation and in deployment.

    Attributes:
        clients_per_round: how many nodes train per round.
        rank: LoRA rank of every client, unless ``ranks`` is given.
        ranks: mixed ranks: the node with partition id ``i`` trains with
            ``ranks[i % len(ranks)]`` in every round (a fixed device class per node).
        seed: the run seed.
        options: extra options put in every plan (strategy-specific).
    """

    clients_per_round: int
    rank: int
    ranks: tuple[int, ...] = ()
    seed: int = 0
    options: Mapping[str, Scalar] = field(default_factory=dict)

    def initialize(self, nodes: Sequence[NodeInfo]) -> dict[str, Any]:
        """Uniform sampling keeps no state."""
        return {}

    def rank_of(self, partition_id: int) -> int:
        """The rank assigned to the node with ``partition_id``."""
        if not self.ranks:
            return self.rank
        return self.ranks[partition_id % len(self.ranks)]

    def plan(
        self, state: dict[str, Any], server_round: int, nodes: Sequence[NodeInfo]
    ) -> tuple[dict[str, Any], Mapping[int, ClientPlan]]:
        """Sample clients and give each its rank and per-round seed."""
        ordered = sorted(nodes, key=lambda n: (n.partition_id, n.node_id))
        count = min(self.clients_per_round, len(ordered))
        rng = random.Random(derive_seed(self.seed, "sample", server_round))
        chosen = sorted(rng.sample(range(len(ordered)), count))
        plans: dict[int, ClientPlan] = {}
        for index in chosen:
            node = ordered[index]
            plans[node.node_id] = ClientPlan(
                node_id=node.node_id,
                partition_id=node.partition_id,
                rank=self.rank_of(node.partition_id),
                seed=derive_seed(self.seed, "client", server_round, node.partition_id),
                options=dict(self.options),
            )
        return state, plans

    def feedback(
        self,
        state: dict[str, Any],
        updates: Sequence[ClientUpdate],
        output: RoundOutput[Any],
    ) -> dict[str, Any]:
        """Uniform sampling does not learn."""
        return state
