"""``fedsa-lora``: share A, keep B on the client.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025; ALGORITHMS.md §3. The server averages ``Ā = Σ_k p_k A_k`` (and, by
default, the extras such as a classifier head); each client keeps its own ``B_k``
across rounds in its ``ClientAlgorithm`` state (Flower's ``Context.state``), starting
from ``init``'s zero B on first participation. At round start client ``k`` computes
with ``W0 + s·B_k Ā``. Uploads contain no B.

**Global model for server-side evaluation.** FedSA-LoRA is personalised; a global
model is defined only for reporting: ``Ā`` with the weighted mean of the clients'
latest B, ``B_glob = Σ_j n_j B_j / Σ_j n_j`` over every client that ever reported
(latest report each, stored in the aggregator state). Since uploads carry no B,
this needs ``report_b = true``, which makes clients also upload B — it costs
``P_B(r)·b`` up per round and is counted by the byte ledger. With the default
``report_b = false`` the wire cost is the method's (``P_A(r)·b`` up and down) and the
global adapter keeps its initial B (zero), so server-side evaluation shows the base
model with the averaged A; evaluate on the clients instead (``eval.client``), where
``start`` loads each client's own B.

``local_extras = true`` keeps the extras local like B (the official GLUE config keeps
the classifier local); they are reported with ``report_b`` too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedpeft import (
    AggregatorBase,
    ClientAlgorithmBase,
    ClientPlan,
    ClientUpdate,
    FedStrategy,
    RoundOutput,
    StrategyEnv,
    TensorDict,
    client_weights,
    register_strategy,
    weighted_mean,
)
from fedpeft.lora.peft_io import factor_keys, is_lora_key, lora_modules


@dataclass(frozen=True)
class FedSaLoraConfig:
    """Options of ``fedsa-lora``.

    Default differs from the paper's GLUE setup: ``local_extras = false``, a shared
    classifier head (official ``federatedscope/glue/yamls/fedsa-lora.yaml``:
    ``local_param: ['lora_B', 'classifier']``) because the official LLM config keeps
    only ``lora_B`` local and a shared head keeps the server-side model evaluable;
    set ``local_extras = true`` to reproduce the GLUE runs.

    Attributes:
        report_b: clients also upload B (and local extras) for the server's
            reporting-only global model; costs ``P_B(r)·b`` up per round.
        local_extras: keep non-LoRA trainables (heads) on the client like B.
    """

    report_b: bool = False
    local_extras: bool = False


def local_keys(tensors: TensorDict, local_extras: bool) -> set[str]:
    """Keys that stay on the client: every ``lora_B`` (and the extras if local)."""
    keys = {factor_keys(m)[1] for m in lora_modules(tensors)}
    if local_extras:
        keys |= {k for k in tensors if not is_lora_key(k)}
    return keys


@dataclass(frozen=True)
class FedSaLoraAggregator(AggregatorBase[Any]):
    """Mean of A (and shared extras); reporting-only mean of the latest local tensors.

    State: ``"local/<partition id>/<key>"`` (latest reported local tensor) and
    ``"n/<partition id>"`` (its example count), only with ``report_b``.

    Attributes:
        config: the strategy options.
    """

    config: FedSaLoraConfig

    def initialize(self, global_tensors: TensorDict) -> dict[str, Any]:
        """Nobody has reported yet."""
        return {}

    def client_payload(
        self, state: dict[str, Any], global_tensors: TensorDict, plan: ClientPlan
    ) -> TensorDict:
        """The shared tensors: A (and the extras unless local)."""
        local = local_keys(global_tensors, self.config.local_extras)
        return {k: v for k, v in global_tensors.items() if k not in local}

    def aggregate(
        self,
        state: dict[str, Any],
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[dict[str, Any]]:
        """``Ā = Σ p_k A_k``; with ``report_b`` also the mean of the latest local tensors."""
        weights = client_weights(updates)
        local = local_keys(global_tensors, self.config.local_extras)
        shared = [
            {k: v for k, v in u.tensors.items() if k in global_tensors and k not in local}
            for u in updates
        ]
        new = dict(global_tensors)
        new.update(weighted_mean(shared, weights))
        new_state = dict(state)
        if self.config.report_b:
            for u in updates:
                pid = u.plan.partition_id
                for k in local & set(u.tensors):
                    new_state[f"local/{pid}/{k}"] = u.tensors[k].detach().clone()
                new_state[f"n/{pid}"] = int(u.num_examples)
            new.update(self._reported_mean(new_state, local))
        return RoundOutput(state=new_state, tensors=new, metrics={})

    def _reported_mean(self, state: dict[str, Any], local: set[str]) -> TensorDict:
        pids = sorted(int(k.split("/")[1]) for k in state if k.startswith("n/"))
        counts = [state[f"n/{p}"] for p in pids]
        total = sum(counts)
        weights = [c / total for c in counts] if total > 0 else [1.0 / len(pids)] * len(pids)
        out: TensorDict = {}
        for key in sorted(local):
            have = [
                (w, state[f"local/{p}/{key}"])
                for w, p in zip(weights, pids, strict=True)
                if f"local/{p}/{key}" in state
            ]
            norm = sum(w for w, _ in have)
            if not have or norm <= 0.0:
                continue
            acc = torch.zeros(have[0][1].shape, dtype=torch.float64)
            for w, t in have:
                if w != 0.0:
                    acc += (w / norm) * t.to(torch.float64)
            out[key] = acc.to(have[0][1].dtype)
        return out


@dataclass(frozen=True)
class LocalB(ClientAlgorithmBase):
    """FedSA-LoRA's client: received A, its own B (and local extras) from the state.

    Attributes:
        report_b: also upload the local tensors (for the server's reporting model).
        local_extras: extras stay local like B.
    """

    report_b: bool = False
    local_extras: bool = False

    def start(
        self, received: TensorDict, init: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> tuple[TensorDict, frozenset[str]]:
        """A (and shared extras) received; B from the state, ``init``'s zero B at first."""
        local = local_keys(init, self.local_extras)
        start = dict(init)
        start.update({k: v for k, v in received.items() if k in init and k not in local})
        start.update({k: v for k, v in state.items() if k in local})
        return start, frozenset(init)

    def finish(
        self, trained: TensorDict, received: TensorDict, state: TensorDict, plan: ClientPlan
    ) -> tuple[TensorDict, TensorDict]:
        """Upload A (and shared extras; local ones too with ``report_b``); keep B."""
        local = local_keys(trained, self.local_extras)
        upload = {k: v for k, v in trained.items() if self.report_b or k not in local}
        return upload, {k: trained[k] for k in sorted(local)}


def build(config: FedSaLoraConfig, env: StrategyEnv) -> FedStrategy:
    """FedSA-LoRA: A shared and averaged, B persistent on each client."""
    return FedStrategy(
        aggregator=FedSaLoraAggregator(config),
        client=LocalB(report_b=config.report_b, local_extras=config.local_extras),
    )


register_strategy(
    "fedsa-lora",
    config_cls=FedSaLoraConfig,
    build=build,
    summary="share A, keep B local on each client (Guo et al., ICLR 2025)",
)
