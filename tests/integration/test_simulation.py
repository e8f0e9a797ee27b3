"""The real Flower simulation engine (Ray) and `flwr run`, with a tiny model."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_SET = [
    "model.name=tiny-bert", "data.max-examples=32", "data.test-size=100",
    "train.local-steps=4", "train.lr=5e-3",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the venv's scripts (flwr, flower-superlink) need not be on PATH (README runs .venv/bin/python)
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1",
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"})
    return env


@pytest.mark.integration
def test_fedpeft_simulate_runs_on_the_ray_engine(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--rounds", "2", "--clients", "2",
           "--out", str(out), "--quiet"] + [a for s in TINY_SET for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    assert all(r["uplink_bytes"] > 0 for r in summary["rounds"][1:])
    assert summary["rounds"][2]["loss"] < summary["rounds"][0]["loss"]
    assert (out / "adapter" / "adapter_config.json").exists()



@pytest.mark.integration
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_ferret_runs_on_the_ray_engine_with_bytes_from_the_formulas(tmp_path, mode):
    out = tmp_path / "run"
    sets = [*TINY_SET, f"ferret.mode={mode}", "ferret.num-seeds=16"]
    if mode == "full":
        sets.append("lora.target-modules=all-linear")
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--strategy", "ferret", "--rounds", "2",
           "--clients", "2", "--out", str(out), "--quiet"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["failed"] == 0 and r["rejected"] == 0
        assert r["uplink_payload_bytes"] == r["strategy_metrics"]["ferret/uplink_formula_bytes"]
    assert rounds[1]["downlink_payload_bytes"] == 2 * 24  # headers only: both start at version 0
    # round 2: one replayed (L, K = 16) table per client: 4·L·K + 24 + 24 bytes
    per_client = rounds[2]["downlink_payload_bytes"] / 2
    assert (per_client - 48) % (4 * 16) == 0 and per_client > 48


@pytest.mark.integration
def test_fedspine_runs_on_the_ray_engine_with_per_client_decisions(tmp_path):
    out = tmp_path / "run"
    sets = [*TINY_SET, "devices.profile=mixed-3-tier", "fedspine.prune-interval=2",
            "lora.target-modules=query,value,intermediate.dense,output.dense"]
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--strategy", "fedspine", "--rounds", "2",
           "--clients", "3", "--out", str(out), "--quiet"] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = json.loads((out / "summary.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["failed"] == 0 and r["rejected"] == 0 and len(r["clients"]) == 3
        assert {c["device"] for c in r["clients"]} == {"fast", "medium", "slow"}
        for c in r["clients"]:
            assert {"rank", "prune_ratio", "client_seconds", "sparsity"} <= set(c)
            assert c["client_seconds"] > c["measured_seconds"] or c["device"] == "fast"
    assert any(c["sparsity"] > 0 for c in rounds[2]["clients"])


def test_malformed_config_exits_nonzero_naming_the_key(tmp_path):
    cmd = [sys.executable, "-m", "fedpeft.cli", "simulate", "--rounds", "0", "--clients", "2",
           "--set", "federation.clients-per-round=5", "--set", "lora.rr=3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "federation.rounds must be > 0, got 0" in proc.stderr
    assert "federation.clients-per-round (5) is more than federation.clients (2)" in proc.stderr
    assert "unknown config key 'lora.rr'" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_pid(port: int) -> int | None:
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True).stdout
    for part in out.split("pid=")[1:]:
        return int(part.split(",")[0])
    return None


@pytest.mark.integration
def test_flwr_run_works_with_the_same_app(tmp_path):
    """`flwr run .` (FLOWER.md §6.6): managed SuperLink on free ports, stopped by PID."""
    env = _env()
    env["FLWR_HOME"] = tempfile.mkdtemp(dir=tmp_path)
    http_port, control_port = _free_port(), _free_port()
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    out = tmp_path / "flwr-run"
    overrides = " ".join(
        [f"{s.split('=')[0]}={_toml(s.split('=')[1])}" for s in TINY_SET]
        + ["federation.rounds=2", "federation.clients=2", f"output.dir='{out}'"]
    )
    cmd = ["flwr", "run", ".", "--stream", "-c", overrides,
           "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    flwr = pathlib.Path(sys.executable).parent / "flwr"
    cmd[0] = str(flwr)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        pid = _listening_pid(http_port)
        if pid:
            os.kill(pid, 15)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]


def _toml(value: str) -> str:
    try:
        float(value)
        return value
    except ValueError:
        return f"'{value}'"
