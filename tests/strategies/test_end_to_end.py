"""Every registered strategy runs through the real Flower adapter (in-process grid),
with uniform and mixed ranks, and reports aggregation error."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import available_strategies
from fedpeft.flower.inprocess import run_in_process

LORA = ["fedit", "lora-fair", "ffa-lora", "fedex-lora", "flora", "fedsa-lora", "flexlora", "hetlora"]


@pytest.mark.parametrize("name", LORA)
def test_strategy_runs_end_to_end(name, tiny_config):
    assert name in available_strategies()
    results = run_in_process({**tiny_config, "strategy.name": name})
    assert [r["round"] for r in results.rounds] == [0, 1, 2]
    for r in results.rounds[1:]:
        assert r["rejected"] == 0 and r["failed"] == 0
        assert math.isfinite(r["loss"])
        if name != "fedsa-lora":  # FedSA-LoRA uploads no B: there is no product to compare
            assert r["aggregation_error"] is not None and 0 <= r["aggregation_error"] < 1.5
    if name in ("fedex-lora", "flora"):
        assert results.rounds[2]["aggregation_error"] < 1e-4  # exact methods


@pytest.mark.parametrize("name", ["fedit", "lora-fair", "flexlora", "hetlora"])
def test_mixed_ranks_run_end_to_end(name, tiny_config):
    results = run_in_process({**tiny_config, "strategy.name": name, "lora.ranks": "4,8,16"})
    ranks = sorted(c["rank"] for c in results.rounds[1]["clients"])
    assert ranks == [4, 8, 16]
    assert all(r["rejected"] == 0 for r in results.rounds)


def test_lora_fair_with_one_client_equals_fedit(tiny_config):
    base = {**tiny_config, "federation.clients": 1}
    a = run_in_process({**base, "output.dir": tiny_config["output.dir"] + "-fedit"})
    b = run_in_process({**base, "strategy.name": "lora-fair", "output.dir": tiny_config["output.dir"] + "-fair"})
    ta = load_file(tiny_config["output.dir"] + "-fedit/adapter/adapter_model.safetensors")
    tb = load_file(tiny_config["output.dir"] + "-fair/adapter/adapter_model.safetensors")
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert a.rounds[-1]["loss"] == b.rounds[-1]["loss"]
