"""Benchmark the server cost of each robust aggregation rule (issue 22: "the cost of each
defence … server time").

Run: ``python simulations/bench_robust.py [--clients 10,100] [--repeats 7] [--json FILE]``

The attack matrix's server seconds per round (round wall time minus the clients' own
seconds) mix the aggregation with receiving, validating and evaluating, and with
whatever else the cores were doing, so they cannot rank the defences. This script
times the aggregation alone, all rules in one run on the same inputs: FedIT (the
attack matrix's strategy) inside the layers ``fedpeft simulate`` builds
(``fedpeft.aggregation.layers.stack``) for each ``aggregation.robust`` value and the
norm clip, on ``n`` client updates of MiniLM's LoRA shapes (r = 8 on query/value plus
the 3-class head, 75,267 numbers: ``bench_codec_micro.minilm_lora``), 20 % of them
sign-flipped. Printed per rule and ``n``: the median seconds of one ``aggregate`` call
over ``--repeats`` runs (after a warm-up) and the ratio to the plain mean (``none``).
Parameters follow the attack matrix at 20 % attackers (``trimmed-mean`` β = 0.2,
``krum`` / ``multi-krum`` f = 0.2·n lowered to what Krum accepts, ``cosine-filter`` τ = 0,
clip at the median update norm).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
from typing import Any

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from attack_matrix import attacker_count, defence_keys  # noqa: E402
from bench_codec_micro import median_seconds, minilm_lora  # noqa: E402

RULES = ("none", "clip", "median", "trimmed-mean", "geomed", "krum", "multi-krum", "cosine-filter")


def rule_keys(rule: str, clients: int, clip: float) -> dict[str, Any]:
    """The config keys of ``rule`` for ``clients`` updates with 20 % attackers: the
    attack matrix's own parameters (:func:`attack_matrix.defence_keys`)."""
    return defence_keys(rule, attacker_count(0.2, clients), clients, clip)[1]


def updates_for(clients: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """``(global adapter, one update per client)``: each honest change is a direction
    shared by all (norm 1) plus the client's own noise (norm ≈ 0.8), ≈ 1.3 in all (the
    attack matrix's median honest update norm); the first 20 % of clients send their
    change negated (sign-flip)."""
    from fedpeft.types import ClientPlan, ClientUpdate

    g = torch.Generator().manual_seed(seed)
    global_tensors = minilm_lora(g)
    d = sum(v.numel() for v in global_tensors.values())
    shared = {key: torch.randn(v.shape, generator=g) / d**0.5 for key, v in global_tensors.items()}
    bad = attacker_count(0.2, clients)
    out = []
    for k in range(clients):
        change = {key: shared[key] + torch.randn(v.shape, generator=g) * 0.8 / d**0.5
                  for key, v in global_tensors.items()}
        if k < bad:
            change = {key: -c for key, c in change.items()}
        out.append(ClientUpdate(
            node_id=k + 1,
            tensors={key: global_tensors[key] + change[key] for key in global_tensors},
            num_examples=100,
            metrics={},
            plan=ClientPlan(node_id=k + 1, partition_id=k, rank=8, seed=k),
            received=dict(global_tensors),
        ))
    return global_tensors, out


def measure(clients: int, repeats: int) -> list[dict[str, Any]]:
    """One row per rule: median seconds of one aggregation and the ratio to ``none``."""
    from fedpeft.aggregation.layers import stack
    from fedpeft.config import parse_run_config
    from fedpeft.server.setup import build_strategy

    global_tensors, updates = updates_for(clients)
    norms = [
        sum(float(((u.tensors[k] - u.received[k]) ** 2).sum()) for k in u.tensors) ** 0.5 for u in updates
    ]
    clip = statistics.median(norms)
    rows = []
    for rule in RULES:
        keys = {"strategy.name": "fedit", "federation.clients": clients, "validation.norm-factor": 0.0,
                **rule_keys(rule, clients, clip)}
        cfg = parse_run_config(keys)
        fed, _, _ = build_strategy(cfg)
        aggregator = stack(fed.aggregator, clip_norm=cfg.validation.clip_norm, robust=cfg.aggregation.robust)
        state = aggregator.initialize(global_tensors)
        out = aggregator.aggregate(state, global_tensors, updates, 1)
        seconds = median_seconds(lambda a=aggregator, s=state: a.aggregate(s, global_tensors, updates, 1), repeats)
        rows.append({
            "clients": clients, "rule": cfg.aggregation.robust if rule not in ("none", "clip") else rule,
            "seconds": seconds, "left_out": sorted(out.rejected),  # node ids; the attackers are 1..m
        })
    base = rows[0]["seconds"]
    for row in rows:
        row["ratio"] = row["seconds"] / base
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| clients | rule | ms per aggregation | × plain mean | updates left out |",
        "|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['rule']} | {1000 * r['seconds']:.2f} | {r['ratio']:.1f} | {len(r['left_out'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="10,100", help="updates per round, comma-separated")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [row for n in args.clients.split(",") for row in measure(int(n), args.repeats)]
    print(markdown(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
