"""Flower's message extractor vs fedpeft's pending-only one, side by side, at 1,000 nodes.

Flower 1.41's simulation engine moves messages from its link state to the ClientApp
workers with a loop that asks for one message *per registered node* every 0.1 s;
``fedpeft.flower.simulation.fast_extractor`` swaps in a loop that polls only nodes with
undelivered messages (docs/scale.md). This runs the same short federation twice in child
processes — once with Flower's loop (fedpeft's swap disabled), once as ``fedpeft
simulate`` runs it — and prints wall time, time before the first round (Ray start-up,
model load, the start-up query to every node) and seconds per round. The model is the
tiny random BERT with 2 local steps, so the engine's overhead is not hidden behind
training; pass ``--set model.name=`` for the embedded MiniLM. Run:

    python simulations/bench_extractor.py                      # 1,000 clients, 10 per round, 3 rounds
    python simulations/bench_extractor.py --set federation.clients=200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]

BASE: dict[str, Any] = {
    "model.name": "tiny-bert",
    "federation.clients": 1000,
    "federation.clients-per-round": 10,
    "federation.rounds": 3,
    "train.local-steps": 2,
    "data.test-size": 200,
    "output.save-adapter": False,
    "simulation.cpus-per-client": 1,
    "simulation.num-cpus": 2,
}


def child(mode: str, config: pathlib.Path) -> None:
    """One ``simulate`` run; ``mode == "flower"`` disables fedpeft's extractor swap."""
    from fedpeft.cli import simulate
    from fedpeft.flower import simulation

    if mode == "flower":
        simulation.fast_extractor = contextlib.nullcontext  # type: ignore[assignment]
    simulate(json.loads(config.read_text()), quiet=True)


def run(mode: str, flat: dict[str, Any], work: pathlib.Path) -> dict[str, Any]:
    out = work / mode
    cfg = work / f"{mode}.json"
    cfg.write_text(json.dumps({**flat, "output.dir": str(out)}))
    log = work / f"{mode}.log"
    started = time.perf_counter()
    with log.open("w") as fh:
        code = subprocess.call(
            [sys.executable, __file__, "--child", mode, str(cfg)],
            stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ),
        )
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{mode}: exit {code}, see {log}")
    rounds = [r for r in json.loads((out / "summary.json").read_text())["rounds"] if r["round"] > 0]
    seconds = [r["seconds"] for r in rounds]
    return {"mode": mode, "wall": wall, "before_rounds": wall - sum(seconds), "rounds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], pathlib.Path(args.child[1]))
        return

    from fedpeft.config import parse_overrides, parse_run_config

    flat = {**BASE, **parse_overrides(args.set)}
    parse_run_config(flat)
    with tempfile.TemporaryDirectory(prefix="fedpeft-extractor-") as tmp:
        results = []
        for mode in ("flower", "fedpeft"):
            print(f"{mode}: running …", flush=True)
            results.append(run(mode, flat, pathlib.Path(tmp)))
    flower, ours = results
    print(f"\n{flat['federation.clients']} clients, {flat['federation.clients-per-round']} per round, "
          f"{flat['federation.rounds']} rounds, model {flat['model.name'] or 'MiniLM'}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| extractor | wall s | before round 1 s | s per round |")
    print("|---|---:|---:|---|")
    for r in results:
        per = ", ".join(f"{s:.1f}" for s in r["rounds"])
        print(f"| {r['mode']} | {r['wall']:.1f} | {r['before_rounds']:.1f} | {per} |")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"\nratios flower / fedpeft: wall {flower['wall'] / ours['wall']:.2f}×, before round 1 "
          f"{flower['before_rounds'] / ours['before_rounds']:.2f}×, per round "
          f"{mean(flower['rounds']) / mean(ours['rounds']):.2f}×")


if __name__ == "__main__":
    main()
