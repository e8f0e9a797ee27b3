"""The fault-injection suite: every fault of simulations/fault_matrix.py is survived,
and an interrupted + resumed run equals an uninterrupted one bit for bit."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.support.scripts import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
fault_matrix = load_script("fault_matrix")


@pytest.fixture(scope="module")
def clean_loss(tmp_path_factory):
    return fault_matrix.run_case(fault_matrix.cases()[0], tmp_path_factory.mktemp("clean"))["final_loss"]


@pytest.mark.parametrize("case", fault_matrix.cases()[1:], ids=lambda c: c.name)
def test_fault_is_survived(case, tmp_path, clean_loss):
    row = fault_matrix.run_case(case, tmp_path)
    assert row["rounds"] == fault_matrix.BASE["federation.rounds"]
    assert row["finite"] and row["injected"], row
    assert abs(row["final_loss"] - clean_loss) <= 0.05, row


RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    from fedpeft.flower.inprocess import run_in_process
    from fedpeft.server.listeners import Observer
    flat = json.loads(sys.argv[1]); kill_after = int(sys.argv[2])

    class Killer(Observer):
        def round_end(self, record):
            if record["round"] == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

    run_in_process(flat, observer=Killer())
    """
)


def _run(flat, kill_after=-1):
    import json

    return subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(flat), str(kill_after)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


RESUME_CASES = {
    "fedit": {},
    "lora-fair": {"strategy.name": "lora-fair"},
    "fedit + topk error feedback": {"codec.uplink": "topk:0.1+int8+zstd"},
    "ferret (server history + client replicas)": {"strategy.name": "ferret", "ferret.num-seeds": 8},
    # FedSpine's reward includes measured time; weight 0 on it makes the arms reproducible
    "fedspine (bandits, device masks)": {
        "strategy.name": "fedspine",
        "fedspine.reward-weights": "0.34,0.33,0.33,0",
        "fedspine.prune-interval": 1,
        "fedspine.p-max": 0.5,
        "devices.profile": "mixed-3-tier",
    },
}


@pytest.mark.parametrize("extra", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_killed_and_resumed_run_equals_uninterrupted(extra, tmp_path):
    base = {**fault_matrix.BASE, "federation.rounds": 3, "output.save-adapter": True, **extra}
    full = {**base, "output.dir": str(tmp_path / "full")}
    part = {**base, "output.dir": str(tmp_path / "part")}
    assert _run(full).returncode == 0
    killed = _run(part, kill_after=1)
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "part" / "checkpoint" / "LATEST").read_text() == "ckpt-000001"
    resumed = _run({**part, "checkpoint.resume": True})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "full" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "part" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    import json

    rounds_a = json.loads((tmp_path / "full" / "summary.json").read_text())["rounds"]
    rounds_b = json.loads((tmp_path / "part" / "summary.json").read_text())["rounds"]
    assert [r["loss"] for r in rounds_a] == [r["loss"] for r in rounds_b]
    assert [r["uplink_bytes"] for r in rounds_a] == [r["uplink_bytes"] for r in rounds_b]


def test_checkpoint_written_while_killed_is_never_torn(tmp_path):
    """Kill the process while it writes checkpoints in a loop; LATEST always loads."""
    script = textwrap.dedent(
        f"""
        import pathlib, torch
        from fedpeft.checkpoint import save_checkpoint
        d = pathlib.Path({str(tmp_path)!r})
        t = {{"w": torch.randn(512, 512)}}
        r = 0
        while True:
            r += 1
            save_checkpoint(d, r, t, {{"aggregator": {{"x": torch.ones(3) * r}}}}, {{"results": [], "ledger": []}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    import time

    from fedpeft.checkpoint import load_latest

    deadline = time.time() + 60
    while not (tmp_path / "LATEST").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = load_latest(tmp_path)
    assert ckpt is not None and ckpt.server_round >= 1
    assert torch.equal(ckpt.states["aggregator"]["x"], torch.ones(3) * ckpt.server_round)
