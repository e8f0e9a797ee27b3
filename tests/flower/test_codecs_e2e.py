"""Codecs compose with strategies end to end; budgets stop runs cleanly."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fedpeft import ConfigError, FedStrategy, WeightedMean, register_strategy
from fedpeft.config import parse_run_config
from fedpeft.flower.inprocess import run_in_process
from fedpeft.server.setup import build_strategy


def test_codec_chain_cuts_uplink_bytes(tiny_config):
    plain = run_in_process({**tiny_config, "federation.rounds": 1})
    coded = run_in_process({**tiny_config, "federation.rounds": 1, "output.dir": tiny_config["output.dir"] + "-c",
                            "codec.uplink": "topk:0.05+int8+zstd"})
    up_plain, up_coded = plain.rounds[1]["uplink_bytes"], coded.rounds[1]["uplink_bytes"]
    assert up_coded * 10 < up_plain
    # same downlink but for the plan's checkpoint path, whose length differs
    assert abs(coded.rounds[1]["downlink_bytes"] - plain.rounds[1]["downlink_bytes"]) <= 3 * 8
    assert coded.rounds[1]["loss"] == pytest.approx(plain.rounds[1]["loss"], abs=0.05)


def test_lossless_chain_is_bit_exact(tiny_config):
    a = run_in_process({**tiny_config, "federation.rounds": 1})
    b = run_in_process({**tiny_config, "federation.rounds": 1, "output.dir": tiny_config["output.dir"] + "-z",
                        "codec.uplink": "zstd", "codec.downlink": "zstd"})
    assert a.rounds[1]["loss"] == b.rounds[1]["loss"]


@dataclass(frozen=True)
class _Cfg:
    pass


def test_strategy_needing_exact_tensors_refuses_lossy_codecs():
    register_strategy("test-exact", config_cls=_Cfg, replace=True,
                      build=lambda c, e: FedStrategy(aggregator=WeightedMean(), lossy_codecs=False))
    cfg = parse_run_config({"strategy.name": "test-exact", "codec.uplink": "int8"})
    with pytest.raises(ConfigError, match="needs exact client tensors .* codec.uplink='int8'"):
        build_strategy(cfg)
    build_strategy(parse_run_config({"strategy.name": "test-exact", "codec.uplink": "zstd"}))


def test_budget_stops_the_run_cleanly_before_exceeding_it(tiny_config):
    one_round = run_in_process({**tiny_config, "federation.rounds": 1})
    per_round = one_round.rounds[1]["uplink_bytes"] + one_round.rounds[1]["downlink_bytes"]
    flat = {**tiny_config, "federation.rounds": 4, "output.dir": tiny_config["output.dir"] + "-b",
            "budget.bytes": int(2.5 * per_round)}
    results = run_in_process(flat)
    assert [r["round"] for r in results.rounds] == [0, 1, 2]
    spent = sum(r["uplink_bytes"] + r["downlink_bytes"] for r in results.rounds)
    assert spent <= flat["budget.bytes"]
    assert "budget.bytes" in results.extra["stopped"] and results.extra["outcome"] == "budget"
