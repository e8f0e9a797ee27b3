"""fedpeft's server optimizers give Flower's numbers: the same client arrays, over three
rounds, into Flower 1.41's FedAvgM / FedAdam / FedYogi / FedAdagrad and into
``ServerOptimizer(WeightedMean())``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from fedpeft import ClientUpdate, WeightedMean
from fedpeft.aggregation.server_opt import ServerOptimizer
from fedpeft.config import ServerOptConfig
from tests.strategies import _factories as fx

SHAPES = {"a": (4, 6), "b": (6, 4), "head": (3,)}
COUNTS = [3, 10, 7]


def _round_arrays(server_round: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(100 + server_round)
    return [
        {k: rng.normal(scale=0.1, size=s).astype(np.float32) for k, s in SHAPES.items()}
        for _ in COUNTS
    ]


def _reply(arrays: dict[str, np.ndarray], n: int, node: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": n}),
        }
    )
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


CASES = [
    (
        "avgm",
        lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
        ServerOptConfig(name="avgm", lr=0.7, momentum=0.9),
    ),
    (
        "adam",
        lambda: FedAdam(eta=0.05, beta_1=0.9, beta_2=0.99, tau=1e-3),
        ServerOptConfig(name="adam", lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3, bias_correction=True),
    ),
    (
        "yogi",
        lambda: FedYogi(eta=0.02, beta_1=0.9, beta_2=0.99, tau=1e-3),
        ServerOptConfig(name="yogi", lr=0.02, beta1=0.9, beta2=0.99, tau=1e-3),
    ),
    (
        "adagrad",
        lambda: FedAdagrad(eta=0.1, tau=1e-3),  # Flower's FedAdagrad has β₁ = 0
        ServerOptConfig(name="adagrad", lr=0.1, beta1=0.0, tau=1e-3),
    ),
]


@pytest.mark.parametrize(("name", "flower_cls", "settings"), CASES, ids=[c[0] for c in CASES])
def test_three_rounds_equal_flowers_strategy(name, flower_cls, settings):
    rng = np.random.default_rng(0)
    initial = {k: rng.normal(scale=0.1, size=s).astype(np.float32) for k, s in SHAPES.items()}
    flower = flower_cls()
    ours = ServerOptimizer(WeightedMean(), settings)
    state = ours.initialize({k: torch.from_numpy(v) for k, v in initial.items()})
    flower_global = {k: v.copy() for k, v in initial.items()}
    our_global = {k: torch.from_numpy(v.copy()) for k, v in initial.items()}
    if name == "avgm":
        flower.current_arrays = ArrayRecord({k: Array(v) for k, v in flower_global.items()})
    for server_round in (1, 2, 3):
        arrays = _round_arrays(server_round)
        if name != "avgm":  # FedOpt keeps the arrays it sent in configure_train
            flower.current_arrays = {k: v.copy() for k, v in flower_global.items()}
        replies = [_reply(a, n, 10 + i) for i, (a, n) in enumerate(zip(arrays, COUNTS, strict=True))]
        record, _ = flower.aggregate_train(server_round, replies)
        flower_global = {k: record[k].numpy() for k in SHAPES}
        updates = [
            ClientUpdate(10 + i, {k: torch.from_numpy(v) for k, v in a.items()}, n, {}, fx.plan(i))
            for i, (a, n) in enumerate(zip(arrays, COUNTS, strict=True))
        ]
        out = ours.aggregate(state, our_global, updates, server_round)
        state, our_global = out.state, out.tensors
        for key in SHAPES:
            np.testing.assert_allclose(
                our_global[key].numpy(), flower_global[key], rtol=1e-5, atol=1e-6,
                err_msg=f"{name} round {server_round} {key}",
            )
    moved = max(float(np.abs(flower_global[k] - initial[k]).max()) for k in SHAPES)
    assert moved > 1e-3  # the optimizer did move the arrays: the comparison can fail
