"""simulations/bench_heterogeneity.py: tuning never sees the test set, the paired
interval is Student's, and a quick run writes its report (tiny model, seconds)."""

from __future__ import annotations

import json
import statistics
import sys

import pytest

from tests.support.scripts import ROOT, load_script

bench = load_script("bench_heterogeneity")


def test_the_paired_interval_is_the_student_t_one():
    diffs = [0.02, 0.05, -0.01]
    mean, half = bench.paired(diffs)
    assert mean == pytest.approx(statistics.fmean(diffs))
    assert half == pytest.approx(4.303 * statistics.stdev(diffs) / 3**0.5)


def test_a_quick_run_tunes_on_the_validation_share_and_reports(tmp_path, monkeypatch):
    out = tmp_path / "het"
    argv = ["bench", "--quick", "--out", str(out), "--splits", "dirichlet-0.1",
            "--methods", "fedit,fedsa-lora"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    runs = out / "runs" / "dirichlet-0.1"
    for method in ("fedit", "fedsa-lora"):
        for lr in ("0.005", "0.01"):
            cfg = json.loads((runs / f"{method}-train.lr{lr}-tune" / "config.json").read_text())["config"]
            assert cfg["eval.split"] == "validation" and cfg["data.validation-size"] > 0
        for seed in (0, 1):
            cfg = json.loads((runs / f"{method}-seed{seed}" / "config.json").read_text())["config"]
            assert cfg["eval.split"] == "test" and cfg["seed"] == seed
    report = (out / "heterogeneity.md").read_text()
    assert "| fedit |" in report and "| fedsa-lora |" in report and "Δ vs fedit" in report
    results = json.loads((out / "heterogeneity.json").read_text())
    assert set(results["splits"]["dirichlet-0.1"]) == {"fedit", "fedsa-lora"}
    assert (out / "accuracy-dirichlet-0.1.png").stat().st_size > 0


def test_the_report_header_names_fedsa_and_scaffold_only_when_they_ran():
    summary = {"clients": 4, "rounds": [{"round": 1, "accuracy": 0.5, "uplink_bytes": 8, "downlink_bytes": 8}]}
    row = {"tuned": "train.lr", "lr": 1e-3, "runs": {0: summary}}
    results = {"budget": bench.budget(bench.parser().parse_args([])), "lrs": [1e-3], "seeds": [0]}
    plain = bench.render({**results, "splits": {"topic": {"fedit": row}}})
    assert "FedSA-LoRA" not in plain and "SCAFFOLD" not in plain and "| fedit |" in plain
    both = bench.render({**results, "splits": {"topic": {"fedit": row, "fedit-sgd+scaffold": row}}})
    assert "SCAFFOLD runs under SGD" in both and "FedSA-LoRA" not in both


def test_fedsa_is_compared_by_its_global_accuracy_and_its_personalised_one_is_beside_it():
    """A client's own share under label skew holds one or two classes: its personalised
    accuracy (0.98 at α = 0.1) must not be set against FedIT's global test accuracy."""

    def summary(acc, own=None):
        last = {"round": 1, "accuracy": acc, "uplink_bytes": 8, "downlink_bytes": 8}
        if own is not None:
            last["client_accuracy"] = own
        return {"clients": 4, "rounds": [last]}

    fedit = {"tuned": "train.lr", "lr": 5e-4, "runs": {0: summary(0.55), 1: summary(0.51)}}
    fedsa = {"tuned": "train.lr", "lr": 1e-3, "runs": {0: summary(0.45, 0.98), 1: summary(0.49, 0.76)}}
    results = {"budget": bench.budget(bench.parser().parse_args([])), "lrs": [1e-3], "seeds": [0, 1]}
    report = bench.render({**results, "splits": {"dirichlet-0.1": {"fedit": fedit, "fedsa-lora": fedsa}}})
    row = next(line for line in report.splitlines() if line.startswith("| fedsa-lora |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "0.470 ± 0.028"  # global accuracy
    assert cells[3].startswith("-0.060")  # paired Δ of global accuracies
    assert cells[4] == "0.870 ± 0.156"  # personalised, beside it
    fedit_cells = [c.strip() for c in next(
        line for line in report.splitlines() if line.startswith("| fedit |")
    ).strip("|").split("|")]
    assert fedit_cells[4] == "—"  # FedIT has no personalised figure
    assert bench.score("fedsa-lora", fedsa["runs"][0]) == 0.98  # tuning: its own measure


def _benchmark_run(split: str, method: str, lr: float, seed: int) -> dict:
    """The resolved config of the benchmark's test-set run at its default budget."""
    from fedpeft.config import parse_run_config

    flat = bench.run_config(bench.budget(bench.parser().parse_args([])), split, method, "train.lr", lr, seed)
    return parse_run_config(flat).to_flat()


@pytest.mark.parametrize("seed", [0, 2])
def test_label_skew_config_is_the_benchmarks_flexlora_run(seed, capsys):
    """``simulations/configs/label-skew.toml`` (README "Which strategy for my data") is
    the benchmark's FlexLoRA run at α = 0.1 key for key, at any ``--set seed=N``, with
    a client rate from the benchmark's grid."""
    from fedpeft.cli import main

    main(["config", "--config", str(ROOT / "simulations/configs/label-skew.toml"), "--set", f"seed={seed}"])
    got = json.loads(capsys.readouterr().out)
    got = got.get("config", got)
    want = _benchmark_run("dirichlet-0.1", "flexlora", got["train.lr"], seed)
    got.pop("output.dir", None)
    want.pop("output.dir", None)
    assert got == want
    grid = [float(x) for x in bench.parser().parse_args([]).lrs.split(",")]
    assert got["train.lr"] in grid


def test_heterogeneity_preset_runs_are_the_benchmarks():
    """Every variant × seed of ``simulations/presets/heterogeneity.toml`` is the
    benchmark's run of that method and split (label ``METHOD-aALPHA`` or
    ``METHOD-topic``) at the rate the preset records, so its expectations are the
    benchmark's figures."""
    from fedpeft.config import parse_run_config

    sweep = load_script("sweep")
    base, variants, seeds = sweep.load_preset(ROOT / "simulations/presets/heterogeneity.toml")
    expect = sweep.load_expectations(ROOT / "simulations/presets/heterogeneity.toml")
    assert seeds == [0, 1, 2] and set(expect) == set(variants)
    for label, keys in variants.items():
        if label.endswith("-topic"):
            method, split = label.removesuffix("-topic"), "topic"
        else:
            method, alpha = label.rsplit("-a", 1)
            split = f"dirichlet-{alpha}"
        for seed in seeds:
            got = parse_run_config({**base, **keys, "seed": seed}).to_flat()
            assert got == _benchmark_run(split, method, keys["train.lr"], seed), label
