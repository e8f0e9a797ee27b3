"""The ServerApp and the one class that subclasses Flower's ``Strategy``.

``FlowerStrategyAdapter`` turns a :class:`~fedpeft.registry.FedStrategy` (selector,
aggregator, client algorithm) plus the configured codecs into Flower's five
strategy methods; Flower's ``Strategy.start`` owns the round loop.

Per round:

1. ``configure_train``: the selector plans the round; each planned client gets the
   aggregator's ``client_payload``, encoded with the downlink codec, in its own
   message.
2. ``aggregate_train``: error replies are logged and dropped; every other reply is
   decoded and validated (keys, shapes for the client's rank, dtype, finite values)
   — a bad one is rejected with a logged reason and never touches the global
   state; the aggregator runs on what is left; the selector gets feedback.
3. ``evaluate_fn`` (centralised evaluation) writes the round's results.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedpeft.aggregation.robust import clip_update, outliers, update_norm
from fedpeft.checkpoint import (
    check_client_states,
    client_state_problem,
    keep_details_until,
    load_for_resume,
    save_checkpoint,
)
from fedpeft.codecs import CodecContext, build_codec
from fedpeft.codecs.base import Chain, CodecState
from fedpeft.config import RunConfig, parse_run_config
from fedpeft.devices import (
    DeviceProfile,
    parse_device_profile,
    profile_for,
    simulated_round_seconds,
    tier_of,
)
from fedpeft.errors import CodecError, ConfigError, FedPeftError, IncompatibleUpdateError
from fedpeft.faults import draw_fault
from fedpeft.flower import records as rec
from fedpeft.flower.wire import decode_tensors, encode_tensors
from fedpeft.ledger import ByteLedger
from fedpeft.lora.ops import aggregation_error
from fedpeft.lora.peft_io import (
    AdapterLayout,
    base_delta_module,
    factor_keys,
    is_base_delta_key,
    is_lora_key,
    lora_module_of,
    shape_for_rank,
    split_adapter,
)
from fedpeft.registry import FedStrategy, StrategyEnv, get_strategy
from fedpeft.results import RunResults, write_config
from fedpeft.seeding import derive_seed
from fedpeft.selection import UniformSelector
from fedpeft.types import AUX_PREFIX, ClientPlan, ClientUpdate, NodeInfo, RoundOutput, TensorDict

log = logging.getLogger("fedpeft")



class RoundFailed(FedPeftError):
    """A round got fewer valid updates than ``federation.min-replies`` after retries."""


class BudgetExhausted(FedPeftError):
    """The next round would exceed ``budget.bytes``."""


class ClientStateUnreadable(RoundFailed):
    """A client could not read its saved state: the run stops (the client is not
    dropped), since it cannot continue exactly without that state."""


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


def strategy_env(cfg: RunConfig) -> StrategyEnv:
    """Run-level facts handed to a strategy's ``build``."""
    return StrategyEnv(
        seed=cfg.seed,
        num_rounds=cfg.federation.rounds,
        clients_per_round=cfg.federation.sampled,
        rank=cfg.lora.max_rank,
        ranks=cfg.lora.rank_list,
        lora_alpha=cfg.lora.alpha,
        use_rslora=cfg.lora.rslora,
    )


def build_strategy(cfg: RunConfig) -> tuple[FedStrategy, Chain, Chain]:
    """The configured strategy and codecs, with their compatibility checked.

    Raises:
        ConfigError: a lossy codec with a strategy that needs exact tensors.
    """
    fed = get_strategy(cfg.strategy.name).build(cfg.options, strategy_env(cfg))
    uplink, downlink = build_codec(cfg.codec.uplink), build_codec(cfg.codec.downlink)
    if not fed.lossy_codecs:
        lossy = [
            f"codec.{d}={c.name!r}" for d, c in (("uplink", uplink), ("downlink", downlink))
            if not c.lossless
        ]
        if lossy:
            raise ConfigError(
                f"strategy {cfg.strategy.name!r} needs exact client tensors and cannot be "
                f"combined with the lossy codec {', '.join(lossy)}; use a lossless chain "
                "such as 'identity' or 'zstd'"
            )
    problems = []
    name = cfg.strategy.name
    one_way = [s.name for s in downlink.stages if getattr(s, "uplink_only", False)]
    if one_way:
        problems.append(
            f"codec.downlink: stage(s) {one_way} code a client's change and work on the "
            "uplink only; use them in codec.uplink"
        )
    if cfg.privacy.secagg:
        if fed.needs_individual_updates:
            problems.append(
                f"privacy.secagg: strategy {name!r} needs each client's individual update, "
                "which sum-only secure aggregation hides; it cannot run under SecAgg"
            )
        else:
            problems.append(
                "privacy.secagg: Flower 1.41 provides SecAgg+ only in its legacy API, which "
                "fedpeft does not use; secure aggregation is not available"
            )
    if cfg.privacy.dp != "none":
        if not fed.dp_compatible:
            problems.append(
                f"privacy.dp={cfg.privacy.dp!r} does not compose with strategy {name!r}: Flower's "
                "DP clipping needs clients to upload the whole global adapter (use fedit with "
                "one rank)"
            )
        if not uplink.lossless:
            problems.append(
                f"privacy.dp={cfg.privacy.dp!r} needs a lossless codec.uplink, got {uplink.name!r}"
            )
    if problems:
        raise ConfigError(problems)
    return fed, uplink, downlink


def wrap_privacy(cfg: RunConfig, strategy: Strategy) -> Strategy:
    """Wrap the adapter in Flower's DP strategy wrapper if ``privacy.dp`` asks for it."""
    if cfg.privacy.dp == "server-fixed":
        from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

        return DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=cfg.privacy.noise_multiplier,
            clipping_norm=cfg.privacy.clip_norm,
            num_sampled_clients=cfg.federation.sampled,
        )
    return strategy


@dataclass
class RoundLog:
    """What happened in one round besides the aggregate (for results)."""

    started: float = 0.0
    sampled: int = 0
    replies: int = 0
    rejected: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    clients: list[dict[str, Any]] = field(default_factory=list)
    strategy_metrics: dict[str, float] = field(default_factory=dict)


def device_profiles(mix: str, nodes: Sequence[NodeInfo]) -> dict[int, tuple[str, DeviceProfile]]:
    """``{node_id: (tier, profile)}`` from the mix ``devices.profile`` (by partition id)
    and each node's ``device.*`` node-config overrides; ``{}`` when ``mix`` is ``""``.

    Raises:
        ConfigError: a node's ``device.*`` keys are invalid (the node is named).
    """
    if not mix:
        return {}
    out = {}
    for n in nodes:
        props = dict(n.properties)
        try:
            profile = parse_device_profile(props, default=profile_for(mix, n.partition_id))
        except ConfigError as err:
            raise ConfigError(f"node {n.node_id} (partition {n.partition_id}): {err}") from err
        out[n.node_id] = (str(props.get("device.tier", tier_of(mix, n.partition_id))), profile)
    return out


class FlowerStrategyAdapter(Strategy):
    """Runs a ``FedStrategy`` through Flower's strategy interface.

    Args:
        cfg: the parsed run config.
        fed: the strategy's components.
        uplink: the uplink codec chain.
        downlink: the downlink codec chain.
        nodes: the nodes found at start-up.
        initial: the initial global adapter.
        layout: adapter layout (scaling) for LoRA telemetry.
        observer: progress callbacks.
    """

    def __init__(
        self,
        cfg: RunConfig,
        fed: FedStrategy,
        uplink: Chain,
        downlink: Chain,
        nodes: Sequence[NodeInfo],
        initial: TensorDict,
        layout: AdapterLayout,
        observer: Observer | None = None,
    ) -> None:
        self.cfg = cfg
        self.fed = fed
        self.uplink = uplink
        self.downlink = downlink
        self.nodes = list(nodes)
        self.devices = device_profiles(cfg.devices.profile, self.nodes)
        self.layout = layout
        self.observer = observer or Observer()
        self.selector = fed.selector or UniformSelector(
            clients_per_round=cfg.federation.sampled,
            rank=cfg.lora.max_rank,
            ranks=cfg.lora.rank_list,
            seed=cfg.seed,
        )
        self.global_tensors: TensorDict = dict(initial)
        self.state: Any = fed.aggregator.initialize(self.global_tensors)
        self.selector_state: Any = self.selector.initialize(self.nodes)
        self.ledger = ByteLedger()
        self.down_state: dict[int, CodecState] = {}
        self.plans: dict[int, ClientPlan] = {}
        self.sent: dict[int, TensorDict] = {}
        self.rounds: dict[int, RoundLog] = {}
        self.offset = 0  # rounds completed before this process started (resume)
        self.grid: Grid | None = None

    # -- checkpointing ------------------------------------------------------------
    def checkpoint_states(self) -> dict[str, Any]:
        """Everything besides the global adapter a resumed run needs."""
        return {
            "aggregator": self.state,
            "selector": self.selector_state,
            "downlink_codec": {str(k): v for k, v in self.down_state.items()},
        }

    def restore(self, server_round: int, global_tensors: TensorDict, states: Mapping[str, Any], ledger: list[Any]) -> None:
        """Continue after ``server_round`` from a checkpoint."""
        self.offset = server_round
        self.global_tensors = dict(global_tensors)
        self.state = states["aggregator"]
        self.selector_state = states["selector"]
        self.down_state = {int(k): v for k, v in states.get("downlink_codec", {}).items()}
        self.ledger.restore(ledger)

    # -- Flower's Strategy interface ------------------------------------------------
    def summary(self) -> None:
        """Log what runs."""
        log.info(
            "fedpeft strategy %r, uplink %r, downlink %r, %d nodes",
            self.cfg.strategy.name,
            self.uplink.name,
            self.downlink.name,
            len(self.nodes),
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One training message per planned client."""
        server_round += self.offset
        self.grid = grid
        if self.cfg.privacy.dp != "none":  # the DP wrapper noised the aggregate: adopt it
            self.global_tensors = rec.record_to_tensors(arrays)
        info = RoundLog(started=time.perf_counter())
        self.rounds[server_round] = info
        self.selector_state, plans = self.selector.plan(
            self.selector_state, server_round, self.nodes
        )
        self.plans = dict(plans)
        self.sent = {}
        messages = self._train_messages(server_round, list(self.plans.values()), attempt=0)
        self._check_budget(server_round, messages)
        info.sampled = len(messages)
        self.observer.round_start(server_round, len(messages))
        return messages

    def _train_messages(self, server_round: int, plans: Sequence[ClientPlan], attempt: int) -> list[Message]:
        messages = []
        for plan in plans:
            node_id = plan.node_id
            tensors = self.fed.aggregator.client_payload(self.state, self.global_tensors, plan)
            ctx = CodecContext(
                seed=derive_seed(self.cfg.seed, "downlink", server_round, plan.partition_id),
                direction="downlink",
            )
            try:
                payload, self.down_state[plan.partition_id] = encode_tensors(
                    tensors, self.downlink, self.down_state.get(plan.partition_id, {}), ctx
                )
            except CodecError:  # shapes changed (e.g. a new rank): residuals no longer apply
                payload, self.down_state[plan.partition_id] = encode_tensors(
                    tensors, self.downlink, {}, ctx
                )
            # the client will see the decoded payload; keep exactly that as reference
            self.sent[node_id] = (
                dict(tensors) if self.downlink.lossless else decode_tensors(payload, self.downlink, ctx)
            )
            arrays_rec, meta = rec.payload_to_record(payload)
            content = RecordDict(
                {
                    rec.ARRAYS: arrays_rec,
                    rec.CODEC: meta,
                    rec.CONFIG: ConfigRecord(
                        {**rec.plan_to_config(plan, server_round), **self._client_settings(attempt)}
                    ),
                }
            )
            self.ledger.record(
                server_round, "downlink", node_id, rec.content_nbytes(content), payload.nbytes()
            )
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN))
        return messages

    def _check_budget(self, server_round: int, messages: Sequence[Message]) -> None:
        """Raise before sending if this round would go over ``budget.bytes``."""
        budget = self.cfg.budget.bytes
        if not budget:
            return
        down = self.ledger.round_total(server_round, "downlink")
        previous = server_round - 1
        prev_up = self.ledger.round_total(previous, "uplink")
        prev_down = self.ledger.round_total(previous, "downlink")
        up_estimate = prev_up * down / prev_down if prev_down else down
        spent = self.ledger.total("uplink") + self.ledger.total("downlink") - down
        if spent + down + up_estimate > budget:
            # the messages were built but are not sent: take them off the ledger
            self.ledger.entries = [e for e in self.ledger.entries if e[0] != server_round]
            raise BudgetExhausted(
                f"round {server_round} would need ~{int(down + up_estimate):,} B more, "
                f"{spent:,} of budget.bytes={budget:,} are spent; stopping before it"
            )

    def _client_settings(self, attempt: int) -> dict[str, Any]:
        out: dict[str, Any] = {rec.ATTEMPT: attempt}
        if self.cfg.checkpoint.every and self.cfg.checkpoint.client_state:
            out[rec.CLIENT_CHECKPOINT_DIR] = str(checkpoint_dir(self.cfg))
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, aggregate the good ones, keep the global intact otherwise."""
        server_round += self.offset
        info = self.rounds.setdefault(server_round, RoundLog(started=time.perf_counter()))
        updates, failed_plans = self._collect(
            server_round, list(replies), info, 0, list(self.plans.values())
        )
        attempt = 0
        need = self.cfg.federation.min_replies
        while len(updates) < need and attempt < self.cfg.federation.max_retries and self.grid is not None:
            attempt += 1
            retry = failed_plans or list(self.plans.values())
            log.warning(
                "round %d: %d valid updates, %d needed; retrying %d clients (attempt %d of %d)",
                server_round, len(updates), need, len(retry), attempt, self.cfg.federation.max_retries,
            )
            again = self.grid.send_and_receive(
                self._train_messages(server_round, retry, attempt), timeout=self.cfg.federation.timeout
            )
            more, failed_plans = self._collect(server_round, list(again), info, attempt, retry)
            updates += more
        if len(updates) < need:
            raise RoundFailed(
                f"round {server_round} got {len(updates)} valid updates, "
                f"federation.min-replies is {need} (after {attempt} retries); reasons: "
                + "; ".join(info.reasons[-5:])
            )
        updates = self._robust(server_round, updates, info)
        if not updates:
            log.warning("round %d: no valid update; the global adapter is unchanged", server_round)
            return rec.tensors_to_record(self.global_tensors), None
        try:
            output: RoundOutput[Any] = self.fed.aggregator.aggregate(
                self.state, self.global_tensors, updates, server_round
            )
            self._check_output(output)
        except (FedPeftError, ValueError, RuntimeError) as err:
            info.reasons.append(f"aggregation failed: {err}")
            log.error("round %d: aggregation failed (%s); the global adapter is unchanged", server_round, err)
            return rec.tensors_to_record(self.global_tensors), None
        telemetry = self._telemetry(updates, output.tensors)
        self.state = output.state
        previous = self.global_tensors
        self.global_tensors = dict(output.tensors)
        info.clients = [self._client_record(server_round, u) for u in updates]
        if self.devices:  # the selector sees each device's simulated round time
            updates = [
                dataclasses.replace(u, metrics={**u.metrics, "simulated-seconds": c["client_seconds"]})
                for u, c in zip(updates, info.clients, strict=True)
            ]
        self.selector_state = self.selector.feedback(self.selector_state, updates, output)
        del previous
        info.metrics.update({**_weighted_metrics(updates), **telemetry, **dict(output.metrics)})
        info.strategy_metrics = {k: float(v) for k, v in output.metrics.items() if "layer/" not in k}
        return rec.tensors_to_record(self.global_tensors), rec.metrics_record(
            {k: v for k, v in info.metrics.items() if "/" not in k}
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Client-side evaluation of the global adapter (``eval.client``)."""
        server_round += self.offset
        if not self.cfg.eval.client:
            return []
        messages = []
        for node in self.nodes:
            plan = ClientPlan(
                node_id=node.node_id,
                partition_id=node.partition_id,
                rank=self.cfg.lora.max_rank,
                seed=0,
            )
            tensors = self.fed.aggregator.client_payload(self.state, self.global_tensors, plan)
            content = RecordDict(
                {
                    rec.ARRAYS: rec.tensors_to_record(tensors),
                    rec.CONFIG: ConfigRecord(rec.plan_to_config(plan, server_round)),
                }
            )
            messages.append(Message(content, dst_node_id=node.node_id, message_type=MessageType.EVALUATE))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics."""
        server_round += self.offset
        good = [r for r in replies if not r.has_error()]
        if not good:
            return None
        weights, sums = 0, {}
        for r in good:
            m = r.content[rec.METRICS]
            n = int(m.get(rec.NUM_EXAMPLES, 0))
            weights += n
            for k, v in m.items():
                if k != rec.NUM_EXAMPLES:
                    sums[k] = sums.get(k, 0.0) + n * float(v)
        if weights == 0:
            return None
        out = {f"client_{k}": v / weights for k, v in sums.items()}
        self.rounds.setdefault(server_round, RoundLog()).metrics.update(out)
        return MetricRecord(out)

    # -- helpers ------------------------------------------------------------------
    def _collect(
        self,
        server_round: int,
        replies: list[Message],
        info: RoundLog,
        attempt: int,
        asked: Sequence[ClientPlan],
    ) -> tuple[list[ClientUpdate], list[ClientPlan]]:
        """Decode and validate replies; return the good updates and the failed plans."""
        updates: list[ClientUpdate] = []
        answered: set[int] = set()
        failed: list[ClientPlan] = []
        info.replies += len(replies)
        limit = self.cfg.validation.max_update_bytes
        for reply in replies:
            node_id = reply.metadata.src_node_id
            answered.add(node_id)
            plan = self.plans.get(node_id)
            if plan is not None and draw_fault(self.cfg.faults, self.cfg.seed, server_round, plan.partition_id, attempt) == "drop":
                info.failed += 1
                info.reasons.append(f"node {node_id}: reply dropped (injected fault)")
                log.warning("round %d: dropped the reply of node %d (injected fault)", server_round, node_id)
                failed.append(plan)
                continue
            if reply.has_error():
                unreadable = client_state_problem(str(reply.error.reason))
                if unreadable is not None:
                    raise ClientStateUnreadable(f"node {node_id}: {unreadable}")
                info.failed += 1
                reason = f"node {node_id} replied with an error: {reply.error.reason}"
                info.reasons.append(reason)
                log.warning("round %d: %s; dropping it", server_round, reason)
                if plan is not None:
                    failed.append(plan)
                    hook = getattr(self.fed.aggregator, "client_failed", None)
                    if callable(hook):  # e.g. Ferret resyncs a client that lost its replica
                        self.state = hook(self.state, plan, reason)
                continue
            nbytes = rec.content_nbytes(reply.content)
            self.ledger.record(
                server_round, "uplink", node_id, nbytes, rec.arrays_nbytes(reply.content)
            )
            try:
                if limit and nbytes > limit:
                    raise IncompatibleUpdateError(
                        f"the reply has {nbytes} bytes, validation.max-update-bytes is {limit}"
                    )
                updates.append(self._decode_update(server_round, node_id, reply.content))
            except (FedPeftError, KeyError, ValueError, TypeError) as err:
                info.rejected += 1
                reason = f"node {node_id}: {err}"
                info.reasons.append(reason)
                log.warning("round %d: rejected the update of %s", server_round, reason)
        missing = [p for p in asked if p.node_id not in answered]
        if missing:
            info.failed += len(missing)
            log.warning("round %d: no reply from nodes %s (timeout)", server_round, [p.node_id for p in missing])
            failed += missing
        return updates, failed

    def _robust(self, server_round: int, updates: list[ClientUpdate], info: RoundLog) -> list[ClientUpdate]:
        """Reject norm outliers, then clip (``validation.*``)."""
        v = self.cfg.validation
        norms = [update_norm(u.tensors, self.sent.get(u.node_id, {})) for u in updates]
        bad = set(outliers(norms, v.norm_factor))
        for i in sorted(bad):
            info.rejected += 1
            reason = (
                f"node {updates[i].node_id}: update norm {norms[i]:.3g} exceeds "
                f"validation.norm-factor={v.norm_factor} x the round's median"
            )
            info.reasons.append(reason)
            log.warning("round %d: rejected the update of %s", server_round, reason)
        kept = [u for i, u in enumerate(updates) if i not in bad]
        if v.clip_norm > 0:
            clipped = 0
            out = []
            for u in kept:
                tensors, was = clip_update(u.tensors, self.sent.get(u.node_id, {}), v.clip_norm)
                clipped += int(was)
                out.append(ClientUpdate(u.node_id, tensors, u.num_examples, u.metrics, u.plan))
            info.metrics["clip/clipped"] = float(clipped)
            kept = out
        return kept

    def _decode_update(self, server_round: int, node_id: int, content: RecordDict) -> ClientUpdate:
        plan = self.plans.get(node_id)
        if plan is None:
            raise IncompatibleUpdateError("it was not sampled this round")
        ctx = CodecContext(
            seed=derive_seed(self.cfg.seed, "uplink", server_round, plan.partition_id),
            direction="uplink",
            reference=self.sent.get(node_id),
        )
        payload = rec.record_to_payload(content[rec.ARRAYS], content.get(rec.CODEC))
        try:
            tensors = decode_tensors(payload, self.uplink, ctx)
        except (CodecError, KeyError, ValueError) as err:
            raise CodecError(f"cannot decode with {self.uplink.name!r}: {err}") from err
        self._validate(tensors, plan)
        metrics = content[rec.METRICS]
        check = getattr(self.fed.aggregator, "check_update", None)
        if callable(check):  # the strategy's own validation of what it asked for
            check(self.state, tensors, plan)
        num_examples = metrics.get(rec.NUM_EXAMPLES)
        if not isinstance(num_examples, int) or num_examples < 0:
            raise IncompatibleUpdateError(
                f"'{rec.NUM_EXAMPLES}' must be a non-negative integer, got {num_examples!r}"
            )
        clean = {}
        for k, v in metrics.items():
            if k != rec.NUM_EXAMPLES and isinstance(v, (int, float)) and math.isfinite(float(v)):
                clean[k] = float(v)
        return ClientUpdate(node_id=node_id, tensors=tensors, num_examples=num_examples, metrics=clean, plan=plan)

    def _client_record(self, server_round: int, u: ClientUpdate) -> dict[str, Any]:
        """One client's line in ``summary.json``: plan, bytes, metrics and
        ``client_seconds`` — simulated on its device profile when ``devices.profile``
        is set (:func:`fedpeft.devices.simulated_round_seconds`), else measured."""
        up = self.ledger.per_client(server_round, "uplink").get(u.node_id, 0)
        down = self.ledger.per_client(server_round, "downlink").get(u.node_id, 0)
        measured = float(u.metrics.get("client-seconds", 0.0))
        out: dict[str, Any] = {
            "node_id": u.node_id,
            "partition_id": u.plan.partition_id,
            "rank": u.plan.rank,
            "num_examples": u.num_examples,
            "uplink_bytes": up,
            "downlink_bytes": down,
        }
        if "prune-ratio" in u.plan.options:
            out["prune_ratio"] = float(u.plan.options["prune-ratio"])
        out.update({k: float(v) for k, v in u.metrics.items()})
        out["client_seconds"] = measured
        if u.node_id in self.devices:
            tier, profile = self.devices[u.node_id]
            out["device"] = tier
            out["measured_seconds"] = measured
            out["client_seconds"] = simulated_round_seconds(measured, profile, up, down)
        return out

    def _validate(self, tensors: Mapping[str, torch.Tensor], plan: ClientPlan) -> None:
        """Keys, shapes for the plan's rank, dtype and finiteness of an upload."""
        if not tensors:
            raise IncompatibleUpdateError("the update is empty")
        problems = []
        # a strategy whose clients upload other shapes (FedSpine: pruned rows/columns)
        # says which: ``upload_shape(key, shape for the plan's rank, tensors, plan)``
        upload_shape = getattr(self.fed.aggregator, "upload_shape", None)
        for key, value in tensors.items():
            if key.startswith(AUX_PREFIX):
                if not value.is_floating_point():
                    continue  # integer auxiliary tensors (indices, seeds): always finite
            elif key not in self.global_tensors or is_base_delta_key(key):
                problems.append(f"unexpected key {key!r}")
                continue
            else:
                want = shape_for_rank(key, tuple(self.global_tensors[key].shape), plan.rank)
                if callable(upload_shape):
                    want = tuple(upload_shape(key, want, tensors, plan))
                if tuple(value.shape) != want:
                    problems.append(
                        f"{key!r} has shape {tuple(value.shape)}, expected {want} for rank {plan.rank}"
                    )
                    continue
            if not value.is_floating_point():
                problems.append(f"{key!r} has dtype {value.dtype}, expected a float tensor")
            elif not bool(torch.isfinite(value).all()):
                problems.append(f"{key!r} has non-finite values")
        if problems:
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            raise IncompatibleUpdateError("; ".join(problems[:3]) + more)

    def _check_output(self, output: RoundOutput[Any]) -> None:
        missing = sorted(set(self.global_tensors) - set(output.tensors))
        if missing:
            raise IncompatibleUpdateError(f"aggregator dropped global keys {missing[:3]}")
        for key, value in output.tensors.items():
            if not bool(torch.isfinite(value).all()):
                raise IncompatibleUpdateError(f"aggregated {key!r} has non-finite values")

    def _telemetry(self, updates: Sequence[ClientUpdate], new_global: TensorDict) -> dict[str, float]:
        """Aggregation error of the LoRA product (ALGORITHMS.md §13)."""
        try:
            # a tensor the client did not upload is the one it received (e.g. FFA-LoRA's
            # frozen A); modules with a factor the server never saw are skipped
            factors = []
            for u in updates:
                known = {**self.global_tensors, **self.sent.get(u.node_id, {})}
                merged: TensorDict = {}
                for key, value in u.tensors.items():
                    if key.startswith(AUX_PREFIX) or not is_lora_key(key):
                        continue
                    partner = _partner_key(key)
                    if partner in u.tensors:
                        merged[key] = value
                    elif key == factor_keys(lora_module_of(key))[1] and partner in known:
                        # B uploaded, A not: the client trained with the A it knows
                        # (FFA-LoRA's frozen A). An unseen B (FedSA-LoRA) is skipped.
                        merged[key], merged[partner] = value, known[partner]
                factors.append(split_adapter(merged, self.layout)[0])
            global_factors, _ = split_adapter(
                {k: v for k, v in new_global.items() if not is_base_delta_key(k)}, self.layout
            )
        except ValueError:
            return {}
        if not global_factors or not all(factors):
            return {}
        if any(
            (f.d_out, f.d_in) != (global_factors[m].d_out, global_factors[m].d_in)
            for client in factors
            for m, f in client.items()
            if m in global_factors
        ):
            return {}  # pruned uploads (FedSpine): no dense ideal mean to compare with
        shift = {}
        for key, value in new_global.items():
            if is_base_delta_key(key):
                old = self.global_tensors.get(key)
                shift[base_delta_module(key)] = value - old if old is not None else value
        total = sum(float(u.num_examples) for u in updates)
        weights = [
            (float(u.num_examples) / total) if total > 0 else 1.0 / len(updates) for u in updates
        ]
        err = aggregation_error(factors, weights, global_factors, shift or None)
        return {
            "aggregation_error": err["relative"],
            "aggregation_cosine": err["cosine"],
            **{f"layer/{k}": v for k, v in err.items() if "/" in k},
        }


def _partner_key(key: str) -> str:
    """The other factor of a LoRA key (``lora_A`` ↔ ``lora_B``)."""
    a, b = factor_keys(lora_module_of(key))
    return b if key == a else a


def _weighted_metrics(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    total = sum(u.num_examples for u in updates) or len(updates)
    out: dict[str, float] = {}
    for u in updates:
        w = (u.num_examples / total) if total else 1.0 / len(updates)
        for k, v in u.metrics.items():
            out[k] = out.get(k, 0.0) + w * v
    return out


class ProgressGrid(Grid):
    """A ``Grid`` that forwards to another and reports each reply as it arrives."""

    def __init__(self, inner: Grid, observer: Observer, pull_interval: float = 0.1) -> None:
        self.inner = inner
        self.observer = observer
        self.pull_interval = pull_interval
        self.current_round = 0

    @property
    def run(self) -> Any:
        """The inner grid's run."""
        return self.inner.run

    def set_run(self, run: Any) -> None:
        """Forward."""
        self.inner.set_run(run)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Forward."""
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Forward."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forward."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forward."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every reply arrived or ``timeout`` passed."""
        messages = list(messages)
        if not messages:
            return []
        try:
            ids = set(self.inner.push_messages(messages))
        except NotImplementedError:  # a grid that only offers send_and_receive
            replies = list(self.inner.send_and_receive(messages, timeout=timeout))
            for r in replies:
                self.observer.reply(self.current_round, r.metadata.src_node_id, not r.has_error())
            return replies
        end = time.time() + (timeout if timeout is not None else 1e12)
        out: list[Message] = []
        while ids and time.time() < end:
            got = list(self.inner.pull_messages(ids))
            for r in got:
                ids.discard(r.metadata.reply_to_message_id)
                self.observer.reply(self.current_round, r.metadata.src_node_id, not r.has_error())
            out.extend(got)
            if ids:
                time.sleep(self.pull_interval)
        return out


def discover_nodes(grid: Grid, cfg: RunConfig) -> list[NodeInfo]:
    """Wait for the nodes, then ask each for its partition id and properties.

    Raises:
        FedPeftError: fewer nodes than ``federation.clients-per-round`` answered
            within ``federation.wait-for-nodes`` seconds.
    """
    want = cfg.federation.clients
    deadline = time.time() + cfg.federation.wait_for_nodes
    node_ids: list[int] = list(grid.get_node_ids())
    while len(node_ids) < want and time.time() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < want:
        log.warning("only %d of %d nodes connected after %.0f s", len(node_ids), want, cfg.federation.wait_for_nodes)
    messages = [
        Message(RecordDict({rec.CONFIG: ConfigRecord({})}), dst_node_id=nid, message_type=rec.QUERY_HELLO)
        for nid in sorted(node_ids)
    ]
    nodes = []
    for reply in grid.send_and_receive(messages, timeout=cfg.federation.timeout):
        if reply.has_error():
            log.warning("node %d did not answer the start-up query: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        props = dict(reply.content[rec.CONFIG])
        pid = int(props.pop("partition-id", reply.metadata.src_node_id))
        nodes.append(NodeInfo(node_id=reply.metadata.src_node_id, partition_id=pid, properties=props))
    if len(nodes) < cfg.federation.sampled:
        raise FedPeftError(
            f"{len(nodes)} nodes answered but federation.clients-per-round is "
            f"{cfg.federation.sampled}; start more SuperNodes or lower it"
        )
    return sorted(nodes, key=lambda n: n.partition_id)


def checkpoint_dir(cfg: RunConfig) -> pathlib.Path:
    """``checkpoint.dir``, or ``<output.dir>/checkpoint``."""
    if cfg.checkpoint.dir:
        return pathlib.Path(cfg.checkpoint.dir).expanduser().resolve()
    return resolve_output_dir(cfg) / "checkpoint"


def resolve_output_dir(cfg: RunConfig) -> pathlib.Path:
    """``output.dir``, or a fresh ``runs/<strategy>-<timestamp>``."""
    if cfg.output.dir:
        return pathlib.Path(cfg.output.dir).expanduser().resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return (pathlib.Path("runs") / f"{cfg.strategy.name}-{stamp}").resolve()


def run_server(
    grid: Grid,
    run_config: Mapping[str, Any],
    observer: Observer | None = None,
) -> RunResults:
    """Run a whole federated fine-tune on ``grid`` and write its results.

    Args:
        grid: Flower's grid (simulation, deployment, or the in-process test grid).
        run_config: the flat run config.
        observer: progress callbacks.
    """
    from fedpeft.tasks import get_task

    observer = observer or Observer()
    cfg = parse_run_config(run_config)
    fed, uplink, downlink = build_strategy(cfg)
    out_dir = resolve_output_dir(cfg)
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(out_dir)))
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = checkpoint_dir(cfg)
    details_path = out_dir / "details.jsonl"
    resumed = None
    if cfg.checkpoint.resume:  # a continuation: its checkpoint must exist and be readable
        resumed = load_for_resume(ckpt_dir, cfg.federation.rounds)
        check_client_states(ckpt_dir, resumed.server_round)
        keep_details_until(details_path, resumed.server_round)
    write_config(out_dir, cfg.to_flat(), cfg.seed)
    task = get_task(cfg)
    model = task.model(cfg.lora.max_rank)
    test = task.test_data() if cfg.eval.server else None
    progress = ProgressGrid(grid, observer)
    nodes = discover_nodes(progress, cfg)
    adapter = FlowerStrategyAdapter(
        cfg, fed, uplink, downlink, nodes, model.initial, model.layout, observer
    )
    results = RunResults(out_dir, strategy=cfg.strategy.name, task=cfg.task.name)
    results.extra.update({"seed": cfg.seed, "clients": len(nodes), "codec": {"uplink": uplink.name, "downlink": downlink.name}})
    split = task.split_summary(cfg.federation.clients)
    results.extra["split"] = split
    if resumed is not None:
        adapter.restore(resumed.server_round, resumed.global_tensors, resumed.states, resumed.meta["ledger"])
        results.rounds = list(resumed.meta["results"])
        log.info("resuming after round %d from %s", resumed.server_round, ckpt_dir)
    else:
        details_path.write_text("")
    observer.run_start(cfg.federation.rounds, out_dir)

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if resumed is not None and server_round == 0:
            return None  # round 0 of a resumed run was evaluated before the interruption
        if cfg.privacy.dp != "none" and server_round > 0:
            adapter.global_tensors = rec.record_to_tensors(arrays)  # the noised aggregate
        server_round += adapter.offset
        metrics: dict[str, float] = {}
        if test is not None:
            model.load(adapter.global_tensors)
            metrics = task.evaluate(model, test)
        info = adapter.rounds.get(server_round, RoundLog())
        record: dict[str, Any] = {
            "round": server_round,
            "accuracy": metrics.get("accuracy"),
            "loss": metrics.get("loss", info.metrics.get("train-loss")),
            "uplink_bytes": adapter.ledger.round_total(server_round, "uplink"),
            "downlink_bytes": adapter.ledger.round_total(server_round, "downlink"),
            "uplink_payload_bytes": adapter.ledger.round_total(server_round, "uplink", payload=True),
            "downlink_payload_bytes": adapter.ledger.round_total(server_round, "downlink", payload=True),
            "seconds": (time.perf_counter() - info.started) if info.started else 0.0,
            "sampled": info.sampled,
            "rejected": info.rejected,
            "failed": info.failed,
        }
        if "perplexity" in metrics:
            record["perplexity"] = metrics["perplexity"]
        if server_round > 0:
            record["train_loss"] = info.metrics.get("train-loss")
            record["aggregation_error"] = info.metrics.get("aggregation_error")
            record["aggregation_cosine"] = info.metrics.get("aggregation_cosine")
            record["clients"] = info.clients
            if cfg.devices.profile and info.clients:
                # a synchronous round lasts as long as its slowest device
                record["simulated_seconds"] = max(c["client_seconds"] for c in info.clients)
            record["strategy_metrics"] = dict(info.strategy_metrics)
            record.update({k: v for k, v in info.metrics.items() if k.startswith("client_")})
        results.add_round(record)
        _append_details(details_path, server_round, info, adapter, split if server_round == 0 else None)
        every = cfg.checkpoint.every
        if every and server_round > 0 and (server_round % every == 0 or server_round == cfg.federation.rounds):
            save_checkpoint(
                ckpt_dir,
                server_round,
                adapter.global_tensors,
                adapter.checkpoint_states(),
                {"results": results.rounds, "ledger": adapter.ledger.entries},
            )
        observer.round_end(record)
        return rec.metrics_record(metrics) if metrics else None

    progress.current_round = 0
    remaining = cfg.federation.rounds - adapter.offset
    if remaining > 0:
        try:
            wrap_privacy(cfg, adapter).start(
                grid=progress,
                initial_arrays=rec.tensors_to_record(adapter.global_tensors),
                num_rounds=remaining,
                timeout=cfg.federation.timeout,
                evaluate_fn=central_evaluate,
            )
        except RoundFailed as err:
            results.extra["stopped"] = str(err)
            results.write()
            log.error("run stopped cleanly: %s; resume with --resume %s", err, out_dir)
            raise
        except BudgetExhausted as err:
            results.extra["stopped"] = str(err)
            log.warning("run stopped cleanly: %s", err)
    results.extra["totals"] = {
        "uplink_bytes": adapter.ledger.total("uplink"),
        "downlink_bytes": adapter.ledger.total("downlink"),
        "uplink_payload_bytes": adapter.ledger.total("uplink", payload=True),
        "downlink_payload_bytes": adapter.ledger.total("downlink", payload=True),
    }
    results.write()
    if cfg.output.save_adapter:
        model.load(adapter.global_tensors)
        model.save_adapter(out_dir / "adapter")
    results.plot()
    return results


def _append_details(
    path: pathlib.Path,
    server_round: int,
    info: RoundLog,
    adapter: FlowerStrategyAdapter,
    split: Mapping[str, Any] | None = None,
) -> None:
    import json

    line: dict[str, Any] = {
        "round": server_round,
        "metrics": {k: v for k, v in info.metrics.items() if isinstance(v, float) and math.isfinite(v)},
        "reasons": info.reasons,
        "bytes": {
            "uplink": adapter.ledger.per_client(server_round, "uplink"),
            "downlink": adapter.ledger.per_client(server_round, "downlink"),
        },
    }
    if split is not None:  # round 0: the split the run trained on
        line["split"] = split
    with path.open("a") as handle:
        handle.write(json.dumps(line, default=str) + "\n")


def make_server_app(
    overrides: Mapping[str, Any] | None = None, observer: Observer | None = None
) -> ServerApp:
    """A ``ServerApp`` running :func:`run_server`.

    Args:
        overrides: flat config entries that take precedence over the run config
            Flower passes (``fedpeft simulate`` binds its config this way, since the
            simulation engine's Python API passes none).
        observer: progress callbacks.
    """
    app = ServerApp()
    bound = dict(overrides or {})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, {**dict(context.run_config), **bound}, observer)

    return app


app = make_server_app()
"""The ServerApp ``flwr run`` loads (``[tool.flwr.app.components]``)."""

__all__ = ["FlowerStrategyAdapter", "Observer", "app", "make_server_app", "run_server"]

