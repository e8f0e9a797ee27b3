"""Fault matrix: inject each fault into a small run and report whether it was survived.

Runs in-process (no Ray) on a tiny random BERT so the whole matrix takes about a
minute; ``tests/test_faults.py`` runs the same matrix and asserts every row. Run:

    python simulations/fault_matrix.py [--json PATH]

"Survived" means: the run finished every round (or stopped cleanly when it had to),
every global tensor is finite, the bad update never reached the aggregate, and the
final loss is within 0.05 of the fault-free run's.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

BASE: dict[str, Any] = {
    "model.name": "tiny-bert",
    "data.max-examples": 48,
    "data.test-size": 120,
    "train.local-steps": 3,
    "train.batch-size": 8,
    "train.lr": 5e-3,
    "federation.rounds": 2,
    "federation.clients": 4,
    "output.save-adapter": False,
}


@dataclass(frozen=True)
class Case:
    """One row: a name, config overrides and an optional reply tamperer."""

    name: str
    overrides: dict[str, Any]
    tamper: Callable[[int, Any, Any], Any] | None = None
    expect: str = "rejected"  # which counter must be > 0: rejected | failed | none


def _corrupt(how: str) -> Callable[[int, Any, Any], Any]:
    from flwr.app import Array

    from fedpeft.flower import records as rec

    def tamper(partition_id: int, instruction: Any, reply: Any) -> Any:
        if partition_id != 1 or reply.has_error():
            return reply
        arrays = reply.content[rec.ARRAYS]
        keys = list(arrays.keys())
        key = next(k for k in keys if "lora_A" in k)
        value = arrays[key].numpy().copy()
        if how == "nan":
            value.flat[0] = np.nan
        elif how == "inf":
            value.flat[-1] = np.inf
        elif how == "shape":
            value = value[:, :-1]
        elif how == "rank":
            value = value[:-2, :]
        elif how == "unknown-key":
            arrays["base_model.model.evil.weight"] = Array(value)
            return reply
        elif how == "scaled":
            for k in keys:
                arrays[k] = Array(arrays[k].numpy() * 1e6)
            return reply
        elif how == "oversized":
            arrays["aux.padding"] = Array(np.zeros(200_000, dtype=np.float32))
            return reply
        arrays[key] = Array(value)
        return reply

    return tamper


def cases() -> list[Case]:
    """Every fault of the matrix."""
    return [
        Case("none", {}, expect="none"),
        Case("NaN update", {}, _corrupt("nan")),
        Case("Inf update", {}, _corrupt("inf")),
        Case("wrong shape", {}, _corrupt("shape")),
        Case("wrong rank", {}, _corrupt("rank")),
        Case("unknown key", {}, _corrupt("unknown-key")),
        Case("scaled by 1e6", {}, _corrupt("scaled")),
        Case("oversized", {"validation.max-update-bytes": 400_000}, _corrupt("oversized")),
        Case("drop 30%", {"faults.drop-rate": 0.3, "federation.min-replies": 2}, expect="failed"),
        Case("crash 30%", {"faults.crash-rate": 0.3, "federation.min-replies": 2}, expect="failed"),
        Case("slow 30% (+0.2 s)", {"faults.slow-rate": 0.3, "faults.slow-seconds": 0.2,
                                    "federation.min-replies": 2}, expect="none"),
    ]


def run_case(case: Case, out_root: pathlib.Path) -> dict[str, Any]:
    """Run one case; return its row."""
    import torch

    from fedpeft.flower.inprocess import run_in_process
    from fedpeft.tasks.model import _CACHE

    flat = {**BASE, **case.overrides, "output.dir": str(out_root / case.name.replace(" ", "_"))}
    results = run_in_process(flat, tamper=case.tamper)
    rows = results.rounds
    rejected = sum(r.get("rejected", 0) for r in rows)
    failed = sum(r.get("failed", 0) for r in rows)
    finite = all(
        bool(torch.isfinite(p).all())
        for key, m in _CACHE.items()
        if isinstance(key, tuple) and len(key) > 4 and key[4] == "model"
        for p in m.params.values()
    )
    injected = {"none": rejected + failed == 0, "rejected": rejected > 0, "failed": failed > 0}[case.expect]
    return {
        "fault": case.name,
        "rounds": len(rows) - 1,
        "rejected": rejected,
        "failed": failed,
        "final_loss": rows[-1]["loss"],
        "finite": finite,
        "injected": injected,
    }


def run_matrix(out_root: pathlib.Path) -> list[dict[str, Any]]:
    """Every case, with ``survived`` judged against the fault-free run."""
    rows = [run_case(c, out_root) for c in cases()]
    clean = rows[0]["final_loss"]
    for row in rows:
        row["survived"] = bool(
            row["rounds"] == BASE["federation.rounds"]
            and row["finite"]
            and row["injected"]
            and math.isfinite(row["final_loss"])
            and abs(row["final_loss"] - clean) <= 0.05
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_matrix(pathlib.Path(tmp))
    print("| fault | rounds | rejected | failed | final loss | survived |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['rounds']} | {r['rejected']} | {r['failed']} | "
              f"{r['final_loss']:.4f} | {'yes' if r['survived'] else 'NO'} |")
    print(f"{sum(r['survived'] for r in rows)} of {len(rows)} faults survived")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
