"""Preset files parse, and recorded expectations are checked (simulations/sweep.py)."""

from __future__ import annotations

import pathlib

from fedpeft.config import parse_run_config
from tests.support.scripts import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
sweep = load_script("sweep")


def test_every_preset_variant_is_a_valid_config():
    presets = sorted((ROOT / "simulations" / "presets").glob("*.toml"))
    assert presets
    for path in presets:
        assert path.read_text().startswith("#"), path
        base, variants, seeds = sweep.load_preset(path)
        assert variants and seeds
        for overrides in variants.values():
            parse_run_config({**base, **overrides})
        assert set(sweep.load_expectations(path)) <= set(variants), path


def test_check_passes_and_fails(capsys):
    expect = {"a": {"accuracy": 0.5, "tolerance": 0.01}, "b": {"loss": 1.0, "tolerance": 0.1}}
    finals = {"a": [{"accuracy": 0.505}, {"accuracy": 0.499}], "b": [{"loss": 1.3}]}
    assert sweep.check(expect, finals) is False
    out = capsys.readouterr().out
    assert "PASS a: accuracy 0.5020" in out and "FAIL b: loss 1.3000" in out
    assert sweep.check({"a": expect["a"]}, finals) is True


def test_only_a_complete_run_of_the_very_same_config_is_reused(tmp_path):
    from fedpeft.results import RunResults, completed_run, write_config

    flat = {"model.name": "tiny-bert", "train.lr": 5e-4, "seed": 1, "output.dir": str(tmp_path)}
    cfg = parse_run_config(flat)
    write_config(tmp_path, cfg.to_flat(), cfg.seed)
    results = RunResults(tmp_path, strategy="fedit", task="classification")
    results.add_round({"round": 0, "uplink_bytes": 0, "downlink_bytes": 0, "seconds": 0.0})
    assert completed_run(tmp_path, flat) is None  # no outcome yet: killed or still running
    results.extra["outcome"] = "complete"
    results.write()
    assert completed_run(tmp_path, flat)["strategy"] == "fedit"
    assert completed_run(tmp_path, {**flat, "train.lr": "0.0005"}) is not None  # same value, as text
    assert completed_run(tmp_path, {**flat, "train.lr": 1e-3}) is None
    assert completed_run(tmp_path / "missing", flat) is None


def test_a_run_recorded_before_a_key_existed_is_reused_only_at_that_keys_default(tmp_path):
    import json

    from fedpeft.results import RunResults, completed_run, write_config

    flat = {"model.name": "tiny-bert", "seed": 1, "output.dir": str(tmp_path)}
    cfg = parse_run_config(flat)
    write_config(tmp_path, cfg.to_flat(), cfg.seed)
    record = json.loads((tmp_path / "config.json").read_text())
    del record["config"]["train.device"]  # as written by a release before train.device
    (tmp_path / "config.json").write_text(json.dumps(record))
    results = RunResults(tmp_path, strategy="fedit", task="classification")
    results.add_round({"round": 0, "uplink_bytes": 0, "downlink_bytes": 0, "seconds": 0.0})
    results.extra["outcome"] = "complete"
    results.write()
    assert completed_run(tmp_path, flat) is not None  # the new key at its default: same run
    assert completed_run(tmp_path, {**flat, "train.device": "cpu"}) is None  # not the default
    record["config"]["retired.key"] = 1  # a key this release no longer has
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert completed_run(tmp_path, flat) is None
