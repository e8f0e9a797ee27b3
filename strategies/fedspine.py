"""``fedspine``: structured pruning + LoRA, a per-device bandit picks rank and pruning ratio.

Yao, Xu, Xu, Liao, Xie, "Efficient Deployment of Large Language Models on
Resource-constrained Devices", arXiv 2501.02438; ALGORITHMS.md §11. No public code
exists; everything beyond the abstract-level description is the specification's
``[PROPOSAL]`` and is configurable here.

* **Plan** (:class:`~fedpeft.selection.sucb.FedSpineSelector`): uniform sampling; one
  S-UCB bandit per device (partition id) picks ``(p_i, r_i)`` — the fraction of the
  device's *remaining* heads/channels to prune this round and its LoRA rank — and,
  with ``fedspine.sparsities`` (issue 18, ``[PROPOSAL]``, off by default), the
  device's final sparsity ``s_i`` from those candidates.
  ``fedspine.fixed-rank`` / ``fedspine.fixed-prune-ratio`` collapse the arm space to
  one point (the fixed-allocation baselines; ``fedspine.target-sparsity`` caps their
  final sparsity, e.g. 0.2).
* **Client** (:class:`FedSpineClient`, the ``local_round`` hook): a copy of the cached
  model is pruned physically to the device's kept heads / FFN channels
  (:func:`fedpeft.pruning.bert.prune_bert_`, masks in ``Context.state``), then trained
  with LoRA; after every optimizer step the LoRA-gradient importance
  ``S = |G ⊙ (W0 + sBA)|`` (per head / channel, L2-normalised per layer) updates an
  EMA ``I ← β I + (1 − β) S``, and every ``prune-interval`` steps (and at the last
  step) the lowest-importance structures go so that the sparsity follows a cubic ramp
  from ``s_prev`` to ``s_goal = min(s*, s_prev + p_i (1 − s_prev))`` (``s*`` = the
  plan's ``target-sparsity``: the chosen candidate, else ``s*``). The first
  ``⌊protect-first · L⌋`` layers and the last are never pruned; a layer keeps at least
  one head and one channel. FFN channels are pruned only when the FFN carries LoRA
  (``lora.target-modules`` with ``intermediate.dense``/``output.dense``): without LoRA
  there is no gradient signal, so only heads are pruned.
* **Upload**: LoRA factors on kept coordinates only (pruned B rows / A columns are not
  sent), the keep-masks ``aux.fedspine.heads`` ``(L, H)`` and
  ``aux.fedspine.channels`` ``(L, d_ff)`` (int8), and the reward inputs
  ``loss-before``/``loss-after`` (a fixed local probe batch), ``sparsity`` (mean of
  head and channel sparsity over unprotected layers) and ``update-norm``
  ``‖M ⊙ (s B A − s B₀ A₀)‖_F``; with candidate sparsities also ``at-target`` (1 when
  nothing is left to prune for the plan's target, exact at any structure count).
* **Aggregate** (:class:`FedSpineAggregator`, §11.3): per layer, scatter each client
  into full coordinates, mask-aware weighted mean
  ``ΔW = Σ p_i M_i P_i / Σ p_i M_i`` (entries nobody kept: previous global), global
  factors = the rank-``r_max`` SVD truncation of ``ΔW``. Client ``i``'s next payload
  is the best rank-``r_i`` approximation of ``ΔW`` restricted to its kept rows and
  columns (zeros elsewhere); the aggregator remembers each device's last masks.
* **Reward** (§11.4, :func:`~fedpeft.selection.sucb.fedspine_reward_terms`): ``0.25``
  each of loss improvement, pruning progress (towards the round's target; a reached
  chosen candidate scores 1), relative update norm and ``1 − T_i / max T`` where
  ``T_i`` is the device's simulated round time under ``devices.profile`` (measured
  time otherwise).

**Wire.** Up ``Σ_ℓ r_i (m_i' + n_i')·4`` bytes + the masks ``L(H + d_ff)`` bytes;
down ``Σ_ℓ r_i (m + n)·4`` (full coordinates, zeros at pruned ones — a choice of this
implementation, see the README).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedpeft import (
    AUX_PREFIX,
    AggregatorBase,
    ClientAlgorithmBase,
    ClientPlan,
    ClientUpdate,
    ConfigError,
    FedStrategy,
    FullAdapter,
    IncompatibleUpdateError,
    LocalRound,
    RoundOutput,
    StrategyEnv,
    TensorDict,
    client_weights,
    register_strategy,
    weighted_mean,
)
from fedpeft.lora import AdapterLayout, LoraFactors, join_adapter, split_adapter
from fedpeft.lora.peft_io import factor_keys, lora_module_of, lora_modules
from fedpeft.pruning import (
    MaskedFactors,
    compose_keep,
    cubic_sparsity,
    ema_update,
    mask_aware_mean,
    num_to_prune,
    protected_layers,
    restricted_lowrank,
    round_sparsity_goal,
    scatter_factors,
    select_prune_count,
    structure_sparsity,
)
from fedpeft.pruning.bert import (
    encoder_layers,
    lora_masks,
    module_role,
    prune_bert_,
    structure_counts,
    structure_scores,
)
from fedpeft.selection.sucb import AT_TARGET_KEY, TIME_REFERENCES, FedSpineSelector, SucbConfig

log = logging.getLogger("fedpeft")

HEADS_KEY = AUX_PREFIX + "fedspine.heads"
"""Uploaded ``(L, H)`` int8 keep-mask over the original attention heads."""
CHANNELS_KEY = AUX_PREFIX + "fedspine.channels"
"""Uploaded ``(L, d_ff)`` int8 keep-mask over the original FFN channels."""
STATE_HEADS, STATE_CHANNELS = "fedspine.heads", "fedspine.channels"
STATE_EMA_HEADS, STATE_EMA_CHANNELS = "fedspine.ema.heads", "fedspine.ema.channels"


def _floats(text: str, key: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise ConfigError(f"{key} must be comma-separated numbers, got {text!r}") from err


def _ints(text: str, key: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise ConfigError(f"{key} must be comma-separated integers, got {text!r}") from err


@dataclass(frozen=True)
class FedSpineConfig:
    """Options of ``fedspine`` (defaults: ALGORITHMS.md §11 ``[PROPOSAL]`` values).

    The paper's text (no public code) gives only the pruning interval (20) and the
    evaluated sparsities (50 % RoBERTa, 30 % LLaMA); the other defaults are the
    specification's proposals, with one exception:

    * Default differs from the specification: ``discount = 1`` (§11 pitfalls: 0.95)
      because 0.95 lowered this S-UCB tree's reward on stationary and on drifting
      rewards alike (figures under ``SucbConfig.discount``).

    ``ranks`` defaults to the specification's set ``2,4,8,16,32``, but a device's rank
    cannot exceed the global adapter's rank ``lora.r`` (the server keeps the global
    factors at ``r_max = lora.r``; default 8): ``build`` drops the larger ranks and
    logs it once, so with the default ``lora.r = 8`` the bandit chooses from
    ``2,4,8``. Set ``lora.r = 32`` for the whole set.

    ``sparsities`` (issue 18; ``[PROPOSAL]`` of this implementation, not in the
    paper's text or the specification) lets each device's bandit choose its final
    sparsity among candidates, as a third S-UCB coordinate next to the pruning ratio
    and the rank. Why: with one ``s*`` every device ends at ``s*`` (the paper
    evaluates at one fixed sparsity, 50 % for RoBERTa), and the pruning-progress
    term rewards only arms that keep pruning towards it, so a device for which
    little pruning is best cannot express it. Pruning is irreversible, so the
    chosen candidate acts as a cap for the round: a candidate at or below the
    device's sparsity prunes nothing, and the progress term is measured towards
    the chosen candidate (reaching or standing at it scores 1). The default (empty)
    leaves the arm space, the tree, the plans and the reward exactly as before: no
    third coordinate is created, every plan carries ``target_sparsity`` and the
    progress formula is the specification's (a test replays a recorded decision
    sequence of the previous code). Measured (README "FedSpine (issue 18 benchmark)",
    2026-12-07, 20 rounds, with ``time-reference=device``): every device ended at the
    largest candidate, 0.5 — trying the candidates one after another commits a device
    to the largest it tries, as pruning cannot be undone — and no allocation beat
    uniform training to any target; so it stays off.

    Attributes:
        target_sparsity: ``s*``, the final head/channel sparsity of every device
            (without ``sparsities``); with ``fixed-prune-ratio`` it caps a fixed
            allocation (e.g. ``0.2``).
        sparsities: candidate final sparsities for the bandit, comma-separated,
            distinct, each in ``[0, 1)`` (e.g. ``"0.1,0.2,0.3,0.5"``); empty: the
            single ``target_sparsity`` (default, the specification). Replaces
            ``target_sparsity`` when set; one value is a fixed target with the
            candidates' reward (progress 1 once reached).
        prune_interval: local steps between pruning steps (20 was best in the paper).
        ranks: the ranks the bandit may choose, comma-separated; those above
            ``lora.r`` are dropped at build time (logged; an error if none is left).
        p_min: smallest per-round pruning ratio of the remaining structures.
        p_max: largest one.
        fixed_rank: ``> 0``: every device always trains at this rank (no bandit on
            the rank).
        fixed_prune_ratio: ``>= 0``: every device always prunes this ratio.
        c: S-UCB confidence weight.
        nu: S-UCB smoothness bonus scale.
        rho: S-UCB smoothness decay per depth.
        n_split: S-UCB split threshold.
        discount: S-UCB discount of old statistics (1 = none).
        reward_weights: ``w_L, w_P, w_I, w_T``.
        protect_first: fraction of the first layers never pruned.
        protect_last: never prune the last layer.
        probe_size: examples of the fixed local probe batch (loss before/after).
        ema_beta: importance EMA ``β``.
        time_reference: the time term's denominator, ``round`` (the
            specification: the round's slowest device) or ``device`` (issue 18,
            ``[PROPOSAL]``, off by default: the device's own slowest round so far,
            so the straggler's bandit also learns which arms make it faster); see
            :attr:`~fedpeft.selection.sucb.FedSpineSelector.time_reference`. Only run
            with ``device`` in the issue 18 benchmark (no side-by-side with ``round``
            there), so no measurement backs either over the other yet.
    """

    target_sparsity: float = 0.5
    sparsities: str = ""
    prune_interval: int = 20
    ranks: str = "2,4,8,16,32"
    p_min: float = 0.0
    p_max: float = 0.3
    fixed_rank: int = 0
    fixed_prune_ratio: float = -1.0
    c: float = 0.5
    nu: float = 1.0
    rho: float = 0.5
    n_split: int = 2
    discount: float = 1.0
    reward_weights: str = "0.25,0.25,0.25,0.25"
    protect_first: float = 0.1
    protect_last: bool = True
    probe_size: int = 32
    ema_beta: float = 0.9
    time_reference: str = "round"

    def problems(self) -> list[str]:
        """Invalid values, one line each (ranks above ``lora.r`` are refused by ``build``)."""
        out = []
        if any(r < 1 for r in self.rank_choices()):
            out.append(
                f"fedspine.ranks / fedspine.fixed-rank must be >= 1, got {self.rank_choices()}"
            )
        if self.fixed_prune_ratio >= 1.0:
            out.append(
                f"fedspine.fixed-prune-ratio must be < 1 (or < 0: bandit), got {self.fixed_prune_ratio}"
            )
        if not 0.0 <= self.protect_first < 1.0:
            out.append(f"fedspine.protect-first must be in [0, 1), got {self.protect_first}")
        if self.probe_size < 1:
            out.append(f"fedspine.probe-size must be >= 1, got {self.probe_size}")
        if not 0.0 <= self.ema_beta < 1.0:
            out.append(f"fedspine.ema-beta must be in [0, 1), got {self.ema_beta}")
        if self.time_reference not in TIME_REFERENCES:
            out.append(
                f"fedspine.time-reference must be one of {', '.join(TIME_REFERENCES)}, "
                f"got {self.time_reference!r}"
            )
        if len(_floats(self.reward_weights, "fedspine.reward-weights")) != 4:
            out.append(f"fedspine.reward-weights must be 4 numbers, got {self.reward_weights!r}")
        choices = _sparsity_choices(self.sparsities)
        valid = choices is not None and len(set(choices)) == len(choices)
        if not valid or any(not 0.0 <= s < 1.0 for s in choices or ()):
            out.append(
                "fedspine.sparsities must be '' (one target: fedspine.target-sparsity) or "
                "distinct comma-separated final sparsities in [0, 1), e.g. "
                f"'0.1,0.2,0.3,0.5'; got {self.sparsities!r}"
            )
        return out

    def sparsity_choices(self) -> tuple[float, ...]:
        """The candidate final sparsities, increasing (empty: the single target)."""
        return tuple(sorted(_sparsity_choices(self.sparsities) or ()))

    def rank_choices(self) -> tuple[int, ...]:
        """The ranks the bandit chooses from (one with ``fixed-rank``)."""
        if self.fixed_rank > 0:
            return (self.fixed_rank,)
        return tuple(sorted(set(_ints(self.ranks, "fedspine.ranks"))))

    def sucb(self) -> SucbConfig:
        """The bandit constants (a one-point arm space for fixed allocations)."""
        ranks = self.rank_choices()
        p_min, p_max = (
            (self.fixed_prune_ratio, self.fixed_prune_ratio)
            if self.fixed_prune_ratio >= 0.0
            else (self.p_min, self.p_max)
        )
        return SucbConfig(
            c=self.c,
            nu=self.nu,
            rho=self.rho,
            n_split=self.n_split,
            discount=self.discount,
            p_min=p_min,
            p_max=p_max,
            ranks=ranks,
            sparsities=self.sparsity_choices(),
        )


def _sparsity_choices(text: str) -> tuple[float, ...] | None:
    """``fedspine.sparsities`` as numbers; ``None`` if it is malformed."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        return None
    return values if all(math.isfinite(v) for v in values) else None


# -- masks -------------------------------------------------------------------------


def _masks_of(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    heads, channels = tensors.get(HEADS_KEY), tensors.get(CHANNELS_KEY)
    return (
        heads.to(torch.bool) if heads is not None else None,
        channels.to(torch.bool) if channels is not None else None,
    )


def _check_masks(heads: torch.Tensor | None, channels: torch.Tensor | None) -> None:
    for name, mask in (("heads", heads), ("channels", channels)):
        if mask is None:
            continue
        if mask.dim() != 2 or mask.numel() == 0:
            raise IncompatibleUpdateError(
                f"aux.fedspine.{name} must be a 2-d (layers, {name}) mask, got shape {tuple(mask.shape)}"
            )
        if not bool(mask.any(dim=1).all()):
            raise IncompatibleUpdateError(
                f"aux.fedspine.{name} removes every {name[:-1]} of a layer"
            )


def module_masks(
    modules: Sequence[str],
    heads: torch.Tensor | None,
    channels: torch.Tensor | None,
    head_dim: Mapping[str, int],
) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """``{module: (row_keep, col_keep)}`` from the device masks (``None`` = all kept).

    ``head_dim[module]`` is the head size of attention modules (``d_model / H``).
    """
    keep_h = {i: heads[i] for i in range(heads.shape[0])} if heads is not None else {}
    keep_c = {i: channels[i] for i in range(channels.shape[0])} if channels is not None else {}
    out: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    for m in modules:
        out.update(lora_masks([m], keep_h, keep_c, head_dim.get(m, 1)))
    return out


# -- server ------------------------------------------------------------------------


@dataclass(frozen=True)
class FedSpineAggregator(AggregatorBase[Any]):
    """Mask-aware mean of mixed-rank, structurally pruned LoRA (ALGORITHMS.md §11.3).

    State: ``{"masks": {partition id: (heads int8 (L, H), channels int8 (L, d_ff))}}``
    — each device's last reported masks, used to restrict its next payload.

    Attributes:
        layout: scalings of the ranks.
        config: the strategy options.
    """

    layout: AdapterLayout
    config: FedSpineConfig

    def initialize(self, global_tensors: TensorDict) -> dict[str, Any]:
        """No device has pruned anything yet."""
        return {"masks": {}}

    def _head_dims(
        self, global_tensors: Mapping[str, torch.Tensor], heads: torch.Tensor | None
    ) -> dict[str, int]:
        if heads is None:
            return {}
        n_heads = int(heads.shape[1])
        out = {}
        for m in lora_modules(global_tensors):
            a_key, b_key = factor_keys(m)
            role = (module_role(m) or (None, None))[1]
            if role == "attention-in":
                width = int(global_tensors[b_key].shape[0])  # B: (H·d_h, r)
            elif role == "attention-out":
                width = int(global_tensors[a_key].shape[1])  # A: (r, H·d_h)
            else:
                continue
            if width % n_heads:
                raise IncompatibleUpdateError(
                    f"aux.fedspine.heads has {n_heads} heads per layer but {m} has width {width}"
                )
            out[m] = width // n_heads
        return out

    def _module_masks(
        self, global_tensors: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        heads, channels = _masks_of(tensors)
        _check_masks(heads, channels)
        modules = lora_modules(global_tensors)
        masks = module_masks(modules, heads, channels, self._head_dims(global_tensors, heads))
        for m, (rows, cols) in masks.items():  # a mask must fit its layer
            a_key, b_key = factor_keys(m)
            d_out, d_in = int(global_tensors[b_key].shape[0]), int(global_tensors[a_key].shape[1])
            if (rows is not None and rows.numel() != d_out) or (
                cols is not None and cols.numel() != d_in
            ):
                raise IncompatibleUpdateError(
                    f"the fedspine masks do not fit {m} ({d_out} x {d_in}): "
                    f"{None if rows is None else rows.numel()} rows, {None if cols is None else cols.numel()} columns"
                )
        return masks

    def upload_shape(
        self, key: str, want: tuple[int, ...], tensors: Mapping[str, torch.Tensor], plan: ClientPlan
    ) -> tuple[int, ...]:
        """The shape of an uploaded factor on the client's kept coordinates.

        ``want`` is the full-coordinate shape at the plan's rank; the masks' widths
        must match it (``H`` heads of ``want / H`` rows, ``d_ff`` channels).

        Raises:
            IncompatibleUpdateError: malformed masks or masks that do not fit.
        """
        heads, channels = _masks_of(tensors)
        if (heads is None and channels is None) or not key.endswith(
            ("lora_A.weight", "lora_B.weight")
        ):
            return want
        _check_masks(heads, channels)
        module = lora_module_of(key)
        is_b = key == factor_keys(module)[1]
        layer, role = module_role(module) or (None, None)
        attention_in, attention_out = role == "attention-in", role == "attention-out"
        ffn_up, ffn_down = role == "ffn-up", role == "ffn-down"
        out = list(want)
        dim = 0 if is_b else 1  # B: (d_out, r) rows; A: (r, d_in) columns
        if heads is not None and ((attention_in and is_b) or (attention_out and not is_b)):
            mask = _row(heads, layer, module, "heads")
            if want[dim] % mask.numel():
                raise IncompatibleUpdateError(
                    f"aux.fedspine.heads has {mask.numel()} heads but {module} has width {want[dim]}"
                )
            out[dim] = int(mask.sum()) * (want[dim] // mask.numel())
        elif channels is not None and ((ffn_up and is_b) or (ffn_down and not is_b)):
            mask = _row(channels, layer, module, "channels")
            if want[dim] != mask.numel():
                raise IncompatibleUpdateError(
                    f"aux.fedspine.channels has {mask.numel()} channels but {module} has {want[dim]}"
                )
            out[dim] = int(mask.sum())
        return tuple(out)

    def client_payload(
        self, state: dict[str, Any], global_tensors: TensorDict, plan: ClientPlan
    ) -> TensorDict:
        """Best rank-``r_i`` approximation of each layer's ``ΔW`` on the device's kept
        rows and columns, zeros at pruned ones (full shapes), plus the extras."""
        factors, extra = split_adapter(global_tensors, self.layout)
        saved = state["masks"].get(str(plan.partition_id))
        masks = (
            self._module_masks(global_tensors, {HEADS_KEY: saved[0], CHANNELS_KEY: saved[1]})
            if saved is not None
            else {}
        )
        scaling = self.layout.scaling(plan.rank)
        out = {}
        for m, g in factors.items():
            rows, cols = masks.get(m, (None, None))
            delta = g.delta().to(torch.float64)  # (d_out, d_in)
            sub = restricted_lowrank(delta, plan.rank, scaling, rows, cols)
            full = scatter_factors(MaskedFactors(sub, rows, cols), g.d_out, g.d_in)
            out[m] = LoraFactors(a=full.a.to(g.a.dtype), b=full.b.to(g.b.dtype), scaling=scaling)
        return join_adapter(out, extra)

    def aggregate(
        self,
        state: dict[str, Any],
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[dict[str, Any]]:
        """Mask-aware mean per layer, truncated to ``r_max``; extras by ``p_k``."""
        p = client_weights(updates)
        gfactors, gextra = split_adapter(global_tensors, self.layout)
        per_client = []
        saved = dict(state["masks"])
        for u in updates:
            masks = self._module_masks(global_tensors, u.tensors)
            lora = {k: v for k, v in u.tensors.items() if k in global_tensors}
            factors, extra = split_adapter(lora, self.layout)
            per_client.append((factors, masks, {k: v for k, v in extra.items() if k in gextra}))
            heads, channels = u.tensors.get(HEADS_KEY), u.tensors.get(CHANNELS_KEY)
            if heads is not None or channels is not None:
                saved[str(u.plan.partition_id)] = (heads, channels)
        new_factors = {}
        covered = []
        for m, g in gfactors.items():
            clients = [
                MaskedFactors(factors[m], *masks.get(m, (None, None)))
                for factors, masks, _ in per_client
            ]
            delta, den = mask_aware_mean(clients, p, g.delta().to(torch.float64))  # (d_out, d_in)
            covered.append(float((den > 0).double().mean()))
            best = restricted_lowrank(delta, g.rank, g.scaling)
            new_factors[m] = LoraFactors(
                a=best.a.to(g.a.dtype), b=best.b.to(g.b.dtype), scaling=g.scaling
            )
        new = dict(global_tensors)
        new.update(join_adapter(new_factors, {}))
        if gextra:
            new.update(weighted_mean([e for _, _, e in per_client], p))
        ranks = [u.plan.rank for u in updates]
        sparsity = [float(u.metrics.get("sparsity", 0.0)) for u in updates]
        metrics = {
            "fedspine/rank_mean": sum(ranks) / len(ranks),
            "fedspine/sparsity_mean": sum(sparsity) / len(sparsity),
            "fedspine/coverage_min": min(covered) if covered else 1.0,
        }
        return RoundOutput(state={"masks": saved}, tensors=new, metrics=metrics)


def _row(mask: torch.Tensor, layer: int | None, module: str, what: str) -> torch.Tensor:
    if layer is None or layer >= mask.shape[0]:
        raise IncompatibleUpdateError(f"aux.fedspine.{what} has no row for {module}")
    return mask[layer]


# -- client ------------------------------------------------------------------------


def _has_lora(module: Any) -> bool:
    return bool(getattr(module, "lora_A", None))


@dataclass(frozen=True)
class FedSpineClient(ClientAlgorithmBase):
    """Prune-and-tune on a pruned copy of the model (ALGORITHMS.md §11.2).

    Attributes:
        layout: scalings of the ranks.
        config: the strategy options.
    """

    layout: AdapterLayout
    config: FedSpineConfig

    def start(
        self, received: TensorDict, init: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> tuple[TensorDict, frozenset[str]]:
        """The received factors (full coordinates) over ``init``; train everything."""
        return FullAdapter().start(received, init, state, plan)

    def local_round(
        self,
        task: Any,
        model: Any,
        data: Any,
        trainable: frozenset[str],
        plan: ClientPlan,
        state: TensorDict,
    ) -> LocalRound:
        """Prune a copy to the stored masks, then train with iterative pruning."""
        from fedpeft.tasks.data import collate
        from fedpeft.tasks.train import batch_schedule

        cfg = self.config
        work = copy.deepcopy(model)  # the cached model stays whole for other clients
        heads_n, channels_n = structure_counts(work.model)
        num_layers = len(heads_n)
        keep_h = _state_mask(state, STATE_HEADS, heads_n)
        keep_c = _state_mask(state, STATE_CHANNELS, channels_n)
        prune_bert_(work.model, keep_h, keep_c)
        protected = protected_layers(num_layers, cfg.protect_first, cfg.protect_last)
        layers = encoder_layers(work.model)
        kinds = ["heads"] + (
            ["channels"]
            if any(
                _has_lora(layer.intermediate.dense) or _has_lora(layer.output.dense)
                for layer in layers
            )
            else []
        )
        keep = {"heads": keep_h, "channels": keep_c}
        counts = {"heads": heads_n, "channels": channels_n}
        ema = {
            "heads": _state_ema(state, STATE_EMA_HEADS, keep_h),
            "channels": _state_ema(state, STATE_EMA_CHANNELS, keep_c),
        }

        def sparsity() -> float:
            values = [structure_sparsity(keep[k], protected) for k in kinds]
            return sum(values) / len(values)

        def left_to_prune(kind: str, s: float) -> int:
            """Structures of ``kind`` still to remove for sparsity ``s`` (``⌊s·N⌋``)."""
            n_orig = sum(c for i, c in counts[kind].items() if i not in protected)
            n_kept = sum(int(keep[kind][i].sum()) for i in counts[kind] if i not in protected)
            return num_to_prune(s, n_orig, n_kept)

        s_prev = sparsity()
        ratio = float(plan.options.get("prune-ratio", 0.0))
        s_target = float(plan.options.get("target-sparsity", cfg.target_sparsity))
        interval = int(plan.options.get("prune-interval", cfg.prune_interval))
        s_goal = round_sparsity_goal(s_prev, ratio, s_target) if ratio > 0 else s_prev
        train_cfg = task.cfg.train
        total = (
            max(1, math.ceil(train_cfg.local_epochs * len(data) / train_cfg.batch_size))
            if train_cfg.local_epochs > 0
            else train_cfg.local_steps
        )
        probe = None
        if len(data):
            probe_idx = next(
                iter(batch_schedule(len(data), min(cfg.probe_size, len(data)), 1, plan.seed))
            )
            probe = collate(data, probe_idx.tolist(), work.pad_id)

        def probe_loss() -> float:
            if probe is None:
                return 0.0
            work.model.eval()
            with torch.no_grad():
                loss, _ = task.loss(work, probe)
            return float(loss)

        loss_before = probe_loss()
        start_products = _products(work.tensors(), self.layout)

        def on_step(step: int, optimizer: torch.optim.Optimizer) -> None:
            scores = dict(zip(("heads", "channels"), structure_scores(work.model), strict=True))
            for kind in kinds:
                ema[kind] = {
                    i: ema_update(ema[kind].get(i), s, cfg.ema_beta)
                    for i, s in scores[kind].items()
                }
            if s_goal <= s_prev or not (step % interval == 0 or step == total):
                return
            s_now = cubic_sparsity(step, total, s_prev, s_goal)
            for kind in kinds:
                remove = left_to_prune(kind, s_now)
                if remove <= 0:
                    continue
                current = select_prune_count(ema[kind], remove, protected, min_keep=1)
                keep[kind] = {i: compose_keep(keep[kind][i], current[i]) for i in current}
                ema[kind] = {i: ema[kind][i][current[i]] for i in current}
                if kind == "heads":
                    prune_bert_(work.model, keep_heads=current, optimizer=optimizer)
                else:
                    prune_bert_(work.model, keep_channels=current, optimizer=optimizer)
            work.model.train()

        result = task.train(work, data, trainable, plan.seed, None, on_step)
        loss_after = probe_loss()
        trained = work.tensors()
        heads = torch.stack([keep["heads"][i] for i in range(num_layers)]).to(torch.int8)  # (L, H)
        channels = torch.stack([keep["channels"][i] for i in range(num_layers)]).to(
            torch.int8
        )  # (L, d_ff)
        end_products = _products(trained, self.layout)
        head_dim = {m: int(layers[0].attention.self.attention_head_size) for m in end_products}
        masks = module_masks(list(end_products), heads.bool(), channels.bool(), head_dim)
        norm_sq = 0.0
        for m, (p_end, rows_end, cols_end) in _scattered(end_products, masks).items():
            p_start = _scatter_product(
                start_products[m],
                keep_before=(keep_h, keep_c),
                module=m,
                head_dim=head_dim[m],
                shape=p_end.shape,
            )
            diff = p_end - p_start
            mask = torch.outer(rows_end, cols_end)
            norm_sq += float((diff * mask).pow(2).sum())
        upload = {**trained, HEADS_KEY: heads, CHANNELS_KEY: channels}
        metrics = {
            "loss-before": loss_before,
            "loss-after": loss_after,
            "sparsity": sparsity(),
            "head-sparsity": structure_sparsity(keep["heads"], protected),
            "channel-sparsity": structure_sparsity(keep["channels"], protected),
            "update-norm": math.sqrt(norm_sq),
        }
        if cfg.sparsity_choices():  # the selector's "stands at its chosen target"
            metrics[AT_TARGET_KEY] = float(all(left_to_prune(k, s_target) <= 0 for k in kinds))
        new_state = {
            STATE_HEADS: heads,
            STATE_CHANNELS: channels,
            STATE_EMA_HEADS: _scatter_ema(ema["heads"], keep["heads"]),
            STATE_EMA_CHANNELS: _scatter_ema(ema["channels"], keep["channels"]),
        }
        return LocalRound(result=result, tensors=upload, metrics=metrics, state=new_state)

    def finish(
        self, trained: TensorDict, received: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> tuple[TensorDict, TensorDict]:
        """Upload the pruned factors and masks; keep masks and importance EMA."""
        keys = (STATE_HEADS, STATE_CHANNELS, STATE_EMA_HEADS, STATE_EMA_CHANNELS)
        return dict(trained), {k: state[k] for k in keys if k in state}


def _state_mask(
    state: Mapping[str, torch.Tensor], key: str, counts: Mapping[int, int]
) -> dict[int, torch.Tensor]:
    saved = state.get(key)
    if saved is None or tuple(saved.shape) != (len(counts), max(counts.values(), default=0)):
        return {i: torch.ones(n, dtype=torch.bool) for i, n in counts.items()}
    return {i: saved[i].to(torch.bool) for i in counts}


def _state_ema(
    state: Mapping[str, torch.Tensor], key: str, keep: Mapping[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    saved = state.get(key)
    if saved is None or saved.shape[0] != len(keep):
        return {}
    return {i: saved[i][keep[i]].to(torch.float32) for i in keep}


def _scatter_ema(ema: Mapping[int, torch.Tensor], keep: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """``(L, N_orig)`` EMA over original indices, 0 at pruned ones."""
    out = torch.zeros(len(keep), max(m.numel() for m in keep.values()), dtype=torch.float32)
    for i, mask in keep.items():
        if i in ema:
            out[i, mask] = ema[i].to(torch.float32)
    return out


def _products(
    tensors: Mapping[str, torch.Tensor], layout: AdapterLayout
) -> dict[str, torch.Tensor]:
    factors, _ = split_adapter(
        {k: v for k, v in tensors.items() if not k.startswith(AUX_PREFIX)}, layout
    )
    return {m: f.delta().detach().to(torch.float64) for m, f in factors.items()}


def _scattered(
    products: Mapping[str, torch.Tensor],
    masks: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each kept-coordinate product in full coordinates with its row/column masks."""
    out = {}
    for m, p in products.items():
        rows, cols = masks.get(m, (None, None))
        rows = rows if rows is not None else torch.ones(p.shape[0], dtype=torch.bool)
        cols = cols if cols is not None else torch.ones(p.shape[1], dtype=torch.bool)
        full = torch.zeros(rows.numel(), cols.numel(), dtype=torch.float64)
        full[torch.outer(rows, cols)] = p.reshape(-1)
        out[m] = (full, rows.double(), cols.double())
    return out


def _scatter_product(
    product: torch.Tensor,
    keep_before: tuple[Mapping[int, torch.Tensor], Mapping[int, torch.Tensor]],
    module: str,
    head_dim: int,
    shape: torch.Size,
) -> torch.Tensor:
    """A round-start product (on the round-start kept coordinates) in full coordinates."""
    keep_h, keep_c = keep_before
    rows, cols = lora_masks([module], dict(keep_h), dict(keep_c), head_dim)[module]
    rows = rows if rows is not None else torch.ones(shape[0], dtype=torch.bool)
    cols = cols if cols is not None else torch.ones(shape[1], dtype=torch.bool)
    full = torch.zeros(shape, dtype=torch.float64)
    full[torch.outer(rows, cols)] = product.reshape(-1)
    return full


@functools.cache
def _note_dropped_ranks(dropped: tuple[int, ...], kept: tuple[int, ...], rank: int) -> None:
    """Log once per process (``build`` runs for every client message)."""
    log.info(
        "fedspine: ranks %s exceed lora.r=%d (the global adapter's rank) and are not "
        "offered; the bandit chooses from %s (raise lora.r to offer them)",
        ",".join(map(str, dropped)),
        rank,
        ",".join(map(str, kept)),
    )


def build(config: FedSpineConfig, env: StrategyEnv) -> FedStrategy:
    """FedSpine: S-UCB selector, pruning client, mask-aware aggregator.

    Ranks of ``fedspine.ranks`` above ``lora.r`` are dropped (logged); a
    ``fedspine.fixed-rank`` above it, or no rank left, is an error.
    """
    problems = config.problems()
    if not problems:
        choices = config.rank_choices()
        kept = tuple(r for r in choices if r <= env.rank)
        if config.fixed_rank > env.rank:
            problems.append(
                f"fedspine.fixed-rank must be <= lora.r={env.rank} (the global adapter's "
                f"rank), got {config.fixed_rank}"
            )
        elif not kept:
            problems.append(
                f"fedspine.ranks must include a rank <= lora.r={env.rank} (the global "
                f"adapter's rank), got {config.ranks!r}; lower the ranks or raise lora.r"
            )
        elif kept != choices:
            _note_dropped_ranks(tuple(r for r in choices if r > env.rank), kept, env.rank)
            config = replace(config, ranks=",".join(map(str, kept)))
    if problems:
        raise ConfigError(problems)
    layout = env.layout
    return FedStrategy(
        aggregator=FedSpineAggregator(layout, config),
        client=FedSpineClient(layout, config),
        selector=FedSpineSelector(
            clients_per_round=env.clients_per_round,
            seed=env.seed,
            sucb=config.sucb(),
            target_sparsity=config.target_sparsity,
            prune_interval=config.prune_interval,
            reward_weights=_floats(config.reward_weights, "fedspine.reward-weights"),  # type: ignore[arg-type]
            time_reference=config.time_reference,
        ),
        lossy_codecs=False,
        needs_individual_updates=True,
        mixed_ranks=True,
    )


register_strategy(
    "fedspine",
    config_cls=FedSpineConfig,
    build=build,
    summary="structured pruning + LoRA, S-UCB bandit per device picks rank and pruning ratio (arXiv 2501.02438)",
)
