"""Short runs whose final global adapters were fingerprinted before the round-engine
refactor (issue 17): the refactor must not change results on the same seeds.

Each case runs through the real ServerApp/ClientApp on the in-process grid with the
tiny random BERT, and its final adapter is reduced to a fingerprint: per tensor the
float64 sum and the sum of squares, plus a projection on a fixed random vector. The
recorded values were printed by ``python -m tests.test_golden_runs`` on the code before
the refactor with 2 torch threads, which the test pins. Same thread count, same
values to the last bit here; the tolerance absorbs float reordering on another CPU (1 vs
2 threads moves them by ~1e-4), not a behaviour change: a changed seed, plan, payload or
aggregation moves them by far more.

The tolerance is relative 1e-3 for the sum of squares and the loss, which cannot cancel.
The sum and the projection are signed sums that do cancel (fedspine's sum is -1.57 over
values whose squares add up to 83), so a relative tolerance on them measures the
cancellation, not the reordering: they get 1e-3 of their natural scale, sqrt(sum of
squares), the size a random-sign sum of these values has. In CI's full-suite run
(2026-12-07) fedspine's sum moved by 3.2e-3 (2e-3 relative, 3.5e-4 of that scale) with the
loss equal to 8e-9 and the squares to 1e-7; the same case in a fresh process, twice in
one process, after each other case, and after every in-process test file gives the
recorded values to the last bit here. The cause was not found; the figures say it acts
at rounding level (perhaps amplified by Adam, which turns rounding-level gradients of
near-zero entries into full steps), not a changed computation. A changed computation moves the sum by about
sqrt(squares) itself, 1000x the tolerance.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY

CASES: dict[str, dict[str, Any]] = {
    "fedit": {"strategy.name": "fedit", "codec.uplink": "int8"},
    "lora-fair": {"strategy.name": "lora-fair", "lora.ranks": "4,8,16"},
    "ferret": {"strategy.name": "ferret", "ferret.num-seeds": 8},
    "fedspine": {
        "strategy.name": "fedspine",
        "lora.target-modules": "query,value,intermediate.dense,output.dense",
        "fedspine.fixed-rank": 4,
        "fedspine.fixed-prune-ratio": 0.3,
        "fedspine.prune-interval": 2,
        "train.local-steps": 4,
    },
}

GOLDEN: dict[str, dict[str, float]] = {  # printed before the refactor (2 torch threads)
    "fedit": {
        "sum": -0.44273995303274205,
        "squares": 11.732414850645121,
        "projection": -0.5181447119172544,
        "loss": 1.0626923799514771,
    },
    "fedspine": {
        "sum": -1.5704350535668716,
        "squares": 83.17388123719574,
        "projection": 1.946430661372166,
        "loss": 1.053164498011271,
    },
    "ferret": {
        "sum": -4.199584841957403,
        "squares": 34.861565461346466,
        "projection": 1.3663832376292353,
        "loss": 1.0553974866867066,
    },
    "lora-fair": {
        "sum": 4.93644494227226,
        "squares": 8.795389525035633,
        "projection": 1.1517862554938663,
        "loss": 1.0627361377080282,
    },
}


def fingerprint(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum, sum of squares and a fixed random projection of all tensors (float64)."""
    gen = torch.Generator().manual_seed(1234)
    total = squares = projection = 0.0
    for key in sorted(tensors):
        t = tensors[key].detach().to(torch.float64).flatten()
        total += float(t.sum())
        squares += float((t * t).sum())
        projection += float(t @ torch.randn(t.numel(), generator=gen, dtype=torch.float64))
    return {"sum": total, "squares": squares, "projection": projection}


def run_case(name: str, out: Path) -> dict[str, float]:
    """Run one case into ``out``; the fingerprint of its final adapter and losses."""
    from fedpeft.flower.inprocess import run_in_process

    cfg = {**TINY, **CASES[name], "output.dir": str(out)}
    results = run_in_process(cfg)
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    return {**fingerprint(tensors), "loss": float(results.rounds[-1]["loss"])}


@pytest.mark.parametrize("name", sorted(CASES))
def test_results_match_the_pre_refactor_fingerprint(name, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = run_case(name, tmp_path / name)
    finally:
        torch.set_num_threads(threads)
    want = GOLDEN[name]
    scale = math.sqrt(want["squares"])  # the size of a random-sign sum of these values
    for key, value in want.items():
        abs_tol = 1e-3 * scale if key in ("sum", "projection") else 1e-6
        assert math.isclose(got[key], value, rel_tol=1e-3, abs_tol=abs_tol), (name, key, got, want)


if __name__ == "__main__":  # print the fingerprints of the current code
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        names = sys.argv[1:] or sorted(CASES)
        print(json.dumps({n: run_case(n, Path(tmp) / n) for n in names}, indent=1))
