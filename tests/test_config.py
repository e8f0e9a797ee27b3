"""Typed config parsing: defaults, every error at once, names in messages."""

from __future__ import annotations

import pathlib
import tomllib

import pytest

from fedpeft import ConfigError, parse_run_config
from fedpeft.config import default_flat_config, flatten_toml, parse_overrides, render_app_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_defaults_parse_from_empty_config():
    cfg = parse_run_config({})
    assert cfg.strategy.name == "fedit"
    assert cfg.task.name == "classification"
    assert cfg.federation.clients == 4 and cfg.federation.sampled == 4
    assert cfg.options is not None


def test_string_values_are_converted_to_field_types():
    cfg = parse_run_config(
        {"lora.r": "16", "train.lr": "1e-3", "eval.client": "true", "train.local_steps": "5"}
    )
    assert cfg.lora.r == 16 and cfg.train.lr == 1e-3 and cfg.eval.client is True
    assert cfg.train.local_steps == 5  # underscore spelling accepted


@pytest.mark.parametrize(
    ("flat", "fragment"),
    [
        ({"lora.rr": 2}, "unknown config key 'lora.rr'; did you mean lora.r"),
        ({"federation.rounds": 0}, "federation.rounds must be > 0, got 0"),
        ({"train.lr": "fast"}, "train.lr must be a number, got 'fast'"),
        ({"federation.clients-per-round": 9}, "federation.clients-per-round (9) is more than"),
        ({"data.partition": "random"}, "data.partition must be one of iid, dirichlet, topic"),
        ({"strategy.name": "lora_fair"}, "unknown strategy 'lora_fair'; available:"),
        ({"codec.uplink": "nope"}, "codec.uplink: unknown codec stage 'nope'"),
        ({"bogus": 1}, "unknown config key 'bogus'"),
        ({"lora.ranks": "4,x"}, "lora.ranks must be comma-separated positive integers"),
    ],
)
def test_malformed_values_name_the_key(flat, fragment):
    with pytest.raises(ConfigError) as info:
        parse_run_config(flat)
    assert fragment in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_run_config({"federation.rounds": 0, "lora.r": -1, "train.batch-size": "x", "zz.top": 1})
    assert len(info.value.problems) == 4


def test_other_strategies_sections_allowed_only_at_defaults():
    flat = default_flat_config()  # what `flwr run` passes: every key of pyproject
    assert parse_run_config(flat).strategy.name == "fedit"


def test_pyproject_app_config_equals_code_defaults():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert flatten_toml(data["tool"]["flwr"]["app"]["config"]) == default_flat_config(), (
        "pyproject.toml [tool.flwr.app.config] is out of date; replace it with:\n"
        + render_app_config()
    )
    assert "federations" not in data["tool"]["flwr"]


def test_a_strategy_equal_weights_option_names_the_key_that_replaced_it():
    with pytest.raises(ConfigError) as info:
        parse_run_config({"fedit.equal-weights": True, "aggregation.weighting": "even"})
    text = str(info.value)
    assert "'fedit.equal-weights' was replaced by aggregation.weighting=equal" in text
    assert "aggregation.weighting must be one of examples, equal; got 'even'" in text


def test_to_flat_round_trips():
    cfg = parse_run_config({"lora.r": 4, "seed": 3, "aggregation.weighting": "equal"})
    assert parse_run_config(cfg.to_flat()) == cfg


def test_shipped_configs_parse():
    files = sorted((ROOT / "simulations" / "configs").glob("*.toml"))
    assert files, "simulations/configs must ship at least one config"
    for file in files:
        text = file.read_text()
        assert text.startswith("#"), f"{file.name} must start with a comment saying how to run it"
        parse_run_config(flatten_toml(tomllib.loads(text)))


def test_overrides_need_key_value():
    assert parse_overrides(["a.b=1"]) == {"a.b": "1"}
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides(["a.b"])


def test_strategy_compatibility_is_decided_in_build_strategy():
    """Mixed ranks, lossy codecs and privacy options are checked in one place."""
    from fedpeft.server.setup import build_strategy

    cfg = parse_run_config({"strategy.name": "ffa-lora", "lora.ranks": "4,8"})  # keys are fine
    with pytest.raises(ConfigError, match="'ffa-lora' does not support mixed ranks"):
        build_strategy(cfg)
    with pytest.raises(ConfigError, match="lora.ranks"):  # the strategy's own build refuses
        build_strategy(parse_run_config({"strategy.name": "ferret", "lora.ranks": "4,8"}))
    with pytest.raises(ConfigError, match="needs exact client tensors"):
        build_strategy(parse_run_config({"strategy.name": "ferret", "codec.uplink": "int8"}))
