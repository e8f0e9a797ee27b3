"""Ferret (LoRA and full modes) vs FedIT and full-parameter FedAvg on the embedded task.

Run:  python simulations/bench_ferret.py --out reports/ferret      (~35 min on 2 cores)
      python simulations/bench_ferret.py --rounds 1 --steps 5 --clients 2   (smoke)

Every method runs in this process on the same federation (the embedded default: MiniLM
sequence classifier, tweets, IID over ``--clients`` clients, all of them every round,
``--steps`` local steps), through the real ClientApp/ServerApp on the in-process grid:

* ``fedit``: FedAvg on LoRA A, B and the head (AdamW, ``train.lr``);
* ``ferret-lora``: Ferret on the same tensors (``ferret.mode=lora``, unbiased);
* ``ferret-lora-ref``: the same with the reference code's scaling (``d/K``, η_s = 10, clip 10);
* ``ferret-lora-k32``: ``ferret-lora`` with K = 32 (the pool size that reaches 1/100);
* ``fedavg-full``: full-parameter FedAvg of every linear layer + head
  (``ferret.mode=full``, ``ferret.projection=false``: the dense baseline);
* ``ferret-full``: Ferret on those tensors (``ferret.mode=full``).

Full-parameter runs use AdamW with ``--full-lr`` (default 5e-5: a usual full fine-tuning
rate; 5e-4 is a LoRA rate). It prints, measured in this run: accuracy per round, payload
bytes per client per round in each direction (the tensors; the wire adds Flower's
record framing, also printed), client seconds per round split into training and
Ferret's projection/replay, and the basis-generation throughput next to the raw RNGs.
Writes ``OUT/ferret.md``, ``OUT/ferret.json`` and ``OUT/ferret.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpeft.flower.inprocess import run_in_process  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ferret_bases as bases_bench  # noqa: E402

FULL = {"ferret.mode": "full", "lora.target-modules": "all-linear"}
METHODS: dict[str, dict[str, Any]] = {
    "fedit": {"strategy.name": "fedit"},
    "ferret-lora": {"strategy.name": "ferret"},
    "ferret-lora-ref": {"strategy.name": "ferret", "ferret.normalisation": "reference"},
    "ferret-lora-k32": {"strategy.name": "ferret", "ferret.num-seeds": 32},
    "fedavg-full": {"strategy.name": "ferret", **FULL, "ferret.projection": False},
    "ferret-full": {"strategy.name": "ferret", **FULL},
}
BASELINE = {
    "ferret-lora": "fedit",
    "ferret-lora-ref": "fedit",
    "ferret-lora-k32": "fedit",
    "ferret-full": "fedavg-full",
}


def run_method(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One federated run; per-round accuracy, bytes and client seconds."""
    flat: dict[str, Any] = {
        "seed": args.seed,
        "federation.rounds": args.rounds,
        "federation.clients": args.clients,
        "train.local-steps": args.steps,
        "output.dir": str(args.out / name),
        "output.save-adapter": False,
        "ferret.num-seeds": args.k,
        **METHODS[name],  # a method's own K wins
    }
    if flat.get("ferret.mode") == "full":
        flat["train.lr"] = args.full_lr
    start = time.perf_counter()
    results = run_in_process(flat)
    wall = time.perf_counter() - start
    rounds = results.rounds
    per_round = []
    for r in rounds[1:]:
        n = max(1, len(r["clients"]))
        client_s = [c.get("client-seconds", 0.0) for c in r["clients"]]
        train_s = [c.get("train-seconds", 0.0) for c in r["clients"]]
        per_round.append(
            {
                "round": r["round"],
                "accuracy": r["accuracy"],
                "up_payload": r["uplink_payload_bytes"] / n,
                "down_payload": r["downlink_payload_bytes"] / n,
                "up_wire": r["uplink_bytes"] / n,
                "down_wire": r["downlink_bytes"] / n,
                "client_s": statistics.mean(client_s),
                "train_s": statistics.mean(train_s),
                "round_s": r["seconds"],
                "metrics": r.get("strategy_metrics") or {},
            }
        )
    return {
        "name": name,
        "config": {k: v for k, v in flat.items() if k != "output.dir"},
        "accuracy": [r["accuracy"] for r in rounds],
        "rounds": per_round,
        "wall_s": wall,
    }


def _mean(run: dict[str, Any], key: str) -> float:
    return statistics.mean(r[key] for r in run["rounds"])


def method_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| method | acc by round | final acc | uplink B/client/round | downlink B/client/round "
        "| uplink vs baseline | client s/round (train + Ferret) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, run in runs.items():
        up, down = _mean(run, "up_payload"), _mean(run, "down_payload")
        base = BASELINE.get(name)
        ratio = f"1/{_mean(runs[base], 'up_payload') / up:,.0f}" if base in runs and up else "1"
        train, client = _mean(run, "train_s"), _mean(run, "client_s")
        accs = ", ".join(f"{a:.3f}" for a in run["accuracy"])
        lines.append(
            f"| {name} | {accs} | {run['accuracy'][-1]:.3f} | {up:,.0f} | {down:,.0f} | {ratio} "
            f"| {client:.1f} ({train:.1f} + {client - train:.1f}) |"
        )
    return lines


def goals(runs: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name, base in BASELINE.items():
        if name not in runs or base not in runs:
            continue
        ratio = _mean(runs[base], "up_payload") / _mean(runs[name], "up_payload")
        total = sum(r["up_payload"] + r["down_payload"] for r in runs[name]["rounds"])
        total_base = sum(r["up_payload"] + r["down_payload"] for r in runs[base]["rounds"])
        gap = 100 * (runs[base]["accuracy"][-1] - runs[name]["accuracy"][-1])
        goal = "≤ 1/100 of FedIT uplink at ≤ 1 pt" if base == "fedit" else "≥ 1,000× fewer bytes"
        met = (ratio >= 100 and gap <= 1) if base == "fedit" else total_base / total >= 1000
        out.append(
            f"- {name} vs {base}: uplink 1/{ratio:,.0f}, both directions 1/{total_base / total:,.0f}, "
            f"final accuracy {abs(gap):.1f} pt {'behind' if gap > 0 else 'ahead'} "
            f"(goal {goal}: {'met' if met else 'NOT met'})"
        )
    return out


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run in runs.items():
        acc = run["accuracy"]
        left.plot(range(len(acc)), acc, marker="o", label=name)
        cum, total = [], 0.0
        for r in run["rounds"]:
            total += r["up_payload"]
            cum.append(total)
        right.plot(cum, acc[1:], marker="o", label=name)
    left.set(xlabel="round", ylabel="test accuracy", title="accuracy per round")
    left.set_xticks(range(max(len(r["accuracy"]) for r in runs.values())))
    right.set(
        xscale="log",
        xlabel="cumulative uplink payload bytes per client",
        ylabel="test accuracy",
        title="accuracy vs uplink bytes",
    )
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def basis_rows(k: int) -> list[str]:
    """Seeded-basis throughput next to the raw RNGs, measured now."""
    rows = list(bases_bench.GENERATION_HEADER)
    rows += [bases_bench.generation_row(d, k, repeats=2) for d in (100_000, 1_000_000)]
    rows += ["", *bases_bench.PROJECT_HEADER]
    rows += [bases_bench.project_row(d, k, repeats=2) for d in (100_000, 1_000_000)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/ferret"))
    parser.add_argument("--rounds", type=int, default=3, help="3: the embedded default")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--k", type=int, default=200, help="ferret.num-seeds")
    parser.add_argument("--full-lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for name in args.methods.split(","):
        print(f"== {name}", flush=True)
        runs[name] = run_method(name, args)
        print("\n".join(method_table({name: runs[name]})[2:]), flush=True)
    lines = [
        f"# Ferret benchmark ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
        f"{platform.python_version()})",
        "",
        f"{args.clients} clients (IID), all every round, {args.rounds} rounds, {args.steps} "
        f"AdamW steps of batch 16, K = {args.k} unless named; LoRA r = 8 on query/value + head; full "
        f"mode: every linear layer + head at lr {args.full_lr}. Bytes are payload "
        "(tensor) bytes per client per round, mean over rounds.",
        "",
        *method_table(runs),
        "",
        *goals(runs),
        "",
        "Wire bytes (payload + Flower framing) per client per round, up / down: "
        + "; ".join(
            f"{n} {_mean(r, 'up_wire'):,.0f} / {_mean(r, 'down_wire'):,.0f}"
            for n, r in runs.items()
        ),
        "",
        "## Basis generation (GB of fp32 basis per second) vs the raw RNGs",
        "",
        *basis_rows(args.k),
    ]
    text = "\n".join(lines)
    print(text)
    (args.out / "ferret.md").write_text(text + "\n")
    (args.out / "ferret.json").write_text(json.dumps(runs, indent=1))
    plot(runs, args.out / "ferret.png")
    print(f"wrote {args.out / 'ferret.md'}, ferret.json, ferret.png")


if __name__ == "__main__":
    main()
