"""Compare LoRA-FAIR's correction objectives on random problems and on real client updates.

For every problem it runs :class:`strategies.lora_fair.LoraFairAggregator` once per
objective and reads the strategy's own pooled metrics (all layers of a problem):

* ``err``: ``‖ΔW − B′Ā‖ / ‖ΔW‖`` after the correction (``lora_fair/relative_error_after``);
  FedIT's ``‖ΔW − B̄Ā‖ / ‖ΔW‖`` is ``relative_error_before``;
* ``ratio``: ``‖B′Ā‖ / ‖ΔW‖`` (``lora_fair/norm_ratio``); FedIT's ``‖B̄Ā‖ / ‖ΔW‖`` is
  ``norm_ratio_before``;
* ``ok``: the problems where the correction meets both conditions, error below FedIT's
  *and* norm ratio at least FedIT's (``≥ norm_ratio_before − 1e-12``),

with ``ΔW = Σ_k p_k B_k A_k``. Objectives (``lora-fair.objective``, λ = 0.01 each, module
doc of ``strategies/lora_fair/``): ``fro-no-shrink`` (the default), ``cosine``,
``cosine-rescaled``, ``fro``, ``residual``, and ``fro λ=0`` for reference (the
least-squares projection: the smallest error any correction of B can reach).

Problem families:

* ``indep s``: clients' factors drawn independently, ``A_k`` entries U(±1/√n) (LoRA's
  Kaiming-uniform init), ``B_k`` entries N(0, s²) for s in 1e-4 … 1e-1;
* ``shared s``: clients drifted from one start: ``A_k = A_0 + 0.3·U(±1/√n)``,
  ``B_k = B_0 + N(0, s²)`` with ``B_0`` entries N(0, s²);
  each over (clients, rank) in (2, 8), (4, 16), (8, 4) and seeds 0–2, four layers
  of shapes 64×32, 64×32, 32×64 and 96×96;
* ``real α=… round t``: the uploads of 4 clients of the embedded classification task
  (MiniLM, ``data.partition=dirichlet``, 30 local steps, batch 16, lr 5e-4, seed 42),
  captured by a probe strategy that delegates to ``fedit`` (so round 2 starts from
  FedIT's aggregate) and cached as safetensors under ``--cache``.

    python simulations/bench_lora_fair_objectives.py               # 72 random problems, round 1
    python simulations/bench_lora_fair_objectives.py --rounds 2    # + round 2 (the docstring table)
    python simulations/bench_lora_fair_objectives.py --quick       # 8 random problems, round 1

The random part took 4.5 min CPU here (~20 s with ``--quick``). Training is the slow part:
each round is 4 clients × 30 steps of MiniLM per α (measured here with the 2 cores
shared by other jobs: 2 rounds took 43 min wall for α = 0.1 and 34 min for α = 0.5);
the uploads are cached, so a rerun only re-evaluates them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import strategies.fedit as fedit
from fedpeft import ClientPlan, ClientUpdate, FedStrategy, StrategyEnv, register_strategy
from fedpeft.lora import AdapterLayout
from strategies.lora_fair import LoraFairAggregator, LoraFairConfig

CANDIDATES: dict[str, dict[str, Any]] = {
    "fro-no-shrink": {"objective": "fro-no-shrink"},
    "cosine": {"objective": "cosine"},
    "cosine-rescaled": {"objective": "cosine-rescaled"},
    "fro": {"objective": "fro"},
    "residual": {"objective": "residual"},
    "fro λ=0": {"objective": "fro", "lam": 0.0},
}
SHAPES = [(64, 32), (64, 32), (32, 64), (96, 96)]  # (d_out, d_in) per layer
SCALES = (1e-4, 1e-3, 1e-2, 1e-1)
PROBE = "lora-fair-probe"


# -- random problems ------------------------------------------------------------------------


def random_problem(
    family: str, scale: float, clients: int, rank: int, seed: int
) -> tuple[dict[str, torch.Tensor], list[ClientUpdate]]:
    """Global adapter and client updates of one random multi-layer problem."""
    gen = torch.Generator().manual_seed(seed)

    def kaiming(r: int, n: int) -> torch.Tensor:
        return (2 * torch.rand(r, n, generator=gen, dtype=torch.float64) - 1) / n**0.5

    start = {}
    for i, (m, n) in enumerate(SHAPES):
        start[f"layers.{i}.proj.lora_A.weight"] = kaiming(rank, n)  # (r, n)
        b0 = scale * torch.randn(m, rank, generator=gen, dtype=torch.float64)  # (m, r)
        start[f"layers.{i}.proj.lora_B.weight"] = b0
    updates = []
    for k in range(clients):
        tensors = {}
        for i, (m, n) in enumerate(SHAPES):
            a_key, b_key = f"layers.{i}.proj.lora_A.weight", f"layers.{i}.proj.lora_B.weight"
            noise_b = scale * torch.randn(m, rank, generator=gen, dtype=torch.float64)
            if family == "indep":
                tensors[a_key], tensors[b_key] = kaiming(rank, n), noise_b
            else:
                tensors[a_key] = start[a_key] + 0.3 * kaiming(rank, n)
                tensors[b_key] = start[b_key] + noise_b
        count = int(torch.randint(20, 200, (1,), generator=gen))
        plan = ClientPlan(node_id=k, partition_id=k, rank=rank, seed=k)
        updates.append(ClientUpdate(k, tensors, count, {}, plan))
    return start, updates


def evaluate(
    glob: dict[str, torch.Tensor], updates: Sequence[ClientUpdate], lora_alpha: float
) -> dict[str, dict[str, float]]:
    """The pooled metrics of every candidate objective on one problem."""
    layout = AdapterLayout(lora_alpha=lora_alpha)
    out = {}
    for name, options in CANDIDATES.items():
        agg = LoraFairAggregator(LoraFairConfig(**options), layout)
        out[name] = dict(agg.aggregate({}, glob, updates, 1).metrics)
    return out


# -- real client updates (probe strategy) ---------------------------------------------------

_CAPTURED: list[dict[str, Any]] = []


@dataclass(frozen=True)
class ProbeConfig:
    """Options of the probe (none)."""


@dataclass(frozen=True)
class CaptureMean:
    """FedIT's aggregator that first records what it receives."""

    inner: Any
    lora_alpha: float

    def initialize(self, global_tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return self.inner.initialize(global_tensors)

    def client_payload(self, state: Any, global_tensors: Any, plan: ClientPlan) -> Any:
        return self.inner.client_payload(state, global_tensors, plan)

    def aggregate(self, state: Any, global_tensors: Any, updates: Any, server_round: int) -> Any:
        _CAPTURED.append(
            {
                "round": server_round,
                "lora_alpha": self.lora_alpha,
                "global": {k: v.detach().clone() for k, v in global_tensors.items()},
                "updates": [
                    (
                        u.plan.partition_id,
                        u.num_examples,
                        {k: v.detach().clone() for k, v in u.tensors.items()},
                    )
                    for u in updates
                ],
            }
        )
        return self.inner.aggregate(state, global_tensors, updates, server_round)


def _build_probe(config: ProbeConfig, env: StrategyEnv) -> FedStrategy:
    base = fedit.build(fedit.FedItConfig(), env)
    return FedStrategy(
        aggregator=CaptureMean(base.aggregator, env.lora_alpha),
        needs_individual_updates=True,
        mixed_ranks=True,
    )


def _cache_path(cache: Path, alpha: float, args: argparse.Namespace) -> Path:
    return cache / f"alpha{alpha}_seed{args.seed}_clients{args.clients}_steps{args.steps}"


def _save(path: Path, captured: list[dict[str, Any]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    meta = []
    for rec in captured:
        t = rec["round"]
        save_file(
            {k: v.contiguous() for k, v in rec["global"].items()},
            str(path / f"round{t}_global.safetensors"),
        )
        clients = []
        for pid, count, tensors in rec["updates"]:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                str(path / f"round{t}_client{pid}.safetensors"),
            )
            clients.append({"partition_id": pid, "num_examples": count})
        meta.append({"round": t, "lora_alpha": rec["lora_alpha"], "clients": clients})
    (path / "meta.json").write_text(json.dumps(meta, indent=1))


def _load(path: Path) -> list[dict[str, Any]]:
    out = []
    for rec in json.loads((path / "meta.json").read_text()):
        t = rec["round"]
        updates = [
            (
                c["partition_id"],
                c["num_examples"],
                load_file(str(path / f"round{t}_client{c['partition_id']}.safetensors")),
            )
            for c in rec["clients"]
        ]
        out.append(
            {
                "round": t,
                "lora_alpha": rec["lora_alpha"],
                "global": load_file(str(path / f"round{t}_global.safetensors")),
                "updates": updates,
            }
        )
    return out


def real_updates(alpha: float, rounds: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Captured uploads of ``rounds`` rounds of the embedded task (trained once, cached;
    a cache of more rounds serves fewer)."""
    path = _cache_path(args.cache, alpha, args)
    if (path / "meta.json").exists():
        cached = _load(path)
        if len(cached) >= rounds:
            return cached[:rounds]
    from fedpeft.flower.inprocess import run_in_process
    from fedpeft.registry import available_strategies

    if PROBE not in available_strategies():
        register_strategy(PROBE, config_cls=ProbeConfig, build=_build_probe, summary="bench probe")
    _CAPTURED.clear()
    flat = {
        "seed": args.seed,
        "strategy.name": PROBE,
        "data.partition": "dirichlet",
        "data.alpha": alpha,
        "federation.rounds": rounds,
        "federation.clients": args.clients,
        "train.local-steps": args.steps,
        "train.batch-size": 16,
        "train.lr": 5e-4,
        "eval.server": False,
        "output.dir": str(path / "run"),
        "output.save-adapter": False,
    }
    start = time.perf_counter()
    run_in_process(flat)
    print(
        f"  trained α={alpha}: {rounds} round(s) in {time.perf_counter() - start:.0f} s", flush=True
    )
    captured = list(_CAPTURED)
    _save(path, captured)
    return captured


def _as_updates(rec: dict[str, Any]) -> list[ClientUpdate]:
    out = []
    for pid, count, tensors in rec["updates"]:
        rank = next(int(v.shape[0]) for k, v in tensors.items() if k.endswith("lora_A.weight"))
        plan = ClientPlan(node_id=pid, partition_id=pid, rank=rank, seed=pid)
        out.append(ClientUpdate(pid, tensors, count, {}, plan))
    return out


# -- table ------------------------------------------------------------------------------------


def summarise(rows: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Means over the problems of one family, per candidate, and the ``ok`` counts."""
    out: dict[str, dict[str, float]] = {}
    for name in CANDIDATES:
        ms = [r[name] for r in rows]
        err0 = [m["lora_fair/relative_error_before"] for m in ms]
        err1 = [m["lora_fair/relative_error_after"] for m in ms]
        rat0 = [m["lora_fair/norm_ratio_before"] for m in ms]
        rat1 = [m["lora_fair/norm_ratio"] for m in ms]
        ok = sum(
            e1 < e0 and q1 >= q0 - 1e-12
            for e0, e1, q0, q1 in zip(err0, err1, rat0, rat1, strict=True)
        )
        out[name] = {
            "err0": statistics.fmean(err0),
            "err1": statistics.fmean(err1),
            "ratio0": statistics.fmean(rat0),
            "ratio1": statistics.fmean(rat1),
            "ok": ok,
            "n": len(ms),
        }
    return out


def table(families: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Markdown table: one row per family, ``err / ratio / ok`` per candidate."""
    head = "| family | n | FedIT err | FedIT ratio | " + " | ".join(
        f"{c}: err, ratio, ok" for c in CANDIDATES
    )
    lines = [head + " |", "| --- | ---: | ---: | ---: |" + " ---: |" * len(CANDIDATES)]
    for fam, s in families.items():
        first = next(iter(s.values()))
        cells = [f"{v['err1']:.3f}, {v['ratio1']:.3f}, {v['ok']}/{v['n']}" for v in s.values()]
        lines.append(
            f"| {fam} | {first['n']} | {first['err0']:.3f} | {first['ratio0']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 clients, rank 8; 1 round")
    parser.add_argument("--rounds", type=int, default=1, help="real rounds (1 with --quick)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--alphas", default="0.1,0.5", help="Dirichlet α of the real runs")
    parser.add_argument("--no-real", action="store_true", help="random problems only")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench_lora_fair_objectives"))
    parser.add_argument("--json", type=Path, help="also write the summaries here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds, grid = ((0,), [(4, 8)]) if args.quick else ((0, 1, 2), [(2, 8), (4, 16), (8, 4)])
    rounds = 1 if args.quick else args.rounds

    families: dict[str, dict[str, dict[str, float]]] = {}
    start = time.perf_counter()
    for family, scale in itertools.product(("indep", "shared"), SCALES):
        rows = []
        for seed, (n, r) in itertools.product(seeds, grid):
            glob, updates = random_problem(family, scale, n, r, seed=1000 * seed + 10 * n + r)
            rows.append(evaluate(glob, updates, lora_alpha=2.0 * r))
        families[f"{family} {scale:g}"] = summarise(rows)
    print(f"random problems: {time.perf_counter() - start:.0f} s", flush=True)
    print("\n".join(table(families)), flush=True)

    if not args.no_real:
        for alpha in (float(a) for a in args.alphas.split(",")):
            for rec in real_updates(alpha, rounds, args):
                ups = _as_updates(rec)
                families[f"real α={alpha:g} round {rec['round']}"] = summarise(
                    [evaluate(rec["global"], ups, rec["lora_alpha"])]
                )
    pooled = {
        name: {
            key: (
                sum(f[name][key] for f in families.values())
                if key in ("ok", "n")
                else statistics.fmean(f[name][key] for f in families.values())
            )
            for key in ("err0", "err1", "ratio0", "ratio1", "ok", "n")
        }
        for name in CANDIDATES
    }
    families["mean of the rows above"] = pooled
    print("\nall families:\n" + "\n".join(table(families)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(families, indent=1))


if __name__ == "__main__":
    main()
