"""Warm deployment: ``fedpeft simulate`` vs ``deploy-local`` cold vs ``deploy-local`` warm.

Flower 1.41 starts a new ``flwr-clientapp`` process for every message, so a cold
deployment re-imports torch/transformers/peft/flwr and rebuilds the model and data per
message, where a simulation worker keeps them in memory. ``deploy-local --warm`` forks
ClientApps from a per-node zygote that holds the imports and, after a run's first
message, the built task (:mod:`fedpeft.deploy.zygote`). This runs the same config three
ways, one after the other, and prints:

1. seconds per round from each ``summary.json``, the steady-round means (rounds 2..R)
   and the ratios deploy/simulate — the goal of issue 20.3 is warm ≤ 1.3× simulate;
2. whether the round losses are identical;
3. what one ``train`` message costs, phase by phase, cold vs warm (and the handler's
   phases in simulation), from the timestamps every ClientApp process writes with
   ``FEDPEFT_CLIENT_TIMINGS`` (:mod:`fedpeft.timings`): process start (cold: exec of
   ``flwr-clientapp``; warm: the shim's start) → handler (interpreter, imports, pull of
   the message, FAB install, app import) → model → data → train → encode → reply and
   exit. Medians over the train messages after round 1.

Reference measurement (embedded task: MiniLM, 2 nodes, 30 local steps, batch 16,
400 test tweets, 3 rounds; ~15 minutes on 2 idle cores):

    python simulations/bench_warm.py --out runs/bench-warm

Small-scale check that the script works (tiny-bert, a few minutes):

    python simulations/bench_warm.py --model tiny-bert --steps 4 --examples 64 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMINGS_ENV = "FEDPEFT_CLIENT_TIMINGS"
PHASES = (
    ("start → handler", "start", "handler-start"),
    ("  fork (warm)", "start", "child-start"),
    ("  pull message", "child-start", "task-pulled"),
    ("  FAB + app import", "task-pulled", "app-loaded"),
    ("model", "handler-start", "model"),
    ("data", "model", "data"),
    ("train", "data", "train"),
    ("encode reply", "train", "handler-end"),
    ("push reply + exit", "handler-end", "process-end"),
    ("total", "start", "process-end"),
)


def settings(args: argparse.Namespace) -> dict[str, str]:
    out = {
        "train.local-steps": str(args.steps),
        "train.batch-size": str(args.batch),
        "data.test-size": str(args.test_size),
        "output.save-adapter": "false",
    }
    if args.model:
        out["model.name"] = args.model
    if args.examples:
        out["data.max-examples"] = str(args.examples)
    return out


def simulate(args: argparse.Namespace, sets: dict[str, str], out: pathlib.Path) -> float:
    env = {
        **os.environ,
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        TIMINGS_ENV: str(out / "timings.jsonl"),
        "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    cmd = [
        sys.executable,
        "-m",
        "fedpeft.cli",
        "simulate",
        "--quiet",
        "--rounds",
        str(args.rounds),
        "--clients",
        str(args.nodes),
        "--out",
        str(out / "run"),
    ]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=out, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def deploy(args: argparse.Namespace, sets: dict[str, str], out: pathlib.Path, warm: bool) -> float:
    from fedpeft.deploy.local import deploy_local

    started = time.perf_counter()
    deploy_local(
        sets,
        nodes=args.nodes,
        rounds=args.rounds,
        out_dir=out / "run",
        work_dir=out / "work",
        isolation=args.isolation,
        warm=warm,
        echo=None,
        env={TIMINGS_ENV: str(out / "timings.jsonl")},
    )
    return time.perf_counter() - started


def phases(path: pathlib.Path, nodes: int) -> dict[str, float]:
    """Median seconds of each phase over the train messages after round 1."""
    if not path.exists():
        return {}
    events: dict[int, dict[str, float]] = defaultdict(dict)
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e.get("time") is None:
            continue
        name = e["event"]
        if name == "handler-start" and e.get("message_type") != "train":
            continue
        events[e["pid"]].setdefault(name, e["time"])
        if name in ("handler-start", "model", "data", "train", "handler-end"):
            events[e["pid"]][name] = e["time"]  # a Ray worker runs many messages: keep the last
    per_message = []
    for ev in events.values():
        if "handler-start" in ev and "train" in ev:
            ev["start"] = ev.get("shim-start", ev.get("process-start", float("nan")))
            per_message.append(ev)
    per_message.sort(key=lambda ev: ev["handler-start"])
    steady = per_message[nodes:] or per_message
    out = {}
    for label, a, b in PHASES:
        values = [ev[b] - ev[a] for ev in steady if a in ev and b in ev]
        if values:
            out[label] = statistics.median(values)
    return out


def sim_phases(path: pathlib.Path) -> dict[str, float]:
    """Handler phases in simulation (a Ray worker handles many messages: read in order)."""
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_pid: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_pid[r["pid"]].append(r)
    spans: dict[str, list[float]] = defaultdict(list)
    for seq in by_pid.values():
        current: dict[str, float] = {}
        for r in seq:
            if r["event"] == "handler-start":
                current = {"handler-start": r["time"]}
            elif current:
                current[r["event"]] = r["time"]
                if r["event"] == "handler-end":
                    for label, a, b in PHASES:
                        if a in current and b in current:
                            spans[label].append(current[b] - current[a])
                    current = {}
    # drop each worker's first message (Ray start-up, first build)
    return {k: statistics.median(v[1:] or v) for k, v in spans.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model.name (default: the task's, MiniLM)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--test-size", type=int, default=400)
    parser.add_argument("--examples", type=int, default=0, help="data.max-examples (0: all)")
    parser.add_argument("--isolation", default="subprocess", choices=["subprocess", "process"])
    parser.add_argument("--out", help="keep runs and logs here (default: a temporary dir)")
    args = parser.parse_args()
    sets = settings(args)
    base = pathlib.Path(args.out or tempfile.mkdtemp(prefix="bench-warm-")).resolve()
    ways = {"simulate": base / "sim", "deploy cold": base / "cold", "deploy warm": base / "warm"}
    for path in ways.values():
        path.mkdir(parents=True, exist_ok=True)
    walls = {
        "simulate": simulate(args, sets, ways["simulate"]),
        "deploy cold": deploy(args, sets, ways["deploy cold"], warm=False),
        "deploy warm": deploy(args, sets, ways["deploy warm"], warm=True),
    }
    rounds = {
        k: json.loads((p / "run" / "summary.json").read_text())["rounds"] for k, p in ways.items()
    }
    print(f"\n{sets}, {args.nodes} nodes, {args.rounds} rounds, isolation {args.isolation}")
    print(f"{'round':>5}" + "".join(f"{k + ' s':>16}" for k in ways) + f"{'loss (all)':>14}")
    for i, sim in enumerate(rounds["simulate"]):
        secs = "".join(f"{rounds[k][i]['seconds']:>16.1f}" for k in ways)
        print(f"{sim['round']:>5}{secs}{sim['loss']:>14.6f}")
    steady = {k: statistics.mean(r["seconds"] for r in v[2:] or v[1:]) for k, v in rounds.items()}
    print(f"{'2..R':>5}" + "".join(f"{steady[k]:>16.1f}" for k in ways) + "   (steady-round mean)")
    for k in ("deploy cold", "deploy warm"):
        print(f"steady-round ratio {k} / simulate: {steady[k] / steady['simulate']:.2f}")
    print("wall, start-up included: " + ", ".join(f"{k} {w:.0f} s" for k, w in walls.items()))
    same = all(
        rounds[k][i]["loss"] == rounds["simulate"][i]["loss"]
        for k in ways
        for i in range(len(rounds["simulate"]))
    )
    close = all(
        abs(rounds[k][i]["loss"] - s["loss"]) <= 1e-4 * abs(s["loss"])
        for k in ways
        for i, s in enumerate(rounds["simulate"])
    )
    print(f"round losses identical (all three): {same}; within 1e-4 relative: {close}")

    table = {
        "simulate (handler)": sim_phases(ways["simulate"] / "timings.jsonl"),
        "deploy cold": phases(ways["deploy cold"] / "timings.jsonl", args.nodes),
        "deploy warm": phases(ways["deploy warm"] / "timings.jsonl", args.nodes),
    }
    print("\none train message, median seconds per phase (messages after round 1)")
    print(f"{'phase':<22}" + "".join(f"{k:>20}" for k in table))
    for label, _, _ in PHASES:
        cells = "".join(
            f"{table[k][label]:>20.2f}" if label in table[k] else f"{'—':>20}" for k in table
        )
        print(f"{label:<22}{cells}")
    print(f"\nruns and logs: {base}")


if __name__ == "__main__":
    main()
