"""Compare finished runs: one table, seed groups, curves and a Pareto plot.

``fedpeft compare RUN_DIR... --out REPORT_DIR`` reads each run's ``summary.json``
(and ``config.json`` for labels, see the README "Results" section) and writes
``REPORT_DIR/report.md`` with two PNGs next to it. The module only reads the files
runs wrote: no Flower, torch or transformers import of its own (matplotlib and rich
are imported when a plot or a terminal table is drawn).

Per run the table reports, from the rounds ``0..T`` of ``summary.json``:

* final and best value of the report's metric — accuracy when every run has one,
  otherwise the evaluation loss (causal-lm runs report no accuracy);
* rounds to target: the first round ``t`` with ``accuracy_t ≥ target`` (or
  ``loss_t ≤ target``); "never" when no round reaches it. The default target is
  ``0.9 · max_runs(final accuracy)`` or ``1.1 · min_runs(final loss)`` over the
  complete runs (all runs when none is complete);
* total uplink / downlink bytes (``totals`` when present, else the sum over rounds),
  wall time ``Σ_t seconds_t``, the mean of the non-null ``aggregation_error`` values
  and ``Σ_t rejected_t``;
* whether the run is on the Pareto front of (total uplink bytes ↓, final metric ↑
  for accuracy / ↓ for loss): no other run is at least as good on both and better
  on one. Only complete runs are ranked.

A run is *incomplete* when its ``summary.json`` says it ``stopped`` (a round failed,
a client's state could not be read) or its last round is below the
``federation.rounds`` of its ``config.json`` (it was interrupted, or is still
running). Incomplete runs are flagged in the table (``1 of 3, interrupted``) and
never ranked on the Pareto front: their final metric is not the run's. A run
stopped by its byte budget (``budget.bytes``) did what it was configured to do: it
is flagged (``2 of 3, budget``) but ranked.

Runs whose configs differ only by ``seed`` (and keys that never label, see
:data:`IGNORED_KEYS`) form a group; when some group holds two or more runs a second
table gives mean ± sample std (ddof = 1) over the group.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import pathlib
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from fedpeft.errors import FedPeftError
from fedpeft.results import RoundRecord, atomic_write, outcome_of, parse_round

Metric = Literal["accuracy", "loss"]

ROUND_PLOT = "metric_vs_round.png"
UPLINK_PLOT = "metric_vs_uplink.png"

# Config keys that never distinguish runs in a label: where results go, how the
# simulation is scheduled, and knobs that do not change the numbers.
IGNORED_KEY_PREFIXES = ("output.", "simulation.")
IGNORED_KEYS = frozenset(
    {
        "seed",  # added last, see _labels
        "strategy.name",  # the head of every label
        "strategy.plugins",
        "model.cache-dir",
        "federation.timeout",
        "federation.wait-for-nodes",
        "train.num-threads",
        "eval.batch-size",
    }
)
DEFAULT_TARGET_FRACTION = 0.9  # accuracy target = 0.9 · best final accuracy
DEFAULT_LOSS_FACTOR = 1.1  # loss target = 1.1 · best (lowest) final loss


@dataclass(frozen=True)
class Run:
    """One run directory as read from disk.

    Attributes:
        directory: the run directory, as given.
        strategy: ``summary.json`` ``strategy``.
        task: ``summary.json`` ``task`` (``""`` when absent).
        seed: the run seed (``summary.json``, else ``config.json``), or None.
        config: the flat resolved config of ``config.json``; when that file is
            absent, the few keys ``summary.json`` carries (strategy, task, seed, codecs).
        rounds: the round records sorted by round, checked by
            :func:`fedpeft.results.parse_round`.
        uplink_bytes: total uplink bytes of the run.
        downlink_bytes: total downlink bytes of the run.
        configured_rounds: ``federation.rounds`` of ``config.json``, or None.
        stopped: ``summary.json`` ``stopped`` (why the run stopped early), or None.
        outcome: ``summary.json`` ``outcome`` (:func:`fedpeft.results.outcome_of`).
    """

    directory: pathlib.Path
    strategy: str
    task: str
    seed: int | None
    config: Mapping[str, Any]
    rounds: tuple[RoundRecord, ...]
    uplink_bytes: int
    downlink_bytes: int
    configured_rounds: int | None = None
    stopped: str | None = None
    outcome: str = ""

    @property
    def last_round(self) -> int:
        """The last round with a record."""
        return max(r["round"] for r in self.rounds)

    @property
    def status(self) -> str:
        """``""`` (complete), ``"budget"`` (stopped by ``budget.bytes``, as configured),
        ``"stopped"`` (stopped early by a failure) or ``"interrupted"`` (fewer rounds
        than configured and no reason recorded)."""
        if self.outcome in ("budget", "failed"):
            return "budget" if self.outcome == "budget" else "stopped"
        if self.configured_rounds is not None and self.last_round < self.configured_rounds:
            return "interrupted"
        return ""

    @property
    def incomplete(self) -> bool:
        """Stopped early or interrupted (see the module docstring); never ranked."""
        return self.status in ("stopped", "interrupted")

    def series(self, key: str) -> list[tuple[int, float]]:
        """``(round, value)`` for the rounds where ``key`` is not null."""
        return [(r["round"], float(r[key])) for r in self.rounds if r.get(key) is not None]


@dataclass(frozen=True)
class RunRow:
    """The table row of one run (None = no value in the run)."""

    label: str
    group: str
    rounds: int
    final_accuracy: float | None
    best_accuracy: float | None
    final_loss: float | None
    best_loss: float | None
    final_perplexity: float | None
    rounds_to_target: int | None
    uplink_bytes: int
    downlink_bytes: int
    seconds: float
    aggregation_error: float | None
    rejected: int
    pareto: bool
    configured_rounds: int | None = None
    status: str = ""  # see Run.status
    note: str = ""  # why the run stopped, for a footnote


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of the non-null values of a group."""

    mean: float | None
    std: float | None
    count: int


@dataclass(frozen=True)
class GroupRow:
    """One group of runs whose labels differ only by seed."""

    label: str
    seeds: tuple[int | None, ...]
    run_indices: tuple[int, ...]
    final_metric: Stat
    best_metric: Stat
    rounds_to_target: Stat  # over the runs that reached the target (count = how many)
    final_loss: Stat
    uplink_bytes: Stat
    downlink_bytes: Stat
    seconds: Stat
    aggregation_error: Stat
    rejected: Stat
    pareto: bool  # on the front of the group means
    incomplete: int = 0  # members that are incomplete (then the group is not ranked)


@dataclass(frozen=True)
class Report:
    """Everything ``report.md`` shows.

    Attributes:
        runs: the runs, in the order given.
        rows: one row per run, same order.
        groups: seed groups (empty unless some group has two or more runs).
        metric: ``"accuracy"`` or ``"loss"``.
        target: the rounds-to-target threshold, in ``metric`` units, or None.
        target_note: how ``target`` was chosen, for the report.
        generated: when the report was built (UTC).
        out_dir: the report directory (None until written).
        files: the files written (``report.md`` and the PNGs).
    """

    runs: tuple[Run, ...]
    rows: tuple[RunRow, ...]
    groups: tuple[GroupRow, ...]
    metric: Metric
    target: float | None
    target_note: str
    generated: datetime
    out_dir: pathlib.Path | None = None
    files: tuple[pathlib.Path, ...] = ()

    @property
    def markdown_path(self) -> pathlib.Path | None:
        """``REPORT_DIR/report.md`` once written."""
        return self.out_dir / "report.md" if self.out_dir is not None else None


# ---------------------------------------------------------------------------- loading


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FedPeftError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
            "expected the file a fedpeft run writes"
        ) from err
    except OSError as err:
        raise FedPeftError(f"{path}: cannot be read ({err.strerror})") from err


def _number(file: pathlib.Path, where: str, value: Any, *, integer: bool = False) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        kind = "an integer" if integer else "a finite number"
        raise FedPeftError(f"{file}: {where} must be {kind}, got {value!r}")
    return value


def load_run(directory: str | os.PathLike[str]) -> Run:
    """Read one run directory (``summary.json`` and, if present, ``config.json``).

    Args:
        directory: a directory written by ``fedpeft simulate`` / ``flwr run``.

    Raises:
        FedPeftError: naming the file and field when the directory has no
            ``summary.json`` or either file does not follow the schema.
    """
    path = pathlib.Path(directory)
    summary_file = path / "summary.json"
    if not path.is_dir():
        raise FedPeftError(f"{path}: not a directory; expected a run directory with summary.json")
    if not summary_file.is_file():
        raise FedPeftError(f"{summary_file}: no such file; is {path} a fedpeft run directory?")
    summary = _read_json(summary_file)
    if not isinstance(summary, dict):
        raise FedPeftError(f"{summary_file}: expected a JSON object, got {type(summary).__name__}")
    strategy = summary.get("strategy")
    if not isinstance(strategy, str) or not strategy:
        raise FedPeftError(
            f"{summary_file}: 'strategy' must be a non-empty string, got {strategy!r}"
        )
    raw_rounds = summary.get("rounds")
    if not isinstance(raw_rounds, list) or not raw_rounds:
        raise FedPeftError(
            f"{summary_file}: 'rounds' must be a non-empty list of round records, "
            f"got {raw_rounds!r:.60}"
        )
    rounds = sorted(
        (parse_round(r, f"{summary_file}: rounds[{i}]") for i, r in enumerate(raw_rounds)),
        key=lambda r: r["round"],
    )
    numbers = [r["round"] for r in rounds]
    if len(set(numbers)) != len(numbers):
        dup = next(n for n in numbers if numbers.count(n) > 1)
        raise FedPeftError(f"{summary_file}: round {dup} appears more than once in 'rounds'")

    config_file = path / "config.json"
    config: dict[str, Any] = {}
    config_seed = None
    if config_file.exists():
        content = _read_json(config_file)
        if not isinstance(content, dict) or not isinstance(content.get("config"), dict):
            raise FedPeftError(
                f"{config_file}: expected an object with a 'config' object "
                '({"config": {...}, "seed": ..., "versions": {...}})'
            )
        config = dict(content["config"])
        config_seed = content.get("seed", config.get("seed"))
    seed = summary.get("seed", config_seed)
    if seed is not None:
        seed = int(_number(summary_file, "seed", seed, integer=True))
    task = summary.get("task") or config.get("task.name") or ""
    codec = summary.get("codec") if isinstance(summary.get("codec"), dict) else {}
    if not config:  # labels from what summary.json carries
        config = {"strategy.name": strategy, "task.name": task, "seed": seed}
        config.update({f"codec.{k}": v for k, v in codec.items()})

    totals = summary.get("totals") if isinstance(summary.get("totals"), dict) else {}
    configured = config.get("federation.rounds")
    configured_rounds = int(configured) if str(configured).isdigit() else None
    stopped = summary.get("stopped")

    def total(key: str) -> int:
        if totals.get(key) is not None:
            return int(_number(summary_file, f"totals.{key}", totals[key], integer=True))
        return sum(int(r[key]) for r in rounds)

    return Run(
        directory=path,
        strategy=strategy,
        task=str(task),
        seed=seed,
        config=config,
        rounds=tuple(rounds),
        uplink_bytes=total("uplink_bytes"),
        downlink_bytes=total("downlink_bytes"),
        configured_rounds=configured_rounds,
        stopped=None if stopped is None else str(stopped),
        outcome=outcome_of(summary),
    )


# ---------------------------------------------------------------------------- labels


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if value == "":
        return '""'
    return str(value)


def _labelled(key: str) -> bool:
    return key not in IGNORED_KEYS and not key.startswith(IGNORED_KEY_PREFIXES)


def _group_key(run: Run) -> str:
    """Equal for runs whose configs differ at most by seed and unlabelled keys."""
    kept = {k: v for k, v in run.config.items() if _labelled(k)}
    return json.dumps([run.strategy, kept], sort_keys=True, default=str)


def _distinguishing_keys(runs: Sequence[Run], label_keys: Sequence[str] | None) -> list[str]:
    """Keys whose values differ among the runs that have them (seed excluded)."""
    if label_keys is None:
        candidates = sorted({k for run in runs for k in run.config if _labelled(k)})
    else:
        candidates = [k for k in label_keys if k not in ("seed", "strategy.name")]
    keys = []
    for key in candidates:
        values = {json.dumps(run.config[key], sort_keys=True) for run in runs if key in run.config}
        if len(values) > 1:
            keys.append(key)
    return keys


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """``data.partition`` → ``partition`` where the last segment is unambiguous."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _labels(runs: Sequence[Run], label_keys: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(label, group label) per run.

    A group holds the runs whose configs differ at most by seed; its label is the
    run label without the seed, plus the member directories when ``label_keys``
    hides what tells two groups apart.
    """
    keys = _distinguishing_keys(runs, label_keys)
    short = _short_names(keys)
    base = []
    for run in runs:
        parts = [run.strategy]
        parts += [f"{short[k]}={_fmt_value(run.config[k])}" for k in keys if k in run.config]
        base.append(" ".join(parts))
    seeds_differ = len({run.seed for run in runs}) > 1
    labels = [
        f"{b} seed={run.seed}" if seeds_differ else b for b, run in zip(base, runs, strict=True)
    ]
    for label in set(labels):  # labels that do not tell runs apart: add the directory
        same = [i for i, other in enumerate(labels) if other == label]
        if len(same) > 1:
            for i, name in zip(
                same, _distinct_suffixes([runs[i].directory for i in same]), strict=True
            ):
                labels[i] = f"{label} ({name})"
    group_keys = [_group_key(run) for run in runs]
    groups = list(base)
    for label in set(base):
        same = [i for i, other in enumerate(base) if other == label]
        if len({group_keys[i] for i in same}) > 1:
            names = dict(
                zip(same, _distinct_suffixes([runs[i].directory for i in same]), strict=True)
            )
            for i in same:
                members = [names[j] for j in same if group_keys[j] == group_keys[i]]
                groups[i] = f"{label} ({', '.join(members)})"
    return labels, groups


def _distinct_suffixes(paths: Sequence[pathlib.Path]) -> list[str]:
    """The shortest trailing path parts that tell ``paths`` apart (``a/run``, ``b/run``)."""
    parts = [p.resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# ---------------------------------------------------------------------------- numbers


def pareto_front(points: Sequence[tuple[float, float]]) -> tuple[int, ...]:
    """Indices of the points no other point dominates; lower x and higher y are better.

    Point ``j`` dominates ``i`` when ``x_j ≤ x_i``, ``y_j ≥ y_i`` and one of the two
    is strict, so equal points are all on the front.
    """
    front = []
    for i, (xi, yi) in enumerate(points):
        if not any(
            xj <= xi and yj >= yi and (xj < xi or yj > yi)
            for j, (xj, yj) in enumerate(points)
            if j != i
        ):
            front.append(i)
    return tuple(front)


def rounds_to_target(run: Run, metric: Metric, target: float) -> int | None:
    """First round whose ``metric`` reaches ``target`` (≥ for accuracy, ≤ for loss)."""
    for server_round, value in run.series(metric):
        if (value >= target) if metric == "accuracy" else (value <= target):
            return server_round
    return None


def _last(run: Run, key: str) -> float | None:
    series = run.series(key)
    return series[-1][1] if series else None


def _best(run: Run, key: str, choose: Callable[..., float]) -> float | None:
    values = [v for _, v in run.series(key)]
    return choose(values) if values else None


def _stat(values: Sequence[float | int | None]) -> Stat:
    present = [float(v) for v in values if v is not None]
    if not present:
        return Stat(None, None, 0)
    std = statistics.stdev(present) if len(present) > 1 else None
    return Stat(statistics.fmean(present), std, len(present))


def _signed(metric: Metric, value: float) -> float:
    """Higher is better: accuracy as is, loss negated."""
    return value if metric == "accuracy" else -value


def build_report(
    runs: Sequence[Run],
    target: float | None = None,
    label_keys: Sequence[str] | None = None,
    generated: datetime | None = None,
) -> Report:
    """Compute the comparison of ``runs`` (no file is written).

    Args:
        runs: loaded runs, at least one.
        target: rounds-to-target threshold in the report metric's units (accuracy
            in [0, 1], or loss); None for the default (module docstring).
        label_keys: flat config keys that may appear in labels (shown when their
            values differ); None for every config key except :data:`IGNORED_KEYS`
            and :data:`IGNORED_KEY_PREFIXES`.
            The seed is always added when seeds differ.
        generated: the report date; now (UTC) when None.

    Raises:
        FedPeftError: if ``runs`` is empty or ``target`` is out of range.
    """
    if not runs:
        raise FedPeftError("compare needs at least one run directory, got none")
    metric: Metric = "accuracy" if all(run.series("accuracy") for run in runs) else "loss"
    finals = [_last(run, metric) for run in runs]
    present = [v for v, r in zip(finals, runs, strict=True) if v is not None and not r.incomplete]
    present = present or [v for v in finals if v is not None]  # complete runs set the target
    if target is not None and not (
        math.isfinite(target) and (0.0 < target <= 1.0 if metric == "accuracy" else target > 0.0)
    ):
        expected = "an accuracy in (0, 1]" if metric == "accuracy" else "a loss > 0"
        raise FedPeftError(
            f"target must be {expected} (the report metric is {metric}), got {target}"
        )
    if target is not None:
        target_note = f"given ({'≥' if metric == 'accuracy' else '≤'} {target:.4g})"
    elif not present:
        target_note = f"none: no run reports {metric}"
    elif metric == "accuracy":
        target = DEFAULT_TARGET_FRACTION * max(present)
        target_note = f"{DEFAULT_TARGET_FRACTION:.0%} of the best final accuracy {max(present):.4f}"
    else:
        target = DEFAULT_LOSS_FACTOR * min(present)
        target_note = f"{DEFAULT_LOSS_FACTOR:g} × the best final loss {min(present):.4f}"

    labels, group_labels = _labels(runs, label_keys)
    scored = [  # incomplete runs are never ranked
        (i, float(run.uplink_bytes), v)
        for i, (run, v) in enumerate(zip(runs, finals, strict=True))
        if v is not None and not run.incomplete
    ]
    front = {scored[k][0] for k in pareto_front([(x, _signed(metric, v)) for _, x, v in scored])}
    rows = []
    for i, run in enumerate(runs):
        errors = [v for _, v in run.series("aggregation_error")]
        rows.append(
            RunRow(
                label=labels[i],
                group=group_labels[i],
                rounds=run.last_round,
                final_accuracy=_last(run, "accuracy"),
                best_accuracy=_best(run, "accuracy", max),
                final_loss=_last(run, "loss"),
                best_loss=_best(run, "loss", min),
                final_perplexity=_last(run, "perplexity"),
                rounds_to_target=None if target is None else rounds_to_target(run, metric, target),
                uplink_bytes=run.uplink_bytes,
                downlink_bytes=run.downlink_bytes,
                seconds=math.fsum(float(r["seconds"]) for r in run.rounds),
                aggregation_error=statistics.fmean(errors) if errors else None,
                rejected=sum(int(r.get("rejected") or 0) for r in run.rounds),
                pareto=i in front,
                configured_rounds=run.configured_rounds,
                status=run.status,
                note=run.stopped or (
                    f"rounds after {run.last_round} were never recorded (killed, or still running)"
                    if run.status == "interrupted"
                    else ""
                ),
            )
        )
    return Report(
        runs=tuple(runs),
        rows=tuple(rows),
        groups=_groups(rows, runs, metric),
        metric=metric,
        target=target,
        target_note=target_note,
        generated=generated or datetime.now(UTC),
    )


def _groups(rows: Sequence[RunRow], runs: Sequence[Run], metric: Metric) -> tuple[GroupRow, ...]:
    order: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        order.setdefault(row.group, []).append(i)
    if all(len(members) < 2 for members in order.values()):
        return ()
    final = "final_accuracy" if metric == "accuracy" else "final_loss"
    best = "best_accuracy" if metric == "accuracy" else "best_loss"
    groups = []
    for label, members in order.items():
        picked = [rows[i] for i in members]

        def stat(name: str, picked: list[RunRow] = picked) -> Stat:
            return _stat([getattr(row, name) for row in picked])

        groups.append(
            GroupRow(
                label=label,
                seeds=tuple(runs[i].seed for i in members),
                run_indices=tuple(members),
                final_metric=stat(final),
                best_metric=stat(best),
                rounds_to_target=stat("rounds_to_target"),
                final_loss=stat("final_loss"),
                uplink_bytes=stat("uplink_bytes"),
                downlink_bytes=stat("downlink_bytes"),
                seconds=stat("seconds"),
                aggregation_error=stat("aggregation_error"),
                rejected=stat("rejected"),
                pareto=False,
                incomplete=sum(1 for i in members if runs[i].incomplete),
            )
        )
    scored = [  # a group with an incomplete run is not ranked
        (k, g.uplink_bytes.mean or 0.0, g.final_metric.mean)
        for k, g in enumerate(groups)
        if g.final_metric.mean is not None and not g.incomplete
    ]
    front = {scored[j][0] for j in pareto_front([(x, _signed(metric, v)) for _, x, v in scored])}
    return tuple(dataclasses.replace(g, pareto=k in front) for k, g in enumerate(groups))


# ---------------------------------------------------------------------------- tables


def _f(value: float | None, spec: str = ".4f") -> str:
    return "—" if value is None else format(value, spec)


def _pm(stat: Stat, spec: str = ".4f") -> str:
    if stat.mean is None:
        return "—"
    if stat.std is None:
        return format(stat.mean, spec)
    return f"{format(stat.mean, spec)} ± {format(stat.std, spec)}"


def _rounds_cell(row: RunRow) -> str:
    """``3``, or ``1 of 3, interrupted`` / ``2 of 3, budget`` for a flagged run."""
    if not row.status:
        return str(row.rounds)
    of = f" of {row.configured_rounds}" if row.configured_rounds is not None else ""
    return f"{row.rounds}{of}, {row.status}"


def _pareto_cell(pareto: bool, incomplete: bool) -> str:
    return "not ranked" if incomplete else ("★" if pareto else "")


def incomplete_notes(report: Report) -> list[str]:
    """One line per incomplete or budget-stopped run: its label and why."""
    out = []
    for row in report.rows:
        if row.status:
            ranked = "ranked" if row.status == "budget" else "not ranked"
            note = row.note if len(row.note) <= 200 else row.note[:199] + "…"
            out.append(f"{row.label}: {_rounds_cell(row)} ({ranked}) — {note}")
    return out


def _target_header(report: Report) -> str:
    if report.target is None:
        return "rounds to target"
    sign = "≥" if report.metric == "accuracy" else "≤"
    return f"rounds to {sign} {report.target:.4g}"


def run_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """The per-run table as (header, rows) of strings, for Markdown and terminal."""
    acc = report.metric == "accuracy"
    ppl = not acc and any(row.final_perplexity is not None for row in report.rows)
    header = ["run", "rounds"]
    header += ["final acc", "best acc"] if acc else ["best loss"]
    header += [_target_header(report), "final loss"] + (["final ppl"] if ppl else [])
    header += ["uplink B", "downlink B", "wall s", "agg error", "rejected", "Pareto"]
    rows = []
    for row in report.rows:
        cells = [row.label, _rounds_cell(row)]
        cells += [_f(row.final_accuracy), _f(row.best_accuracy)] if acc else [_f(row.best_loss)]
        reached = "never" if row.rounds_to_target is None else str(row.rounds_to_target)
        cells += ["—" if report.target is None else reached, _f(row.final_loss)]
        cells += [_f(row.final_perplexity, ",.2f")] if ppl else []
        cells += [
            f"{row.uplink_bytes:,}",
            f"{row.downlink_bytes:,}",
            f"{row.seconds:.1f}",
            _f(row.aggregation_error, ".4g"),
            str(row.rejected),
            _pareto_cell(row.pareto, row.status in ("stopped", "interrupted")),
        ]
        rows.append(cells)
    return header, rows


def group_table(report: Report) -> tuple[list[str], list[list[str]]]:
    """The seed-group table (mean ± std) as (header, rows); empty rows without groups."""
    name = "acc" if report.metric == "accuracy" else "loss"
    header = ["group", "seeds", f"final {name}", f"best {name}", _target_header(report)]
    header += ["final loss"] if report.metric == "accuracy" else []
    header += ["uplink B", "downlink B", "wall s", "agg error", "rejected", "Pareto"]
    rows = []
    for g in report.groups:
        n = len(g.run_indices)
        reached = f"{_pm(g.rounds_to_target, '.1f')} ({g.rounds_to_target.count}/{n})"
        cells = [
            g.label,
            ", ".join(str(s) for s in g.seeds),
            _pm(g.final_metric),
            _pm(g.best_metric),
            "—" if report.target is None else reached,
        ]
        cells += [_pm(g.final_loss)] if report.metric == "accuracy" else []
        cells += [
            _pm(g.uplink_bytes, ",.0f"),
            _pm(g.downlink_bytes, ",.0f"),
            _pm(g.seconds, ".1f"),
            _pm(g.aggregation_error, ".4g"),
            _pm(g.rejected, ".1f"),
            _pareto_cell(g.pareto, g.incomplete > 0),
        ]
        rows.append(cells)
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---"] + ["---:"] * (len(header) - 1)
    return "\n".join([line(header), "|" + "|".join(align) + "|", *(line(r) for r in rows)])


def render_terminal_table(report: Report, width: int = 200) -> str:
    """The run table (and the seed-group table, if any) as text for a terminal.

    Args:
        report: the comparison.
        width: target characters per line: labels wrap to fit; numbers are never
            cut, so a table wider than that (labels at 24 characters) stays wider.
    """
    from rich import box
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    tables = [("runs", run_table(report))]
    if report.groups:
        tables.append(("across seeds (mean ± std)", group_table(report)))
    buf = io.StringIO()
    for title, (header, rows) in tables:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
        table.add_column(header[0], overflow="fold")
        for name in header[1:]:
            table.add_column(name, justify="right", no_wrap=True)
        for cells in rows:
            table.add_row(*cells)
        wide = Console(width=100_000)
        natural = Measurement.get(wide, wide.options, table).maximum
        label = max(len(cell) for cell in [header[0], *(r[0] for r in rows)])
        table.columns[0].max_width = max(24, min(label, width - (natural - label)))
        console = Console(
            file=buf,
            width=max(width, natural - label + table.columns[0].max_width),
            color_system=None,
            highlight=False,
        )
        console.print(table)
    notes = incomplete_notes(report)
    if notes:
        buf.write("\nflagged runs (an incomplete run is never ranked on the Pareto front):\n")
        buf.write("".join(f"  {line}\n" for line in notes))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()).strip("\n") + "\n"


def render_markdown(report: Report, out_dir: pathlib.Path) -> str:
    """``report.md``: tables, the plots by relative path, the date and the run directories."""
    label = "accuracy" if report.metric == "accuracy" else "loss"
    better = "higher" if report.metric == "accuracy" else "lower"
    lines = [
        "# fedpeft run comparison",
        "",
        f"Generated {report.generated:%Y-%m-%d %H:%M:%S %Z} by `fedpeft compare` "
        f"from {len(report.runs)} run(s):",
        "",
    ]
    for row, run in zip(report.rows, report.runs, strict=True):
        link = os.path.relpath(run.directory.resolve() / "summary.json", out_dir.resolve())
        lines.append(f"- `{run.directory}` ([summary.json]({link})) — {row.label}")
    lines += [
        "",
        f"Metric: **{label}** ({better} is better"
        + ("; no run reported accuracy for all rounds, so loss is used" if label == "loss" else "")
        + f"). Target for *rounds to target*: {report.target_note}; the first round that "
        "reaches it, *never* if none does. Bytes are totals over the run, *wall s* the "
        "sum of round times, *agg error* the mean relative aggregation error over rounds. "
        f"★ = on the Pareto front of final {label} vs total uplink bytes.",
        "",
        "## Runs",
        "",
        _markdown_table(*run_table(report)),
    ]
    notes = incomplete_notes(report)
    if notes:
        lines += [
            "",
            "Flagged runs — *stopped* or *interrupted* runs did not finish their configured "
            "rounds; their final values are not the run's and they are never ranked on the "
            "Pareto front (a *budget* stop is what the run was configured to do, and is ranked):",
            "",
            *(f"- {line}" for line in notes),
        ]
    if report.groups:
        lines += [
            "",
            "## Across seeds",
            "",
            "Runs whose labels differ only by seed; mean ± sample std (ddof = 1). "
            "*Rounds to target* averages the runs that reached it (reached/total).",
            "",
            _markdown_table(*group_table(report)),
        ]
    lines += [
        "",
        "## Curves",
        "",
        f"![{label} vs round]({ROUND_PLOT})",
        "",
        f"![{label} vs cumulative uplink bytes]({UPLINK_PLOT})",
        "",
        f"Second plot: round 0 (no bytes yet) is left out of the log axis; each run's final "
        f"{label} is a marker (filled = Pareto-optimal), the dashed line joins the Pareto front.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def _styles(report: Report) -> list[tuple[str, str]]:
    """(colour, line style) per run: one colour per seed group."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    groups: dict[str, int] = {}
    seen: dict[str, int] = {}
    styles = []
    for row in report.rows:
        colour = palette[groups.setdefault(row.group, len(groups)) % len(palette)]
        k = seen.get(row.group, 0)
        seen[row.group] = k + 1
        styles.append((colour, ("-", "--", ":", "-.")[k % 4]))
    return styles


def _figure(num_runs: int) -> Any:
    """A figure with room below the axes for one legend line per run."""
    from matplotlib.figure import Figure

    return Figure(figsize=(10, 4.5 + 0.2 * (num_runs + 2)), layout="constrained")


def _legend(fig: Any, ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    labels = [label if len(label) <= 120 else label[:119] + "…" for label in labels]
    fig.legend(handles, labels, loc="outside lower center", fontsize="small", frameon=False)


def _png(fig: Any) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_rounds(report: Report) -> bytes:
    """PNG: the report metric vs round, one line per run."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure(len(report.runs))
    ax = fig.add_subplot()
    for run, row, (colour, style) in zip(report.runs, report.rows, _styles(report), strict=True):
        series = run.series(report.metric)
        ax.plot(
            [r for r, _ in series],
            [v for _, v in series],
            style,
            marker="o",
            markersize=3,
            color=colour,
            label=row.label,
        )
    if report.target is not None:
        ax.axhline(report.target, color="grey", linewidth=0.8, linestyle=":", label="target")
    ax.set(xlabel="round", ylabel=report.metric, title=f"{report.metric} vs round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    _legend(fig, ax)
    return _png(fig)


def plot_uplink(report: Report) -> bytes:
    """PNG: the report metric vs cumulative uplink bytes (log x), Pareto front marked."""
    fig = _figure(len(report.runs))
    ax = fig.add_subplot()
    front: list[tuple[float, float]] = []
    positive = False
    for run, row, (colour, style) in zip(report.runs, report.rows, _styles(report), strict=True):
        cumulative, xs, ys = 0, [], []
        for record in run.rounds:
            cumulative += int(record["uplink_bytes"])
            value = record.get(report.metric)
            if value is not None and cumulative > 0:
                xs.append(float(cumulative))
                ys.append(float(value))
        positive = positive or bool(xs)
        ax.plot(xs, ys, style, color=colour, alpha=0.6, linewidth=1, label=row.label)
        if xs:
            ax.plot(
                xs[-1:],
                ys[-1:],
                "o",
                color=colour,
                markersize=7 if row.pareto else 5,
                markerfacecolor=colour if row.pareto else "white",
            )
            if row.pareto:
                front.append((xs[-1], ys[-1]))
    if len(front) > 1:
        front.sort()
        ax.plot(
            [x for x, _ in front],
            [y for _, y in front],
            "--",
            color="black",
            linewidth=1.5,
            label="Pareto front",
            drawstyle="steps-post",
        )
    elif front:
        ax.plot(front[0][0], front[0][1], "*", color="black", markersize=12, label="Pareto front")
    if positive:
        ax.set_xscale("log")
    ax.set(
        xlabel="cumulative uplink bytes",
        ylabel=report.metric,
        title=f"{report.metric} vs uplink bytes",
    )
    ax.grid(alpha=0.3, which="both")
    _legend(fig, ax)
    return _png(fig)


# ---------------------------------------------------------------------------- entry point


def compare(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    target: float | None = None,
    label_keys: Sequence[str] | None = None,
) -> Report:
    """Load ``run_dirs``, compare them and write ``out_dir/report.md`` with its PNGs.

    Args:
        run_dirs: run directories (each with ``summary.json``), in table order.
        out_dir: the report directory (created if needed); files are written
            atomically.
        target: see :func:`build_report`.
        label_keys: see :func:`build_report`.

    Raises:
        FedPeftError: if a run directory is missing, malformed or given twice.
    """
    resolved = [pathlib.Path(d).resolve() for d in run_dirs]
    for k, path in enumerate(resolved):
        if path in resolved[:k]:
            raise FedPeftError(f"run directory {run_dirs[k]!s} is given more than once")
    report = build_report([load_run(d) for d in run_dirs], target=target, label_keys=label_keys)
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / ROUND_PLOT, out / UPLINK_PLOT, out / "report.md"]
    atomic_write(files[0], plot_rounds(report))
    atomic_write(files[1], plot_uplink(report))
    atomic_write(files[2], render_markdown(report, out).encode())
    return dataclasses.replace(report, out_dir=out, files=tuple(files))
