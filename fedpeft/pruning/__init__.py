"""Structured pruning for FedSpine (pure torch; imports neither flwr nor transformers).

* :mod:`~fedpeft.pruning.blocks`: attention / FFN block descriptions and masks;
* :mod:`~fedpeft.pruning.importance`: LoRA-guided scores and their EMA;
* :mod:`~fedpeft.pruning.schedule`: what to prune (``select_prune``) and when;
* :mod:`~fedpeft.pruning.aggregate`: the server's mask-aware aggregation;
* :mod:`~fedpeft.pruning.bert`: in-place pruning of BERT-style models (duck-typed).
"""

from fedpeft.pruning.aggregate import (
    MaskedFactors,
    mask_aware_mean,
    restricted_lowrank,
    scatter_factors,
)
from fedpeft.pruning.blocks import (
    AttentionBlock,
    FFNBlock,
    Projection,
    group_indices,
    prune_attention,
    prune_ffn,
)
from fedpeft.pruning.importance import (
    channel_scores,
    element_scores,
    ema_update,
    head_scores,
    lora_weight_change,
    normalize_scores,
)
from fedpeft.pruning.schedule import (
    compose_keep,
    cubic_sparsity,
    num_to_prune,
    protected_layers,
    round_sparsity_goal,
    select_prune,
    select_prune_count,
    structure_sparsity,
)

__all__ = [
    "AttentionBlock",
    "FFNBlock",
    "MaskedFactors",
    "Projection",
    "channel_scores",
    "compose_keep",
    "cubic_sparsity",
    "element_scores",
    "ema_update",
    "group_indices",
    "head_scores",
    "lora_weight_change",
    "mask_aware_mean",
    "normalize_scores",
    "num_to_prune",
    "protected_layers",
    "prune_attention",
    "prune_ffn",
    "restricted_lowrank",
    "round_sparsity_goal",
    "scatter_factors",
    "select_prune",
    "select_prune_count",
    "structure_sparsity",
]
