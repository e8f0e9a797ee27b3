"""simulations/bench_codecs.py: bytes per client-round in both directions, ratios to fp32
FedIT, the best entry per ratio, and a quick run that writes its report."""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.scripts import ROOT, load_script

bench = load_script("bench_codecs")


def _summary(acc: float, up: int, down: int, clients: int = 4, seconds: float = 10.0) -> dict:
    per_client = [{"codec-seconds": 0.1} for _ in range(clients)]
    rounds = [{"round": 0, "accuracy": 0.3, "uplink_bytes": 0, "downlink_bytes": 0, "seconds": 0.0}]
    rounds += [
        {"round": t, "accuracy": acc, "uplink_bytes": up * clients, "downlink_bytes": down * clients,
         "seconds": seconds, "clients": per_client, "server_codec_seconds": 0.5}
        for t in (1, 2)
    ]
    return {"rounds": rounds, "clients": clients}


def test_traffic_is_per_client_per_round_in_each_direction():
    t = bench.traffic(_summary(0.6, up=1000, down=3000))
    assert (t["up"], t["down"], t["total"]) == (1000, 3000, 4000)
    assert t["client_codec_share"] == pytest.approx(0.01) and t["server_codec_share"] == pytest.approx(0.05)


def test_ratios_are_to_fp32_totals_and_the_best_entry_respects_the_loss_limit():
    table = {
        "fp32": {"lr": 5e-4, "runs": {0: _summary(0.60, 300_000, 300_000), 1: _summary(0.62, 300_000, 300_000)}},
        # 40× at −0.3 point; 150× at −0.8 point; 300× at −3 points
        "a": {"lr": 5e-4, "runs": {0: _summary(0.597, 7_500, 7_500), 1: _summary(0.617, 7_500, 7_500)}},
        "b": {"lr": 5e-4, "runs": {0: _summary(0.592, 2_000, 2_000), 1: _summary(0.612, 2_000, 2_000)}},
        "c": {"lr": 5e-4, "runs": {0: _summary(0.57, 1_000, 1_000), 1: _summary(0.59, 1_000, 1_000)}},
    }
    rows = {r["entry"]: r for r in bench.rows(table)}
    assert rows["a"]["ratio"] == pytest.approx(40) and rows["b"]["ratio"] == pytest.approx(150)
    assert rows["a"]["delta"] == pytest.approx(-0.003) and rows["c"]["delta"] == pytest.approx(-0.03)
    report = bench.render({"budget": {"federation.clients": 4, "federation.rounds": 2,
                                      "train.local-steps": 3, "model.name": "x"},
                           "seeds": [0, 1], "splits": {"iid": table}})
    assert "| 32× | a (40×, -0.003) | b (150×, -0.008) |" in report
    assert "| 200× | none | none |" in report


def test_a_quick_run_writes_bytes_both_ways_and_the_report(tmp_path, monkeypatch):
    out = tmp_path / "codecs"
    argv = ["bench", "--quick", "--out", str(out), "--splits", "iid", "--entries", "fp32,sign+zstd", "--seeds", "0"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    results = json.loads((out / "codecs.json").read_text())
    table = results["splits"]["iid"]
    rows = {r["entry"]: r for r in bench.rows(table)}
    assert rows["sign+zstd"]["up"] * 5 < rows["fp32"]["up"] and rows["sign+zstd"]["down"] * 5 < rows["fp32"]["down"]
    cfg = json.loads((out / "runs" / "iid" / "sign+zstd-seed0" / "config.json").read_text())["config"]
    assert cfg["codec.uplink"] == cfg["codec.downlink"] == "sign+zstd" and cfg["codec.downlink-delta"] is True
    assert "| sign+zstd |" in (out / "codecs.md").read_text() and (out / "pareto-iid.png").is_file()


@pytest.mark.parametrize(("name", "entry"), [("32x", "lora-sb+fp16+zstd"), ("100x", "lora-sb+int8+zstd")])
@pytest.mark.parametrize("seed", [0, 2])
def test_the_compressed_configs_are_the_benchmarks_runs(name, entry, seed, capsys):
    """``simulations/configs/compressed-*.toml`` (README "Communication") are the
    benchmark's IID runs of their entry key for key, at any ``--set seed=N``."""
    from fedpeft.cli import main
    from fedpeft.config import parse_run_config

    config = ROOT / "simulations" / "configs" / f"compressed-{name}.toml"
    main(["config", "--config", str(config), "--set", f"seed={seed}"])
    got = json.loads(capsys.readouterr().out)
    got = got.get("config", got)
    args = bench.parser().parse_args([])
    flat = bench.run_config(bench.budget(args), "iid", entry, bench.lr_of(entry), seed)
    want = parse_run_config(flat).to_flat()
    for key in ("output.dir", "output.save-adapter"):  # where and whether the adapter is kept
        got.pop(key, None)
        want.pop(key, None)
    assert got == want


@pytest.mark.parametrize("entry", list(bench.ENTRIES))
def test_every_entry_is_a_valid_run_config(entry):
    """Each entry's keys, with its learning rate, pass the config validation a run does
    first (a typo or a refused combination fails here, not hours into the benchmark)."""
    from fedpeft.config import parse_run_config

    args = bench.parser().parse_args([])
    flat = {**bench.budget(args), **bench.SPLITS["iid"], **bench.ENTRIES[entry], "train.lr": bench.lr_of(entry)}
    cfg = parse_run_config(flat).to_flat()
    assert cfg["train.lr"] == bench.lr_of(entry)
    if entry == "ferret-full":
        assert cfg["train.lr"] == 5e-5 and cfg["ferret.mode"] == "full"


def test_an_entry_s_rate_is_its_method_s_tuned_then_kept_then_the_reference():
    assert bench.method_of("lora-sb+int8+zstd") == "lora-sb" and bench.method_of("int8+zstd") == "int8+zstd"
    assert bench.lr_of("lora-sb+int8+zstd") == bench.LR["lora-sb"]
    assert bench.lr_of("lora-sb+int8+zstd", {"lora-sb": 1e-2}) == 1e-2
    assert bench.lr_of("int8+zstd", {"lora-sb": 1e-2}) == bench.REFERENCE_LR


def test_tuning_scores_each_rate_on_the_validation_share_and_runs_the_entries_at_the_best(tmp_path, monkeypatch):
    """The validation accuracy picks the rate (peaked at 1e-2 here), never the test
    accuracy (rising with the rate); every entry of the method then runs at it."""
    from fedpeft.config import parse_run_config

    seen = []

    def fake(flat, out):
        seen.append(flat)
        lr, validation = flat["train.lr"], flat.get("eval.split") == "validation"
        acc = 0.6 - abs(lr - 1e-2) if validation else 0.5 + lr
        return {"summary": _summary(acc, 1000, 1000), "seconds": 0.0, "reused": False}

    monkeypatch.setattr(bench, "run", fake)
    args = bench.parser().parse_args(["--out", str(tmp_path), "--splits", "iid", "--seeds", "0",
                                      "--entries", "fp32,lora-sb,lora-sb+int8+zstd"])
    results = bench.benchmark(args)
    tuning = results["tuning"]["iid"]["lora-sb"]
    assert tuning["lr"] == 1e-2 and set(tuning["scores"]) == set(bench.TUNE["lora-sb"])
    tunes = [f for f in seen if f.get("eval.split") == "validation"]
    assert len(tunes) == len(bench.TUNE["lora-sb"])
    assert all(f["data.validation-size"] == bench.VALIDATION_SIZE and f["strategy.name"] == "lora-sb" for f in tunes)
    parse_run_config(tunes[0])  # a valid run config
    table = results["splits"]["iid"]
    assert table["lora-sb"]["lr"] == table["lora-sb+int8+zstd"]["lr"] == 1e-2
    assert table["fp32"]["lr"] == bench.REFERENCE_LR
    assert "chosen 0.01." in bench.render(results)


def test_no_tune_keeps_the_kept_rate_and_runs_no_tuning(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(bench, "run", lambda flat, out: seen.append(flat) or
                        {"summary": _summary(0.6, 1000, 1000), "seconds": 0.0, "reused": False})
    args = bench.parser().parse_args(["--out", str(tmp_path), "--no-tune", "--splits", "iid", "--seeds", "0",
                                      "--entries", "lora-sb"])
    results = bench.benchmark(args)
    assert [f["train.lr"] for f in seen] == [bench.LR["lora-sb"]] and results["tuning"] == {}
