"""The ClientApp: local LoRA training and evaluation behind Flower messages.

Handlers:

* ``query.hello`` — report this node's partition id and node config (device
  profile) so the server can plan per node;
* ``train`` — decode the payload, let the strategy's ``ClientAlgorithm`` choose the
  starting adapter and trainable tensors, train, and reply with the encoded upload,
  ``num-examples`` and training metrics;
* ``evaluate`` — evaluate the received adapter on the local held-out split.

Client state that must survive rounds (the algorithm's state, codec residuals)
lives in ``Context.state``; the model and the tokenised data are cached per process
(see :mod:`fedpeft.tasks.model`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedpeft.checkpoint import load_client_state, save_client_state
from fedpeft.client.round import evaluate_client, run_client_round
from fedpeft.config import RunConfig, parse_run_config
from fedpeft.errors import FedPeftError
from fedpeft.faults import draw_fault
from fedpeft.flower import records as rec
from fedpeft.timings import mark

_CONFIGS: dict[frozenset[tuple[str, Any]], RunConfig] = {}


NODE_KEYS = ("train.device",)
"""Run-config keys a SuperNode's ``node-config`` may set for itself (its GPU)."""


def _config(context: Context, bound: Mapping[str, Any]) -> RunConfig:
    return _config_of(context.run_config, context.node_config, bound)


def _config_of(
    run_config: Mapping[str, Any], node_config: Mapping[str, Any], bound: Mapping[str, Any]
) -> RunConfig:
    node = {k: node_config[k] for k in NODE_KEYS if k in node_config}
    flat = {**dict(run_config), **bound, **node}
    key = frozenset((k, v) for k, v in flat.items())
    if key not in _CONFIGS:
        _CONFIGS[key] = parse_run_config(flat)
    return _CONFIGS[key]


def _partition(context: Context) -> tuple[int, int]:
    return _partition_of(context.node_config)


def _partition_of(node_config: Mapping[str, Any]) -> tuple[int, int]:
    return int(node_config.get("partition-id", 0)), int(node_config.get("num-partitions", 1))


def warm_hint(msg: Message, context: Context) -> dict[str, Any] | None:
    """What a warm zygote should build so this node's next message finds it loaded.

    Flower starts a process per message in deployment; :mod:`fedpeft.flower.warm_clientapp`
    forks them from a zygote and calls this before each message: the run config, the
    node config and the adapter rank (the plan's for ``train``/``evaluate``; for the
    run's first message, ``query.hello``, the rank the config gives this partition).
    Only the deployed app (no ``bound`` overrides) is warmed.
    """
    kind = msg.metadata.message_type.split(".", 1)[0]
    rank = None
    if kind in ("train", "evaluate"):
        rank = rec.config_to_plan(msg.content[rec.CONFIG], context.node_id).rank
    elif kind != "query":
        return None
    return {
        "run_config": dict(context.run_config),
        "node_config": dict(context.node_config),
        "rank": rank,
    }


def warm(hint: Mapping[str, Any]) -> None:
    """Build the model and this node's data for ``hint`` (see :func:`warm_hint`) into the
    per-process cache, exactly as the ``train``/``evaluate`` handlers would.

    The model only on CPU: with a CUDA (or ROCm) build of torch and ``train.device``
    other than ``cpu``, resolving the device initialises the CUDA driver, after which
    the zygote's forked children could not use CUDA; then only the data is warmed.
    """
    import torch

    from fedpeft.tasks import get_task

    cfg = _config_of(hint["run_config"], hint["node_config"], {})
    pid, num = _partition_of(hint["node_config"])
    rank = hint["rank"]
    if rank is None:
        ranks = cfg.lora.rank_list
        rank = ranks[pid % len(ranks)] if ranks else cfg.lora.r
    task = get_task(cfg)
    gpu_torch = torch.version.cuda is not None or getattr(torch.version, "hip", None) is not None
    if cfg.train.device == "cpu" or not gpu_torch:
        task.model(int(rank))
    task.client_data(pid, num)


def _client_state(context: Context) -> dict[str, Any]:
    """The strategy's client state kept in ``Context.state`` (``{}`` at first)."""
    if rec.CLIENT_STATE not in context.state:
        return {}
    return rec.record_to_tensors(context.state[rec.CLIENT_STATE])


def handle_hello(msg: Message, context: Context, bound: Mapping[str, Any]) -> Message:
    """Report partition id, partition count and the node config's scalars."""
    pid, num = _partition(context)
    props: dict[str, Any] = {"partition-id": pid, "num-partitions": num}
    for key, value in context.node_config.items():
        if isinstance(value, (int, float, str, bool)) and key not in props:
            props[key] = value
    return Message(RecordDict({rec.CONFIG: ConfigRecord(props)}), reply_to=msg)


def handle_train(msg: Message, context: Context, bound: Mapping[str, Any]) -> Message:
    """One round of local training."""
    started = time.perf_counter()
    mark("handler-start", message_type="train")
    cfg = _config(context, bound)
    config = msg.content[rec.CONFIG]
    server_round = int(config[rec.SERVER_ROUND])
    plan = rec.config_to_plan(config, context.node_id)
    pid, num = _partition(context)
    attempt = int(config.get(rec.ATTEMPT, 0))
    fault = draw_fault(cfg.faults, cfg.seed, server_round, plan.partition_id, attempt)
    if fault == "crash":
        raise FedPeftError(f"injected crash (faults.crash-rate={cfg.faults.crash_rate})")
    if fault == "slow":
        time.sleep(cfg.faults.slow_seconds)
    ckpt = config.get(rec.CLIENT_CHECKPOINT_DIR)
    if ckpt and rec.CLIENT_STATE not in context.state:
        _restore_client_state(context, str(ckpt), plan.partition_id, server_round)
    state = _client_state(context)
    codec_state = (
        rec.record_to_arrays(context.state[rec.CODEC_STATE])
        if rec.CODEC_STATE in context.state
        else {}
    )
    payload = rec.record_to_payload(msg.content[rec.ARRAYS], msg.content.get(rec.CODEC))
    out = run_client_round(cfg, plan, server_round, (pid, num), payload, state, codec_state, started)
    context.state[rec.CLIENT_STATE] = rec.tensors_to_record(out.state)
    context.state[rec.CODEC_STATE] = rec.arrays_to_record(out.codec_state)
    if ckpt:
        _save_client_state(str(ckpt), plan.partition_id, server_round, out.state, out.codec_state)
    arrays, meta = rec.payload_to_record(out.payload)
    content = RecordDict(
        {rec.ARRAYS: arrays, rec.CODEC: meta, rec.METRICS: rec.metrics_record(out.metrics)}
    )
    mark("handler-end")
    return Message(content, reply_to=msg)


def _save_client_state(
    directory: str, partition_id: int, server_round: int, state: Mapping[str, Any], codec: Mapping[str, Any]
) -> None:
    import pathlib

    import torch

    tensors = {f"client/{k}": v for k, v in state.items()}
    tensors.update({f"codec/{k}": torch.from_numpy(v) for k, v in codec.items()})
    tensors["round"] = torch.tensor([server_round])
    try:
        save_client_state(pathlib.Path(directory), partition_id, server_round, tensors)
    except OSError as err:  # a client must not fail its round over a checkpoint
        logging.getLogger("fedpeft").warning("cannot save client state to %s: %s", directory, err)


def _restore_client_state(context: Context, directory: str, partition_id: int, server_round: int) -> None:
    import pathlib

    saved = load_client_state(pathlib.Path(directory), partition_id, server_round)
    if saved is None:
        return
    state = {k[len("client/"):]: v for k, v in saved.items() if k.startswith("client/")}
    codec = {k[len("codec/"):]: v.numpy() for k, v in saved.items() if k.startswith("codec/")}
    context.state[rec.CLIENT_STATE] = rec.tensors_to_record(state)
    context.state[rec.CODEC_STATE] = rec.arrays_to_record(codec)


def handle_evaluate(msg: Message, context: Context, bound: Mapping[str, Any]) -> Message:
    """Evaluate the received global adapter on the local held-out split."""
    cfg = _config(context, bound)
    plan = rec.config_to_plan(msg.content[rec.CONFIG], context.node_id)
    state = _client_state(context)
    received = rec.record_to_tensors(msg.content[rec.ARRAYS])
    metrics = evaluate_client(cfg, plan, _partition(context), received, state)
    return Message(RecordDict({rec.METRICS: rec.metrics_record(metrics)}), reply_to=msg)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ``ClientApp``; ``overrides`` take precedence over the run config (see
    :func:`fedpeft.flower.server_app.make_server_app`)."""
    app = ClientApp()
    bound = dict(overrides or {})

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        return handle_hello(msg, context, bound)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, bound)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, bound)

    return app


app = make_client_app()
"""The ClientApp ``flwr run`` loads (``[tool.flwr.app.components]``)."""

__all__ = ["app", "make_client_app", "warm", "warm_hint"]

