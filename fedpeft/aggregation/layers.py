"""Aggregation layers: aggregators that wrap an inner aggregator (TFF's aggregator
factories, e.g. ``tff.aggregators.clipping_factory``, in fedpeft's state-in/state-out
form).

A layer sees the round's updates first, may drop or change some, then calls its
inner aggregator; every other hook (``client_payload``, ``check_update``,
``client_failed``, ``upload_shape``) is delegated to the inner one unchanged, so a
layer composes with any strategy. Stateless layers pass the inner state through
untouched (a checkpoint is the strategy's own state); a layer with state
(:class:`StatefulLayer`) nests the inner one under ``"inner"``. A layer's metrics are prefixed with its name; the
updates it leaves out are reported in ``RoundOutput.rejected`` with their reason and
the updates the aggregate was made of in ``RoundOutput.updates``.

The engine stacks the configured layers around the strategy's aggregator
(:func:`stack`): ``scaffold.enabled`` →
:class:`fedpeft.aggregation.scaffold.Scaffold` (it strips the control variates from
the uploads), then ``validation.norm-factor`` → :class:`RejectOutliers`, then
``validation.clip-norm`` → :class:`ClipUpdates`, then ``server-opt.*`` →
:class:`fedpeft.aggregation.server_opt.ServerOptimizer` (a layer with state: it nests
the inner state under ``"inner"``), then ``aggregation.weighting`` →
:class:`EqualWeights`, then the strategy. Strategies use layers themselves too:
``fedit`` and ``lora-fair`` put :class:`PadToRank` around their means for mixed ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from fedpeft.aggregation.base import AggregatorBase, hooks_of
from fedpeft.aggregation.robust import clip_update, outliers, update_norm
from fedpeft.errors import FedPeftError
from fedpeft.lora import AdapterLayout, pad_adapter_to, resize_adapter_to
from fedpeft.types import ClientPlan, ClientUpdate, RoundOutput, TensorDict


class Layer(AggregatorBase[Any]):
    """An aggregator around ``inner``: override :meth:`process` (which updates go on,
    changed or not); everything else is delegated.

    Args:
        inner: the wrapped aggregator (anything with the aggregator methods).
    """

    name = "layer"
    transparent = False
    """``True`` for a layer that changes only how the inner aggregator sees an update
    (its weight, its rank padding): ``RoundOutput.updates`` then reports each update as
    it came in, so client records and telemetry see what the client sent."""

    def __init__(self, inner: Any) -> None:
        self.inner = hooks_of(inner)

    def process(
        self, updates: Sequence[ClientUpdate]
    ) -> tuple[list[ClientUpdate], dict[str, float], dict[int, str]]:
        """``(updates passed on, metrics without prefix, {node_id: reason} left out)``."""
        return list(updates), {}, {}

    def aggregate(
        self, state: Any, global_tensors: TensorDict, updates: Sequence[ClientUpdate], server_round: int
    ) -> RoundOutput[Any]:
        """:meth:`process`, then the inner aggregator on what is left."""
        kept, metrics, rejected = self.process(updates)
        if not kept:
            raise FedPeftError(f"{self.name}: every update was left out ({len(rejected)} rejected)")
        out = self.inner.aggregate(state, global_tensors, kept, server_round)
        used = out.updates if out.updates is not None else tuple(kept)
        if self.transparent:
            came = {u.node_id: u for u in updates}
            used = tuple(came[u.node_id] for u in used)
        return RoundOutput(
            out.state,
            out.tensors,
            {**{f"{self.name}/{k}": v for k, v in metrics.items()}, **out.metrics},
            updates=used,
            rejected={**rejected, **out.rejected},
        )

    def initialize(self, global_tensors: TensorDict) -> Any:
        """The inner state (a stateless layer adds none)."""
        return self.inner.initialize(global_tensors)

    def client_payload(self, state: Any, global_tensors: TensorDict, plan: ClientPlan) -> TensorDict:
        """Delegated."""
        return self.inner.client_payload(state, global_tensors, plan)

    def check_update(self, state: Any, tensors: TensorDict, plan: ClientPlan) -> None:
        """Delegated."""
        self.inner.check_update(state, tensors, plan)

    def client_failed(self, state: Any, plan: ClientPlan, reason: str) -> Any:
        """Delegated."""
        return self.inner.client_failed(state, plan, reason)

    def upload_shape(
        self, key: str, shape: tuple[int, ...], tensors: TensorDict, plan: ClientPlan
    ) -> tuple[int, ...]:
        """Delegated."""
        return self.inner.upload_shape(key, shape, tensors, plan)


class StatefulLayer(Layer):
    """A layer with state of its own: its state is ``{"inner": <the inner state>,
    **own}``, and every delegated hook gets the inner state (``client_failed``'s result
    is nested again). Override :meth:`own_state` and ``aggregate`` (which must return
    the nested form)."""

    def own_state(self, global_tensors: TensorDict) -> dict[str, Any]:
        """The layer's own entries before the first round."""
        return {}

    def initialize(self, global_tensors: TensorDict) -> dict[str, Any]:
        """``{"inner": ..., **own_state}``."""
        return {"inner": self.inner.initialize(global_tensors), **self.own_state(global_tensors)}

    def client_payload(self, state: Any, global_tensors: TensorDict, plan: ClientPlan) -> TensorDict:
        """Delegated with the inner state."""
        return self.inner.client_payload(state["inner"], global_tensors, plan)

    def check_update(self, state: Any, tensors: TensorDict, plan: ClientPlan) -> None:
        """Delegated with the inner state."""
        self.inner.check_update(state["inner"], tensors, plan)

    def client_failed(self, state: Any, plan: ClientPlan, reason: str) -> Any:
        """Delegated; the inner state it returns is nested again."""
        return {**state, "inner": self.inner.client_failed(state["inner"], plan, reason)}


class RejectOutliers(Layer):
    """Leave out updates whose change ``‖x_k − r_k‖`` exceeds ``factor`` × the round's
    low median (:func:`fedpeft.aggregation.robust.outliers`; needs ≥ 3 updates).

    Works on the change of every uploaded float tensor (A and B, or whatever the
    strategy uploads), not on the LoRA product."""

    name = "outliers"

    def __init__(self, inner: Any, factor: float) -> None:
        super().__init__(inner)
        self.factor = factor

    def process(
        self, updates: Sequence[ClientUpdate]
    ) -> tuple[list[ClientUpdate], dict[str, float], dict[int, str]]:
        """Drop the outliers, naming each with its norm."""
        norms = [update_norm(u.tensors, u.received) for u in updates]
        bad = set(outliers(norms, self.factor))
        rejected = {
            updates[i].node_id: (
                f"update norm {norms[i]:.3g} exceeds validation.norm-factor={self.factor} "
                "x the round's median"
            )
            for i in sorted(bad)
        }
        return [u for i, u in enumerate(updates) if i not in bad], {}, rejected


class ClipUpdates(Layer):
    """Scale each update's change to at most ``clip_norm`` (norm clipping as in DP-FedAvg,
    McMahan et al., ICLR 2018); metric ``clip/clipped`` counts the clipped updates."""

    name = "clip"

    def __init__(self, inner: Any, clip_norm: float) -> None:
        super().__init__(inner)
        self.clip_norm = clip_norm

    def process(
        self, updates: Sequence[ClientUpdate]
    ) -> tuple[list[ClientUpdate], dict[str, float], dict[int, str]]:
        """Clip every update."""
        out, clipped = [], 0
        for u in updates:
            tensors, was = clip_update(u.tensors, u.received, self.clip_norm)
            clipped += int(was)
            out.append(dataclasses.replace(u, tensors=tensors))
        return out, {"clipped": float(clipped)}, {}


class EqualWeights(Layer):
    """``aggregation.weighting=equal``: the inner aggregator sees every client with one
    example, so any example-weighted mean becomes the plain mean ``p_k = 1/N``.

    The updates reported back (``RoundOutput.updates``) carry the real example counts,
    so client records and example-weighted training metrics are unchanged."""

    name = "weighting"
    transparent = True

    def process(
        self, updates: Sequence[ClientUpdate]
    ) -> tuple[list[ClientUpdate], dict[str, float], dict[int, str]]:
        """Every update with ``num_examples = 1``."""
        return [dataclasses.replace(u, num_examples=1) for u in updates], {}, {}


class PadToRank(Layer):
    """Mixed ranks: zero-pad each upload to the global rank ``R`` before the inner
    aggregator, and truncate what the inner aggregator sends to the client's rank.

    Padding folds the scaling ratio into B (``fedpeft.lora.pad_adapter_to``), so each
    client's product ``s_k·B_k·A_k`` is kept at the global scaling ``s_R``; extra
    tensors (heads) pass unchanged.

    Args:
        inner: the aggregator working at rank ``R``.
        rank: the global rank ``R``.
        layout: scaling facts (α, rsLoRA) for moving factors between ranks.
    """

    name = "pad"
    transparent = True

    def __init__(self, inner: Any, rank: int, layout: AdapterLayout) -> None:
        super().__init__(inner)
        self.rank = rank
        self.layout = layout

    def process(
        self, updates: Sequence[ClientUpdate]
    ) -> tuple[list[ClientUpdate], dict[str, float], dict[int, str]]:
        """Every upload at rank ``R``."""
        return [
            dataclasses.replace(u, tensors=pad_adapter_to(u.tensors, self.rank, self.layout))
            for u in updates
        ], {}, {}

    def client_payload(self, state: Any, global_tensors: TensorDict, plan: ClientPlan) -> TensorDict:
        """The inner payload at the client's rank."""
        payload = self.inner.client_payload(state, global_tensors, plan)
        return resize_adapter_to(payload, plan.rank, self.layout)


def stack(
    aggregator: Any,
    *,
    norm_factor: float = 0.0,
    clip_norm: float = 0.0,
    weighting: str = "examples",
    server_opt: Any = None,
    scaffold_clients: int = 0,
) -> AggregatorBase[Any]:
    """The strategy's aggregator inside the configured layers (outermost first:
    SCAFFOLD's variates, outlier rejection, clipping, the server optimizer, equal
    weighting); a layer whose setting is off (0, ``"examples"``, ``None``) is left out.

    Args:
        server_opt: the ``server-opt`` section (:class:`fedpeft.config.ServerOptConfig`).
        scaffold_clients: ``N`` for :class:`fedpeft.aggregation.scaffold.Scaffold`
            (0 = off). It is outermost so the variates never reach the other layers.
    """
    out: AggregatorBase[Any] = hooks_of(aggregator)
    if weighting == "equal":
        out = EqualWeights(out)
    elif weighting != "examples":
        raise ValueError(f"aggregation.weighting must be examples or equal, got {weighting!r}")
    if server_opt is not None:
        from fedpeft.aggregation.server_opt import ServerOptimizer  # it builds on Layer

        out = ServerOptimizer(out, server_opt)
    if clip_norm > 0:
        out = ClipUpdates(out, clip_norm)
    if norm_factor > 0:
        out = RejectOutliers(out, norm_factor)
    if scaffold_clients > 0:
        from fedpeft.aggregation.scaffold import Scaffold  # it builds on Layer

        out = Scaffold(out, scaffold_clients)
    return out
