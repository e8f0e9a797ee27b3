"""fedpeft ``fedit`` side by side with a plain Flower FedAvg + peft reference app.

The README rule: a number goes into the README only after a side-by-side run against
the reference (``REFERENCE_RESULTS.md``). For each chosen partition this runs, one
after the other on the same machine, in child processes whose whole process tree is
sampled for memory (``bench_scale.TreeSampler``: summed RSS every 0.5 s, summed PSS
and USS every 2 s):

(a) fedpeft exactly as a user runs it — ``fedpeft simulate --strategy fedit …`` on
    Flower's simulation engine (Ray), results read from ``OUT/summary.json``;
(b) the reference app (:mod:`reference_app`, in ``simulations/reference_app/``):
    ``flwr.serverapp.strategy.FedAvg`` on the peft adapter state dict (LoRA A/B and
    the head) in an ``ArrayRecord``, a ClientApp with a plain torch AdamW loop, run
    with the same engine and resources. ``--skip-reference`` prints the published
    figures of ``REFERENCE_RESULTS.md`` instead.

Both see identical data: the tweets, the seeded test set and the client partitions
come from ``fedpeft.tasks`` in both (tokenised and split into fedpeft's disk cache,
``$FEDPEFT_CACHE`` or ``~/.cache/fedpeft``, before the timed runs, so neither pays for
it; the cache key carries ``SPLIT_VERSION``, so splits cached by older code are not reused).
Model init, batch order and dropout are seeded by each implementation its own way.

The reference budget (defaults): 4 clients, all trained every round, 5 rounds × 30
AdamW steps, batch 16, lr 5e-4 constant, max length 64, LoRA r=8 α=16 dropout 0 on
query/value + the head, seed 42, 2,000-tweet test set, centralised evaluation every
round; IID and Dirichlet α=0.1 over labels; one CPU per ClientApp (2 train at a time
on 2 cores). Per run it reports accuracy by round, final test loss, the last round's
client train loss, seconds per round (train + central evaluation), wall time of the
whole child process (Ray start/stop included) and peak memory; a Markdown table, a
PASS/FAIL line for "fedpeft IID final accuracy within 2 points of the reference"
(|difference| ≤ 0.02; against the side-by-side run, or the published 0.6405 with
``--skip-reference``), and ``--out`` JSON with everything. Run:

    python simulations/bench_reference.py                       # ~15 min on 2 cores
    python simulations/bench_reference.py --partitions iid --skip-reference
    python simulations/bench_reference.py --quick               # smoke check, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIM = ROOT / "simulations"
sys.path.insert(0, str(SIM))

from bench_scale import MemoryPeak, TreeSampler, stop_leftovers  # noqa: E402
from reference_app.task import RefConfig  # noqa: E402

TOLERANCE = 0.02
"""Accuracy points (as a fraction) fedpeft's IID final may differ from the reference's."""

PUBLISHED: dict[str, dict[str, Any]] = {
    # REFERENCE_RESULTS.md (plain Flower 1.41 FedAvg + peft on this 2-core machine kind).
    # IID: the re-run of 2026-12-06 (rounds and memory of that run); Dirichlet α=0.1: the
    # results table of 2026-11-23 (accuracy, final test loss, ~56 s per round).
    "iid": {
        "accuracy": [0.200, 0.408, 0.494, 0.5515, 0.6245, 0.6405],
        "test_loss": 0.864,
        "train_loss": 0.90,
        "round_seconds": [56.7, 43.5, 41.0, 41.6, 38.3],
        "wall_seconds": 248.0,
        "peak_rss_bytes": 4614 * 2**20,
        "peak_pss_bytes": round(3.77 * 2**30),
        "bytes_per_client_per_direction": 304_654,
        "note": "flwr run (wall includes the ~21 s SuperLink/Ray fixed cost)",
    },
    "dirichlet": {
        "accuracy": [0.200, 0.4075, 0.4075, 0.4075, 0.4075, 0.4075],
        "test_loss": 1.24,
        "train_loss": None,
        "round_seconds": [56.0] * 5,
        "wall_seconds": None,
        "peak_rss_bytes": None,
        "peak_pss_bytes": None,
        "bytes_per_client_per_direction": 304_654,
        "note": "~56 s per round; client sizes 204/3,019/18,866/14,069 (its own split)",
    },
}


@dataclass(frozen=True)
class Budget:
    """One run's budget (shared by both implementations)."""

    model: str = "minilm"
    clients: int = 4
    rounds: int = 5
    steps: int = 30
    batch_size: int = 16
    lr: float = 5e-4
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    max_length: int = 64
    test_size: int = 2000
    eval_batch_size: int = 64
    dirichlet_alpha: float = 0.1
    seed: int = 42

    def fedpeft_sets(self, partition: str) -> list[str]:
        """``--set`` overrides of ``fedpeft simulate`` for this budget."""
        sets = {
            "model.name": self.model,
            "model.max-length": self.max_length,
            "lora.r": self.r,
            "lora.alpha": self.alpha,
            "lora.dropout": self.dropout,
            "lora.target-modules": "query,value",
            "train.local-steps": self.steps,
            "train.batch-size": self.batch_size,
            "train.lr": self.lr,
            "data.partition": partition,
            "data.test-size": self.test_size,
            "eval.batch-size": self.eval_batch_size,
            "simulation.cpus-per-client": 1,
        }
        if partition == "dirichlet":
            sets["data.alpha"] = self.dirichlet_alpha
        return [f"{k}={v}" for k, v in sets.items()]

    def reference(self, partition: str, out: pathlib.Path) -> RefConfig:
        """The reference app's config for this budget."""
        return RefConfig(
            model=self.model,
            max_length=self.max_length,
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            targets=("query", "value"),
            clients=self.clients,
            rounds=self.rounds,
            local_steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            partition=partition,
            dirichlet_alpha=self.dirichlet_alpha,
            test_size=self.test_size,
            eval_batch_size=self.eval_batch_size,
            seed=self.seed,
            out=str(out),
        )

    @property
    def is_reference(self) -> bool:
        """Whether this is the budget the published figures were measured with."""
        return self == Budget()


def child_env() -> dict[str, str]:
    """Environment of both children: offline, quiet, ``reference_app`` importable by
    the Ray actors (they inherit ``PYTHONPATH``)."""
    env = dict(os.environ)
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SIM), env.get("PYTHONPATH", "")) if p)
    env.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_OFFLINE": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_DEDUP_LOGS": "0",
        }
    )
    return env


def prepare_data(budget: Budget, partitions: list[str]) -> dict[str, list[int]]:
    """Tokenise the corpus and cut the test set and partitions into fedpeft's disk
    cache (untimed); return the client training-set sizes per partition."""
    from fedpeft.config import parse_run_config
    from fedpeft.tasks import get_task

    sizes = {}
    for partition in partitions:
        data_config = budget.reference(partition, ROOT).data_config()
        task = get_task(parse_run_config(data_config))
        task.test_data()
        sizes[partition] = [
            len(task.client_data(pid, budget.clients)[0]) for pid in range(budget.clients)
        ]
    return sizes


def run_sampled(
    cmd: list[str], env: dict[str, str], log_path: pathlib.Path
) -> tuple[int, MemoryPeak, float]:
    """Run ``cmd`` with its process tree sampled; return ``(exit status, peaks, wall s)``.
    Processes of the tree still alive a second after the child exited (Ray stragglers)
    are stopped by PID."""
    import psutil

    started = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        with TreeSampler(child.pid) as sampler:
            code = child.wait()
    wall = time.perf_counter() - started
    time.sleep(1.0)
    left = [pid for pid in sampler.leftovers() if pid != child.pid]
    if left:
        names = []
        for pid in left:
            try:
                names.append(f"{pid} {psutil.Process(pid).name()}")
            except psutil.Error:
                names.append(str(pid))
        print(f"  note: {len(left)} processes outlived the run; stopping them: {names}")
        stop_leftovers(left)
    return code, sampler.peak, wall


def normalise(
    label: str,
    impl: str,
    partition: str,
    rounds: list[dict[str, Any]],
    peak: MemoryPeak | None,
    wall: float | None,
    per_client_bytes: int | None,
) -> dict[str, Any]:
    """One run's figures in a common shape."""
    trained = [r for r in rounds if r["round"] > 0]
    seconds = [float(r["seconds"]) for r in trained]
    return {
        "run": label,
        "implementation": impl,
        "partition": partition,
        "accuracy": [r.get("accuracy") for r in rounds],
        "final_accuracy": rounds[-1].get("accuracy") if rounds else None,
        "test_loss": [r.get("loss") for r in rounds],
        "final_test_loss": rounds[-1].get("loss") if rounds else None,
        "final_train_loss": trained[-1].get("train_loss") if trained else None,
        "round_seconds": seconds,
        "mean_round_seconds": statistics.mean(seconds) if seconds else None,
        "wall_seconds": wall,
        "peak_rss_bytes": peak.rss if peak else None,
        "peak_pss_bytes": (peak.pss or None) if peak else None,
        "peak_uss_bytes": (peak.uss or None) if peak else None,
        "max_processes": peak.processes if peak else None,
        "bytes_per_client_per_direction": per_client_bytes,
    }


def run_fedpeft(
    budget: Budget, partition: str, work: pathlib.Path, env: dict[str, str]
) -> dict[str, Any]:
    """(a) ``fedpeft simulate`` as a user runs it."""
    out = work / f"fedpeft-{partition}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "fedpeft.cli",
        "simulate",
        "--strategy",
        "fedit",
        "--rounds",
        str(budget.rounds),
        "--clients",
        str(budget.clients),
        "--seed",
        str(budget.seed),
        "--out",
        str(out),
        "--quiet",
    ]
    cmd += [a for s in budget.fedpeft_sets(partition) for a in ("--set", s)]
    print(f"fedpeft {partition}: {' '.join(cmd[1:])}", flush=True)
    code, peak, wall = run_sampled(cmd, env, work / f"fedpeft-{partition}.log")
    summary_path = out / "summary.json"
    if code != 0 or not summary_path.exists():
        raise SystemExit(
            f"fedpeft {partition} failed (exit {code}); see {work / f'fedpeft-{partition}.log'}"
        )
    rounds = json.loads(summary_path.read_text())["rounds"]
    first = next((r for r in rounds if r["round"] == 1), {})
    per_client = (
        first.get("uplink_bytes", 0) // max(first.get("sampled", 0) or budget.clients, 1) or None
    )
    result = normalise(
        f"fedpeft fedit {partition}", "fedpeft", partition, rounds, peak, wall, per_client
    )
    result["directory"] = str(out)
    return result


def run_reference(
    budget: Budget, partition: str, work: pathlib.Path, env: dict[str, str]
) -> dict[str, Any]:
    """(b) the plain Flower FedAvg + peft reference app, same engine and resources."""
    out = work / f"reference-{partition}"
    shutil.rmtree(out, ignore_errors=True)
    cfg_path = work / f"reference-{partition}.json"
    cfg_path.write_text(budget.reference(partition, out).to_json())
    cmd = [sys.executable, "-m", "reference_app.run", str(cfg_path)]
    print(f"reference {partition}: {' '.join(cmd[1:])}", flush=True)
    code, peak, wall = run_sampled(cmd, env, work / f"reference-{partition}.log")
    summary_path = out / "summary.json"
    if code != 0 or not summary_path.exists():
        raise SystemExit(
            f"reference {partition} failed (exit {code}); see {work / f'reference-{partition}.log'}"
        )
    summary = json.loads(summary_path.read_text())
    result = normalise(
        f"reference {partition}",
        "reference",
        partition,
        summary["rounds"],
        peak,
        wall,
        summary.get("bytes_per_client_per_direction"),
    )
    result["directory"] = str(out)
    return result


def published(partition: str) -> dict[str, Any]:
    """The figures of ``REFERENCE_RESULTS.md`` in the common shape."""
    p = PUBLISHED[partition]
    return {
        "run": f"reference {partition} (published)",
        "implementation": "reference-published",
        "partition": partition,
        "accuracy": p["accuracy"],
        "final_accuracy": p["accuracy"][-1],
        "test_loss": None,
        "final_test_loss": p["test_loss"],
        "final_train_loss": p["train_loss"],
        "round_seconds": p["round_seconds"],
        "mean_round_seconds": statistics.mean(p["round_seconds"]),
        "wall_seconds": p["wall_seconds"],
        "peak_rss_bytes": p["peak_rss_bytes"],
        "peak_pss_bytes": p["peak_pss_bytes"],
        "peak_uss_bytes": None,
        "max_processes": None,
        "bytes_per_client_per_direction": p["bytes_per_client_per_direction"],
        "note": p["note"],
    }


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _gib(n: int | None) -> str:
    return "–" if not n else f"{n / 2**30:.2f} GiB"


def render(runs: list[dict[str, Any]]) -> str:
    """The Markdown table."""
    last = max(len(r["accuracy"]) - 1 for r in runs)
    lines = [
        f"| run | acc r0…r{last} | final | test loss | train loss | s/round | wall s "
        "| peak RSS | peak PSS |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        cells = [
            r["run"],
            ", ".join(_f(a, ".4f") for a in r["accuracy"]),
            _f(r["final_accuracy"], ".4f"),
            _f(r["final_test_loss"], ".3f"),
            _f(r["final_train_loss"], ".3f"),
            _f(r["mean_round_seconds"], ".1f"),
            _f(r["wall_seconds"], ".0f"),
            _gib(r["peak_rss_bytes"]),
            _gib(r["peak_pss_bytes"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check(runs: list[dict[str, Any]], budget: Budget) -> dict[str, Any] | None:
    """fedpeft's IID final accuracy against the side-by-side reference (or the
    published figure when the reference was not run and the budget is the reference's).
    Only a run at the reference budget gives PASS/FAIL; smaller budgets give "info"."""
    ours = next(
        (r for r in runs if r["implementation"] == "fedpeft" and r["partition"] == "iid"), None
    )
    if ours is None:
        return None
    side = next(
        (r for r in runs if r["implementation"] == "reference" and r["partition"] == "iid"), None
    )
    if side is not None:
        ref, source = side["final_accuracy"], "the side-by-side reference run"
    elif budget.is_reference:
        ref, source = (
            PUBLISHED["iid"]["accuracy"][-1],
            "the published reference (REFERENCE_RESULTS.md)",
        )
    else:
        return {
            "status": "n/a",
            "line": "n/a: fedpeft IID vs reference needs the reference budget "
            "or a side-by-side reference run (not --skip-reference with --quick/--rounds/--steps)",
        }
    diff = ours["final_accuracy"] - ref
    if budget.is_reference:
        status = "PASS" if abs(diff) <= TOLERANCE else "FAIL"
        limit = f"limit ±{TOLERANCE * 100:.0f}"
    else:  # a few steps from different initial heads: noise, not a verdict
        status, limit = "INFO", "no verdict: not the reference budget"
    line = (
        f"{status}: fedpeft IID final accuracy {ours['final_accuracy']:.4f} vs "
        f"{ref:.4f} from {source}: {diff * 100:+.2f} points ({limit})"
    )
    return {
        "status": status,
        "fedpeft": ours["final_accuracy"],
        "reference": ref,
        "source": source,
        "difference": diff,
        "tolerance": TOLERANCE,
        "line": line,
    }


def _meta(budget: Budget, sizes: dict[str, list[int]], skip: bool) -> dict[str, Any]:
    import platform

    import psutil

    versions = {}
    for name in ("flwr", "torch", "peft", "transformers"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001 - a missing version is only reported
            versions[name] = None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "load_average_at_end": os.getloadavg(),
        "versions": versions,
        "budget": asdict(budget),
        "reference_budget": budget.is_reference,
        "client_train_sizes": sizes,
        "reference": "published figures" if skip else "run side by side",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--partitions", default="iid,dirichlet", help="comma-separated: iid, dirichlet"
    )
    parser.add_argument("--rounds", type=int, help="override the 5 rounds")
    parser.add_argument("--steps", type=int, help="override the 30 local steps")
    parser.add_argument(
        "--quick", action="store_true", help="smoke check: 2 rounds x 2 steps, 200-tweet test set"
    )
    parser.add_argument("--model", default="minilm", choices=["minilm", "tiny-bert"])
    parser.add_argument(
        "--skip-reference",
        action="store_true",
        help="print the published reference figures instead of running the reference app",
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=ROOT / "reports" / "bench_reference.json"
    )
    parser.add_argument(
        "--work",
        type=pathlib.Path,
        help="run directories and logs (default: next to --out, <out stem>/)",
    )
    args = parser.parse_args()

    partitions = [p.strip() for p in args.partitions.split(",") if p.strip()]
    unknown = [p for p in partitions if p not in PUBLISHED]
    if unknown or not partitions:
        parser.error(f"--partitions: choose from iid, dirichlet; got {args.partitions!r}")
    budget = Budget(model=args.model)
    if args.quick:
        budget = replace(budget, rounds=2, steps=2, test_size=200)
    if args.rounds is not None:
        budget = replace(budget, rounds=args.rounds)
    if args.steps is not None:
        budget = replace(budget, steps=args.steps)
    work = (args.work or args.out.with_suffix("")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"budget: {asdict(budget)}", flush=True)
    print("preparing data (tokenise, test set, partitions; untimed) …", flush=True)
    sizes = prepare_data(budget, partitions)
    for partition, s in sizes.items():
        print(f"  {partition}: client train sizes {s}")
    env = child_env()

    runs: list[dict[str, Any]] = []
    for partition in partitions:
        runs.append(run_fedpeft(budget, partition, work, env))
        print(f"  done in {runs[-1]['wall_seconds']:.0f} s", flush=True)
        if args.skip_reference:
            runs.append(published(partition))
        else:
            runs.append(run_reference(budget, partition, work, env))
            print(f"  done in {runs[-1]['wall_seconds']:.0f} s", flush=True)

    table = render(runs)
    result = check(runs, budget)
    print()
    print(
        f"{budget.clients} clients, {budget.rounds} rounds x {budget.steps} steps, "
        f"batch {budget.batch_size}, "
        f"lr {budget.lr}, LoRA r={budget.r} alpha={budget.alpha:g} on query,value + head, "
        f"{budget.test_size}-tweet test set, seed {budget.seed}, {budget.model}"
    )
    if not budget.is_reference:
        print(
            "(not the reference budget: the published figures below were measured "
            "with 5 rounds x 30 steps)"
            if args.skip_reference
            else "(not the reference budget)"
        )
    print(
        "s/round = mean over rounds of train + central evaluation; wall = the whole child process; "
        "peak RSS/PSS = max over samples of the sum over its process tree"
    )
    print(table, end="")
    if result is not None:
        print(result["line"])
    payload = {
        "meta": _meta(budget, sizes, args.skip_reference),
        "runs": runs,
        "check": result,
        "published": PUBLISHED,
        "table": table,
    }
    args.out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"figures → {args.out}; runs and logs → {work}")
    if result is not None and result["status"] == "FAIL":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
