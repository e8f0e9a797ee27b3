"""Server optimizers on the round's pseudo-gradient, as a layer around any aggregator.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021 (Algorithm 2: FedAdagrad,
FedAdam, FedYogi) and Hsu et al., "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", 2019 (FedAvgM). Per tensor ``x``
of the global adapter (any shape, e.g. ``(r, d_in)`` for a LoRA A), with ``x̄`` what
the inner aggregator returns for it this round (FedIT's mean, LoRA-FAIR's corrected
mean, …) and ``Δ = x̄ − x``::

    avgm:     v ← μ·v + (−Δ)   (v = −Δ in the first round)     x ← x − η·v
    adam:     m ← β₁m + (1−β₁)Δ,   v ← β₂v + (1−β₂)Δ²           x ← x + η_t·m / (√v + τ)
    yogi:     m as adam,   v ← v − (1−β₂)·Δ²·sign(v − Δ²)        x ← x + η·m / (√v + τ)
    adagrad:  m as adam,   v ← v + Δ²                            x ← x + η·m / (√v + τ)

with ``m = v = 0`` before the first round and ``η_t = η`` (the paper), or
``η_t = η·√(1 − β₂^(t+1)) / (1 − β₁^(t+1))`` in round ``t`` with ``bias_correction``
(what Flower's ``FedAdam`` does, ``t`` = the server round).

The arithmetic is Flower 1.41's (``flwr.serverapp.strategy.FedAvgM``, ``FedAdam``,
``FedYogi``, ``FedAdagrad``), so a user gets the numbers Flower's strategies give on the
same arrays (``tests/flower/test_server_opt_matches_flower.py`` feeds both).

Defaults that differ from the paper (Reddi et al.): ``v`` starts at 0, not at
``v₋₁ ≥ τ²``, because Flower's strategies start there and the ``τ`` in the denominator
keeps the first step finite either way. Flower's ``FedAdagrad`` has no momentum
(``β₁ = 0``); here ``β₁`` is a setting for all three adaptive methods (paper: 0.9).

Which tensors: every floating-point tensor of the global adapter the inner aggregator
returns (LoRA A and B, heads, FedEx-LoRA's base delta), each on its own. For the LoRA
factors this is an optimizer on A and on B, not on the product ``BA``. Strategies that
re-initialise factors every round (FLoRA) refuse it at config time.

State (in checkpoints): ``{"inner": <the inner aggregator's state>, "m": {key: tensor},
"v": {key: tensor}}``; metric ``server_opt/update_norm`` is ``‖x_new − x‖`` over all
tensors, ``server_opt/pseudo_gradient_norm`` is ``‖Δ‖``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedpeft.aggregation.layers import StatefulLayer
from fedpeft.config import ServerOptConfig
from fedpeft.types import ClientUpdate, RoundOutput, TensorDict

DEFAULT_LR: dict[str, float] = {"avgm": 1.0, "adam": 0.1, "yogi": 0.01, "adagrad": 0.1}
"""``server-opt.lr = 0`` means these: Hsu et al.'s server rate 1 for FedAvgM, Flower
1.41's ``eta`` defaults for the adaptive ones (Reddi et al. tune η per task)."""


def rate(settings: ServerOptConfig) -> float:
    """η: ``server-opt.lr``, or the method's :data:`DEFAULT_LR` when it is 0."""
    return settings.lr if settings.lr > 0 else DEFAULT_LR[settings.name]


class ServerOptimizer(StatefulLayer):
    """The inner aggregate as the target of one optimizer step from the current global.

    Args:
        inner: the aggregator whose result defines the pseudo-gradient.
        settings: the optimizer and its hyper-parameters (the ``server-opt`` section;
            ``name`` is not ``none``).
    """

    name = "server_opt"

    def __init__(self, inner: Any, settings: ServerOptConfig) -> None:
        super().__init__(inner)
        self.settings = settings

    def own_state(self, global_tensors: TensorDict) -> dict[str, Any]:
        """``{"m": {}, "v": {}}`` (moments are created on first use)."""
        return {"m": {}, "v": {}}

    def aggregate(
        self, state: Any, global_tensors: TensorDict, updates: Sequence[ClientUpdate], server_round: int
    ) -> RoundOutput[Any]:
        """The inner aggregate ``x̄``, then ``x ← step(x, x̄ − x)`` per float tensor."""
        out = self.inner.aggregate(state["inner"], global_tensors, updates, server_round)
        s = self.settings
        m, v = dict(state["m"]), dict(state["v"])
        new = dict(out.tensors)
        grad2 = step2 = 0.0
        for key, target in out.tensors.items():
            x = global_tensors.get(key)
            if x is None or not target.is_floating_point() or x.shape != target.shape:
                continue  # a key the optimizer cannot follow (new, integer, resized)
            x64 = x.to(torch.float64)
            delta = target.to(torch.float64) - x64  # Δ = x̄ − x, shape of x
            if s.name == "avgm":
                pg = -delta  # Flower's pseudo-gradient old − new
                mom = m.get(key)
                mom = pg if mom is None or s.momentum == 0 else s.momentum * mom + pg
                if s.momentum > 0:
                    m[key] = mom
                stepped = x64 - rate(s) * mom
            else:
                m1 = m.get(key, torch.zeros_like(delta))
                m1 = s.beta1 * m1 + (1 - s.beta1) * delta
                v1 = v.get(key, torch.zeros_like(delta))
                sq = delta * delta
                if s.name == "adam":
                    v1 = s.beta2 * v1 + (1 - s.beta2) * sq
                elif s.name == "yogi":
                    v1 = v1 - (1 - s.beta2) * sq * torch.sign(v1 - sq)
                else:  # adagrad
                    v1 = v1 + sq
                m[key], v[key] = m1, v1
                eta = rate(s)
                if s.name == "adam" and s.bias_correction:
                    t = server_round + 1.0
                    eta = eta * (1 - s.beta2**t) ** 0.5 / (1 - s.beta1**t)
                stepped = x64 + eta * m1 / (v1.sqrt() + s.tau)
            new[key] = stepped.to(target.dtype)
            grad2 += float((delta * delta).sum())
            step2 += float(((stepped - x64) ** 2).sum())
        metrics = {
            **out.metrics,
            f"{self.name}/pseudo_gradient_norm": grad2**0.5,
            f"{self.name}/update_norm": step2**0.5,
        }
        return RoundOutput(
            {"inner": out.state, "m": m, "v": v},
            new,
            metrics,
            updates=out.updates,
            rejected=dict(out.rejected),
        )
