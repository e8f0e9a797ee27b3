"""``ffa-lora``: freeze A, train and average only B (and the extras).

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024;
ALGORITHMS.md §2. ``A`` is the initial global adapter's and never changes; per layer
the server averages ``B̄ = Σ_k p_k B_k`` and then ``B̄A = Σ_k p_k B_k A`` exactly (the
model is linear in the trained factor). Non-LoRA trainables (a classifier head) are
trained and averaged as in the FedEx-LoRA reference code.

**A is sent once.** A client receives ``A`` (bitwise the global's) on its first
participation, keeps it in its state, and from then on gets only ``B`` and the
extras; the server remembers who has ``A`` (``state["has_a/<partition id>"]``) from
the replies it accepted. Uploads never contain ``A``.

**Wire.** Up ``P_B(r)·b`` per round; down ``P_B(r)·b`` (+ a one-off ``P_A(r)·b``).
Sum-compatible with secure aggregation; one rank only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedpeft import (
    AggregatorBase,
    ClientAlgorithmBase,
    ClientPlan,
    ClientUpdate,
    FedStrategy,
    IncompatibleUpdateError,
    RoundOutput,
    StrategyEnv,
    TensorDict,
    client_weights,
    register_strategy,
    weighted_mean,
)
from fedpeft.lora.peft_io import factor_keys, lora_modules


def a_keys(tensors: TensorDict) -> set[str]:
    """The ``lora_A`` keys of an adapter."""
    return {factor_keys(m)[0] for m in lora_modules(tensors)}


@dataclass(frozen=True)
class FfaLoraConfig:
    """Options of ``ffa-lora``."""


@dataclass(frozen=True)
class FfaLoraAggregator(AggregatorBase[Any]):
    """Mean of the uploaded B and extras; A stays the initial global A."""

    def initialize(self, global_tensors: TensorDict) -> dict[str, Any]:
        """No client has received A yet."""
        return {}

    def client_payload(
        self, state: dict[str, Any], global_tensors: TensorDict, plan: ClientPlan
    ) -> TensorDict:
        """B and extras; A too for a client that has not trained yet."""
        if state.get(f"has_a/{plan.partition_id}"):
            frozen = a_keys(global_tensors)
            return {k: v for k, v in global_tensors.items() if k not in frozen}
        return dict(global_tensors)

    def aggregate(
        self,
        state: dict[str, Any],
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[dict[str, Any]]:
        """Weighted mean of B and extras.

        Raises:
            IncompatibleUpdateError: an update contains a ``lora_A`` key.
        """
        frozen = a_keys(global_tensors)
        for u in updates:
            bad = sorted(frozen & set(u.tensors))
            if bad:
                raise IncompatibleUpdateError(
                    f"ffa-lora freezes A, but node {u.node_id} uploaded {bad[:2]}"
                )
        weights = client_weights(updates)
        uploads = [{k: v for k, v in u.tensors.items() if k in global_tensors} for u in updates]
        new = dict(global_tensors)
        new.update(weighted_mean(uploads, weights))
        new_state = dict(state)
        for u in updates:
            new_state[f"has_a/{u.plan.partition_id}"] = 1
        return RoundOutput(state=new_state, tensors=new, metrics={})


@dataclass(frozen=True)
class FrozenA(ClientAlgorithmBase):
    """FFA-LoRA's client: A from the server (once, then from the state), train the rest.

    ``start`` takes A from the payload if present, else from the state; B and extras
    from the payload. Every key but A is trained. ``finish`` uploads B and extras and
    keeps A in the state.
    """

    def start(
        self, received: TensorDict, init: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> tuple[TensorDict, frozenset[str]]:
        """Frozen A; B and extras as received.

        Raises:
            IncompatibleUpdateError: A was neither received nor kept.
        """
        frozen = a_keys(init)
        start = dict(init)
        start.update({k: v for k, v in received.items() if k in init})
        missing = sorted(k for k in frozen if k not in received and k not in state)
        if missing:
            raise IncompatibleUpdateError(
                f"ffa-lora: the frozen A {missing[:2]} was neither received nor kept in the "
                "client state; a client needs the server's A once (client state lost?)"
            )
        start.update({k: state[k] for k in frozen if k not in received})
        return start, frozenset(init) - frozen

    def finish(
        self, trained: TensorDict, received: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> tuple[TensorDict, TensorDict]:
        """Upload everything but A; keep A."""
        frozen = a_keys(trained)
        upload = {k: v for k, v in trained.items() if k not in frozen}
        return upload, {k: trained[k] for k in frozen}


def build(config: FfaLoraConfig, env: StrategyEnv) -> FedStrategy:
    """FFA-LoRA: A frozen from the initial global adapter; B and extras averaged."""
    return FedStrategy(aggregator=FfaLoraAggregator(), client=FrozenA())


register_strategy(
    "ffa-lora",
    config_cls=FfaLoraConfig,
    build=build,
    summary="freeze A, average B only (Sun et al., ICLR 2024)",
)
