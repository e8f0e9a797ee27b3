"""One client round without transport: decode what the server sent, run the strategy's
client half around local training, encode the upload.

``fedpeft.flower.client_app`` only reads the Message and ``Context.state`` into these
arguments and writes the result back.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedpeft.aggregation import scaffold
from fedpeft.attacks import attack_update, poison_data
from fedpeft.client.algorithm import finish_with_carry, overrides
from fedpeft.client.prox import proximal_term
from fedpeft.codecs import CodecContext, build_codec
from fedpeft.codecs.base import Payload
from fedpeft.codecs.budget import encode_within
from fedpeft.codecs.tensors import (
    decode_downlink,
    decode_tensors,
    encode_tensors,
    reference_state,
    split_reference,
)
from fedpeft.config import RunConfig
from fedpeft.errors import FedPeftError
from fedpeft.faults import client_attack
from fedpeft.registry import get_strategy
from fedpeft.seeding import derive_seed
from fedpeft.timings import mark
from fedpeft.types import NUM_EXAMPLES, ClientPlan, TensorDict


@dataclass(frozen=True)
class ClientRound:
    """What a client round produced.

    Attributes:
        payload: the encoded upload.
        state: the strategy's client state for the next round.
        codec_state: the uplink codec's state (error-feedback residuals).
        metrics: ``num-examples`` and training metrics for the reply.
    """

    payload: Payload
    state: TensorDict
    codec_state: dict[str, np.ndarray]
    metrics: dict[str, Any]


def client_algorithm(cfg: RunConfig) -> Any:
    """The configured strategy's client half."""
    from fedpeft.server.setup import strategy_env

    return get_strategy(cfg.strategy.name).build(cfg.options, strategy_env(cfg)).client


def run_client_round(
    cfg: RunConfig,
    plan: ClientPlan,
    server_round: int,
    partition: tuple[int, int],
    received_payload: Payload,
    state: TensorDict,
    codec_state: Mapping[str, np.ndarray],
    started: float | None = None,
) -> ClientRound:
    """Train one round for ``plan`` on partition ``(id, count)``.

    Args:
        cfg: the run config.
        plan: this round's plan.
        server_round: the round number.
        partition: ``(partition id, number of partitions)`` of this node's data.
        received_payload: the encoded payload the server sent.
        state: the strategy's client state from earlier rounds (``{}`` at first).
        codec_state: the uplink codec's state from earlier rounds.
        started: when the round started (``time.perf_counter()``), for ``client-seconds``.
    """
    from fedpeft.tasks import get_task

    started = time.perf_counter() if started is None else started
    if cfg.train.num_threads:  # the whole process: a ClientApp process trains one client
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    task = get_task(cfg)
    model = task.model(plan.rank)
    mark("model")
    algorithm = client_algorithm(cfg)
    downlink, uplink = build_codec(cfg.codec.downlink), build_codec(cfg.codec.uplink)
    down_ctx = CodecContext(
        seed=derive_seed(cfg.seed, "downlink", server_round, plan.partition_id), direction="downlink"
    )
    # codec.downlink-delta: the reference this client decoded last time is in its codec
    # state beside the uplink's residuals
    delta = cfg.codec.downlink_delta and not downlink.lossless
    held, codec_state = split_reference(codec_state)
    codec_started = time.perf_counter()
    if delta:
        received = decode_downlink(received_payload, downlink, held, down_ctx)
        held = reference_state(server_round, received)
    else:
        received = decode_tensors(received_payload, downlink, down_ctx)
        held = {}
    codec_seconds = time.perf_counter() - codec_started
    # SCAFFOLD's variates (scaffold.enabled) travel beside the strategy's tensors
    received, c = scaffold.split(received, scaffold.SERVER)
    state, c_i = scaffold.split(state, scaffold.STATE)

    opened = algorithm.start(received, model.initial, state, plan)
    start, trainable = opened
    model.load(start)
    train_data, _ = task.client_data(*partition)
    # faults.attack: a Byzantine partition poisons its data here or its update below
    attack = client_attack(cfg.faults, cfg.seed, *partition)
    if attack is not None and attack.on_data:
        train_data = poison_data(task, train_data, attack, derive_seed(cfg.seed, "backdoor", partition[0]))
    mark("data")
    extra_metrics: dict[str, float] = {}
    local = (
        algorithm.local_round(task, model, train_data, trainable, plan, state)
        if overrides(algorithm, "local_round")
        else None
    )
    if local is not None:
        result, trained = local.result, local.tensors
        extra_metrics = {k: float(v) for k, v in local.metrics.items()}
        state = {**state, **local.state}
    else:
        penalty = _penalty(cfg, algorithm, plan, start, c, c_i)
        result = task.train(model, train_data, trainable, plan.seed, penalty)
        trained = model.tensors()
    mark("train")
    upload, new_state = finish_with_carry(algorithm, opened, trained, received, state, plan)
    if attack is not None and not attack.on_data:
        upload = attack_update(attack, upload, received, derive_seed(cfg.seed, "attack", server_round, partition[0]))
    if c:
        new_c_i, delta = scaffold.client_variates(start, trained, c, c_i, result.steps, cfg.train.lr)
        upload = {**upload, **{f"{scaffold.UPLOAD}{k}": v for k, v in delta.items()}}
        kept = {**c_i, **new_c_i}
        new_state = {**new_state, **{f"{scaffold.STATE}{k}": v for k, v in kept.items()}}

    up_ctx = CodecContext(
        seed=derive_seed(cfg.seed, "uplink", server_round, plan.partition_id),
        direction="uplink",
        reference=received,
    )
    codec_started = time.perf_counter()
    target = cfg.budget.bytes_per_round

    def encode(codec_state: Mapping[str, np.ndarray]) -> tuple[Payload, Any, dict[str, float]]:
        if not target:
            return (*encode_tensors(upload, uplink, dict(codec_state), up_ctx), {})
        # budget.bytes-per-round: the topk fraction that fits the target this round
        fitted = encode_within(upload, uplink, dict(codec_state), up_ctx, target)
        return fitted.payload, fitted.state, {
            "uplink-fraction": fitted.fraction, "uplink-fitted-bytes": float(fitted.nbytes),
        }

    try:
        encoded, new_codec_state, budget_metrics = encode(codec_state)
    except FedPeftError:  # shapes changed since the residuals were kept (new rank)
        encoded, new_codec_state, budget_metrics = encode({})
    codec_seconds += time.perf_counter() - codec_started
    metrics = {
        NUM_EXAMPLES: result.num_examples,
        "train-loss": result.loss if result.steps else 0.0,
        "steps": result.steps,
        "train-seconds": result.seconds,
        "train-tokens": result.tokens,
        "client-seconds": time.perf_counter() - started,
        "codec-seconds": codec_seconds,
        **extra_metrics,
        **budget_metrics,
    }
    return ClientRound(encoded, new_state, {**new_codec_state, **held}, metrics)


def _penalty(
    cfg: RunConfig,
    algorithm: Any,
    plan: ClientPlan,
    start: TensorDict,
    c: TensorDict | None = None,
    c_i: TensorDict | None = None,
) -> Any:
    """The strategy's ``penalty`` hook plus FedProx's term (``train.prox-mu``) plus
    SCAFFOLD's correction (when the server sent a variate ``c``), or ``None``."""
    terms = []
    if overrides(algorithm, "penalty"):
        terms.append(lambda params: algorithm.penalty(params, plan))
    if cfg.train.prox_mu > 0:
        anchor = {k: v.detach().clone() for k, v in start.items()}
        terms.append(lambda params: proximal_term(params, anchor, cfg.train.prox_mu))
    if c:
        own = dict(c_i or {})
        terms.append(lambda params: scaffold.correction_term(params, c, own))
    if not terms:
        return None
    if len(terms) == 1:
        return terms[0]

    def total(params: Any) -> Any:
        parts = [t for t in (term(params) for term in terms) if t is not None]
        return sum(parts[1:], parts[0]) if parts else None

    return total


def evaluate_client(
    cfg: RunConfig, plan: ClientPlan, partition: tuple[int, int], received: TensorDict, state: TensorDict
) -> dict[str, Any]:
    """Evaluate the received global adapter (as the client's ``start`` loads it) on the
    partition's held-out split; ``num-examples`` is that split's size."""
    from fedpeft.tasks import get_task

    task = get_task(cfg)
    model = task.model(plan.rank)
    received = scaffold.split(received, scaffold.SERVER)[0]
    state = scaffold.split(state, scaffold.STATE)[0]
    start, _ = client_algorithm(cfg).start(received, model.initial, state, plan)
    model.load(start)
    _, test = task.client_data(*partition)
    metrics: dict[str, Any] = dict(task.evaluate(model, test))
    metrics[NUM_EXAMPLES] = len(test)
    return metrics
