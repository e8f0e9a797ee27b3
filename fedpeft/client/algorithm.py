"""The ``ClientAlgorithm`` protocol: what a client does before and after training.

The framework owns the model and the training loop; a strategy's client algorithm
decides which tensors the model starts from, which of them are trained and what is
uploaded, and what the client keeps for later rounds (``state``, persisted in
Flower's ``Context.state``). Mirrors the server: ``finish`` returns
``(upload, new_state)`` (ALGORITHMS.md §0).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

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


@dataclass(frozen=True)
class Started:
    """What ``start`` returns: the tensors to load, the keys to train, and ``carry`` —
    anything ``finish`` of the same round needs (passed to it as ``carry=``), so an
    algorithm keeps nothing between the two calls. Unpacks as ``tensors, trainable``.
    """

    tensors: TensorDict
    trainable: frozenset[str]
    carry: Any = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.tensors, self.trainable))


class ClientAlgorithm(Protocol):
    """Client-side hooks of a strategy: ``start`` and ``finish``. The optional hooks
    (``penalty``, ``local_round``) and ``finish``'s ``carry`` are declared, with their
    defaults, on :class:`ClientAlgorithmBase`.
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


class ClientAlgorithmBase:
    """Every hook the client calls on a strategy's client half, with its default."""

    def start(
        self, received: TensorDict, init: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> Started | tuple[TensorDict, frozenset[str]]:
        """Choose the starting adapter and the trainable keys (see ``ClientAlgorithm``);
        return a :class:`Started` to hand ``finish`` a ``carry``."""
        raise NotImplementedError

    def finish(
        self,
        trained: TensorDict,
        received: TensorDict,
        state: TensorDict,
        plan: ClientPlan,
        carry: Any = None,
    ) -> tuple[TensorDict, TensorDict]:
        """Return ``(upload, new_state)``; ``carry`` is what ``start`` returned in
        :class:`Started` (``None`` if nothing)."""
        raise NotImplementedError

    def penalty(self, params: Mapping[str, torch.Tensor], plan: ClientPlan) -> torch.Tensor | None:
        """A term added to the loss at every local step (``params``: the live trainable
        adapter tensors). Default: none (only overriding it costs a call per step).
        HetLoRA's rank self-pruning uses it."""
        return None

    def local_round(
        self, task: Any, model: Any, data: Any, trainable: frozenset[str], plan: ClientPlan, state: TensorDict
    ) -> LocalRound | None:
        """Train in place of ``task.train`` after ``start``'s tensors are loaded into
        ``model`` (the process-wide cached model: copy it before changing its
        structure); ``None`` (the default) lets the framework train. FedSpine trains a
        structurally pruned copy."""
        return None


def finish_with_carry(
    algorithm: Any,
    started: Started | tuple[TensorDict, frozenset[str]],
    trained: TensorDict,
    received: TensorDict,
    state: TensorDict,
    plan: ClientPlan,
) -> tuple[TensorDict, TensorDict]:
    """``algorithm.finish``, handed the ``carry`` of what its ``start`` returned."""
    carry = started.carry if isinstance(started, Started) else None
    if carry is None:
        return algorithm.finish(trained, received, state, plan)
    return algorithm.finish(trained, received, state, plan, carry=carry)


def overrides(algorithm: Any, hook: str) -> bool:
    """Whether ``algorithm`` implements ``hook`` itself (not the base's default)."""
    method = getattr(type(algorithm), hook, None)
    if method is None:
        return False
    return method is not getattr(ClientAlgorithmBase, hook, None)


@dataclass(frozen=True)
class FullAdapter(ClientAlgorithmBase):
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
        carry: Any = None,
    ) -> tuple[TensorDict, TensorDict]:
        """Upload every trained tensor; keep no state."""
        return dict(trained), state
