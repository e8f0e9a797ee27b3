"""Frozen value types that cross module boundaries.

A *tensor dict* (``TensorDict``) is the currency of fedpeft: named ``torch.Tensor`` s
keyed exactly like a peft adapter state dict without the adapter name, e.g.
``"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"``
(shape ``(r, d_in)``) or ``"base_model.model.classifier.weight"`` (a trainable head).
Only :mod:`fedpeft.lora.peft_io` interprets the key spelling.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

TensorDict = dict[str, torch.Tensor]
"""Named tensors: an adapter, an update, or a piece of client/strategy state."""

Scalar = int | float | str | bool
"""A value that can travel in a Flower ``ConfigRecord`` and in a flat run config."""

S = TypeVar("S")

NUM_EXAMPLES = "num-examples"
"""Key of a client's example count in its reply metrics (its aggregation weight under
``aggregation.weighting=examples``)."""

AUX_PREFIX = "aux."
"""Uploaded keys with this prefix are strategy-defined auxiliary tensors (e.g.
``"aux.hetlora.rank"``): the server checks them for finite values only."""


@dataclass(frozen=True)
class NodeInfo:
    """What the server knows about a connected node (from the start-of-run query).

    Attributes:
        node_id: Flower's node id (random per run in simulation).
        partition_id: the node's stable index (``partition-id`` in its node config);
            selection, ranks and seeds are keyed by it so a run is reproducible in
            simulation and in deployment alike.
        properties: everything else the node reported (device profile, ...).
    """

    node_id: int
    partition_id: int
    properties: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientPlan:
    """What one client is asked to do in one round; built by a ``Selector``.

    Attributes:
        node_id: the Flower node the plan is for.
        partition_id: that node's stable index (see ``NodeInfo``).
        rank: LoRA rank this client trains with this round (mixed ranks are allowed).
        seed: the client's random seed for this round (data order, dropout, stochastic
            codecs). Derived from ``(run seed, round, node)`` so runs are reproducible.
        options: strategy-specific instructions. They travel in the message's
            ``ConfigRecord`` and reach the strategy's ``ClientAlgorithm`` unchanged.
    """

    node_id: int
    partition_id: int
    rank: int
    seed: int
    options: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """One client's decoded, validated reply to a training message.

    Attributes:
        node_id: who sent it.
        tensors: the uploaded tensors after decoding (what the strategy asked for).
        num_examples: local examples trained on; the default aggregation weight.
        metrics: finite training metrics reported by the client.
        plan: the plan the client was given this round.
        received: what the client started from (the decoded payload it was sent), for
            layers that work on the change ``tensors − received``; empty when unknown.
    """

    node_id: int
    tensors: TensorDict
    num_examples: int
    metrics: Mapping[str, float]
    plan: ClientPlan
    received: TensorDict = field(default_factory=dict)


@dataclass(frozen=True)
class RoundOutput(Generic[S]):
    """The result of one aggregation step: state in, state out (TFF style).

    Attributes:
        state: the aggregator's new state; passed back to the next ``aggregate`` call
            and saved in checkpoints.
        tensors: the new global adapter (every key the global adapter has).
        metrics: finite diagnostic numbers, keys namespaced by layer, e.g.
            ``"lora_fair/cosine"``.
        updates: the updates the aggregate was made of, after aggregation layers
            dropped or changed some (clipped); a *transparent* layer (equal weighting,
            rank padding) reports them as they came in. ``None``: the updates passed
            in, unchanged.
        rejected: ``{node_id: reason}`` of updates a layer left out.
    """

    state: S
    tensors: TensorDict
    metrics: Mapping[str, float] = field(default_factory=dict)
    updates: tuple[ClientUpdate, ...] | None = None
    rejected: Mapping[int, str] = field(default_factory=dict)
