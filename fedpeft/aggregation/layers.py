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
:class:`EqualWeights`, then ``aggregation.robust`` → :class:`RobustAggregate` (median,
trimmed mean, geometric median: they replace the strategy's mean) or :class:`RobustSelect`
(Krum, Multi-Krum, cosine filter: they drop whole clients), then the strategy. Strategies use layers themselves too:
``fedit`` and ``lora-fair`` put :class:`PadToRank` around their means for mixed ranks.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from fedpeft.aggregation import robust_mean
from fedpeft.aggregation.base import AggregatorBase, hooks_of
from fedpeft.aggregation.mean import client_weights
from fedpeft.aggregation.robust import clip_update, outliers, update_norm
from fedpeft.config import parse_robust
from fedpeft.errors import FedPeftError
from fedpeft.lora import AdapterLayout, pad_adapter_to, resize_adapter_to
from fedpeft.types import ClientPlan, ClientUpdate, RoundOutput, TensorDict

log = logging.getLogger(__name__)


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

    def process_round(
        self, updates: Sequence[ClientUpdate], global_tensors: TensorDict
    ) -> tuple[list[ClientUpdate], dict[str, float], dict[int, str]]:
        """The round's :meth:`process`; override instead when the decision needs the
        global tensors. Default: ``process(updates)``."""
        return self.process(updates)

    def aggregate(
        self, state: Any, global_tensors: TensorDict, updates: Sequence[ClientUpdate], server_round: int
    ) -> RoundOutput[Any]:
        """:meth:`process_round`, then the inner aggregator on what is left."""
        kept, metrics, rejected = self.process_round(updates, global_tensors)
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


class RobustAggregate(Layer):
    """``aggregation.robust`` = ``median``, ``trimmed-mean:β`` or ``geomed``: the inner
    aggregator runs as usual (its state, metrics and any tensor it computes itself are
    kept), then every shared tensor of its result is replaced by ``r̄ + agg(U)``
    (:func:`fedpeft.aggregation.robust_mean.robust_tensors`; ``U`` the clients' changes,
    ``r̄`` their common start). The median and the trimmed mean are coordinate-wise and
    unweighted (Yin et al., 2018; Flower's ``FedMedian`` / ``FedTrimmedAvg``); the
    geometric median is of each client's whole change, weighted by ``p_k`` (RFA,
    Pillutla et al., 2022).

    What it computes per strategy (a replaced mean must be the strategy's own rule, so
    only strategies whose aggregate *is* a mean of the uploads are accepted;
    ``fedpeft.server.setup`` refuses the rest):

    * ``fedit`` (one rank): ``Ā`` and ``B̄`` become ``med_k A_k`` and ``med_k B_k``
      (likewise trimmed), each factor on its own, and heads too. This is **not** a
      median of the products: ``(med B)(med A) ≠ med_k (B_k A_k)``, coordinate-wise or
      otherwise, just as FedIT's ``B̄Ā`` is not ``mean B_k A_k``. The geometric median is
      of the concatenated ``(A_k, B_k, head_k)`` change per client, again a point in
      factor space, not in product space.
    * ``ffa-lora``: only B (and heads) is uploaded; A is the same frozen matrix on every
      client, so ``(med B)·A`` is the image of the median of B under the linear map
      ``B ↦ BA``: a coordinate-wise median in B's coordinates (not in ``BA``'s), and
      the geometric median of the ``B_k`` maps to a product that is exactly
      ``argmin_Z Σ α_k ‖Z − B_k A‖_{(A)}`` in the norm ``‖Z‖_{(A)} = ‖ZA⁺‖`` — exact
      in product space only when A has orthonormal rows.
    * ``fedsa-lora``: the shared A (and shared heads). The clients' local B, uploaded
      only for evaluation (``report_b``), was never sent to them, so it is not a shared
      tensor and keeps the strategy's reported mean.
    * strategies that compute their own global update from each client's factors
      (``fedex-lora``'s residual, ``lora-fair``'s correction, ``flexlora``'s SVD of
      ``Σ p_k B_k A_k``: ``needs_individual_updates``) or that own their global update
      (``lora-sb``, ``flora``, ``ferret``) are refused: replacing their factors by medians
      would contradict what they computed from the same clients. Use a selection rule
      (:class:`RobustSelect`), which keeps whole clients.

    Args:
        inner: the wrapped aggregator.
        rule: ``median``, ``trimmed-mean`` or ``geomed``.
        param: β of ``trimmed-mean``.
    """

    name = "robust"

    def __init__(self, inner: Any, rule: str, param: float = 0.0) -> None:
        super().__init__(inner)
        if rule not in ("median", "trimmed-mean", "geomed"):
            raise ValueError(f"aggregation.robust: {rule!r} is not median, trimmed-mean or geomed")
        self.rule = rule
        self.param = param

    def aggregate(
        self, state: Any, global_tensors: TensorDict, updates: Sequence[ClientUpdate], server_round: int
    ) -> RoundOutput[Any]:
        """The inner aggregate with its shared tensors replaced by the robust ones."""
        out = self.inner.aggregate(state, global_tensors, updates, server_round)
        used = list(out.updates) if out.updates is not None else list(updates)
        keys = [
            k for k in robust_mean.shared_keys(used, global_tensors)
            if k in out.tensors and out.tensors[k].shape == used[0].tensors[k].shape
        ]
        if not keys:
            raise FedPeftError(
                f"aggregation.robust={self.rule}: the updates share no tensor with the "
                "global adapter (same key and shape, uploaded and received by every client)"
            )
        robust, metrics = robust_mean.robust_tensors(
            self.rule, self.param, used, global_tensors, keys, client_weights(used)
        )
        tensors = dict(out.tensors)
        for key in keys:
            tensors[key] = robust[key].to(out.tensors[key].dtype)
        metrics["keys"] = float(len(keys))
        return RoundOutput(
            out.state,
            tensors,
            {**{f"{self.name}/{k}": v for k, v in metrics.items()}, **out.metrics},
            updates=out.updates,
            rejected=out.rejected,
        )


class RobustSelect(Layer):
    """``aggregation.robust`` = ``krum:f``, ``multi-krum:f`` or ``cosine-filter[:τ]``:
    leave out whole clients, then the inner aggregator (the strategy's own rule) on the
    rest. The ones left out are reported in ``RoundOutput.rejected`` with their score
    (logged and counted as rejected by the engine); metrics ``robust/kept`` and
    ``robust/dropped``.

    * ``krum:f`` / ``multi-krum:f``: keep the ``m`` clients of lowest Krum score, ``m = 1``
      / ``n − f`` (:func:`fedpeft.aggregation.robust_mean.krum_select`; Blanchard et
      al., 2017). Flower's ``Krum``/``MultiKrum`` then average what is kept, weighted by
      examples, as fedpeft's ``fedit`` does.
    * ``cosine-filter:τ``: drop clients whose change has cosine ``< τ`` with the round's
      coordinate-wise median change (:func:`fedpeft.aggregation.robust_mean.cosine_to_median`);
      needs ≥ 3 updates (fewer pass unchanged). If no client reaches τ, the best aligned
      one is kept rather than losing the round.

    Distances and cosines are taken over every shared tensor of a client's change
    concatenated (:func:`fedpeft.aggregation.robust_mean.shared_keys`), i.e. in factor
    space: ``(A_k, B_k, head_k)`` for ``fedit``, ``fedex-lora``, ``lora-fair`` and
    ``flexlora`` (one rank; every client starts from the same broadcast factors, so
    their changes are comparable), B and heads for ``ffa-lora``, the shared A for
    ``fedsa-lora``, R for ``lora-sb``. Distances in factor space are not distances
    of the products ``B_k A_k``, but selection keeps each client's factors together,
    so whatever the strategy computes from them (products, residuals, an SVD) stays
    consistent: this is the honest rule for strategies that aggregate products.

    Args:
        inner: the wrapped aggregator.
        rule: ``krum``, ``multi-krum`` or ``cosine-filter``.
        param: ``f`` of Krum, τ of the cosine filter.
    """

    name = "robust"

    def __init__(self, inner: Any, rule: str, param: float = 0.0) -> None:
        super().__init__(inner)
        if rule not in ("krum", "multi-krum", "cosine-filter"):
            raise ValueError(f"aggregation.robust: {rule!r} is not krum, multi-krum or cosine-filter")
        self.rule = rule
        self.param = param

    def process_round(
        self, updates: Sequence[ClientUpdate], global_tensors: TensorDict
    ) -> tuple[list[ClientUpdate], dict[str, float], dict[int, str]]:
        """The clients kept, metrics and the reasons of those left out."""
        n = len(updates)
        keys = robust_mean.shared_keys(updates, global_tensors)
        if not keys:
            raise FedPeftError(
                f"aggregation.robust={self.rule}: the updates share no tensor (same key and "
                "shape, uploaded and received by every client) to compare them on"
            )
        flat = robust_mean.flat_changes(updates, global_tensors, keys)  # (n, d)
        rejected: dict[int, str] = {}
        metrics: dict[str, float] = {}
        if self.rule in ("krum", "multi-krum"):
            f = int(self.param)
            m = 1 if self.rule == "krum" else max(1, n - f)
            if n <= 2 * f + 2:
                log.warning(
                    "aggregation.robust=%s:%d with %d updates: Krum's guarantee needs n > 2f + 2",
                    self.rule, f, n,
                )
            kept_idx, scores = robust_mean.krum_select(flat, f, m)
            bound = max(scores[i] for i in kept_idx)
            for i in range(n):
                if i not in kept_idx:
                    rejected[updates[i].node_id] = (
                        f"Krum score {scores[i]:.4g} is not among the {m} lowest of {n} "
                        f"(aggregation.robust={self.rule}:{f}; kept scores <= {bound:.4g})"
                    )
        else:
            if n < 3:
                kept_idx = list(range(n))
            else:
                cosines = robust_mean.cosine_to_median(flat)
                kept_idx = [i for i, c in enumerate(cosines) if c >= self.param]
                if not kept_idx:
                    kept_idx = [max(range(n), key=lambda i: (cosines[i], -i))]
                for i in range(n):
                    if i not in kept_idx:
                        rejected[updates[i].node_id] = (
                            f"cosine {cosines[i]:.3f} of its change with the round's median "
                            f"change is below aggregation.robust=cosine-filter:{self.param:g}"
                        )
                metrics["min_cosine"] = min(cosines)
        metrics["kept"] = float(len(kept_idx))
        metrics["dropped"] = float(n - len(kept_idx))
        return [updates[i] for i in kept_idx], metrics, rejected


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
    robust: str = "none",
) -> AggregatorBase[Any]:
    """The strategy's aggregator inside the configured layers (outermost first:
    SCAFFOLD's variates, outlier rejection, clipping, the server optimizer, equal
    weighting, the robust rule); a layer whose setting is off (0, ``"examples"``,
    ``None``, ``"none"``) is left out.

    Args:
        server_opt: the ``server-opt`` section (:class:`fedpeft.config.ServerOptConfig`).
        scaffold_clients: ``N`` for :class:`fedpeft.aggregation.scaffold.Scaffold`
            (0 = off). It is outermost so the variates never reach the other layers.
        robust: ``aggregation.robust`` (``"none"`` = off): :class:`RobustAggregate` or
            :class:`RobustSelect`, innermost, right around the strategy, so it sees the
            updates after outlier rejection and clipping, under the configured
            weighting, and a server optimizer steps along its result.
    """
    out: AggregatorBase[Any] = hooks_of(aggregator)
    rule = parse_robust(robust)
    if rule.selects:
        out = RobustSelect(out, rule.name, rule.param)
    elif rule.name != "none":
        out = RobustAggregate(out, rule.name, rule.param)
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
