"""Round-end listeners: what happens to a finished round (no Flower import).

The engine produces a :class:`~fedpeft.server.engine.ServerState` and a round record;
each listener gets both, in order: the results writer (``summary.json``,
``metrics.csv``, ``details.jsonl``), the checkpointer, the progress display.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

from fedpeft.checkpoint import save_checkpoint
from fedpeft.ledger import ByteLedger
from fedpeft.results import RoundRecord, RunResults
from fedpeft.server.engine import RoundWork, ServerState


class Observer:
    """Progress callbacks (the CLI's progress display implements them)."""

    def run_start(self, num_rounds: int, out_dir: pathlib.Path) -> None:
        """The run is configured and about to start."""

    def round_start(self, server_round: int, num_clients: int) -> None:
        """Training messages for ``server_round`` were sent."""

    def reply(self, server_round: int, node_id: int, ok: bool) -> None:
        """One reply arrived."""

    def round_end(self, record: Mapping[str, Any]) -> None:
        """The round's results were written."""


class RoundListener:
    """Called once per finished round (round 0 included, with ``work=None``)."""

    def round_end(self, state: ServerState, record: RoundRecord, work: RoundWork | None) -> None:
        """``state`` after the round, its ``record``, and the round's scratch."""


class ResultsWriter(RoundListener):
    """Adds the record to ``summary.json``/``metrics.csv`` and a line to ``details.jsonl``
    (per-client bytes, every metric, rejection reasons; round 0 also the data split)."""

    def __init__(self, results: RunResults, details: pathlib.Path, split: Mapping[str, Any] | None) -> None:
        self.results = results
        self.details = details
        self.split = split

    def round_end(self, state: ServerState, record: RoundRecord, work: RoundWork | None) -> None:
        """Write the round."""
        self.results.add_round(record)
        ledger = ByteLedger(list(state.ledger))
        metrics = work.metrics if work is not None else {}
        line: dict[str, Any] = {
            "round": state.round,
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)},
            "reasons": work.reasons if work is not None else [],
            "bytes": {
                "uplink": ledger.per_client(state.round, "uplink"),
                "downlink": ledger.per_client(state.round, "downlink"),
            },
        }
        if state.round == 0 and self.split is not None:  # the split the run trained on
            line["split"] = self.split
        with self.details.open("a") as handle:
            handle.write(json.dumps(line, default=str) + "\n")


class Checkpointer(RoundListener):
    """Saves the state every ``every`` rounds and after the last (``every=0``: never)."""

    def __init__(self, directory: pathlib.Path, every: int, num_rounds: int, results: RunResults) -> None:
        self.directory = directory
        self.every = every
        self.num_rounds = num_rounds
        self.results = results

    def round_end(self, state: ServerState, record: RoundRecord, work: RoundWork | None) -> None:
        """Checkpoint if this round is due."""
        r = state.round
        if not self.every or r == 0 or (r % self.every and r != self.num_rounds):
            return
        save_checkpoint(
            self.directory,
            r,
            state.global_tensors,
            state.checkpoint_states(),
            {"results": self.results.rounds, "ledger": list(state.ledger)},
        )


class Progress(RoundListener):
    """Forwards the record to an :class:`Observer`."""

    def __init__(self, observer: Observer) -> None:
        self.observer = observer

    def round_end(self, state: ServerState, record: RoundRecord, work: RoundWork | None) -> None:
        """Tell the observer."""
        self.observer.round_end(record)
