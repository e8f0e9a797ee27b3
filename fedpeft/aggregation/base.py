"""The ``Aggregator`` protocol: the server half of every strategy.

An aggregator is a stateless object whose state is passed in and returned
(``aggregate(state, ...) -> RoundOutput(state, tensors, metrics)``), as in TFF's
aggregation processes. Nothing is hidden in attributes, so there is no call order to
respect and a checkpoint is just the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from fedpeft.types import ClientPlan, ClientUpdate, RoundOutput, TensorDict

S = TypeVar("S")


class Aggregator(Protocol[S]):
    """Combines client updates into a new global adapter.

    Implement three methods. ``client_payload`` decides what each client receives
    (for most strategies: the global adapter, see :func:`broadcast`); per-client
    payloads (different ranks, personalised factors) come from the ``ClientPlan``.

    Optional extra hook: ``check_update(state, tensors, plan) -> None``. If the
    aggregator defines it, the server calls it on every decoded upload before
    aggregation; raising ``FedPeftError`` (or ``ValueError``) rejects that one update
    with the message logged as the reason, and the round goes on without it. Use it
    for uploads whose structure only the strategy knows (e.g. Ferret's coordinates).

    Optional extra hook: ``client_failed(state, plan, reason) -> state``, called when a
    planned client replies with an error (its state may be lost); returns the new state.
    """

    def initialize(self, global_tensors: TensorDict) -> S:
        """Return the initial state given the initial global adapter."""
        ...

    def aggregate(
        self,
        state: S,
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[S]:
        """Aggregate validated updates; return the new state and global adapter."""
        ...

    def client_payload(
        self, state: S, global_tensors: TensorDict, plan: ClientPlan
    ) -> TensorDict:
        """Return the tensors sent to the client described by ``plan``."""
        ...


def broadcast(global_tensors: TensorDict) -> TensorDict:
    """The common ``client_payload``: every client receives the global adapter."""
    return dict(global_tensors)
