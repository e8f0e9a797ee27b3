"""Results of a run: ``summary.json``, ``metrics.csv``, ``curves.png``, ``config.json``.

Files are rewritten after every round through a temporary file and an atomic
rename, so an interrupted run leaves the last complete state on disk, never a torn
file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import platform
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROUND_FIELDS = ("round", "accuracy", "loss", "uplink_bytes", "downlink_bytes", "seconds")

OUTCOMES = ("complete", "budget", "failed")
"""``summary.json`` → ``outcome``: every round ran; the run stopped before a round that
would exceed ``budget.bytes`` (as configured); a round failed (``stopped`` says why)."""


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
        rounds: one dict per round (round 0 = before training) with at least
            :data:`ROUND_FIELDS`.
        extra: run-level fields added to ``summary.json``.
    """

    directory: pathlib.Path
    strategy: str
    task: str
    rounds: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add_round(self, record: Mapping[str, Any]) -> None:
        """Append (or replace) a round's record and rewrite the files."""
        record = dict(record)
        self.rounds = [r for r in self.rounds if r["round"] != record["round"]]
        self.rounds.append(record)
        self.rounds.sort(key=lambda r: r["round"])
        self.write()

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` content."""
        return {"strategy": self.strategy, "task": self.task, **self.extra, "rounds": self.rounds}

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
