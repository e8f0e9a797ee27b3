"""Time the LoRA-FAIR server step next to FedIT averaging on LLaMA-7B-shaped adapters.

Synthetic adapters: 64 LoRA modules of 4096×4096 (q and v of 32 layers), rank 16,
10 clients, float32 (33.6 MB per client). Each method runs in its own subprocess so
the peak-memory figures do not mix; peak extra memory is the growth of
``ru_maxrss`` over the process's level after the client updates were built
(``tracemalloc`` does not see torch allocations).

    python simulations/bench_lora_fair_server.py                 # both, median of 3
    python simulations/bench_lora_fair_server.py --layers 8      # smaller, quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def _updates(layers: int, dim: int, rank: int, clients: int) -> tuple[dict, list]:
    from fedpeft import ClientPlan, ClientUpdate

    gen = torch.Generator().manual_seed(0)
    glob = {}
    for i in range(layers):
        glob[f"model.layers.{i}.proj.lora_A.weight"] = (
            torch.randn(rank, dim, generator=gen) / dim**0.5
        )
        glob[f"model.layers.{i}.proj.lora_B.weight"] = torch.zeros(dim, rank)
    updates = []
    for k in range(clients):
        tensors = {
            key: v + (0.01 if "lora_A" in key else 0.001) * torch.randn(v.shape, generator=gen)
            for key, v in glob.items()
        }
        plan = ClientPlan(node_id=k, partition_id=k, rank=rank, seed=k)
        updates.append(
            ClientUpdate(node_id=k, tensors=tensors, num_examples=100 + k, metrics={}, plan=plan)
        )
    return glob, updates


def _child(
    method: str, layers: int, dim: int, rank: int, clients: int, repeats: int, objective: str
) -> None:
    import strategies.fedit
    import strategies.lora_fair
    from fedpeft import StrategyEnv

    torch.set_num_threads(2)
    env = StrategyEnv(
        seed=0, num_rounds=1, clients_per_round=clients, rank=rank, lora_alpha=2 * rank
    )
    module = strategies.lora_fair if method == "lora-fair" else strategies.fedit
    if method == "lora-fair":
        config = module.LoraFairConfig(objective=objective)
    else:
        config = module.FedItConfig()
    agg = module.build(config, env).aggregator
    glob, updates = _updates(layers, dim, rank, clients)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, metrics = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        out = agg.aggregate(agg.initialize(glob), glob, updates, 1)
        times.append(time.perf_counter() - start)
        metrics = dict(out.metrics)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(
        json.dumps(
            {
                "seconds": statistics.median(times),
                "all": times,
                "peak_extra_mb": peak / 1024,
                "metrics": metrics,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=64)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--objectives",
        default="fro-no-shrink,cosine",
        help="LoRA-FAIR objectives to time beside FedIT (comma-separated; the first is the default)",
    )
    parser.add_argument("--objective", default="fro-no-shrink", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["fedit", "lora-fair"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.layers, args.dim, args.rank, args.clients, args.repeats)
    if args.child:
        _child(args.child, *shape, args.objective)
        return
    size_mb = args.layers * 2 * args.dim * args.rank * 4 / 1e6
    print(
        f"{args.layers} modules {args.dim}x{args.dim}, r={args.rank}, {args.clients} clients "
        f"({size_mb:.1f} MB per client, float32), median of {args.repeats}"
    )
    runs = [("fedit", "")] + [("lora-fair", o.strip()) for o in args.objectives.split(",") if o.strip()]
    for method, objective in runs:
        cmd = [sys.executable, __file__, "--child", method, f"--objective={objective or 'fro'}"] + [
            f"--{name}={value}"
            for name, value in zip(
                ("layers", "dim", "rank", "clients", "repeats"), shape, strict=True
            )
        ]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        label = f"{method} {objective}".strip()
        line = f"{label:24s} {res['seconds']:7.3f} s   peak extra {res['peak_extra_mb']:8.1f} MB"
        if method == "lora-fair":
            m = res["metrics"]
            line += (
                f"   cos {m['lora_fair/cosine_before']:.4f} -> {m['lora_fair/cosine_after']:.4f}"
                f", iterations {m['lora_fair/iterations']:.0f}"
            )
        print(line)


if __name__ == "__main__":
    main()
