"""``fedpeft deploy-local --resume DIR``: a run continued on a fresh deployment.

A real loopback deployment (SuperLink + 2 SuperNodes, TLS, node authentication) runs one
round through the command line; a second deployment continues it to two rounds with
``--resume``. The result must be the uninterrupted run's: the same round-1 record and,
for the final adapter, the in-process simulation of two rounds with the same seeds
(deployment and simulation agree exactly, ``test_deploy_integration``). Costs minutes,
so it is marked ``integration``.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.cli import main
from tests.support.procs import TINY_DEPLOY

pytestmark = pytest.mark.integration

SETS = [arg for key, value in TINY_DEPLOY.items() for arg in ("--set", f"{key}={value}")]


def _summary(run: pathlib.Path) -> list[dict]:
    return json.loads((run / "summary.json").read_text())["rounds"]


def test_bad_resume_options_fail_before_anything_starts(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["deploy-local", "--resume", str(run)]) != 0
    assert "is not a directory; expected a run directory" in capsys.readouterr().err
    run.mkdir()
    (run / "config.json").write_text(
        json.dumps({"config": {**TINY_DEPLOY, "federation.clients": 2, "output.dir": str(run)}})
    )
    assert main(["deploy-local", "--resume", str(run), "--nodes", "3"]) != 0
    assert "the run has 2 clients, one per SuperNode; --nodes 3" in capsys.readouterr().err
    assert main(["deploy-local", "--resume", str(run), "--overwrite"]) != 0
    assert "--overwrite cannot be combined with --resume" in capsys.readouterr().err
    assert main(["deploy-local", "--resume", str(run), "--set", "train.lr=0.1"]) != 0
    assert "cannot change" in capsys.readouterr().err
    assert main(["deploy-local", "--resume", str(run)]) != 0  # no checkpoint to continue
    assert "nothing to resume" in capsys.readouterr().err


def test_a_resumed_deployment_ends_as_the_uninterrupted_run(tmp_path):
    from fedpeft.flower.inprocess import run_in_process

    run = tmp_path / "run"
    first = ["deploy-local", "--nodes", "2", "--rounds", "1", "--out", str(run), *SETS]
    assert main([*first, "--work-dir", str(tmp_path / "w1")]) == 0
    one = _summary(run)
    assert [r["round"] for r in one] == [0, 1]

    assert main(["deploy-local", "--resume", str(run), "--rounds", "2",
                 "--work-dir", str(tmp_path / "w2")]) == 0
    two = _summary(run)
    assert [r["round"] for r in two] == [0, 1, 2]
    for key in ("loss", "accuracy"):
        assert two[1][key] == one[1][key]
    assert json.loads((run / "config.json").read_text())["config"]["federation.rounds"] == 2

    sim = tmp_path / "sim"
    flat = {**TINY_DEPLOY, "federation.rounds": 2, "federation.clients": 2,
            "output.dir": str(sim), "output.save-adapter": True}
    run_in_process(flat)
    got = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(sim / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-7, msg=key)
    assert two[2]["loss"] == pytest.approx(_summary(sim)[2]["loss"], rel=1e-4)
