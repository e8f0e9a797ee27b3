"""The server app end to end on the in-process grid (no Ray): results, bytes,
validation of client replies, client state, model caching."""

from __future__ import annotations

import json
import logging
import math
import pathlib

import numpy as np
import pytest
import torch
from flwr.app import Array, Error, Message

from fedpeft.flower import records as rec
from fedpeft.flower.client_app import make_client_app
from fedpeft.flower.server_app import run_server
from fedpeft.tasks import model as model_cache
from tests.support.fake_grid import InProcessGrid


def _run(cfg, num_nodes=3, tamper=None, node_config=None):
    grid = InProcessGrid(make_client_app(), num_nodes, run_config=cfg, tamper=tamper, node_config=node_config)
    return run_server(grid, cfg), grid


def test_results_files_and_schema(tiny_config):
    results, _ = _run(tiny_config)
    out = pathlib.Path(tiny_config["output.dir"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "fedit" and summary["task"] == "classification"
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for r in summary["rounds"]:
        assert isinstance(r["accuracy"], float) and isinstance(r["loss"], float)
        assert isinstance(r["uplink_bytes"], int) and isinstance(r["downlink_bytes"], int)
        assert isinstance(r["seconds"], float)
    assert summary["rounds"][0]["uplink_bytes"] == 0
    assert 0.0 <= summary["rounds"][1]["aggregation_error"] < 1.0
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith(
        "round,accuracy,loss,uplink_bytes,downlink_bytes,seconds"
    )
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["strategy.name"] == "fedit" and "torch" in config["versions"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_bytes_match_the_adapter_size(tiny_config):
    model_cache.clear_cache()  # so that the only model cached is this run's
    results, grid = _run(tiny_config)
    cfg_model = model_cache._CACHE  # the server's model is cached in this process
    adapter = next(v for k, v in cfg_model.items() if isinstance(k, tuple) and k[4] == "model")
    tensor_bytes = sum(t.numel() * 4 for t in adapter.initial.values())
    per_client = results.rounds[1]["downlink_bytes"] / 3
    # fp32 data + npy headers (~128 B per tensor) + keys + plan config record
    overhead = per_client - tensor_bytes
    assert 0 < overhead < 200 * len(adapter.initial) + 400


def test_loss_decreases_and_client_state_persists(tiny_config):
    cfg = {**tiny_config, "federation.rounds": 3, "train.local-steps": 8}
    results, grid = _run(cfg)
    losses = [r["loss"] for r in results.rounds]
    assert losses[-1] < losses[0]
    for ctx in grid.ctx.values():
        assert rec.CLIENT_STATE in ctx.state and rec.CODEC_STATE in ctx.state


def test_model_is_loaded_once_per_process(tiny_config):
    model_cache.clear_cache()
    _run({**tiny_config, "federation.rounds": 3})
    builds = [k for k in model_cache._CACHE if isinstance(k, tuple) and k[4] == "model"]
    assert len(builds) == 1  # server and 3 clients x 3 rounds share one model object


def _corrupt(kind):
    def tamper(partition_id, instruction, reply):
        if partition_id != 1 or reply.has_error():
            return reply
        if kind == "error":
            return Message(Error(code=1, reason="boom"), reply_to=instruction)
        arrays = reply.content[rec.ARRAYS]
        key = next(k for k in arrays.keys() if "lora_A" in k)
        value = arrays[key].numpy().copy()
        if kind == "shape":
            value = value[:, :-1]
        elif kind == "nan":
            value[0, 0] = np.nan
        elif kind == "key":
            arrays["base_model.model.unknown.weight"] = Array(value)
            return reply
        arrays[key] = Array(value)
        return reply

    return tamper


@pytest.mark.parametrize("kind", ["shape", "nan", "key", "error"])
def test_bad_reply_is_rejected_and_round_goes_on(tiny_config, kind, caplog):
    caplog.set_level(logging.WARNING, logger="fedpeft")
    results, _ = _run(tiny_config, tamper=_corrupt(kind))
    r1 = results.rounds[1]
    if kind == "error":
        assert r1["failed"] == 1
    else:
        assert r1["rejected"] == 1
        assert "rejected the update of node" in caplog.text
    assert len(r1["clients"]) == 2  # the other two were aggregated
    assert math.isfinite(r1["loss"])


def test_all_replies_rejected_keeps_global_intact(tiny_config):
    def tamper(pid, instruction, reply):
        arrays = reply.content[rec.ARRAYS]
        for k in list(arrays.keys()):
            v = arrays[k].numpy().copy()
            v.flat[0] = np.inf
            arrays[k] = Array(v)
        return reply

    from fedpeft.server.engine import RoundFailed

    with pytest.raises(RoundFailed, match="got 0 valid updates, federation.min-replies is 1"):
        _run({**tiny_config, "federation.rounds": 1}, tamper=tamper)
    summary = json.loads((pathlib.Path(tiny_config["output.dir"]) / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0]  # nothing was aggregated
    assert "stopped" in summary and summary["outcome"] == "failed"


def test_saved_adapter_loads_with_peft(tiny_config):
    from peft import PeftModel

    from fedpeft.config import parse_run_config
    from fedpeft.seeding import derive_seed
    from fedpeft.tasks import get_task
    from fedpeft.tasks.model import seeded

    _run(tiny_config)
    cfg = parse_run_config(tiny_config)
    task = get_task(cfg)
    with seeded(derive_seed(cfg.seed, "init")):  # tiny-bert's random base, as the run built it
        base = task.base_model()
    loaded = PeftModel.from_pretrained(base, str(pathlib.Path(tiny_config["output.dir"]) / "adapter"))
    ours = task.model(8)
    batch = {"input_ids": torch.tensor([[101, 2000, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, ours.model(**batch).logits, atol=1e-5)
