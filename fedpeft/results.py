"""Results of a run: ``summary.json``, ``metrics.csv``, ``curves.png``, ``config.json``.

Files are rewritten after every round through a temporary file and an atomic
rename, so an interrupted run leaves the last complete state on disk, never a torn
file.
"""

import csv
import io
import json
import math
import os
import pathlib
import platform
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Required, TypedDict, Union, get_args, get_origin, get_type_hints

from fedpeft.errors import FedPeftError

Outcome = Literal["complete", "budget", "failed"]
"""``summary.json`` → ``outcome``: every round ran; the run stopped before a round that
would exceed ``budget.bytes`` (as configured); a round failed (``stopped`` says why)."""

OUTCOMES: tuple[str, ...] = get_args(Outcome)


class ClientRecord(TypedDict, total=False):
    """One client's line in a round record (``rounds[t].clients[i]``). Besides these
    fields it holds the client's reply metrics under their own names (``train-loss``,
    ``steps``, ``train-seconds``, a strategy's own)."""

    node_id: Required[int]
    partition_id: Required[int]
    rank: Required[int]
    num_examples: Required[int]  # the real count, whatever aggregation.weighting is
    uplink_bytes: Required[int]
    downlink_bytes: Required[int]
    client_seconds: Required[float]  # simulated on its device profile when one is set
    measured_seconds: float  # with devices.profile: the real time
    device: str  # with devices.profile: the tier
    prune_ratio: float  # FedSpine


class RoundRecord(TypedDict, total=False):
    """One round's record: a line of ``summary.json`` → ``rounds`` and of
    ``metrics.csv``, written by the round engine (``fedpeft.server.engine``), read back
    by ``fedpeft compare`` (:func:`parse_round`). Round 0 is the initial adapter (no
    training: only the evaluation and zero bytes). ``Required`` marks what a reader
    may rely on in any file; the rest depends on the task, the round and the config."""

    round: Required[int]
    uplink_bytes: Required[int]  # wire bytes (payload + record framing), all clients
    downlink_bytes: Required[int]
    seconds: Required[float]  # the round's wall time (training, aggregation, evaluation)
    accuracy: float | None  # server evaluation (classification)
    loss: float | None  # server evaluation loss (or the train loss with eval.server off)
    perplexity: float | None  # server evaluation (causal LM)
    backdoor_asr: float  # with faults.attack=backdoor: triggered test inputs classified as the target
    backdoor_flip: float  # …among those the model gets right untriggered (the trigger's own effect)
    uplink_payload_bytes: int  # the tensors' encoded bytes only
    downlink_payload_bytes: int
    sampled: int
    rejected: int  # updates refused by validation or left out by a layer
    failed: int  # clients whose reply never came or was an error
    train_loss: float | None  # the example-weighted mean of the clients' train loss
    aggregation_error: float | None  # ‖ΣpₖsBₖAₖ − sB̄Ā‖/‖ΣpₖsBₖAₖ‖ (ALGORITHMS.md §13)
    aggregation_cosine: float | None
    clients: list[ClientRecord]
    simulated_seconds: float  # with devices.profile: the slowest device's time
    strategy_metrics: dict[str, float]  # the strategy's and layers' metrics
    server_codec_seconds: float  # encoding downlinks and decoding uplinks, this round
    client_accuracy: float  # with eval.client: example-weighted client evaluation
    client_loss: float
    client_perplexity: float


class Totals(TypedDict):
    """``summary.json`` → ``totals``: the whole run's bytes."""

    uplink_bytes: int
    downlink_bytes: int
    uplink_payload_bytes: int
    downlink_payload_bytes: int


class RunSummary(TypedDict, total=False):
    """``summary.json``."""

    strategy: Required[str]
    task: Required[str]
    rounds: Required[list[RoundRecord]]
    seed: int
    clients: int
    codec: dict[str, str]  # {"uplink": chain, "downlink": chain}
    split: dict[str, Any]  # the partition's statistics
    outcome: Outcome  # absent while the run is going, or if it was killed
    stopped: str  # why the run stopped early
    totals: Totals


ROUND_FIELDS = ("round", "accuracy", "loss", "uplink_bytes", "downlink_bytes", "seconds")
"""The first columns of ``metrics.csv``."""


def _number_kinds() -> dict[str, tuple[type, bool]]:
    """``{field: (int or float, None allowed)}`` for the numeric fields of
    :class:`RoundRecord`."""
    out = {}
    for name, hint in get_type_hints(RoundRecord).items():
        args = set(get_args(hint)) if get_origin(hint) in (Union, types.UnionType) else {hint}
        nullable = type(None) in args
        kind = (args - {type(None)}).pop() if len(args - {type(None)}) == 1 else None
        if kind in (int, float):
            out[name] = (kind, nullable)
    return out


_NUMBERS = _number_kinds()


def parse_round(raw: Any, where: str) -> RoundRecord:
    """A round record read from a file, checked against :class:`RoundRecord`: the
    required fields present, every numeric field a finite number (an integer where the
    schema says ``int``); optional fields that may be null and are absent become
    ``None``. Unknown fields are kept.

    Args:
        raw: one entry of ``summary.json`` → ``rounds``.
        where: how to name it in errors, e.g. ``"runs/x/summary.json: rounds[3]"``.

    Raises:
        FedPeftError: naming the field and what it should be.
    """
    if not isinstance(raw, dict):
        raise FedPeftError(f"{where} must be an object, got {raw!r:.60}")
    missing = [k for k in ("round", *sorted(RoundRecord.__required_keys__ - {"round"})) if k not in raw]
    if missing:
        label = f"{where} (round {raw['round']})" if "round" in raw else where
        raise FedPeftError(
            f"{label} has no {missing[0]!r} field; expected "
            f"{', '.join(sorted(RoundRecord.__required_keys__))} in every round"
        )
    record: dict[str, Any] = dict(raw)
    for key, (kind, nullable) in _NUMBERS.items():
        value = raw.get(key)
        if value is None:
            if key in raw and not nullable:
                raise FedPeftError(f"{where}.{key} must be a number, got null")
            if nullable:
                record[key] = None
            continue
        integer = kind is int
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if not ok or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            what = "an integer" if integer else "a finite number"
            raise FedPeftError(f"{where}.{key} must be {what}, got {value!r}")
    return typing.cast(RoundRecord, record)


def outcome_of(summary: Mapping[str, Any]) -> str:
    """The run's outcome (one of :data:`OUTCOMES`), or ``""`` while it is running or if
    it was killed before it could write one. ``summary.json`` files written before the
    ``outcome`` field existed are read from their ``stopped`` reason."""
    outcome = summary.get("outcome")
    if outcome in OUTCOMES:
        return str(outcome)
    stopped = summary.get("stopped")
    if stopped is not None:
        return "budget" if "budget.bytes" in str(stopped) else "failed"
    return ""


def completed_run(directory: pathlib.Path, flat: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``summary.json`` of ``directory`` when it holds a complete run (``outcome``
    ``complete``) of exactly ``flat``'s resolved config (``output.dir`` aside), else
    ``None``: what a sweep may reuse instead of running again.

    A key that the run's record lacks because it was added to fedpeft after the run counts
    as equal when ``flat`` leaves it at its default: a new key's default keeps what ran
    before (that is how keys are added), so benchmarks keep their finished runs across
    releases. A key at any other value, or a removed key, makes the run differ."""
    from fedpeft.config import parse_run_config

    summary_file, config_file = directory / "summary.json", directory / "config.json"
    if not (summary_file.is_file() and config_file.is_file()):
        return None
    summary = json.loads(summary_file.read_text())
    done = dict(json.loads(config_file.read_text()).get("config", {}))
    want = parse_run_config(flat).to_flat()
    defaults = parse_run_config({}).to_flat()
    for key in set(want) - set(done):
        if want[key] == defaults.get(key, object()):
            want.pop(key)
    done.pop("output.dir", None)
    want.pop("output.dir", None)
    return summary if outcome_of(summary) == "complete" and done == want else None


def atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same dir + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def versions() -> dict[str, str]:
    """Versions of the packages that decide a run's numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("fedpeft", "flwr", "torch", "transformers", "peft", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class RunResults:
    """Per-round records of a run, written to ``directory`` as they arrive.

    Attributes:
        directory: the results directory.
        strategy: strategy name.
        task: task name.
        rounds: one :class:`RoundRecord` per round (round 0 = before training).
        extra: run-level fields added to ``summary.json``.
    """

    directory: pathlib.Path
    strategy: str
    task: str
    rounds: list[RoundRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add_round(self, record: RoundRecord) -> None:
        """Append (or replace) a round's record and rewrite the files."""
        record = typing.cast(RoundRecord, dict(record))
        self.rounds = [r for r in self.rounds if r["round"] != record["round"]]
        self.rounds.append(record)
        self.rounds.sort(key=lambda r: r["round"])
        self.write()

    def summary(self) -> RunSummary:
        """The ``summary.json`` content."""
        return typing.cast(
            RunSummary,
            {"strategy": self.strategy, "task": self.task, **self.extra, "rounds": self.rounds},
        )

    def write(self) -> None:
        """Rewrite ``summary.json`` and ``metrics.csv``."""
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(
            self.directory / "summary.json",
            json.dumps(self.summary(), indent=2, allow_nan=False).encode(),
        )
        columns = list(ROUND_FIELDS) + sorted(
            {k for r in self.rounds for k, v in r.items() if k not in ROUND_FIELDS and _scalar(v)}
        )
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in self.rounds:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
        atomic_write(self.directory / "metrics.csv", buf.getvalue().encode())

    def plot(self) -> None:
        """``curves.png``: accuracy/loss vs round and vs cumulative bytes."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = [r["round"] for r in self.rounds]
        cum, total = [], 0
        for r in self.rounds:
            total += int(r.get("uplink_bytes", 0)) + int(r.get("downlink_bytes", 0))
            cum.append(total / 1e6)
        has_acc = any(r.get("accuracy") is not None for r in self.rounds)
        metric = "accuracy" if has_acc else "loss"
        values = [r.get(metric) for r in self.rounds]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot(rounds, values, marker="o")
        axes[0].set(xlabel="round", ylabel=metric, title=f"{metric} vs round")
        axes[1].plot(rounds, [r.get("loss") for r in self.rounds], marker="o", color="tab:red")
        axes[1].set(xlabel="round", ylabel="loss", title="loss vs round")
        axes[2].plot(cum, values, marker="o", color="tab:green")
        axes[2].set(xlabel="cumulative MB (up + down)", ylabel=metric, title=f"{metric} vs bytes")
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.suptitle(f"{self.strategy} on {self.task}")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write(self.directory / "curves.png", buf.getvalue())


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str)) or value is None


def write_config(directory: pathlib.Path, flat: Mapping[str, Any], seed: int) -> None:
    """``config.json``: the resolved flat config, the seed and package versions."""
    atomic_write(
        directory / "config.json",
        json.dumps({"config": dict(flat), "seed": seed, "versions": versions()}, indent=2).encode(),
    )
