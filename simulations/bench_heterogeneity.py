"""Heterogeneity benchmark (issue 18): which strategy and which remedy help under label,
topic skew, with the client learning rate tuned per method.

For every split (Dirichlet α = 0.1, α = 0.5, topic) and every method (a strategy, or
FedIT / a strategy with a remedy: a server optimizer, FedProx, SCAFFOLD, the
logit-adjusted loss):

1. **tune**: one run per client learning rate of ``--lrs`` (or per value of the key a
   method tunes instead, :data:`TUNED`: the server optimizers' rate, SGD rates for
   SCAFFOLD and its SGD baseline) at ``--tune-seed``, scored
   by the final accuracy on a validation share of the training pool (skipped when the
   grid has one rate)
   (``data.validation-size`` examples, held out of every partition;
   ``eval.split=validation``) — never the test set. FedSA-LoRA is scored by its
   personalised accuracy (``eval.client``: each client's own held-out share);
2. **measure**: ``--seeds`` runs at the chosen rate, evaluated on the test set.

Budget (defaults: the reference's, ``REFERENCE_RESULTS.md``): MiniLM, LoRA r = 8 on
query/value + head, 4 clients all training every round, 5 rounds × 30 AdamW steps of
batch 16, 2,000 test tweets. Every run goes through the in-process grid (the server and
client code of ``fedpeft simulate``; clients train one after another).

Output (``--out``): ``heterogeneity.md`` (per split: chosen rate, final accuracy mean ±
std over seeds, the paired difference vs FedIT with its 95 % t-interval, aggregation
error, bytes per client per round), ``heterogeneity.json`` (every run), one
``accuracy-<split>.png`` per split (mean accuracy vs round per method, with the
reference FedAvg and the centralised line of ``REFERENCE_RESULTS.md``), and a run
directory per run (reused when it is complete, so an interrupted benchmark continues).
``--long`` adds ``--long-rounds`` runs of the ``--long-top`` best methods and FedIT on
Dirichlet α = 0.1. Run:

    python simulations/bench_heterogeneity.py --out reports/heterogeneity      # hours
    python simulations/bench_heterogeneity.py --quick --out /tmp/het          # a minute
    python simulations/bench_heterogeneity.py --splits dirichlet-0.1 --methods fedit,flexlora
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time
from collections.abc import Mapping
from typing import Any

SPLITS: dict[str, dict[str, Any]] = {
    "dirichlet-0.1": {"data.partition": "dirichlet", "data.alpha": 0.1},
    "dirichlet-0.5": {"data.partition": "dirichlet", "data.alpha": 0.5},
    "topic": {"data.partition": "topic"},
}

METHODS: dict[str, dict[str, Any]] = {
    "fedit": {"strategy.name": "fedit"},
    "lora-fair": {"strategy.name": "lora-fair"},
    "flexlora": {"strategy.name": "flexlora"},
    "fedex-lora": {"strategy.name": "fedex-lora"},
    "ffa-lora": {"strategy.name": "ffa-lora"},
    "fedsa-lora": {"strategy.name": "fedsa-lora", "eval.client": True},
    # remedies on FedIT (fixed server settings; the client rate is tuned)
    "fedit+avgm": {"strategy.name": "fedit", "server-opt.name": "avgm"},
    "fedit+adam": {"strategy.name": "fedit", "server-opt.name": "adam"},
    "fedit+prox": {"strategy.name": "fedit", "train.prox-mu": 0.01},
    # SCAFFOLD needs SGD: compare it with FedIT under SGD, both tuned on SGD rates
    "fedit-sgd": {"strategy.name": "fedit", "train.optimizer": "sgd"},
    "fedit-sgd+scaffold": {"strategy.name": "fedit", "train.optimizer": "sgd", "scaffold.enabled": True},
    "fedit+logit-adjust": {"strategy.name": "fedit", "train.logit-adjust": 1.0},
    # a remedy with the strongest strategy of the first measurements (issue 18's table)
    "flexlora+logit-adjust": {"strategy.name": "flexlora", "train.logit-adjust": 1.0},
}
"""Method label → config keys. FedProx μ = 0.01 (from the paper's grid) and the balanced
softmax τ = 1 are fixed; what is tuned is in :data:`TUNED`."""

TUNED: dict[str, tuple[str, list[float]]] = {
    # FFA-LoRA trains B only (A frozen at its random init): its paper uses larger rates
    "ffa-lora": ("train.lr", [1e-3, 2e-3]),
    # the server optimizers' own rate, the client's AdamW rate at the reference 5e-4
    "fedit+avgm": ("server-opt.lr", [0.1, 0.3]),  # μ 0.9: steady-state step η/(1−μ)
    "fedit+adam": ("server-opt.lr", [1e-3, 3e-3]),
    # SGD needs rates of another scale than AdamW's
    "fedit-sgd": ("train.lr", [0.1, 0.3, 1.0]),
    "fedit-sgd+scaffold": ("train.lr", [0.1, 0.3, 1.0]),
}
"""Methods tuned on another key or grid than the client rate over ``--lrs`` (measured
on 2026-12-06 at α = 0.1, seed 0, untuned: FedAvgM with η 1 and FedAdam with η 0.01
fell to the majority class, 0.4195 each, against FedIT's 0.558)."""

PERSONALISED = {"fedsa-lora"}
"""Methods whose model is personal (local B): scored by ``client_accuracy``."""

REFERENCE = {"dirichlet-0.1": 0.4075}
"""Plain Flower FedAvg + peft at the reference budget (REFERENCE_RESULTS.md)."""
CENTRALISED = 0.762
"""The same model trained centrally for the same 600 steps (REFERENCE_RESULTS.md)."""

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Two-sided 95 % Student-t quantiles by degrees of freedom."""


NO_OUTLIER_REJECTION = {"validation.norm-factor": 0.0}
"""Every run aggregates every reply, as the reference FedAvg does: with the balanced loss
a client holding one class barely moves, and the default rule (reject above 10 × the
round's low median norm) then drops the other clients' ordinary updates."""


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """Keys every run shares."""
    return {**_budget(args), **NO_OUTLIER_REJECTION}


def _budget(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {
            "model.name": "tiny-bert",
            "data.max-examples": 48,
            "data.test-size": 120,
            "data.validation-size": 120,
            "federation.clients": 4,
            "federation.rounds": 2,
            "train.local-steps": 3,
            "train.batch-size": 8,
            "output.save-adapter": False,
        }
    return {
        "model.name": "minilm",
        "model.max-length": 64,
        "lora.r": 8,
        "lora.alpha": 16.0,
        "lora.target-modules": "query,value",
        "data.test-size": 2000,
        "data.validation-size": args.validation_size,
        "federation.clients": 4,
        "federation.rounds": args.rounds,
        "train.local-steps": args.steps,
        "train.batch-size": 16,
        "eval.batch-size": 64,
        "output.save-adapter": False,
    }


def score(method: str, summary: Mapping[str, Any]) -> float | None:
    """The final accuracy a method's learning rate is tuned by (personalised for
    FedSA-LoRA, whose model is each client's own)."""
    return final(summary, "client_accuracy" if method in PERSONALISED else "accuracy")


def final(summary: Mapping[str, Any], key: str = "accuracy") -> float | None:
    """The last round's ``key``: ``accuracy`` (the global model on the test set, what
    every method is compared by) or ``client_accuracy`` (personalised)."""
    value = summary["rounds"][-1].get(key)
    return None if value is None else float(value)


def run(flat: dict[str, Any], out: pathlib.Path) -> dict[str, Any]:
    """One run (reused when ``out`` holds a complete run of the same config); its
    summary and wall time."""
    from fedpeft.flower.inprocess import run_in_process
    from fedpeft.results import completed_run

    done = completed_run(out, flat)
    if done is not None:
        return {"summary": done, "seconds": None, "reused": True}
    start = time.perf_counter()
    run_in_process({**flat, "output.dir": str(out.resolve())})
    summary = json.loads((out / "summary.json").read_text())
    return {"summary": summary, "seconds": time.perf_counter() - start, "reused": False}


def paired(diffs: list[float]) -> tuple[float, float]:
    """Mean difference and the half-width of its 95 % t-interval (0 with one seed)."""
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    half = T975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, half


def per_round_bytes(summary: Mapping[str, Any]) -> tuple[float, float]:
    """Mean uplink and downlink bytes per client per round."""
    rounds = [r for r in summary["rounds"] if r["round"] > 0]
    clients = max(1, int(summary.get("clients", 1)))
    up = statistics.fmean(r["uplink_bytes"] for r in rounds) / clients
    down = statistics.fmean(r["downlink_bytes"] for r in rounds) / clients
    return up, down


def run_config(
    base: dict[str, Any], split: str, method: str, key: str, value: float, seed: int,
    eval_split: str = "test",
) -> dict[str, Any]:
    """The flat config of one run: the shared ``base`` keys, the split's and the
    method's, the tuned ``key`` at ``value``, the seed and the evaluation split."""
    return {**base, **SPLITS[split], **METHODS[method], key: value, "seed": seed, "eval.split": eval_split}


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Tune, then measure, every (split, method); return everything."""
    base = budget(args)
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = args.splits.split(",")
    methods = args.methods.split(",")
    unknown = sorted(set(splits) - set(SPLITS)) + sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown split or method {unknown}; splits {list(SPLITS)}, methods {list(METHODS)}")
    results: dict[str, Any] = {"budget": base, "lrs": lrs, "seeds": seeds, "splits": {}}

    def grid(method: str) -> tuple[str, list[float]]:
        if args.quick or method not in TUNED:
            return "train.lr", lrs
        return TUNED[method]

    total = len(splits) * sum(
        (len(grid(m)[1]) if len(grid(m)[1]) > 1 else 0) + len(seeds) for m in methods
    )
    done, started = 0, time.perf_counter()

    def progress(label: str, rec: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        took = "reused" if rec["reused"] else f"{rec['seconds']:.0f} s"
        left = (time.perf_counter() - started) / done * (total - done)
        print(f"[{done}/{total}] {label}: {took}; ~{left / 60:.0f} min left", flush=True)

    for split in splits:
        table: dict[str, Any] = {}
        for method in methods:
            key, values = grid(method)
            tuning: dict[float, float | None] = {}
            for value in values if len(values) > 1 else []:  # one value: nothing to tune
                out = args.out / "runs" / split / f"{method}-{key}{value:g}-tune"
                rec = run(run_config(base, split, method, key, value, args.tune_seed, "validation"), out)
                tuning[value] = score(method, rec["summary"])
                progress(f"{split} {method} {key} {value:g} (validation {tuning[value]})", rec)
            scored = [v for v in values if tuning.get(v) is not None]
            best = max(scored, key=lambda v: tuning[v]) if scored else values[0]
            runs = {}
            for seed in seeds:
                out = args.out / "runs" / split / f"{method}-seed{seed}"
                rec = run(run_config(base, split, method, key, best, seed), out)
                runs[seed] = rec["summary"]
                progress(f"{split} {method} seed {seed} (test {score(method, rec['summary'])})", rec)
            table[method] = {"tuned": key, "tuning": tuning, "lr": best, "runs": runs}
        results["splits"][split] = table
    if args.long:
        results["long"] = long_runs(args, base, results)
    return results


def long_runs(args: argparse.Namespace, base: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """``--long-rounds`` rounds of the best ``--long-top`` methods and FedIT at α = 0.1."""
    table = results["splits"].get("dirichlet-0.1", {})
    ranked = sorted(
        (m for m in table if m != "fedit"),
        key=lambda m: -statistics.fmean(final(s) or 0.0 for s in table[m]["runs"].values()),
    )
    chosen = ["fedit", *ranked[: args.long_top]]
    out: dict[str, Any] = {}
    for method in chosen:
        tuned = table[method].get("tuned", "train.lr") if method in table else "train.lr"
        lr = table[method]["lr"] if method in table else 5e-4
        flat = run_config(base, "dirichlet-0.1", method, tuned, lr, int(args.seeds.split(",")[0]))
        rec = run({**flat, "federation.rounds": args.long_rounds}, args.out / "runs" / "long" / method)
        out[method] = {"lr": lr, "summary": rec["summary"]}
        print(f"long {method}: {final(rec['summary'])}", flush=True)
    return out


def render(results: dict[str, Any]) -> str:
    """The Markdown report."""
    b = results["budget"]
    lines = [
        "# Heterogeneity benchmark",
        "",
        f"{b['federation.clients']} clients, {b['federation.rounds']} rounds × "
        f"{b['train.local-steps']} steps, model {b['model.name']}; client learning rate tuned "
        f"per method over {results['lrs']} on a validation share of the training pool "
        f"({b.get('data.validation-size')} examples), then seeds {results['seeds']} on the test "
        "set (methods of `TUNED` on their own key and grid). Δ vs fedit: the mean paired "
        "difference (same seed) and its 95 % t-interval. "
        "No outlier rejection (validation.norm-factor = 0), as in the reference FedAvg.",
    ]
    ran = {m for table in results["splits"].values() for m in table}
    if ran & PERSONALISED:  # say only what applies to the methods that ran
        lines[-1] += (
            " Final accuracy and Δ: the global model on the test set, for every method."
            " Personalised: each client's own model (FedSA-LoRA: its own B) on its own"
            " held-out share, averaged over clients — under label skew a client's share"
            " holds one or two classes, so it is not comparable with the global column"
            " (FedSA-LoRA's rate is tuned by it)."
        )
    if any("scaffold" in m for m in ran):
        lines[-1] += " SCAFFOLD runs under SGD: compare fedit-sgd+scaffold with fedit-sgd."
    for split, table in results["splits"].items():
        lines += ["", f"## {split}", ""]
        if split in REFERENCE:
            lines.append(f"Reference FedAvg (plain Flower + peft): {REFERENCE[split]}; centralised {CENTRALISED}.")
            lines.append("")
        personal = bool(set(table) & PERSONALISED)
        lines.append(
            "| method | tuned value | final accuracy | Δ vs fedit [95 % CI] | "
            + ("personalised | " if personal else "")
            + "agg error | up / down KB per client-round |"
        )
        lines.append("|---|---|---|---|" + ("---|" if personal else "") + "---|---|")
        base_runs = table.get("fedit", {}).get("runs", {})
        for method, row in table.items():
            accs = {s: final(r) for s, r in row["runs"].items()}
            values = [a for a in accs.values() if a is not None]
            mean = statistics.fmean(values) if values else float("nan")
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            diff = "—"
            if method != "fedit" and base_runs:
                diffs = [
                    accs[s] - final(base_runs[s])
                    for s in accs
                    if s in base_runs and accs[s] is not None and final(base_runs[s]) is not None
                ]
                if diffs:
                    d, half = paired(diffs)
                    diff = f"{d:+.3f} [{d - half:+.3f}, {d + half:+.3f}]" if math.isfinite(half) else f"{d:+.3f}"
            errors = [
                r["aggregation_error"]
                for s in row["runs"].values()
                for r in s["rounds"]
                if r.get("aggregation_error") is not None
            ]
            err = f"{statistics.fmean(errors):.3f}" if errors else "—"
            up, down = per_round_bytes(next(iter(row["runs"].values())))
            own = ""
            if personal:
                mine = [v for r in row["runs"].values() if (v := final(r, "client_accuracy")) is not None]
                own = "— | "
                if mine:
                    spread = statistics.stdev(mine) if len(mine) > 1 else 0.0
                    own = f"{statistics.fmean(mine):.3f} ± {spread:.3f} | "
            lines.append(
                f"| {method} | {row.get('tuned', 'train.lr')} {row['lr']:g} | {mean:.3f} ± {sd:.3f} | {diff} | {own}{err} | "
                f"{up / 1e3:,.0f} / {down / 1e3:,.0f} |"
            )
    if "long" in results:
        lines += ["", "## Longer runs (Dirichlet α = 0.1)", "", "| method | lr | rounds | final accuracy |", "|---|---|---|---|"]
        for method, rec in results["long"].items():
            rounds = rec["summary"]["rounds"][-1]["round"]
            lines.append(f"| {method} | {rec['lr']:g} | {rounds} | {final(rec['summary'])} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: pathlib.Path) -> None:
    """Mean accuracy vs round per method, one figure per split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for split, table in results["splits"].items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for method, row in table.items():
            curves = [[r.get("accuracy") for r in s["rounds"]] for s in row["runs"].values()]
            rounds = [r["round"] for r in next(iter(row["runs"].values()))["rounds"]]
            mean = [
                statistics.fmean(v for v in col if v is not None) if any(v is not None for v in col) else None
                for col in zip(*curves, strict=True)
            ]
            ax.plot(rounds, mean, marker="o", label=method)
        if split in REFERENCE:
            ax.axhline(REFERENCE[split], color="grey", linestyle="--", label="reference FedAvg")
        ax.axhline(CENTRALISED, color="black", linestyle=":", label="centralised")
        ax.set(xlabel="round", ylabel="test accuracy (mean over seeds)", title=split)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"accuracy-{split}.png", dpi=110)
        plt.close(fig)


def parser() -> argparse.ArgumentParser:
    """The command line (its defaults are the benchmark's budget and grid)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("reports/heterogeneity"))
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lrs", default="5e-4,1e-3", help="client learning-rate grid")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tune-seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--validation-size", type=int, default=1000)
    parser.add_argument("--long", action="store_true", help="add the longer α = 0.1 runs")
    parser.add_argument("--long-rounds", type=int, default=20)
    parser.add_argument("--long-top", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny model, 2 rounds: checks the script")
    return parser


def main() -> None:
    args = parser().parse_args()
    if args.quick:
        args.lrs, args.seeds = "5e-3,1e-2", "0,1"
    args.out.mkdir(parents=True, exist_ok=True)
    results = benchmark(args)
    (args.out / "heterogeneity.json").write_text(json.dumps(results, indent=1, default=str))
    report = render(results)
    (args.out / "heterogeneity.md").write_text(report)
    plot(results, args.out)
    print(report)
    print(f"wrote {args.out / 'heterogeneity.md'}, heterogeneity.json, accuracy-*.png")


if __name__ == "__main__":
    main()
