"""FedSpine vs fixed allocations on the embedded task under heterogeneous device profiles.

Run:  python simulations/bench_fedspine.py --out reports/fedspine-i18
      (6 runs of 20 rounds × 4 steps: measured 2026-12-07 at ≈ 115 min with another
      benchmark sharing the 2 cores, 17-20 min per run; see "Budget" below)
      python simulations/bench_fedspine.py --rounds 2 --steps 4 --clients 3 --model tiny-bert \
          --test-size 120 --out /tmp/fedspine-smoke   (smoke, under a minute)

Every run goes through the real ClientApp/ServerApp on the in-process grid: MiniLM
sequence classifier, tweets IID over ``--clients`` clients, all of them every round,
``--steps`` AdamW steps of batch 16, LoRA (``lora.r = 8``) on query/value and both FFN
projections (so FFN channels get importance scores) plus the head, pruning every
``--interval`` steps:

* ``uniform``: every device at the max rank 8, no pruning (``fedspine.fixed-rank=8``,
  ``fixed-prune-ratio=0``: the same aggregation, no bandit);
* ``fixed-rR-pP-sS``: every device at rank R pruning P of its remaining heads/channels
  per round until its final sparsity S (``fedspine.target-sparsity``; the low caps
  0.1 and 0.2 beside issue 6's 0.5) — the candidates for the best single allocation;
* ``fedspine``: the per-device S-UCB bandit choosing rank, pruning ratio and — with
  ``--sparsities`` (default ``0.1,0.2,0.3,0.5``; ``""`` for the paper's single
  ``--target-sparsity``) — each device's final sparsity; one run per device profile
  mix (its choices depend on the simulated times it is rewarded with). ``--spine
  KEY=VALUE`` (repeatable) adds settings to these runs only, e.g. ``fedspine.c=0.2``.

Budget (issue 18: a 20+-round horizon, fewer local steps where CPU time forbids
more). Estimated, not measured, from the issue-6 run of this script (6 rounds × 12
steps, 6 clients, 2,000 test tweets, ``runs/fedspine.log`` / its ``summary.json``
files, 2 cores shared with another benchmark): a dense client round took ~13.6 s
(~1.1 s per step with the model copy and probe passes), evaluation + overhead
~35-45 s per round, a run 10-14 min. Here 6 clients × 4 steps ≈ 29 s of training and
~20 s of evaluation on 1,000 test tweets per round → ~17 min per run at that load,
~12 min alone (the reference benchmark's ~0.7 s per step at lighter load); 6 runs +
the pruned models (full test set for accuracy, the first ``--latency-batches``
batches for latency, identical masks evaluated once) ≈ 80 min alone, ≈ 105 min
shared. 1,000 test tweets: standard error ~1.5 points per accuracy; all runs share
the same test set, so differences between runs are less noisy than that.

Fixed allocations train identically whatever the profile (same clients, seeds and
arms), so they run once without a profile and their simulated times are computed for
each mix afterwards with the same formula the server uses
(:func:`fedpeft.devices.simulated_round_seconds`: measured seconds / compute speed +
bytes / bandwidth, a round lasting as long as its slowest device). Reported per mix:
simulated time to the target accuracy (default: the uniform allocation's final accuracy
minus 1 point), final accuracy of the global adapter, accuracy and CPU inference latency
of each device's *pruned* model (the global adapter on the base pruned to the device's
final masks, on the task's test set, batch 32; latency on its first
``--latency-batches`` batches, best of 3), bytes, and FedSpine's per-device choices
(rank / prune ratio / final-sparsity target per round, final sparsity).
Writes ``OUT/fedspine.md``, ``OUT/fedspine.json`` and ``OUT/fedspine.png``;
``--report-only --target 0.48 --target 0.585`` re-renders them from the JSON at other
target accuracies without training again.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedpeft.checkpoint import load_latest  # noqa: E402
from fedpeft.config import parse_overrides, parse_run_config  # noqa: E402
from fedpeft.devices import MIXES, profile_for, simulated_round_seconds, tier_of  # noqa: E402
from fedpeft.flower.inprocess import run_in_process  # noqa: E402
from fedpeft.pruning.bert import prune_bert_, structure_counts  # noqa: E402
from fedpeft.tasks import get_task  # noqa: E402
from fedpeft.tasks.data import collate  # noqa: E402

TARGETS = "query,value,intermediate.dense,output.dense"
MIX_NAMES = ("mixed-3-tier", "long-tail")
FIXED = {  # name: (rank, prune ratio per round, final sparsity)
    "uniform": (8, 0.0, 0.0),
    "fixed-r8-p0.3-s0.1": (8, 0.3, 0.1),
    "fixed-r8-p0.3-s0.2": (8, 0.3, 0.2),
    "fixed-r8-p0.3-s0.5": (8, 0.3, 0.5),  # issue 6's fixed-r8-p0.3
}


def base_config(args: argparse.Namespace, name: str) -> dict[str, Any]:
    flat: dict[str, Any] = {
        "seed": args.seed,
        "strategy.name": "fedspine",
        "federation.rounds": args.rounds,
        "federation.clients": args.clients,
        "train.local-steps": args.steps,
        "lora.r": 8,
        "lora.target-modules": TARGETS,
        "fedspine.ranks": "2,4,8",
        "fedspine.prune-interval": args.interval,
        "fedspine.target-sparsity": args.target_sparsity,
        "data.test-size": args.test_size,
        "checkpoint.every": args.rounds,
        "output.dir": str(args.out / name),
        "output.save-adapter": False,
    }
    if args.model:
        flat["model.name"] = args.model
    return flat


def run(name: str, flat: dict[str, Any]) -> dict[str, Any]:
    """One federated run: accuracy and per-client records per round, final masks."""
    start = time.perf_counter()
    results = run_in_process(flat)
    wall = time.perf_counter() - start
    ckpt = load_latest(Path(flat["output.dir"]) / "checkpoint")
    masks = ckpt.states["aggregator"]["masks"] if ckpt else {}
    log = ckpt.states["selector"]["log"] if ckpt else []
    return {
        "name": name,
        "config": {k: v for k, v in flat.items() if k != "output.dir"},
        "accuracy": [r["accuracy"] for r in results.rounds],
        "rounds": [
            {
                "round": r["round"],
                "accuracy": r["accuracy"],
                "uplink_bytes": r["uplink_bytes"],
                "downlink_bytes": r["downlink_bytes"],
                "clients": r["clients"],
            }
            for r in results.rounds[1:]
        ],
        "wall_s": wall,
        "masks": {
            pid: [m.tolist() if m is not None else None for m in pair]
            for pid, pair in masks.items()
        },
        "decisions": log,
        "global": ckpt.global_tensors if ckpt else None,
    }


def simulated_timeline(run_: dict[str, Any], mix: str) -> list[float]:
    """Cumulative simulated seconds after each round under ``mix``."""
    total, out = 0.0, []
    for r in run_["rounds"]:
        times = [
            simulated_round_seconds(
                c.get("measured_seconds", c["client_seconds"]),
                profile_for(mix, c["partition_id"]),
                c["uplink_bytes"],
                c["downlink_bytes"],
            )
            for c in r["clients"]
        ]
        total += max(times) if times else 0.0
        out.append(total)
    return out


def time_to(run_: dict[str, Any], timeline: list[float], target: float) -> float | None:
    for acc, t in zip(run_["accuracy"][1:], timeline, strict=True):
        if acc is not None and acc >= target:
            return t
    return None


def pruned_models(
    run_: dict[str, Any], flat: dict[str, Any], latency_batches: int, repeats: int = 3
) -> dict[str, Any]:
    """Accuracy and inference latency of each device's pruned model vs the unpruned one
    (a device whose masks equal another's, or keep everything, reuses its numbers)."""
    cfg = parse_run_config(flat)
    task = get_task(cfg)
    model = task.model(8)
    model.load(run_["global"])
    test = task.test_data()
    batches = [
        collate(test, list(range(i, min(i + 32, len(test)))), model.pad_id)
        for i in range(0, len(test), 32)
    ][:latency_batches]

    def latency(m: Any) -> float:
        import torch

        m.model.eval()
        best = []
        with torch.inference_mode():
            for _ in range(repeats):
                t0 = time.perf_counter()
                for b in batches:
                    task.loss(m, b)
                best.append(time.perf_counter() - t0)
        return min(best)

    dense_s = latency(model)
    dense_acc = task.evaluate(model, test).get("accuracy")
    out: dict[str, Any] = {"dense_seconds": dense_s, "dense_accuracy": dense_acc, "devices": {}}
    import torch

    heads_n, _ = structure_counts(model.model)
    seen: dict[str, tuple[Any, float]] = {}  # masks → (accuracy, seconds)
    for pid, (heads, channels) in sorted(run_["masks"].items(), key=lambda kv: int(kv[0])):
        h = torch.tensor(heads, dtype=torch.bool) if heads is not None else None
        c = torch.tensor(channels, dtype=torch.bool) if channels is not None else None
        if (h is None or bool(h.all())) and (c is None or bool(c.all())):
            acc, seconds = dense_acc, dense_s  # nothing pruned: the dense model
        else:
            key = json.dumps([heads, channels])
            if key not in seen:
                work = copy.deepcopy(model)
                prune_bert_(
                    work.model,
                    {i: h[i] for i in range(len(heads_n))} if h is not None else None,
                    {i: c[i] for i in range(len(heads_n))} if c is not None else None,
                )
                seen[key] = (task.evaluate(work, test).get("accuracy"), latency(work))
            acc, seconds = seen[key]
        out["devices"][pid] = {
            "accuracy": acc,
            "seconds": seconds,
            "speedup": dense_s / seconds,
            "heads_kept": float(h.double().mean()) if h is not None else 1.0,
            "channels_kept": float(c.double().mean()) if c is not None else 1.0,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports/fedspine"))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--interval", type=int, default=2, help="fedspine.prune-interval")
    parser.add_argument(
        "--sparsities",
        default="0.1,0.2,0.3,0.5",
        help="fedspine.sparsities of the FedSpine runs ('' = one --target-sparsity)",
    )
    parser.add_argument(
        "--target-sparsity",
        type=float,
        default=0.5,
        help="FedSpine's single final sparsity when --sparsities is ''",
    )
    parser.add_argument(
        "--spine",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra setting for the FedSpine runs only, repeatable (e.g. fedspine.c=0.2)",
    )
    parser.add_argument(
        "--test-size", type=int, default=1000, help="data.test-size (0: the task's 2,000)"
    )
    parser.add_argument(
        "--latency-batches", type=int, default=8, help="test batches of 32 timed per pruned model"
    )
    parser.add_argument(
        "--target",
        type=float,
        action="append",
        help="target accuracy, repeatable (default: the uniform allocation's final − 0.01)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="re-render OUT/fedspine.md from OUT/fedspine.json (e.g. with other --target values)",
    )
    parser.add_argument("--model", default="", help="model.name (default: the embedded MiniLM)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    setting: dict[str, Any] = {
        k: getattr(args, k)
        for k in (
            "clients",
            "rounds",
            "steps",
            "interval",
            "sparsities",
            "target_sparsity",
            "spine",
            "test_size",
            "seed",
        )
    }
    setting["fixed"] = {name: list(arm) for name, arm in FIXED.items()}
    setting["date"] = time.strftime("%Y-%m-%d")
    if args.report_only:
        saved = json.loads((args.out / "fedspine.json").read_text())
        runs, pruned = saved["runs"], saved["pruned"]
        setting = saved.get("setting", setting)  # the run's own setting, where recorded
    else:
        runs, pruned = run_all(args)
    targets = args.target or [runs["uniform"]["accuracy"][-1] - 0.01]
    text, summary = report(runs, pruned, setting, targets, default_target=not args.target)
    print(text)
    (args.out / "fedspine.md").write_text(text + "\n")
    (args.out / "fedspine.json").write_text(
        json.dumps(
            {
                "setting": setting,
                "summary": summary,
                "pruned": pruned,
                "runs": {k: {**v, "global": None} for k, v in runs.items()},
            },
            indent=1,
            default=str,
        )
    )
    plot(runs, args.out / "fedspine.png")
    print(f"wrote {args.out / 'fedspine.md'}, fedspine.json, fedspine.png")


def run_all(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every allocation's run, then each pruned device model's accuracy and latency."""
    # build the models and every partition once, so no run pays the loading in its times
    warm = parse_run_config(base_config(args, "warm-up"))
    task = get_task(warm)
    for rank in (2, 4, 8):
        task.model(rank)
    for pid in range(args.clients):
        task.client_data(pid, args.clients)
    task.test_data()

    runs: dict[str, dict[str, Any]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for name, (rank, ratio, final) in FIXED.items():
        configs[name] = {
            **base_config(args, name),
            "fedspine.fixed-rank": rank,
            "fedspine.fixed-prune-ratio": ratio,
            "fedspine.target-sparsity": final,
        }
    spine = dict(parse_overrides(args.spine)) if args.spine else {}
    for mix in MIX_NAMES:
        name = f"fedspine@{mix}"
        configs[name] = {
            **base_config(args, name),
            "fedspine.sparsities": args.sparsities,
            "devices.profile": mix,
            **spine,
        }
    for flat in configs.values():
        parse_run_config(flat)  # every config is valid before the first run starts
    for name, flat in configs.items():
        print(f"== {name}", flush=True)
        runs[name] = run(name, flat)
        print(f"   accuracy {runs[name]['accuracy']}, {runs[name]['wall_s']:.0f} s", flush=True)
    print("== pruned models (accuracy, latency)", flush=True)
    pruned = {
        name: pruned_models(r, configs[name], args.latency_batches)
        for name, r in runs.items()
        if r["masks"]
    }
    return runs, pruned


def report(
    runs: dict[str, dict[str, Any]],
    pruned: dict[str, Any],
    setting: dict[str, Any],
    targets: list[float],
    default_target: bool,
) -> tuple[str, dict[str, Any]]:
    """The Markdown report: per device mix, one table row per allocation with its
    simulated time to each target, and the goal verdicts vs uniform and the best fixed."""
    names = ", ".join(f"{t:.3f}" for t in targets)
    lines = [
        f"# FedSpine benchmark ({setting['date']}, {platform.machine()}, "
        f"Python {platform.python_version()}, CPU only)",
        "",
        f"{setting['clients']} clients (IID tweets), all every round, {setting['rounds']} rounds, "
        f"{setting['steps']} AdamW steps of batch 16, LoRA r ≤ 8 on {TARGETS} + head, pruning every "
        f"{setting['interval']} steps; {_spine_setting(setting)}; "
        f"{setting.get('test_size') or 2000} test tweets. Target accuracy "
        f"{names}" + (" (uniform final − 1 pt)." if default_target else "."),
        "",
    ]
    summary: dict[str, Any] = {"targets": targets, "mixes": {}}
    for mix in MIX_NAMES:
        clients = int(setting["clients"])
        tiers = [tier_of(mix, i) for i in range(clients)]
        rows = []
        for name, r in runs.items():
            if name.startswith("fedspine@") and name != f"fedspine@{mix}":
                continue
            timeline = simulated_timeline(r, mix)
            dev = pruned.get(name, {}).get("devices", {})
            rows.append(
                {
                    "name": name,
                    "time_to_target": [time_to(r, timeline, t) for t in targets],
                    "total_time": timeline[-1],
                    "final": r["accuracy"][-1],
                    "best": max(a for a in r["accuracy"] if a is not None),
                    "pruned_acc": statistics.mean(d["accuracy"] for d in dev.values())
                    if dev
                    else r["accuracy"][-1],
                    "speedup": statistics.mean(d["speedup"] for d in dev.values()) if dev else 1.0,
                    "up": sum(x["uplink_bytes"] for x in r["rounds"]),
                    "down": sum(x["downlink_bytes"] for x in r["rounds"]),
                }
            )
        reach_cols = " | ".join(f"simulated s to {t:.3f}" for t in targets)
        lines += [
            f"## {mix} ({', '.join(f'{t}×{tiers.count(t)}' for t in dict.fromkeys(tiers))})",
            "",
            f"| allocation | {reach_cols} | simulated s total | final acc (global) | best acc "
            "| mean acc of pruned device models | pruned inference speed-up | uplink MB | downlink MB |",
            "| --- | " + "---: | " * len(targets) + "---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for x in rows:
            reach = " | ".join(f"{t:.0f}" if t is not None else "not reached" for t in x["time_to_target"])
            lines.append(
                f"| {x['name']} | {reach} | {x['total_time']:.0f} | {x['final']:.3f} | {x['best']:.3f} "
                f"| {x['pruned_acc']:.3f} | {x['speedup']:.2f}× | {x['up'] / 1e6:.2f} | {x['down'] / 1e6:.2f} |"
            )
        uniform = next(x for x in rows if x["name"] == "uniform")
        spine = next(x for x in rows if x["name"].startswith("fedspine"))
        verdict = []
        for i, target in enumerate(targets):
            fixed = [
                x
                for x in rows
                if not x["name"].startswith("fedspine") and x["time_to_target"][i] is not None
            ]
            best_fixed = min(fixed, key=lambda x: x["time_to_target"][i]) if fixed else None
            for label, ref in (("uniform", uniform), ("best fixed", best_fixed)):
                if ref is None or ref["time_to_target"][i] is None:
                    verdict.append(f"target {target:.3f}, {label}: did not reach the target")
                elif spine["time_to_target"][i] is None:
                    verdict.append(
                        f"target {target:.3f}, vs {label} ({ref['name']}): FedSpine did not reach it"
                    )
                else:
                    speed = ref["time_to_target"][i] / spine["time_to_target"][i]
                    gap = 100 * (ref["final"] - spine["final"])
                    met = speed >= 1.4 and gap <= 1.0
                    verdict.append(
                        f"target {target:.3f}, vs {label} ({ref['name']}): {speed:.2f}× faster to "
                        f"the target, final accuracy {abs(gap):.1f} pt {'behind' if gap > 0 else 'ahead'} "
                        f"(goal ≥ 1.4× at ≤ 1 pt: "
                        f"{'met' if met else 'NOT met'})"
                    )
        lines += ["", *[f"- {v}" for v in verdict], ""]
        per_device: dict[int, list[dict[str, Any]]] = {}
        for d in runs[f"fedspine@{mix}"]["decisions"]:
            per_device.setdefault(int(d["partition_id"]), []).append(d)
        lines.append(
            "FedSpine's choices per device (rank / prune ratio / final-sparsity target by "
            "round; final sparsity): "
            + "; ".join(
                f"{pid} {tiers[pid]}: "
                + ", ".join(
                    f"r{d['rank']}/p{d['prune_ratio']:.2f}"
                    + (f"/s{d['target_sparsity']:g}" if "target_sparsity" in d else "")
                    for d in ds
                )
                + f"; s={ds[-1].get('sparsity', 0.0):.2f}"
                for pid, ds in sorted(per_device.items())
            )
        )
        lines.append("")
        summary["mixes"][mix] = rows
    return "\n".join(lines), summary


def _spine_setting(setting: dict[str, Any]) -> str:
    """How the runs chose their final sparsity (older JSON files lack the new keys)."""
    fixed = setting.get("fixed")
    text = (
        "fixed allocations " + ", ".join(f"{n} (r {a[0]}, p {a[1]}, s {a[2]})" for n, a in fixed.items())
        if fixed
        else f"fixed allocations prune up to sparsity {setting['target_sparsity']}"
    )
    if setting.get("sparsities"):
        text += f"; FedSpine chooses each device's final sparsity from {setting['sparsities']}"
    else:
        text += f"; FedSpine prunes every device to {setting['target_sparsity']}"
    if setting.get("spine"):
        text += f" (with {', '.join(setting['spine'])})"
    return text


def plot(runs: dict[str, dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, len(MIX_NAMES), figsize=(11, 4))
    for ax, mix in zip(axes, MIX_NAMES, strict=True):
        for name, r in runs.items():
            if name.startswith("fedspine@") and name != f"fedspine@{mix}":
                continue
            ax.plot([0.0, *simulated_timeline(r, mix)], r["accuracy"], marker="o", label=name)
        ax.set(xlabel="simulated seconds", ylabel="test accuracy", title=mix)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    assert set(MIX_NAMES) <= set(MIXES)
    main()
