"""Attack matrix (issue 22): accuracy and backdoor success under hostile clients, per
defence, and what each defence costs on clean data.

For every attacker rate of ``--rates`` (share of the 10 clients that attack, the same
seeded set in every round: ``fedpeft.faults.attacker_ids``), every attack of
``--attacks`` (``faults.attack``: ``sign-flip``, ``scale:K``, ``gaussian:σ``,
``same-value``, ``label-flip``, ``backdoor``) and every defence of ``--defences``
(:data:`DEFENCES`: no defence, the norm clip ``validation.clip-norm`` and each rule of
``aggregation.robust``), ``--seeds`` runs; plus clean runs (rate 0) with every defence,
at the parameters it takes at each attacked rate, for its cost on clean data. The clean
runs carry ``faults.attack=backdoor`` with no attacker, so they also measure the
backdoor success rate of an unattacked model (an under-trained model already predicts
the target class for many triggered inputs: that is the baseline a backdoor's success
rate is read against).

Defence parameters follow the number of attackers ``m = round(rate · n)``
(:func:`defence_keys`): ``trimmed-mean:β`` with ``⌊β·n⌋ = m`` (trims as many values
from each side as there are attackers, which may all sit on one side), ``krum:f`` and
``multi-krum:f`` with ``f = m`` — lowered to the largest ``f`` Krum accepts
(``n > 2f + 2``: 3 of 10) when ``m`` is above it, and said so in the report —
``cosine-filter`` at τ = 0, ``median`` and ``geomed`` without a parameter, and the
norm clip at the median norm of the honest updates of the clean no-defence run of the
same seed (``--clip-norm auto``, the default: recorded in that run's
``update-norms.json``; an oracle bound that a deployment would estimate). The default
outlier rejection (``validation.norm-factor``) is off in every run, as in the
reference FedAvg, so "none" is no defence at all.

Budget (the reference's, ``REFERENCE_RESULTS.md``): MiniLM, LoRA r = 8 on query/value
+ head, 10 clients all training every round, IID, 5 rounds × 30 AdamW steps of batch
16 at lr 5e-4 per client, 2,000 test tweets; FedIT (FedAvg of the factors). Every run
goes through the in-process grid (the server and client code of ``fedpeft simulate``,
clients one after another) and has its own directory under ``--out``/runs, reused when
complete: an interrupted matrix continues, and parts can run in parallel processes
(``--attacks a`` in one, ``--attacks b`` in another, then one ``--report-only``).

Report (``--out``/``attacks.md`` and ``attacks.json``), per cell: final accuracy (mean
± std over seeds), its paired difference to the clean no-defence run of the same seed
with its 95 % t-interval, the backdoor success rate (ASR: share of non-target test
inputs classified as the target once the trigger is inserted; flip: the same share
among those the model gets right without the trigger; under ``backdoor`` only; runs
recorded before fedpeft reported the flip are rescored from their last checkpoint:
:func:`with_backdoor_flip`), updates rejected (attackers / honest clients, summed over
rounds) and whether the issue's goal holds: at 20 % attackers the best defence within 2
points of clean and a flip below 10 % (:data:`ASR_GOAL` says why not the ASR); on clean
data a defence costing at most 1 point.
Server time per round: the round's wall time minus the clients' own seconds (clients
train one after another in-process), i.e. receiving, validating, aggregating (the
defence) and evaluating the new global adapter; the round record has no separate
aggregation time. Run:

    python simulations/attack_matrix.py --out reports/attacks                 # hours
    python simulations/attack_matrix.py --quick --out /tmp/attacks            # a minute
    python simulations/attack_matrix.py --rates 0.2 --attacks backdoor --defences none,median
    python simulations/attack_matrix.py --attacks '' --defences clip            # its clean cost only
    python simulations/attack_matrix.py --rates 0.2 --seeds 1,2 --defences multi-krum \
        --no-costs --no-undefended                                           # the defended cells only
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time
from collections.abc import Mapping
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_heterogeneity import NO_OUTLIER_REJECTION, final, paired  # noqa: E402

ATTACKS = ("sign-flip", "scale:10", "gaussian:0.1", "same-value", "label-flip", "backdoor")
"""The attacks of the full matrix (``faults.attack`` values). ``scale:10`` boosts the
update tenfold (Bagdasaryan et al. boost by n/η); ``gaussian:0.1``: per-entry σ far
above a LoRA update's entries (~1e-3 after 30 AdamW steps at 5e-4), chosen so that two
noisy clients would derail a mean — measured (2026-12-07, 20 %, seed 0), they cost the
undefended FedIT only 0.9 point: the honest rounds that follow repair most of it."""

DEFENCES = ("none", "clip", "median", "trimmed-mean", "krum", "multi-krum", "geomed", "cosine-filter")
"""Defence labels: ``none``, the norm clip (``validation.clip-norm``) and every rule of
``aggregation.robust``, parameterised by :func:`defence_keys`."""

SELECTING = ("krum", "multi-krum", "cosine-filter")
"""Defences that drop whole clients (their rejections are counted)."""

CLEAN_DEFENCE = "none"
BACKDOOR = "backdoor"
ACCURACY_GOAL = 0.02
"""At 20 % attackers the best defence stays within 2 points of clean accuracy…"""
ASR_GOAL = 0.10
"""…and keeps the backdoor success rate below 10 %: judged on ``backdoor_flip``, the share
of non-target test inputs the model gets right without the trigger that the trigger
turns to the target. The raw ``backdoor_asr`` (every non-target input) cannot serve: the
target, ``negative``, is the corpus's largest class, and the clean model after 5 rounds
already sends 44 % of triggered non-target inputs there with no attacker at all (its
``backdoor_flip`` is 1.3 %). Both are reported."""
COST_GOAL = 0.01
"""A defence costs at most 1 point on clean data."""
GOAL_RATE = 0.2
"""The attacker rate the goal is stated at (40 %: reported as measured)."""

QUICK = {"rates": "0.2", "attacks": "scale:10,backdoor", "defences": "none,median,multi-krum", "seeds": "0"}
"""The reduced grid of ``--quick`` (what CI runs): 2 attacks × 3 defences at one rate."""


def budget(args: argparse.Namespace) -> dict[str, Any]:
    """Keys every run shares."""
    shared = {
        "strategy.name": "fedit", "data.partition": "iid", "federation.clients": args.clients,
        "output.save-adapter": False, **NO_OUTLIER_REJECTION,
    }
    if args.quick:
        return {
            **shared, "model.name": "tiny-bert", "data.max-examples": 40, "data.test-size": 60,
            "federation.rounds": 2, "train.local-steps": 2, "train.batch-size": 8, "train.lr": 5e-3,
        }
    return {
        **shared, "model.name": "minilm", "model.max-length": 64, "lora.r": 8, "lora.alpha": 16.0,
        "lora.target-modules": "query,value", "data.test-size": 2000, "federation.rounds": args.rounds,
        "train.local-steps": args.steps, "train.batch-size": 16, "train.lr": 5e-4, "eval.batch-size": 64,
    }


# -- defence parameters -------------------------------------------------------------------


def attacker_count(rate: float, clients: int) -> int:
    """How many of ``clients`` attack at ``rate`` (as ``fedpeft.faults.attacker_ids``
    rounds it: halves up)."""
    return min(clients, math.floor(rate * clients + 0.5 + 1e-9))


def max_krum_f(clients: int) -> int:
    """The largest ``f`` Krum accepts with ``clients`` per round (``n > 2f + 2``)."""
    return max(0, (clients - 3) // 2)


def trimmed_beta(attackers: int, clients: int) -> float:
    """The smallest β whose ``⌊β·n⌋`` (as fedpeft computes it, ``int(β * n)``) trims
    ``attackers`` values from each side."""
    beta = attackers / clients
    while int(beta * clients) < attackers:  # 0.29 * 100 = 28.999…: nudge up
        beta = math.nextafter(beta, 1.0)
    return beta


def defence_keys(defence: str, attackers: int, clients: int, clip_norm: float | None) -> tuple[str, dict[str, Any], str]:
    """``(spec, config keys, note)`` of ``defence`` against ``attackers`` of ``clients``.

    ``spec`` names the defence as run (``trimmed-mean:0.2``, ``clip:1.37``…); ``note`` is
    empty unless the parameters could not follow the attacker count.

    Raises:
        ValueError: the defence cannot be set up for this many attackers (a trimmed mean
            needs ``2m < n``), or the norm clip has no norm.
    """
    if defence == "none":
        return "none", {}, ""
    if defence == "clip":
        if clip_norm is None or not clip_norm > 0:
            raise ValueError("the norm clip needs a positive clip norm")
        return f"clip:{clip_norm:.4g}", {"validation.clip-norm": float(clip_norm)}, ""
    if defence in ("median", "geomed"):
        return defence, {"aggregation.robust": defence}, ""
    if defence == "cosine-filter":
        return "cosine-filter:0", {"aggregation.robust": "cosine-filter:0"}, ""
    if defence == "trimmed-mean":
        if 2 * attackers >= clients:
            raise ValueError(f"a trimmed mean cannot remove {attackers} attackers of {clients} (β < 0.5)")
        beta = trimmed_beta(max(attackers, 1), clients)  # β = 0 would be a plain mean
        spec = f"trimmed-mean:{beta:.6g}"
        return spec, {"aggregation.robust": f"trimmed-mean:{beta!r}"}, ""
    if defence in ("krum", "multi-krum"):
        f = max(attackers, 1)
        note = ""
        if f > max_krum_f(clients):
            note = f"f = {max_krum_f(clients)} < {f} attackers: Krum needs n > 2f + 2"
            f = max_krum_f(clients)
        return f"{defence}:{f}", {"aggregation.robust": f"{defence}:{f}"}, note
    raise ValueError(f"unknown defence {defence!r}; defences {list(DEFENCES)}")


# -- runs ---------------------------------------------------------------------------------


def update_norm_observer(norms: list[float]) -> Any:
    """A reply ``tamper`` of the in-process grid that changes nothing and records the L2
    norm of each upload's change from what the client received (every array the
    instruction also carried with the same shape; the others from zero)."""
    import numpy as np

    from fedpeft.flower import records as rec

    def observe(partition_id: int, instruction: Any, reply: Any) -> Any:
        if reply.has_error() or rec.ARRAYS not in reply.content:
            return reply
        sent = instruction.content[rec.ARRAYS] if rec.ARRAYS in instruction.content else None
        total = 0.0
        arrays = reply.content[rec.ARRAYS]
        for key in arrays.keys():
            value = arrays[key].numpy()
            if not np.issubdtype(value.dtype, np.floating):
                continue
            value = value.astype(np.float64)
            if sent is not None and key in sent.keys():
                ref = sent[key].numpy()
                if ref.shape == value.shape:
                    value = value - ref
            total += float((value * value).sum())
        norms.append(math.sqrt(total))
        return reply

    return observe


NORMS_FILE = "update-norms.json"


def run(flat: dict[str, Any], out: pathlib.Path, record_norms: bool = False) -> dict[str, Any]:
    """One run (reused when ``out`` holds a complete run of the same config, and its
    update norms when asked for); its summary, wall time and the norms."""
    from fedpeft.flower.inprocess import run_in_process
    from fedpeft.results import completed_run

    norms_file = out / NORMS_FILE
    done = completed_run(out, flat)
    if done is not None and (not record_norms or norms_file.is_file()):
        norms = json.loads(norms_file.read_text()) if norms_file.is_file() else None
        return {"summary": with_backdoor_flip(out, done), "seconds": None, "reused": True, "norms": norms}
    norms: list[float] = []
    start = time.perf_counter()
    run_in_process({**flat, "output.dir": str(out.resolve())}, tamper=update_norm_observer(norms) if record_norms else None)
    seconds = time.perf_counter() - start
    if record_norms:
        norms_file.write_text(json.dumps(norms))
    summary = json.loads((out / "summary.json").read_text())
    return {"summary": summary, "seconds": seconds, "reused": False, "norms": norms if record_norms else None}


SCORES_FILE = "backdoor-scores.json"


def with_backdoor_flip(out: pathlib.Path, summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with its final round's ``backdoor_flip`` filled in when the run was
    recorded before fedpeft reported it (only ``backdoor_asr``): both are recomputed from
    the run's last checkpoint — the final global adapter — on the run's own test set,
    the recomputed accuracy and ``backdoor_asr`` must equal the recorded ones, and the
    scores are kept in ``out``/``backdoor-scores.json`` (the run's own files are not
    changed).

    Raises:
        RuntimeError: the checkpoint is not the final round's, or it does not reproduce
            the recorded numbers.
    """
    last = summary["rounds"][-1]
    if "backdoor_asr" not in last or "backdoor_flip" in last:
        return summary
    def reproduces(scores: Mapping[str, Any]) -> str | None:
        for key in ("accuracy", "backdoor_asr"):
            if not math.isclose(float(scores[key]), float(last[key]), abs_tol=1e-9):
                return f"{key} {scores[key]} but the run recorded {last[key]}"
        return None

    cache = out / SCORES_FILE
    scores = json.loads(cache.read_text()) if cache.is_file() else None
    if scores is None or reproduces(scores) is not None:  # none yet, or kept for another run
        scores = rescore(out, int(last["round"]))
        problem = reproduces(scores)
        if problem is not None:
            raise RuntimeError(f"{out}: the last checkpoint gives {problem}; not filling in backdoor_flip")
        cache.write_text(json.dumps(scores))
    last["backdoor_flip"] = scores["backdoor_flip"]
    return summary


def rescore(out: pathlib.Path, final_round: int) -> dict[str, float]:
    """The server evaluation (accuracy, loss, ``backdoor_asr``, ``backdoor_flip``) of the
    global adapter in ``out``'s last checkpoint, which must be of ``final_round``."""
    from fedpeft.checkpoint import load_latest
    from fedpeft.config import parse_run_config
    from fedpeft.server.setup import checkpoint_dir
    from fedpeft.tasks import get_task

    flat = json.loads((out / "config.json").read_text())["config"]
    cfg = parse_run_config({**flat, "output.dir": str(out.resolve())})  # wherever the run now lies
    ckpt = load_latest(checkpoint_dir(cfg))
    if ckpt is None or ckpt.server_round != final_round:
        found = "none" if ckpt is None else f"round {ckpt.server_round}"
        raise RuntimeError(f"{out}: no checkpoint of round {final_round} to rescore ({found})")
    task = get_task(cfg)
    model = task.model(cfg.lora.max_rank)
    model.load(ckpt.global_tensors)
    return task.evaluate(model, task.test_data())


def clip_from(norms: list[float] | None) -> float | None:
    """The automatic clip norm: the median honest update norm of the clean run."""
    return float(statistics.median(norms)) if norms else None


def run_config(base: Mapping[str, Any], rate: float, attack: str, keys: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The flat config of one run."""
    return {**base, "faults.byzantine-rate": rate, "faults.attack": attack, **keys, "seed": seed}


def run_dir(root: pathlib.Path, rate: float, attack: str, spec: str, seed: int) -> pathlib.Path:
    """Where one run lives (``rate0`` for the clean runs)."""
    safe = lambda s: s.replace(":", "-")  # noqa: E731
    return root / "runs" / f"rate{rate:g}" / safe(attack) / f"{safe(spec)}-seed{seed}"


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every run of the matrix (or, with ``--report-only``, every complete one)."""
    from fedpeft.config import parse_run_config
    from fedpeft.faults import attacker_ids
    from fedpeft.results import completed_run

    base = budget(args)
    n = int(base["federation.clients"])
    rates = [float(r) for r in args.rates.split(",")]
    attacks = [a for a in args.attacks.split(",") if a]  # --attacks '': the clean runs only
    defences = args.defences.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(defences) - set(DEFENCES))
    if unknown:
        raise SystemExit(f"unknown defence {unknown}; defences {list(DEFENCES)}")
    for attack in attacks:
        parse_run_config({"faults.attack": attack})  # a malformed attack fails here, before any run
    if CLEAN_DEFENCE not in defences:
        defences = [CLEAN_DEFENCE, *defences]  # the reference of every difference
    results: dict[str, Any] = {
        "budget": base, "seeds": seeds, "rates": rates, "attacks": attacks, "defences": defences,
        "clean": {}, "attacked": {}, "clip_norm": {},
    }
    done, started = 0, time.perf_counter()

    def one(flat: dict[str, Any], out: pathlib.Path, label: str, record_norms: bool = False) -> dict[str, Any] | None:
        nonlocal done
        if args.report_only:
            summary = completed_run(out, flat)
            summary = None if summary is None else with_backdoor_flip(out, summary)
            norms_file = out / NORMS_FILE
            norms = json.loads(norms_file.read_text()) if norms_file.is_file() else None
            return None if summary is None else {"summary": summary, "norms": norms}
        rec = run(flat, out, record_norms)
        done += 1
        took = "reused" if rec["reused"] else f"{rec['seconds']:.0f} s"
        elapsed = (time.perf_counter() - started) / 60
        print(f"[{done}] {label}: accuracy {final(rec['summary'])} ({took}; {elapsed:.0f} min so far)", flush=True)
        return rec

    def attackers_of(rate: float, attack: str, seed: int) -> list[int]:
        cfg = parse_run_config({**base, "faults.byzantine-rate": rate, "faults.attack": attack, "seed": seed})
        return attacker_ids(cfg.faults, seed, n)

    # 1. clean runs (rate 0): the no-defence reference first (its norms set the clip)
    clip_norm: dict[int, float | None] = {}
    for seed in seeds:
        flat = run_config(base, 0.0, BACKDOOR, {}, seed)
        rec = one(flat, run_dir(args.out, 0.0, "clean", "none", seed), f"clean none seed {seed}", record_norms=True)
        if rec is not None:
            results["clean"].setdefault("none", {"defence": "none", "note": "", "runs": {}})["runs"][seed] = rec["summary"]
        clip_norm[seed] = args.clip_norm if args.clip_norm is not None else clip_from(rec and rec.get("norms"))
    results["clip_norm"] = {str(s): v for s, v in clip_norm.items()}
    for defence in defences:
        if defence == CLEAN_DEFENCE or args.no_costs:
            continue
        for rate in rates:
            for seed in seeds:
                try:
                    spec, keys, note = defence_keys(defence, attacker_count(rate, n), n, clip_norm[seed])
                except ValueError:
                    continue
                spec_label = "clip" if defence == "clip" else spec  # the clip norm varies by seed
                out = run_dir(args.out, 0.0, "clean", spec_label, seed)
                rec = one(run_config(base, 0.0, BACKDOOR, keys, seed), out, f"clean {spec} seed {seed}")
                if rec is not None:
                    cell = results["clean"].setdefault(spec_label, {"defence": defence, "note": note, "runs": {}})
                    cell["runs"][seed] = rec["summary"]
    # 2. attacked runs
    for rate in rates:
        m = attacker_count(rate, n)
        for attack in attacks:
            for defence in defences:
                if defence == CLEAN_DEFENCE and args.no_undefended:
                    continue
                cell: dict[str, Any] = {"defence": defence, "runs": {}, "attackers": {}}
                for seed in seeds:
                    try:
                        spec, keys, note = defence_keys(defence, m, n, clip_norm[seed])
                    except ValueError as err:
                        cell.update(spec=defence, note=f"not run: {err}")
                        break
                    cell.update(spec="clip" if defence == "clip" else spec, note=note)
                    out = run_dir(args.out, rate, attack, cell["spec"], seed)
                    rec = one(run_config(base, rate, attack, keys, seed), out, f"rate {rate:g} {attack} {spec} seed {seed}")
                    if rec is not None:
                        cell["runs"][seed] = rec["summary"]
                        cell["attackers"][seed] = attackers_of(rate, attack, seed)
                results["attacked"].setdefault(f"{rate:g}", {}).setdefault(attack, {})[defence] = cell
    return results


# -- cell logic ---------------------------------------------------------------------------


def server_seconds(summary: Mapping[str, Any]) -> float:
    """Mean server seconds per round: the round's wall time minus its clients' own
    seconds (in-process, clients run one after another)."""
    rounds = [r for r in summary["rounds"] if r["round"] > 0]
    if not rounds:
        return float("nan")
    return statistics.fmean(
        float(r["seconds"]) - math.fsum(float(c.get("client_seconds", 0.0)) for c in r.get("clients") or [])
        for r in rounds
    )


def rejections(summary: Mapping[str, Any], attackers: list[int] | None) -> tuple[int, int | None]:
    """``(rejected updates over all rounds, of which from attackers)``; a rejected
    update is absent from its round's client records, so the attackers' share is the
    attackers missing from them (``None`` when the attackers are unknown)."""
    rounds = [r for r in summary["rounds"] if r["round"] > 0]
    total = sum(int(r.get("rejected") or 0) for r in rounds)
    if attackers is None:
        return total, None
    bad = 0
    for r in rounds:
        if not r.get("rejected"):
            continue
        kept = {int(c["partition_id"]) for c in r.get("clients") or []}
        bad += sum(1 for a in attackers if a not in kept)
    return total, min(bad, total)


def cell_stats(
    runs: Mapping[Any, Mapping[str, Any]],
    clean: Mapping[Any, Mapping[str, Any]],
    attackers: Mapping[Any, list[int]] | None = None,
) -> dict[str, Any]:
    """One cell's numbers over seeds: accuracy (mean, std), paired difference to the
    clean no-defence runs of the same seeds (mean, half-width of the 95 % t-interval),
    backdoor success rate (mean; ``None`` when no run has it), rejections and server
    seconds per round. Seeds are matched as strings (JSON keys)."""
    runs = {str(s): r for s, r in runs.items()}
    clean = {str(s): r for s, r in clean.items()}
    attackers = {str(s): a for s, a in (attackers or {}).items()}
    accs = {s: a for s, r in runs.items() if (a := final(r)) is not None}
    diffs = [accs[s] - c for s in accs if s in clean and (c := final(clean[s])) is not None]
    delta, half = paired(diffs) if diffs else (float("nan"), float("nan"))
    asr = [v for r in runs.values() if (v := final(r, "backdoor_asr")) is not None]
    flip = [v for r in runs.values() if (v := final(r, "backdoor_flip")) is not None]
    rej = [rejections(r, attackers.get(s)) for s, r in runs.items()]
    bad = [b for _, b in rej if b is not None]
    return {
        "seeds": sorted(accs),
        "accuracy": statistics.fmean(accs.values()) if accs else float("nan"),
        "std": statistics.stdev(accs.values()) if len(accs) > 1 else 0.0,
        "delta": delta,
        "half": half,
        "asr": statistics.fmean(asr) if asr else None,
        "flip": statistics.fmean(flip) if flip else None,
        "rejected": sum(t for t, _ in rej),
        "rejected_attackers": sum(bad) if bad else (0 if not rej else None),
        "server_seconds": statistics.fmean(server_seconds(r) for r in runs.values()) if runs else float("nan"),
    }


def meets_attack_goal(stats: Mapping[str, Any], backdoor: bool) -> bool:
    """Within 2 points of clean accuracy and, under the backdoor, a trigger-caused
    success (``backdoor_flip``, see :data:`ASR_GOAL`) below 10 %."""
    if not math.isfinite(stats["delta"]) or stats["delta"] < -ACCURACY_GOAL:
        return False
    return not backdoor or (stats["flip"] is not None and stats["flip"] < ASR_GOAL)


def meets_cost_goal(stats: Mapping[str, Any]) -> bool:
    """A defence costs at most 1 point on clean data."""
    return math.isfinite(stats["delta"]) and stats["delta"] >= -COST_GOAL


def best_defence(cells: Mapping[str, Mapping[str, Any]], backdoor: bool) -> tuple[str | None, bool]:
    """``(the best defence of one attack, whether it meets the goal)``: the most accurate
    defence meeting the goal, else the most accurate one (``none`` is not a defence)."""
    scored = {d: s for d, s in cells.items() if d != CLEAN_DEFENCE and math.isfinite(s["accuracy"])}
    if not scored:
        return None, False
    meeting = [d for d, s in scored.items() if meets_attack_goal(s, backdoor)]
    pool = meeting or list(scored)
    return max(pool, key=lambda d: scored[d]["accuracy"]), bool(meeting)


# -- report -------------------------------------------------------------------------------


def _delta(s: Mapping[str, Any]) -> str:
    if not math.isfinite(s["delta"]):
        return "—"
    ci = f" [{s['delta'] - s['half']:+.3f}, {s['delta'] + s['half']:+.3f}]" if math.isfinite(s["half"]) else ""
    return f"{s['delta']:+.3f}{ci}"


def _asr(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _backdoor(s: Mapping[str, Any]) -> str:
    return f"{_asr(s['asr'])} / {_asr(s['flip'])}"


def _rejected(s: Mapping[str, Any]) -> str:
    if s["rejected_attackers"] is None:
        return str(s["rejected"])
    return f"{s['rejected_attackers']} / {s['rejected'] - s['rejected_attackers']}"


def render(results: Mapping[str, Any]) -> str:
    """The Markdown report."""
    b = results["budget"]
    clean_runs = results["clean"].get(CLEAN_DEFENCE, {}).get("runs", {})
    clean = cell_stats(clean_runs, clean_runs)
    clips = {s: v for s, v in results.get("clip_norm", {}).items() if v is not None}
    lines = [
        "# Attack matrix",
        "",
        f"{b['federation.clients']} clients (IID), {b['federation.rounds']} rounds × {b['train.local-steps']} "
        f"steps of batch {b['train.batch-size']} at lr {b['train.lr']:g}, model {b['model.name']}, FedIT, "
        f"seeds {results['seeds']}. Δ: paired difference to the clean no-defence run of the same seed "
        "(95 % t-interval). ASR: backdoor success rate, the share of non-target test inputs classified as "
        "the target once the trigger is inserted; flip: the same share among the non-target inputs the model "
        "classifies correctly without the trigger (what the trigger itself changes; the goal is judged on "
        "it, as the clean model's own leaning to the target class inflates the ASR). Rejected: updates left out over all rounds, attackers / "
        "honest clients. Server s: per round, the round's wall time minus the clients' own seconds "
        "(receiving, validating, aggregating and evaluating; the round record keeps no aggregation time "
        "of its own). No outlier rejection (validation.norm-factor = 0) in any run.",
        "",
        f"Clean, no defence: accuracy {clean['accuracy']:.3f} ± {clean['std']:.3f}; ASR / flip of the trigger "
        f"without any attacker {_backdoor(clean)} (the baselines a backdoor's are read against)."
        + (f" Clip norm (median honest update norm of that run): {', '.join(f'seed {s}: {v:.4g}' for s, v in clips.items())}."
           if clips else ""),
        "",
        "## Cost of each defence on clean data",
        "",
        f"Goal: ≤ {100 * COST_GOAL:.0f} point below clean no-defence.",
        "",
        "| defence | accuracy | Δ vs clean | ASR / flip (no attacker) | rejected (honest) | server s / round | Δ server s | ≤ 1 point |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec, cell in results["clean"].items():
        s = cell_stats(cell["runs"], clean_runs)
        if not s["seeds"]:
            continue
        goal = "—" if spec == CLEAN_DEFENCE else ("yes" if meets_cost_goal(s) else "**no**")
        extra = f" ({cell['note']})" if cell.get("note") else ""
        lines.append(
            f"| {spec}{extra} | {s['accuracy']:.3f} ± {s['std']:.3f} | {'—' if spec == CLEAN_DEFENCE else _delta(s)} "
            f"| {_backdoor(s)} | {s['rejected']} | {s['server_seconds']:.2f} "
            f"| {s['server_seconds'] - clean['server_seconds']:+.2f} | {goal} |"
        )
    for rate, table in results["attacked"].items():
        m = attacker_count(float(rate), int(b["federation.clients"]))
        goal_rate = math.isclose(float(rate), GOAL_RATE)
        lines += ["", f"## {100 * float(rate):.0f} % attackers ({m} of {b['federation.clients']})", ""]
        if goal_rate:
            lines += [
                f"Goal: the best defence within {100 * ACCURACY_GOAL:.0f} points of clean and, under the backdoor, "
                f"flip < {100 * ASR_GOAL:.0f} %.", "",
            ]
        else:
            lines += ["Reported as measured (the goal is stated at 20 %).", ""]
        lines += [
            "| attack | defence | accuracy | Δ vs clean | ASR / flip | rejected (attackers / honest) | meets goal |",
            "|---|---|---|---|---|---|---|",
        ]
        summary_rows = []
        for attack, cells in table.items():
            backdoor = attack.split(":")[0] == BACKDOOR
            stats = {}
            for defence, cell in cells.items():
                label = cell.get("spec", defence) + (f" ({cell['note']})" if cell.get("note") else "")
                if not cell["runs"]:
                    lines.append(f"| {attack} | {label} | — | — | — | — | — |")
                    continue
                s = stats[defence] = cell_stats(cell["runs"], clean_runs, cell.get("attackers"))
                ok = "yes" if meets_attack_goal(s, backdoor) else "no"
                lines.append(
                    f"| {attack} | {label} | {s['accuracy']:.3f} ± {s['std']:.3f} | {_delta(s)} "
                    f"| {_backdoor(s) if backdoor else '—'} | {_rejected(s)} | {ok} |"
                )
            best, ok = best_defence(stats, backdoor)
            if best is not None:
                s = stats[best]
                asr = f", ASR / flip {_backdoor(s)}" if backdoor else ""
                verdict = ("**met**" if ok else "**not met**") if goal_rate else ("within" if ok else "outside")
                summary_rows.append(f"| {attack} | {cells[best].get('spec', best)} | {_delta(s)}{asr} | {verdict} |")
        if summary_rows:
            lines += ["", "Best defence per attack:", "", "| attack | best defence | Δ vs clean | goal |", "|---|---|---|---|",
                      *summary_rows]
        lines += ["", "Δ accuracy vs clean (flip under the backdoor):", ""]
        defences = [d for d in results["defences"] if any(d in cells for cells in table.values())]
        lines += ["| attack | " + " | ".join(defences) + " |", "|---|" + "---|" * len(defences)]
        for attack, cells in table.items():
            backdoor = attack.split(":")[0] == BACKDOOR
            row = []
            for d in defences:
                cell = cells.get(d)
                if not cell or not cell["runs"]:
                    row.append("—")
                    continue
                s = cell_stats(cell["runs"], clean_runs)
                row.append(f"{s['delta']:+.3f}" + (f" ({_asr(s['flip'])})" if backdoor else ""))
            lines.append(f"| {attack} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def load(out: pathlib.Path) -> dict[str, Any]:
    """A written ``attacks.json``."""
    return json.loads((out / "attacks.json").read_text())


def parser() -> argparse.ArgumentParser:
    """The command line (its defaults are the full matrix)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("reports/attacks"))
    parser.add_argument("--rates", default="0.2,0.4", help="attacker shares (of --clients)")
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="faults.attack values")
    parser.add_argument("--defences", default=",".join(DEFENCES), help=f"of {', '.join(DEFENCES)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--clip-norm", type=float, default=None,
                        help="norm clip bound (default: the median honest update norm of the clean run)")
    parser.add_argument("--no-costs", action="store_true",
                        help="skip each defence's clean run (its cost on clean data); the clean no-defence run stays")
    parser.add_argument("--no-undefended", action="store_true", help="skip the attacked runs without a defence")
    parser.add_argument("--report-only", action="store_true", help="report the complete runs; run nothing")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model, 2 rounds, a reduced grid (2 attacks × 3 defences at 20 %%): checks the script")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.quick:  # the reduced grid, unless an option says otherwise
        given = set(argv if argv is not None else sys.argv[1:])
        for key, value in QUICK.items():
            if not any(a == f"--{key}" or a.startswith(f"--{key}=") for a in given):
                setattr(args, key, value)
    args.out.mkdir(parents=True, exist_ok=True)
    results = benchmark(args)
    (args.out / "attacks.json").write_text(json.dumps(results, indent=1, default=str))
    text = render(results)
    (args.out / "attacks.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
