"""Conversions between fedpeft values and Flower records, and wire-level constants.

Every key a message carries is defined here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpeft.codecs.base import Payload
from fedpeft.types import ClientPlan, Scalar, TensorDict

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
CODEC = "codec"
SERVER_ROUND = "server-round"
PLAN_PREFIX = "plan."
OPTION_PREFIX = "option."
CLIENT_STATE = "fedpeft.client-state"
CODEC_STATE = "fedpeft.codec-state"
QUERY_HELLO = "query.hello"
ATTEMPT = "attempt"
CLIENT_CHECKPOINT_DIR = "checkpoint-dir"
EVALUATE_GLOBAL = "evaluate"


def payload_to_record(payload: Payload) -> tuple[ArrayRecord, ConfigRecord]:
    """A payload as an ``ArrayRecord`` (its arrays) and a ``ConfigRecord`` (its meta)."""
    arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in payload.arrays.items()})
    return arrays, ConfigRecord(dict(payload.meta))


def record_to_payload(arrays: ArrayRecord, meta: ConfigRecord | None) -> Payload:
    """Inverse of :func:`payload_to_record`."""
    return Payload(
        arrays={k: arrays[k].numpy() for k in arrays.keys()},
        meta=dict(meta) if meta is not None else {},
    )


def content_nbytes(content: RecordDict) -> int:
    """Serialized bytes of a message's records: array data with npy headers, keys,
    config and metric records (Flower's ``count_bytes``)."""
    total = 0
    for name, record in content.items():
        total += len(name) + record.count_bytes()
    return total


def arrays_nbytes(content: RecordDict) -> int:
    """Raw bytes of the array data in a message's ``ARRAYS`` record (no headers)."""
    if ARRAYS not in content:
        return 0
    record = content[ARRAYS]
    return int(sum(record[k].numpy().nbytes for k in record.keys()))


def plan_to_config(plan: ClientPlan, server_round: int) -> dict[str, Scalar]:
    """The plan as flat ConfigRecord entries."""
    out: dict[str, Scalar] = {
        SERVER_ROUND: server_round,
        PLAN_PREFIX + "partition-id": plan.partition_id,
        PLAN_PREFIX + "rank": plan.rank,
        PLAN_PREFIX + "seed": plan.seed,
    }
    for key, value in plan.options.items():
        out[OPTION_PREFIX + key] = value
    return out


def config_to_plan(config: Mapping[str, Any], node_id: int) -> ClientPlan:
    """Inverse of :func:`plan_to_config`."""
    options = {
        k[len(OPTION_PREFIX):]: v for k, v in config.items() if k.startswith(OPTION_PREFIX)
    }
    return ClientPlan(
        node_id=node_id,
        partition_id=int(config[PLAN_PREFIX + "partition-id"]),
        rank=int(config[PLAN_PREFIX + "rank"]),
        seed=int(config[PLAN_PREFIX + "seed"]),
        options=options,
    )


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Tensors (any float dtype but bf16) as an ``ArrayRecord``."""
    return ArrayRecord(
        {k: Array(v.detach().cpu().contiguous().numpy()) for k, v in tensors.items()}
    )


def record_to_tensors(record: ArrayRecord) -> TensorDict:
    """An ``ArrayRecord`` as writable torch tensors."""
    return {k: torch.from_numpy(np.array(record[k].numpy(), copy=True)) for k in record.keys()}


def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Numpy arrays (codec state) as an ``ArrayRecord``."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Inverse of :func:`arrays_to_record`."""
    return {k: np.array(record[k].numpy(), copy=True) for k in record.keys()}


def metrics_record(metrics: Mapping[str, float | int]) -> MetricRecord:
    """A MetricRecord from plain numbers (numpy scalars and bools are cast)."""
    out: dict[str, float | int] = {}
    for k, v in metrics.items():
        out[k] = int(v) if isinstance(v, (bool, np.integer)) or isinstance(v, int) else float(v)
    return MetricRecord(out)
