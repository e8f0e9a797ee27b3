"""Scale benchmark: many virtual clients on Flower's simulation engine (Ray backend).

For every variant of a preset (``simulations/presets/scale.toml``: 1,000 clients, 10 per
round, 5 rounds, FedIT and LoRA-FAIR) this runs ``fedpeft simulate`` in a child process
and, while it runs, samples the child's whole process tree (driver with the ServerApp,
Ray's GCS/raylet/agents, ClientApp actors) every 0.5 s with psutil. It reports:

* peak RSS: the maximum over samples of the sum of RSS over the tree (pages shared
  between processes — torch's libraries, Ray's object store — are counted once per
  process, so this over-counts); also the peak of the PSS sum (shared pages split
  between their users, the honest "machine memory" figure) and of the USS sum
  (private pages only), sampled every 2 s because they cost a read of smaps;
* seconds per round (``summary.json``; round time = sending, training of the sampled
  clients, aggregation and central evaluation);
* the overhead ratio: round time / bare training time of the same sampled clients,
  where bare = ``local_train`` of those clients one after another in this process
  (no Flower, no Ray, torch on every core), measured in the same benchmark run after
  the simulations. Clients are sampled by partition id with a seeded generator, so
  every variant trains the same clients and one bare measurement serves all.

Then it writes ``OUT/scale.json``, ``OUT/scale.md`` and a ``fedpeft compare`` report
(``OUT/report.md``) and prints PASS/FAIL against the preset's ``[expect.LABEL]``
accuracies and ``[scale]`` limits (exit status 1 on a FAIL). Run:

    python simulations/bench_scale.py simulations/presets/scale.toml --out runs/scale
    python simulations/bench_scale.py simulations/presets/scale.toml --out runs/scale \\
        --only fedit --set federation.rounds=2          # a quicker look
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import asdict, dataclass, field
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "simulations"))

from sweep import check, load_expectations, load_preset  # noqa: E402


@dataclass
class MemoryPeak:
    """Peaks of the process-tree memory sums, in bytes."""

    rss: int = 0
    pss: int = 0
    uss: int = 0
    processes: int = 0
    samples: int = 0
    seen_pids: set[int] = field(default_factory=set)


class TreeSampler:
    """Sample the memory of ``pid`` and all its descendants in a thread.

    Args:
        pid: root of the tree.
        interval: seconds between RSS samples.
        full_every: take PSS/USS (``memory_full_info``) every this many samples.
    """

    def __init__(self, pid: int, interval: float = 0.5, full_every: int = 4) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.full_every = full_every
        self.peak = MemoryPeak()
        self.created: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _tree(self) -> list[Any]:
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _loop(self) -> None:
        import psutil

        n = 0
        while not self._stop.is_set():
            procs = self._tree()
            rss = pss = uss = 0
            full = n % self.full_every == 0
            for proc in procs:
                try:
                    if full:
                        info = proc.memory_full_info()
                        pss += getattr(info, "pss", 0)
                        uss += info.uss
                        rss += info.rss
                    else:
                        rss += proc.memory_info().rss
                    if proc.pid not in self.created:
                        self.created[proc.pid] = proc.create_time()
                except psutil.Error:
                    continue
            p = self.peak
            p.rss, p.processes = max(p.rss, rss), max(p.processes, len(procs))
            if full:
                p.pss, p.uss = max(p.pss, pss), max(p.uss, uss)
            p.samples += 1
            p.seen_pids.update(proc.pid for proc in procs)
            n += 1
            self._stop.wait(self.interval)

    def leftovers(self) -> list[int]:
        """PIDs seen in the tree that are still alive (same process, by start time)."""
        import psutil

        alive = []
        for pid, created in self.created.items():
            try:
                if psutil.Process(pid).create_time() == created:
                    alive.append(pid)
            except psutil.Error:
                continue
        return alive


def run_child(flat: dict[str, Any], log_path: pathlib.Path) -> tuple[int, MemoryPeak, float, list[int]]:
    """``fedpeft simulate`` with ``flat`` in a child process, sampled; return
    ``(exit status, memory peaks, wall seconds, leftover pids)``."""
    cfg_path = log_path.with_suffix(".config.json")
    cfg_path.write_text(json.dumps(flat))
    env = dict(os.environ)
    env.setdefault("RAY_DEDUP_LOGS", "0")
    started = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", str(cfg_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        with TreeSampler(child.pid) as sampler:
            code = child.wait()
    wall = time.perf_counter() - started
    time.sleep(1.0)
    left = [pid for pid in sampler.leftovers() if pid != child.pid]
    return code, sampler.peak, wall, left


def stop_leftovers(pids: list[int]) -> None:
    """Terminate processes this benchmark started that outlived their run (by PID)."""
    import psutil

    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def bare_training(flat: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[int, list[float]]:
    """``{round: [seconds per sampled client]}``: ``local_train`` of each round's
    sampled clients in this process, no Flower, torch on every core."""
    import torch

    from fedpeft.config import parse_run_config
    from fedpeft.seeding import derive_seed
    from fedpeft.tasks import get_task

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = parse_run_config(flat)
    task = get_task(cfg)
    model = task.model(cfg.lora.max_rank)
    trainable = frozenset(model.initial)
    num = cfg.federation.clients
    out: dict[int, list[float]] = {}
    for record in rounds:
        server_round = int(record["round"])
        if server_round == 0:
            continue
        times = []
        for client in record.get("clients", []):
            pid = int(client["partition_id"])
            train, _ = task.client_data(pid, num)  # data preparation is not training
            model.load(model.initial)
            started = time.perf_counter()
            task.train(model, train, trainable, derive_seed(cfg.seed, "bare", server_round, pid))
            times.append(time.perf_counter() - started)
        out[server_round] = times
    return out


def _gb(n: float) -> str:
    """Bytes in GiB (2**30 bytes: the unit of the machine's "24 GB" and of the limit)."""
    return f"{n / 2**30:.2f}"


def summarise(
    label: str,
    summary: dict[str, Any],
    peak: MemoryPeak,
    wall: float,
    bare: dict[int, list[float]],
) -> dict[str, Any]:
    """Figures of one variant."""
    rounds = [r for r in summary["rounds"] if r["round"] > 0]
    per_round = []
    for r in rounds:
        bare_s = sum(bare.get(r["round"], []))
        clients = r.get("clients", [])
        per_round.append(
            {
                "round": r["round"],
                "seconds": r["seconds"],
                "bare_seconds": bare_s,
                "overhead_ratio": r["seconds"] / bare_s if bare_s else None,
                "client_train_seconds": sum(c.get("train-seconds", 0.0) for c in clients),
                "client_seconds": sum(c.get("client-seconds", 0.0) for c in clients),
                "sampled": r.get("sampled"),
                "accuracy": r.get("accuracy"),
            }
        )
    steady = per_round[1:] or per_round
    ratios = [p["overhead_ratio"] for p in steady if p["overhead_ratio"]]
    return {
        "label": label,
        "clients": summary.get("clients"),
        "final_accuracy": summary["rounds"][-1].get("accuracy"),
        "peak_rss_bytes": peak.rss,
        "peak_pss_bytes": peak.pss,
        "peak_uss_bytes": peak.uss,
        "max_processes": peak.processes,
        "memory_samples": peak.samples,
        "wall_seconds": wall,
        "first_round_seconds": per_round[0]["seconds"] if per_round else None,
        "steady_seconds_per_round": statistics.mean(p["seconds"] for p in steady) if steady else None,
        "steady_bare_seconds_per_round": statistics.mean(p["bare_seconds"] for p in steady) if steady else None,
        "steady_overhead_ratio": statistics.median(ratios) if ratios else None,
        "rounds": per_round,
    }


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The figures as a Markdown table (also printed)."""
    lines = [
        f"Scale benchmark — {meta['date']} — {meta['machine']}",
        "",
        f"{meta['clients']} clients, {meta['per_round']} per round, {meta['rounds']} rounds, "
        f"{meta['steps']} local steps × batch {meta['batch']}, {meta['concurrency']} ClientApps "
        f"at a time (simulation.cpus-per-client={meta['cpus_per_client']} of {meta['num_cpus']} CPUs)",
        "",
        "| strategy | final acc | peak RSS sum GiB | peak PSS sum GiB | peak USS sum GiB | processes | "
        "round 1 s | s/round (rounds 2+) | bare s/round | overhead ratio | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        acc = r["final_accuracy"]
        lines.append(
            f"| {r['label']} | {acc:.4f} | {_gb(r['peak_rss_bytes'])} | {_gb(r['peak_pss_bytes'])} | "
            f"{_gb(r['peak_uss_bytes'])} | {r['max_processes']} | {r['first_round_seconds']:.1f} | "
            f"{r['steady_seconds_per_round']:.1f} | {r['steady_bare_seconds_per_round']:.1f} | "
            f"{r['steady_overhead_ratio']:.2f} | {r['wall_seconds']:.0f} |"
            if acc is not None
            else f"| {r['label']} | failed | {_gb(r['peak_rss_bytes'])} | | | | | | | | {r['wall_seconds']:.0f} |"
        )
    lines.append("")
    lines.append("Per round (s): " + "; ".join(
        f"{r['label']}: " + ", ".join(
            f"r{p['round']} {p['seconds']:.1f} (bare {p['bare_seconds']:.1f}, in-client train "
            f"{p['client_train_seconds']:.1f})" for p in r["rounds"])
        for r in results))
    return "\n".join(lines) + "\n"


def check_limits(limits: dict[str, float], results: list[dict[str, Any]]) -> bool:
    """PASS/FAIL per ``[scale]`` limit and variant."""
    ok = True
    for r in results:
        if "peak-rss-gib" in limits:
            got = r["peak_rss_bytes"] / 2**30
            passed = got <= float(limits["peak-rss-gib"])
            ok &= passed
            print(f"{'PASS' if passed else 'FAIL'} {r['label']}: peak RSS {got:.2f} GiB "
                  f"({r['peak_rss_bytes'] / 1e9:.2f} × 10⁹ B, sum over the process tree; "
                  f"PSS {r['peak_pss_bytes'] / 2**30:.2f} GiB), limit {limits['peak-rss-gib']} GiB")
        if "max-overhead-ratio" in limits:
            got = r["steady_overhead_ratio"]
            passed = got is not None and got <= float(limits["max-overhead-ratio"])
            ok &= passed
            print(f"{'PASS' if passed else 'FAIL'} {r['label']}: overhead ratio "
                  f"{got if got is None else round(got, 2)}, limit {limits['max-overhead-ratio']}")
    return ok


def _machine() -> str:
    import platform

    import psutil

    return (f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", type=pathlib.Path, nargs="?")
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument("--only", help="comma-separated variant labels")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one simulation, in the process the parent samples
        from fedpeft.cli import simulate

        simulate(json.loads(pathlib.Path(args.child).read_text()), quiet=True)
        return
    if args.preset is None or args.out is None:
        parser.error("PRESET and --out are required")

    from fedpeft.config import parse_overrides, parse_run_config
    from fedpeft.report import compare, render_terminal_table

    base, variants, seeds = load_preset(args.preset)
    limits = dict(tomllib.loads(args.preset.read_text()).get("scale", {}))
    if args.only:
        wanted = [v.strip() for v in args.only.split(",")]
        variants = {k: v for k, v in variants.items() if k in wanted}
    extra = parse_overrides(args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    seed = seeds[0]
    runs: list[tuple[str, dict[str, Any], pathlib.Path, MemoryPeak, float]] = []
    failed = False
    for label, overrides in variants.items():
        out = (args.out / label).resolve()
        flat = {**base, **overrides, **extra, "seed": seed, "output.dir": str(out)}
        parse_run_config(flat)  # fail before anything starts
        print(f"{label}: simulating ({args.out / (label + '.log')}) …", flush=True)
        code, peak, wall, left = run_child(flat, args.out / f"{label}.log")
        if left:
            print(f"  warning: {len(left)} processes outlived the run; stopping them: {left}")
            stop_leftovers(left)
        print(f"  exit {code}, {wall:.0f} s, peak RSS sum {_gb(peak.rss)} GiB, PSS {_gb(peak.pss)} GiB, "
              f"{peak.processes} processes", flush=True)
        if code != 0 or not (out / "summary.json").exists():
            failed = True
            print(f"  FAILED, see {args.out / (label + '.log')}")
            continue
        runs.append((label, flat, out, peak, wall))
    if not runs:
        raise SystemExit(1)

    first_flat = runs[0][1]
    first_rounds = json.loads((runs[0][2] / "summary.json").read_text())["rounds"]
    print("bare training of the same sampled clients (no Flower) …", flush=True)
    bare = bare_training(first_flat, first_rounds)
    results = []
    for label, flat, out, peak, wall in runs:
        summary = json.loads((out / "summary.json").read_text())
        def sampled_ids(rounds: list[dict[str, Any]]) -> list[list[int]]:
            return [sorted(c["partition_id"] for c in r.get("clients", [])) for r in rounds]

        same = sampled_ids(summary["rounds"]) == sampled_ids(first_rounds)  # replies come in any order
        if not same:
            print(f"  note: {label} sampled other clients than {runs[0][0]}; its ratio uses those of {runs[0][0]}")
        results.append(summarise(label, summary, peak, wall, bare))
    cfg = parse_run_config(first_flat)
    num_cpus = cfg.simulation.num_cpus or os.cpu_count() or 1
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": _machine(),
        "clients": cfg.federation.clients,
        "per_round": cfg.federation.sampled,
        "rounds": cfg.federation.rounds,
        "steps": cfg.train.local_steps,
        "batch": cfg.train.batch_size,
        "cpus_per_client": cfg.simulation.cpus_per_client,
        "num_cpus": num_cpus,
        "concurrency": max(1, num_cpus // cfg.simulation.cpus_per_client),
        "load_average": os.getloadavg(),
    }
    text = render(results, meta)
    (args.out / "scale.md").write_text(text)
    (args.out / "scale.json").write_text(json.dumps(
        {"meta": meta, "results": results, "bare": {str(k): v for k, v in bare.items()},
         "peaks": {label: {k: v for k, v in asdict(peak).items() if k != "seen_pids"}
                   for label, _, _, peak, _ in runs}}, indent=2, default=str))
    print(text, end="")
    report = compare([out for _, _, out, _, _ in runs], args.out / "report")
    print(render_terminal_table(report, width=160), end="")
    print(f"report → {report.markdown_path}; figures → {args.out / 'scale.md'}")
    finals = {label: [json.loads((out / "summary.json").read_text())["rounds"][-1]]
              for label, _, out, _, _ in runs}
    ok = check(load_expectations(args.preset), finals)
    ok &= check_limits(limits, results)
    if failed or not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
