"""The ``Selector`` protocol: who trains this round, and with which plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from fedpeft.types import ClientPlan, ClientUpdate, NodeInfo, RoundOutput

S = TypeVar("S")


class Selector(Protocol[S]):
    """Samples clients and gives each a ``ClientPlan`` (rank, seed, options).

    State in, state out: ``plan`` and ``feedback`` return the new state, so a bandit
    (FedSpine) or a rank schedule (HetLoRA) is checkpointed with the run.
    """

    def initialize(self, nodes: Sequence[NodeInfo]) -> S:
        """Return the initial state for the nodes connected at the start."""
        ...

    def plan(
        self, state: S, server_round: int, nodes: Sequence[NodeInfo]
    ) -> tuple[S, Mapping[int, ClientPlan]]:
        """Choose this round's clients among ``nodes``; plans keyed by node id."""
        ...

    def feedback(
        self,
        state: S,
        updates: Sequence[ClientUpdate],
        output: RoundOutput[Any],
    ) -> S:
        """Learn from the round's accepted updates and aggregation output."""
        ...
