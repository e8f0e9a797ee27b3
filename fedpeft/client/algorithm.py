"""The ``ClientAlgorithm`` protocol: what a client does before and after training.

The framework owns the model and the training loop; a strategy's client algorithm
decides which tensors the model starts from, which of them are trained and what is
uploaded, and what the client keeps for later rounds (``state``, persisted in
Flower's ``Context.state``). Mirrors the server: ``finish`` returns
``(upload, new_state)`` (ALGORITHMS.md §0).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedpeft.types import ClientPlan, TensorDict


@dataclass(frozen=True)
class LocalRound:
    """What an algorithm's own ``local_round`` hook returns (see ``ClientAlgorithm``).

    Attributes:
        result: the training result (``fedpeft.tasks.train.TrainResult``).
        tensors: what ``finish`` receives as ``trained``; may differ in shape from the
            model's adapter (e.g. pruned rows removed) and may carry ``aux.*`` keys.
        metrics: extra finite numbers added to the reply's training metrics.
        state: entries merged into the client state that ``finish`` receives.
    """

    result: Any
    tensors: TensorDict
    metrics: Mapping[str, float] = field(default_factory=dict)
    state: TensorDict = field(default_factory=dict)


class ClientAlgorithm(Protocol):
    """Client-side hooks of a strategy.

    Optional extra hook: ``penalty(params: Mapping[str, torch.Tensor], plan) ->
    torch.Tensor | None``. If the algorithm defines it, the trainer adds its value
    to the loss at every local step (``params`` are the live trainable adapter
    tensors keyed like the adapter). HetLoRA's rank self-pruning uses it.

    Optional extra hook: ``local_round(task, model, data, trainable, plan, state) ->
    LocalRound``. If defined, the client calls it instead of ``task.train`` after
    loading ``start``'s tensors into ``model`` (the process-wide cached model: copy it
    before changing its structure). FedSpine trains a structurally pruned copy.
    """

    def start(
        self,
        received: TensorDict,
        init: TensorDict,
        state: TensorDict,
        plan: ClientPlan,
    ) -> tuple[TensorDict, frozenset[str]]:
        """Choose the starting adapter and the trainable keys.

        Args:
            received: what the server sent (decoded).
            init: a freshly initialised adapter of the plan's rank (every key the
                model has), seeded by the plan.
            state: what this client kept from earlier rounds (empty at first).
            plan: this round's plan.

        Returns:
            The tensors to load (must cover every key of ``init``) and the keys to
            train; all other adapter tensors are frozen.
        """
        ...

    def finish(
        self,
        trained: TensorDict,
        received: TensorDict,
        state: TensorDict,
        plan: ClientPlan,
    ) -> tuple[TensorDict, TensorDict]:
        """Return ``(upload, new_state)`` after local training."""
        ...


@dataclass(frozen=True)
class FullAdapter:
    """Start from what was received, train every adapter tensor, upload it all.

    Keys the server did not send start from ``init``. This is FedIT's client.
    """

    def start(
        self,
        received: TensorDict,
        init: TensorDict,
        state: TensorDict,
        plan: ClientPlan,
    ) -> tuple[TensorDict, frozenset[str]]:
        """Load ``received`` over ``init``; train everything."""
        start = dict(init)
        start.update({k: v for k, v in received.items() if k in init})
        return start, frozenset(init)

    def finish(
        self,
        trained: TensorDict,
        received: TensorDict,
        state: TensorDict,
        plan: ClientPlan,
    ) -> tuple[TensorDict, TensorDict]:
        """Upload every trained tensor; keep no state."""
        return dict(trained), state
