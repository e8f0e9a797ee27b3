"""simulations/bench_synthetic.py: the gain is paired by seed and relative to FedIT, and a
small grid runs the three methods from the same data and writes its table (seconds)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.support.scripts import load_script

load_script("bench_heterogeneity")  # bench_synthetic imports its paired interval
bench = load_script("bench_synthetic")


def test_a_small_grid_reports_paired_relative_gains(tmp_path, monkeypatch):
    out = tmp_path / "syn"
    argv = ["bench", "--out", str(out), "--hs", "1", "--drift", "10:5e-3", "--seeds", "0,1",
            "--rounds", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    (cell,) = json.loads((out / "synthetic.json").read_text())
    losses = cell["losses"]
    assert set(losses) == {"fedit", "lora-fair", "fedex-lora"}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in losses.values())
    for method in ("lora-fair", "fedex-lora"):
        rel = [(f - m) / f for f, m in zip(losses["fedit"], losses[method], strict=True)]
        assert cell["gains"][method]["mean"] == pytest.approx(sum(rel) / 2)
        assert cell["gains"][method]["wins"] == sum(r > 0 for r in rel)
    # the seeds differ (data and initial adapter are seeded), the methods share a seed's start
    assert losses["fedit"][0] != losses["fedit"][1]
    report = (out / "synthetic.md").read_text()
    assert "| 1 | 10 | 0.005 |" in report and "lora-fair gain" in report
