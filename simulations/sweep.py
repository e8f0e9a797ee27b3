"""Run a preset: several variants × seeds of one setting, then a comparison report.

A preset (``simulations/presets/NAME.toml``) has a ``[base]`` table of config keys,
a ``[variants.LABEL]`` table per variant (keys that override the base) and a
``seeds`` list. Every run goes through the in-process grid (the same server and
client code as ``fedpeft simulate``, without Ray's start-up cost; clients train one
after another), into ``OUT/LABEL-seedK``; then ``fedpeft.report.compare`` writes
``OUT/report.md`` with the table and plots. Run:

    python simulations/sweep.py simulations/presets/codecs.toml --out runs/codecs
    python simulations/sweep.py PRESET --only fedit,lora-fair --seeds 0   # a subset

A preset may record expectations, ``[expect.LABEL] accuracy = 0.508, tolerance = 0.02``
(the mean final accuracy over the seeds run; ``loss`` works the same way). The sweep then
prints PASS / FAIL per expectation and exits with status 1 if any fails (not with
``--set``: the expectations describe the preset as written).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
import tomllib
from typing import Any

from fedpeft.config import flatten_toml


def load_expectations(path: pathlib.Path) -> dict[str, dict[str, float]]:
    """``{label: {"accuracy"|"loss": value, "tolerance": t}}`` of a preset file."""
    return dict(tomllib.loads(path.read_text()).get("expect", {}))


def check(expect: dict[str, dict[str, float]], finals: dict[str, list[dict[str, Any]]]) -> bool:
    """Print PASS/FAIL per expectation; True if all pass (unrun labels are skipped)."""
    ok = True
    for label, want in expect.items():
        if label not in finals:
            continue
        tol = float(want.get("tolerance", 0.0))
        for metric in ("accuracy", "loss"):
            if metric not in want:
                continue
            values = [float(r[metric]) for r in finals[label] if r.get(metric) is not None]
            got = sum(values) / len(values) if values else float("nan")
            passed = abs(got - float(want[metric])) <= tol
            ok &= passed
            print(f"{'PASS' if passed else 'FAIL'} {label}: {metric} {got:.4f}, "
                  f"expected {float(want[metric]):.4f} ± {tol}")
    return ok


def load_preset(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[int]]:
    """``(base, variants, seeds)`` of a preset file."""
    data = tomllib.loads(path.read_text())
    base = flatten_toml(data.get("base", {}))
    variants = {label: flatten_toml(v) for label, v in data.get("variants", {}).items()}
    return base, variants, list(data.get("seeds", [0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", type=pathlib.Path)
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--only", help="comma-separated variant labels")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override every run")
    args = parser.parse_args()

    from fedpeft.config import parse_overrides
    from fedpeft.flower.inprocess import run_in_process
    from fedpeft.report import compare, render_terminal_table
    from fedpeft.results import completed_run

    base, variants, seeds = load_preset(args.preset)
    if args.only:
        wanted = [v.strip() for v in args.only.split(",")]
        variants = {k: v for k, v in variants.items() if k in wanted}
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",")]
    extra = parse_overrides(args.set)
    dirs = []
    finals: dict[str, list[dict[str, Any]]] = {}
    for label, overrides in variants.items():
        for seed in seeds:
            out = args.out / f"{label}-seed{seed}"
            flat = {**base, **overrides, **extra, "seed": seed, "output.dir": str(out.resolve())}
            start = time.perf_counter()
            if completed_run(out, flat) is not None:  # the very same run, complete
                print(f"{label} seed {seed}: already done, reusing {out}")
            else:
                results = run_in_process(flat)
                last = results.rounds[-1]
                print(f"{label} seed {seed}: accuracy {last.get('accuracy')} loss {last.get('loss'):.4f} "
                      f"({time.perf_counter() - start:.0f} s)")
            dirs.append(out)
            finals.setdefault(label, []).append(json.loads((out / "summary.json").read_text())["rounds"][-1])
    report = compare(dirs, args.out)
    print(render_terminal_table(report, width=160), end="")
    print(f"report → {report.markdown_path}")
    if extra:  # the recorded expectations describe the preset as written
        print("expectations not checked: --set changed the preset's settings")
    elif not check(load_expectations(args.preset), finals):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
