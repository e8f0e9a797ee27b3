"""A whole run's server side, without transport: from the flat config to the results.

``fedpeft.flower.server_app.run_server`` drives it: :class:`ServerRun` checks the config,
loads the model, the test data and (on resume) the checkpoint; once the transport knows
the nodes, :meth:`ServerRun.start` builds the round engine, its first state and the
round-end listeners; :meth:`ServerRun.stop` records why a run stopped early and
:meth:`ServerRun.finish` writes the totals, the adapter and the plots.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fedpeft.checkpoint import (
    Expected,
    architecture_of,
    check_client_states,
    keep_details_until,
    load_for_resume,
    run_identity,
    write_identity,
)
from fedpeft.config import RunConfig, parse_run_config
from fedpeft.ledger import ByteLedger
from fedpeft.results import RunResults, write_config
from fedpeft.server.engine import RoundEngine, ServerState
from fedpeft.server.listeners import Checkpointer, Observer, Progress, ResultsWriter, RoundListener
from fedpeft.server.lock import OutputLock
from fedpeft.server.setup import build_strategy, checkpoint_dir, resolve_output_dir
from fedpeft.types import NodeInfo

log = logging.getLogger("fedpeft")


class ServerRun:
    """One run's server side, set up from its flat config.

    Args:
        run_config: the flat run config.
        observer: progress callbacks.
    """

    def __init__(self, run_config: Mapping[str, Any], observer: Observer | None = None) -> None:
        self.observer = observer or Observer()
        cfg = parse_run_config(run_config)
        self.fed, self.uplink, self.downlink = build_strategy(cfg)
        self.out_dir = resolve_output_dir(cfg)
        self.cfg = cfg = dataclasses.replace(
            cfg, output=dataclasses.replace(cfg.output, dir=str(self.out_dir))
        )
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = checkpoint_dir(cfg)
        # one writer per directory, taken before anything is written (see OutputLock)
        self._locks = [OutputLock(self.out_dir)]
        uses_ckpt = cfg.checkpoint.every or cfg.checkpoint.resume
        if uses_ckpt and not self.ckpt_dir.is_relative_to(self.out_dir):
            self._locks.append(OutputLock(self.ckpt_dir))
        try:
            for lock in self._locks:
                lock.acquire()
            self._setup(cfg)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: RunConfig) -> None:
        """Everything after the locks: config record, model, checkpoint, test data."""
        from fedpeft.tasks import get_task

        self.details = self.out_dir / "details.jsonl"
        self.resumed = None
        if not cfg.checkpoint.resume:
            write_config(self.out_dir, cfg.to_flat(), cfg.seed)
        self.task = get_task(cfg)
        self.model = self.task.model(cfg.lora.max_rank)
        expected = self._expected()
        if cfg.checkpoint.resume:  # a continuation: its checkpoint must exist, be readable
            # and be this run's (identity, tensor names and shapes); nothing is changed before
            self.resumed = load_for_resume(self.ckpt_dir, cfg.federation.rounds, expected)
            check_client_states(self.ckpt_dir, self.resumed.server_round, expected)
            keep_details_until(self.details, self.resumed.server_round)
            write_config(self.out_dir, cfg.to_flat(), cfg.seed)
        if cfg.checkpoint.every:
            write_identity(self.ckpt_dir, expected.identity)
        self.test = self.task.test_data() if cfg.eval.server else None
        self.results = RunResults(self.out_dir, strategy=cfg.strategy.name, task=cfg.task.name)

    def close(self) -> None:
        """Release the output directory (the process's exit would too)."""
        for lock in self._locks:
            lock.release()

    def _expected(self) -> Expected:
        """This run's identity and adapter shapes, which a checkpoint must match."""
        from fedpeft.lora.peft_io import base_delta_key, lora_modules

        cfg, model = self.cfg, self.model
        optional = {}
        for module in lora_modules(model.initial):  # base deltas (FedEx-LoRA, FLoRA, Ferret)
            layer = model.model.get_submodule(module)
            weight = getattr(getattr(layer, "base_layer", None), "weight", None)
            if weight is not None:
                shape = tuple(weight.shape)
                flipped = getattr(layer, "fan_in_fan_out", False)
                optional[base_delta_key(module)] = shape[::-1] if flipped else shape
        identity = run_identity(
            cfg.task.name, self.task.model_name, architecture_of(model.model),
            cfg.lora.max_rank, self.task.targets, cfg.strategy.name,
        )
        shapes = {k: tuple(v.shape) for k, v in model.initial.items()}
        return Expected(identity, shapes, optional, cfg.federation.clients)

    def evaluate(self, tensors: Mapping[str, Any]) -> dict[str, float]:
        """Server-side evaluation of a global adapter (``{}`` with ``eval.server=false``)."""
        if self.test is None:
            return {}
        self.model.load(tensors)
        return self.task.evaluate(self.model, self.test)

    def start(self, nodes: Sequence[NodeInfo]) -> tuple[RoundEngine, ServerState, list[RoundListener]]:
        """The engine for ``nodes``, the state to continue from and the listeners."""
        cfg = self.cfg
        client_state_dir = str(self.ckpt_dir) if cfg.checkpoint.every and cfg.checkpoint.client_state else ""
        engine = RoundEngine(
            cfg, self.fed, self.uplink, self.downlink, nodes, self.model.layout, self.evaluate, client_state_dir
        )
        self.results.extra.update(
            {"seed": cfg.seed, "clients": len(nodes), "codec": {"uplink": self.uplink.name, "downlink": self.downlink.name}}
        )
        split = self.task.split_summary(cfg.federation.clients)
        self.results.extra["split"] = split
        if self.resumed is not None:
            r = self.resumed
            state = ServerState.from_checkpoint(r.server_round, r.global_tensors, r.states, r.meta["ledger"])
            self.results.rounds = list(r.meta["results"])
            log.info("resuming after round %d from %s", r.server_round, self.ckpt_dir)
        else:
            state = engine.initial_state(self.model.initial)
            self.details.write_text("")
        listeners: list[RoundListener] = [
            ResultsWriter(self.results, self.details, split),
            Checkpointer(self.ckpt_dir, cfg.checkpoint.every, cfg.federation.rounds, self.results),
            Progress(self.observer),
        ]
        self.observer.run_start(cfg.federation.rounds, self.out_dir)
        return engine, state, listeners

    def stop(self, err: Exception, outcome: str) -> None:
        """Record that the run stopped early (``outcome``: ``"failed"`` or ``"budget"``)."""
        self.results.extra.update(stopped=str(err), outcome=outcome)
        if outcome == "failed":
            self.results.write()
            log.error("run stopped cleanly: %s; resume with --resume %s", err, self.out_dir)
        else:
            log.warning("run stopped cleanly: %s", err)

    def finish(self, state: ServerState) -> RunResults:
        """Write the totals, the adapter (``output.save-adapter``) and the plots."""
        self.results.extra.setdefault("outcome", "complete")
        ledger = ByteLedger(list(state.ledger))
        self.results.extra["totals"] = {
            "uplink_bytes": ledger.total("uplink"),
            "downlink_bytes": ledger.total("downlink"),
            "uplink_payload_bytes": ledger.total("uplink", payload=True),
            "downlink_payload_bytes": ledger.total("downlink", payload=True),
        }
        self.results.write()
        if self.cfg.output.save_adapter:
            self.model.load(state.global_tensors)
            self.model.save_adapter(self.out_dir / "adapter")
            self.task.save_extras(self.out_dir / "adapter")
        self.results.plot()
        return self.results
