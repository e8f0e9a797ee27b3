"""The ``Aggregator`` protocol: the server half of every strategy.

An aggregator is a stateless object whose state is passed in and returned
(``aggregate(state, ...) -> RoundOutput(state, tensors, metrics)``), as in TFF's
aggregation processes. Nothing is hidden in attributes, so there is no call order to
respect and a checkpoint is just the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

from fedpeft.types import ClientPlan, ClientUpdate, RoundOutput, TensorDict

S = TypeVar("S")


class Aggregator(Protocol[S]):
    """Combines client updates into a new global adapter.

    Implement three methods. ``client_payload`` decides what each client receives
    (for most strategies: the global adapter, see :func:`broadcast`); per-client
    payloads (different ranks, personalised factors) come from the ``ClientPlan``.
    The optional hooks (``check_update``, ``client_failed``, ``upload_shape``) are
    declared, with their defaults, on :class:`AggregatorBase`; subclass it to see and
    override them. An aggregator that does not subclass it gets the defaults for
    whatever it does not define (:func:`hooks_of`).
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


class AggregatorBase(Generic[S]):
    """Every hook the server calls on an aggregator, with its default.

    Required: :meth:`aggregate`. Everything else has a default that a plain averaging
    strategy keeps.
    """

    def initialize(self, global_tensors: TensorDict) -> S:
        """Return the initial state given the initial global adapter. Default: ``{}``
        (no state)."""
        return {}  # type: ignore[return-value]

    def aggregate(
        self,
        state: S,
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[S]:
        """Aggregate validated updates; return the new state and global adapter."""
        raise NotImplementedError

    def client_payload(self, state: S, global_tensors: TensorDict, plan: ClientPlan) -> TensorDict:
        """The tensors sent to the client of ``plan``. Default: the global adapter."""
        return broadcast(global_tensors)

    def check_update(self, state: S, tensors: TensorDict, plan: ClientPlan) -> None:
        """Validate one decoded upload before aggregation. Raise ``FedPeftError`` (or
        ``ValueError``) to reject that one update, the message logged as the reason;
        the round goes on without it. For uploads whose structure only the strategy
        knows (e.g. Ferret's coordinates). Default: nothing beyond the server's own
        checks (keys, shapes, dtype, finite values)."""

    def client_failed(self, state: S, plan: ClientPlan, reason: str) -> S:
        """A planned client replied with an error (its state may be lost); return the
        new state (e.g. Ferret resyncs that client). Default: the state unchanged."""
        return state

    def upload_shape(
        self, key: str, shape: tuple[int, ...], tensors: TensorDict, plan: ClientPlan
    ) -> tuple[int, ...]:
        """The shape the server should expect for uploaded ``key``, given ``shape``
        (the global tensor's shape at the plan's rank). Default: ``shape``. FedSpine's
        clients upload pruned rows/columns and say which in ``tensors``."""
        return shape


HOOKS = ("client_payload", "check_update", "client_failed", "upload_shape")
"""The optional methods of :class:`AggregatorBase` (declared there with defaults)."""


class _Defaults(AggregatorBase[Any]):
    """An aggregator that does not subclass :class:`AggregatorBase`, with the base's
    defaults for the hooks it does not define (the one place that looks them up)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        for name in ("initialize", "aggregate", *HOOKS):
            method = getattr(inner, name, None)
            if callable(method):
                setattr(self, name, method)


def hooks_of(aggregator: Any) -> AggregatorBase[Any]:
    """``aggregator`` with every hook of :class:`AggregatorBase` callable."""
    return aggregator if isinstance(aggregator, AggregatorBase) else _Defaults(aggregator)


def broadcast(global_tensors: TensorDict) -> TensorDict:
    """The common ``client_payload``: every client receives the global adapter."""
    return dict(global_tensors)
