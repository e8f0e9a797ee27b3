"""Pure torch LoRA algebra (imports neither flwr nor transformers)."""

from fedpeft.lora.factors import LoraFactors
from fedpeft.lora.ops import (
    SIGMA_SPLITS,
    aggregation_error,
    factors_from_svd,
    pad_adapter_to,
    pad_rank,
    product_frobenius_inner,
    product_mean,
    refactor_svd,
    rescale,
    resize_adapter_to,
    resize_rank,
    stack_factors,
    svd_factors,
    truncate_adapter_to,
    truncate_rank,
    work_dtype,
)
from fedpeft.lora.peft_io import AdapterLayout, join_adapter, split_adapter

__all__ = [
    "SIGMA_SPLITS",
    "AdapterLayout",
    "LoraFactors",
    "aggregation_error",
    "factors_from_svd",
    "join_adapter",
    "pad_adapter_to",
    "pad_rank",
    "product_frobenius_inner",
    "product_mean",
    "refactor_svd",
    "rescale",
    "resize_adapter_to",
    "resize_rank",
    "split_adapter",
    "stack_factors",
    "svd_factors",
    "truncate_adapter_to",
    "truncate_rank",
    "work_dtype",
]
