"""The round engine: one federated round from plan to record, with no Flower import.

Between rounds the server is a :class:`ServerState` value (rounds completed, global
adapter, aggregator/selector/downlink-codec states, byte ledger). A round is:

1. :meth:`RoundEngine.plan_round` — the selector plans it; :meth:`RoundEngine.outgoing`
   encodes what each planned client receives (the aggregator's ``client_payload``
   through the downlink codec); the transport reports each message's size with
   :meth:`RoundEngine.sent` and :meth:`RoundEngine.check_budget` stops before a round
   that would go over ``budget.bytes``.
2. :meth:`RoundEngine.receive` — transport-neutral :class:`Reply` values are decoded
   and validated (keys, shapes for the client's rank, dtype, finite values, the
   strategy's ``check_update``); a bad one is rejected with a logged reason and never
   touches the global state. The transport retries the failed plans while fewer than
   ``federation.min-replies`` updates are valid (:meth:`RoundEngine.retry_plans`).
3. :meth:`RoundEngine.aggregate` — the strategy's aggregator runs inside the
   configured aggregation layers (:mod:`fedpeft.aggregation.layers`: outlier
   rejection, clipping), the selector gets feedback; an aggregator that fails or
   returns a bad adapter leaves the global adapter as it was.
4. :meth:`RoundEngine.finish_round` — the new :class:`ServerState` and the round's
   record (evaluation, bytes, clients, telemetry); listeners (results writer,
   checkpointer, progress display) receive both.

The Flower adapter (:mod:`fedpeft.flower.server_app`) turns Messages into
:class:`Reply` values and :class:`Outgoing` values into Messages, and nothing more.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fedpeft.aggregation.layers import stack
from fedpeft.aggregation.mean import client_weights
from fedpeft.checkpoint import client_state_problem
from fedpeft.codecs import CodecContext
from fedpeft.codecs.base import Chain, CodecState, Payload
from fedpeft.codecs.tensors import decode_tensors, encode_downlink, encode_tensors, reference_state
from fedpeft.config import RunConfig
from fedpeft.devices import simulated_round_seconds
from fedpeft.errors import CodecError, FedPeftError, IncompatibleUpdateError
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
from fedpeft.registry import FedStrategy
from fedpeft.results import ClientRecord, RoundRecord
from fedpeft.seeding import derive_seed
from fedpeft.selection import UniformSelector
from fedpeft.server.setup import device_profiles
from fedpeft.types import (
    AUX_PREFIX,
    NUM_EXAMPLES,
    ClientPlan,
    ClientUpdate,
    NodeInfo,
    RoundOutput,
    TensorDict,
)

log = logging.getLogger("fedpeft")

LedgerEntry = tuple[int, str, int, int, int]


class RoundFailed(FedPeftError):
    """A round got fewer valid updates than ``federation.min-replies`` after retries."""


class BudgetExhausted(FedPeftError):
    """The next round would exceed ``budget.bytes``."""


class ClientStateUnreadable(RoundFailed):
    """A client could not read its saved state: the run stops (the client is not
    dropped), since it cannot continue exactly without that state."""


@dataclass(frozen=True)
class ServerState:
    """Everything the server carries from one round to the next; a checkpoint is this.

    Attributes:
        round: rounds completed (0 before the first).
        global_tensors: the global adapter.
        aggregator: the aggregator's state.
        selector: the selector's state.
        downlink: downlink codec state per partition id: error-feedback residuals, or
            with ``codec.downlink-delta`` the tensors that client holds (its reference).
        ledger: byte-ledger entries ``(round, direction, node_id, bytes, payload_bytes)``.
    """

    round: int
    global_tensors: TensorDict
    aggregator: Any
    selector: Any
    downlink: Mapping[int, CodecState] = field(default_factory=dict)
    ledger: tuple[LedgerEntry, ...] = ()

    def checkpoint_states(self) -> dict[str, Any]:
        """The states saved beside the global adapter (checkpoint ``state.pt``)."""
        return {
            "aggregator": self.aggregator,
            "selector": self.selector,
            "downlink_codec": {str(k): v for k, v in self.downlink.items()},
        }

    @classmethod
    def from_checkpoint(
        cls, server_round: int, global_tensors: TensorDict, states: Mapping[str, Any], ledger: Sequence[Any]
    ) -> ServerState:
        """Inverse of saving ``global_tensors``, :meth:`checkpoint_states` and ``ledger``."""
        restored = ByteLedger()
        restored.restore(list(ledger))
        return cls(
            round=server_round,
            global_tensors=dict(global_tensors),
            aggregator=states["aggregator"],
            selector=states["selector"],
            downlink={int(k): v for k, v in states.get("downlink_codec", {}).items()},
            ledger=tuple(restored.entries),
        )


@dataclass(frozen=True)
class Outgoing:
    """One training message to send: the plan and its encoded payload."""

    plan: ClientPlan
    server_round: int
    payload: Payload
    attempt: int
    client_state_dir: str = ""


@dataclass(frozen=True)
class Reply:
    """One client's reply, as the transport received it.

    Attributes:
        node_id: the sender.
        error: the reason of an error reply (``None`` for a normal reply).
        payload: the encoded upload; ``None`` with ``malformed`` set when the transport
            could not read the message.
        metrics: the reply's metrics (``num-examples`` and training metrics).
        nbytes: serialized bytes of the message.
        payload_nbytes: raw bytes of its arrays.
        malformed: why the message could not be read (the update is then rejected).
    """

    node_id: int
    error: str | None = None
    payload: Payload | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    payload_nbytes: int = 0
    malformed: str = ""



@dataclass
class RoundWork:
    """A round in progress: what was planned and sent, what came back (scratch, not
    checkpointed; the round either finishes into a new ``ServerState`` or fails)."""

    server_round: int
    aggregator: Any
    selector: Any
    downlink: dict[int, CodecState]
    ledger: ByteLedger
    global_tensors: TensorDict
    started: float = field(default_factory=time.perf_counter)
    plans: dict[int, ClientPlan] = field(default_factory=dict)
    sent: dict[int, TensorDict] = field(default_factory=dict)
    pending: dict[int, int] = field(default_factory=dict)  # node id → partition id sent to
    updates: list[ClientUpdate] = field(default_factory=list)
    sampled: int = 0
    replies: int = 0
    rejected: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    clients: list[ClientRecord] = field(default_factory=list)
    strategy_metrics: dict[str, float] = field(default_factory=dict)
    codec_seconds: float = 0.0  # the server's encoding of downlinks, decoding of uplinks


class RoundEngine:
    """Runs rounds of one configured strategy; holds no round state itself.

    Args:
        cfg: the parsed run config.
        fed: the strategy's components.
        uplink: the uplink codec chain.
        downlink: the downlink codec chain.
        nodes: the nodes found at start-up.
        layout: adapter layout (scaling) for LoRA telemetry.
        evaluate: server-side evaluation of a global adapter (``{}`` if none).
        client_state_dir: where clients keep their state between rounds (``""``: in
            memory only).
    """

    def __init__(
        self,
        cfg: RunConfig,
        fed: FedStrategy,
        uplink: Chain,
        downlink: Chain,
        nodes: Sequence[NodeInfo],
        layout: AdapterLayout,
        evaluate: Callable[[TensorDict], Mapping[str, float]] | None = None,
        client_state_dir: str = "",
    ) -> None:
        self.cfg = cfg
        self.fed = fed
        # the strategy inside the configured layers (validation.*, aggregation.*)
        self.aggregator = stack(
            fed.aggregator,
            norm_factor=cfg.validation.norm_factor,
            clip_norm=cfg.validation.clip_norm,
            weighting=cfg.aggregation.weighting,
            server_opt=cfg.server_opt if cfg.server_opt.name != "none" else None,
            scaffold_clients=cfg.federation.clients if cfg.scaffold.enabled else 0,
            robust=cfg.aggregation.robust,
        )
        self.uplink = uplink
        self.downlink = downlink
        self.downlink_delta = cfg.codec.downlink_delta and not downlink.lossless
        self.nodes = list(nodes)
        self.devices = device_profiles(cfg.devices.profile, self.nodes)
        self.layout = layout
        self.evaluate = evaluate or (lambda tensors: {})
        self.client_state_dir = client_state_dir
        self.selector = fed.selector or UniformSelector(
            clients_per_round=cfg.federation.sampled,
            rank=cfg.lora.max_rank,
            ranks=cfg.lora.rank_list,
            seed=cfg.seed,
        )

    # -- state ------------------------------------------------------------------------
    def initial_state(self, initial: TensorDict) -> ServerState:
        """Round 0: the initial adapter and fresh strategy/selector states."""
        tensors = dict(initial)
        return ServerState(
            round=0,
            global_tensors=tensors,
            aggregator=self.aggregator.initialize(tensors),
            selector=self.selector.initialize(self.nodes),
        )

    # -- 1. plan and send -------------------------------------------------------------
    def plan_round(self, state: ServerState) -> RoundWork:
        """Start round ``state.round + 1``: the selector's plans (nothing encoded yet)."""
        work = RoundWork(
            server_round=state.round + 1,
            aggregator=state.aggregator,
            selector=state.selector,
            downlink=dict(state.downlink),
            ledger=ByteLedger(list(state.ledger)),
            global_tensors=dict(state.global_tensors),
        )
        work.selector, plans = self.selector.plan(work.selector, work.server_round, self.nodes)
        work.plans = dict(plans)
        return work

    def outgoing(self, work: RoundWork, plans: Sequence[ClientPlan], attempt: int) -> list[Outgoing]:
        """Encode each plan's payload; keeps what each client will decode as reference."""
        out = []
        for plan in plans:
            tensors = self.aggregator.client_payload(work.aggregator, work.global_tensors, plan)
            started = time.perf_counter()
            ctx = CodecContext(
                seed=derive_seed(self.cfg.seed, "downlink", work.server_round, plan.partition_id),
                direction="downlink",
            )
            if self.downlink_delta:
                # coded against what this client decoded when it last completed a round
                held = work.downlink.get(plan.partition_id, {})
                payload, work.sent[plan.node_id] = encode_downlink(tensors, self.downlink, held, ctx)
                work.pending[plan.node_id] = plan.partition_id
                work.codec_seconds += time.perf_counter() - started
                out.append(Outgoing(plan, work.server_round, payload, attempt, self.client_state_dir))
                continue
            try:
                payload, work.downlink[plan.partition_id] = encode_tensors(
                    tensors, self.downlink, work.downlink.get(plan.partition_id, {}), ctx
                )
            except CodecError:  # shapes changed (e.g. a new rank): residuals no longer apply
                payload, work.downlink[plan.partition_id] = encode_tensors(tensors, self.downlink, {}, ctx)
            # the client will see the decoded payload; keep exactly that as reference
            work.sent[plan.node_id] = (
                dict(tensors) if self.downlink.lossless else decode_tensors(payload, self.downlink, ctx)
            )
            work.codec_seconds += time.perf_counter() - started
            out.append(Outgoing(plan, work.server_round, payload, attempt, self.client_state_dir))
        return out

    def sent(self, work: RoundWork, node_id: int, nbytes: int, payload_nbytes: int) -> None:
        """The transport built a message of ``nbytes`` for ``node_id``."""
        work.ledger.record(work.server_round, "downlink", node_id, nbytes, payload_nbytes)

    def check_budget(self, work: RoundWork) -> None:
        """Raise before sending if this round would go over ``budget.bytes``."""
        budget = self.cfg.budget.bytes
        if not budget:
            return
        ledger, server_round = work.ledger, work.server_round
        down = ledger.round_total(server_round, "downlink")
        previous = server_round - 1
        prev_up = ledger.round_total(previous, "uplink")
        prev_down = ledger.round_total(previous, "downlink")
        up_estimate = prev_up * down / prev_down if prev_down else down
        spent = ledger.total("uplink") + ledger.total("downlink") - down
        if spent + down + up_estimate > budget:
            # the messages were built but are not sent: take them off the ledger
            ledger.entries = [e for e in ledger.entries if e[0] != server_round]
            raise BudgetExhausted(
                f"round {server_round} would need ~{int(down + up_estimate):,} B more, "
                f"{spent:,} of budget.bytes={budget:,} are spent; stopping before it"
            )

    # -- 2. receive -------------------------------------------------------------------
    def receive(
        self, work: RoundWork, replies: Sequence[Reply], asked: Sequence[ClientPlan]
    ) -> list[ClientPlan]:
        """Decode and validate replies into ``work.updates``; return the failed plans."""
        server_round = work.server_round
        answered: set[int] = set()
        failed: list[ClientPlan] = []
        work.replies += len(replies)
        limit = self.cfg.validation.max_update_bytes
        for reply in replies:
            node_id = reply.node_id
            answered.add(node_id)
            plan = work.plans.get(node_id)
            self._track_reference(work, reply)
            if reply.error is not None:
                unreadable = client_state_problem(reply.error)
                if unreadable is not None:
                    raise ClientStateUnreadable(f"node {node_id}: {unreadable}")
                work.failed += 1
                reason = f"node {node_id} replied with an error: {reply.error}"
                work.reasons.append(reason)
                log.warning("round %d: %s; dropping it", server_round, reason)
                if plan is not None:
                    failed.append(plan)
                    # e.g. Ferret resyncs a client that lost its replica
                    work.aggregator = self.aggregator.client_failed(work.aggregator, plan, reason)
                continue
            work.ledger.record(server_round, "uplink", node_id, reply.nbytes, reply.payload_nbytes)
            try:
                if limit and reply.nbytes > limit:
                    raise IncompatibleUpdateError(
                        f"the reply has {reply.nbytes} bytes, validation.max-update-bytes is {limit}"
                    )
                work.updates.append(self._decode_update(work, reply))
            except (FedPeftError, KeyError, ValueError, TypeError) as err:
                work.rejected += 1
                reason = f"node {node_id}: {err}"
                work.reasons.append(reason)
                log.warning("round %d: rejected the update of %s", server_round, reason)
        missing = [p for p in asked if p.node_id not in answered]
        for p in missing:  # did it decode the message? unknown: send it the tensors next time
            if self.downlink_delta and work.pending.pop(p.node_id, None) is not None:
                work.downlink.pop(p.partition_id, None)
        if missing:
            work.failed += len(missing)
            work.reasons += [f"node {p.node_id}: no reply" for p in missing]
            log.warning("round %d: no reply from nodes %s", server_round, [p.node_id for p in missing])
            failed += missing
        return failed

    def _track_reference(self, work: RoundWork, reply: Reply) -> None:
        """Downlink delta: a client that completed its round (a reply with a payload,
        accepted or not) now holds what it was sent; after an error reply it may hold
        anything, so it gets the tensors themselves at its next message."""
        pid = work.pending.pop(reply.node_id, None) if self.downlink_delta else None
        if pid is None:
            return
        if reply.error is None:
            work.downlink[pid] = reference_state(work.server_round, work.sent[reply.node_id])
        else:
            work.downlink.pop(pid, None)

    def retry_plans(self, work: RoundWork, failed: Sequence[ClientPlan], attempt: int) -> list[ClientPlan]:
        """The plans to send again (``[]``: enough valid updates, or no retries left)."""
        need = self.cfg.federation.min_replies
        if len(work.updates) >= need or attempt >= self.cfg.federation.max_retries:
            return []
        retry = list(failed) or list(work.plans.values())
        log.warning(
            "round %d: %d valid updates, %d needed; retrying %d clients (attempt %d of %d)",
            work.server_round, len(work.updates), need, len(retry), attempt + 1,
            self.cfg.federation.max_retries,
        )
        return retry

    def _decode_update(self, work: RoundWork, reply: Reply) -> ClientUpdate:
        node_id = reply.node_id
        plan = work.plans.get(node_id)
        if plan is None:
            raise IncompatibleUpdateError("it was not sampled this round")
        if reply.malformed or reply.payload is None:
            raise IncompatibleUpdateError(reply.malformed or "the reply has no payload")
        ctx = CodecContext(
            seed=derive_seed(self.cfg.seed, "uplink", work.server_round, plan.partition_id),
            direction="uplink",
            reference=work.sent.get(node_id),
        )
        started = time.perf_counter()
        try:
            tensors = decode_tensors(reply.payload, self.uplink, ctx)
        except (CodecError, KeyError, ValueError) as err:
            raise CodecError(f"cannot decode with {self.uplink.name!r}: {err}") from err
        finally:
            work.codec_seconds += time.perf_counter() - started
        self._validate(work, tensors, plan)
        # the strategy's own validation of what it asked for
        self.aggregator.check_update(work.aggregator, tensors, plan)
        metrics = reply.metrics
        num_examples = metrics.get(NUM_EXAMPLES)
        if not isinstance(num_examples, int) or num_examples < 0:
            raise IncompatibleUpdateError(
                f"'{NUM_EXAMPLES}' must be a non-negative integer, got {num_examples!r}"
            )
        clean = {}
        for k, v in metrics.items():
            if k != NUM_EXAMPLES and isinstance(v, (int, float)) and math.isfinite(float(v)):
                clean[k] = float(v)
        return ClientUpdate(
            node_id=node_id,
            tensors=tensors,
            num_examples=num_examples,
            metrics=clean,
            plan=plan,
            received=work.sent.get(node_id, {}),
        )

    def _validate(self, work: RoundWork, tensors: Mapping[str, torch.Tensor], plan: ClientPlan) -> None:
        """Keys, shapes for the plan's rank (or the strategy's ``upload_shape``), dtype
        and finiteness of an upload."""
        if not tensors:
            raise IncompatibleUpdateError("the update is empty")
        problems = []
        for key, value in tensors.items():
            if key.startswith(AUX_PREFIX):
                if not value.is_floating_point():
                    continue  # integer auxiliary tensors (indices, seeds): always finite
            elif key not in work.global_tensors or is_base_delta_key(key):
                problems.append(f"unexpected key {key!r}")
                continue
            else:
                want = shape_for_rank(key, tuple(work.global_tensors[key].shape), plan.rank)
                want = tuple(self.aggregator.upload_shape(key, want, tensors, plan))
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

    def require_enough(self, work: RoundWork, attempts: int) -> None:
        """Raise :class:`RoundFailed` when fewer than ``federation.min-replies`` are valid."""
        need = self.cfg.federation.min_replies
        if len(work.updates) < need:
            raise RoundFailed(
                f"round {work.server_round} got {len(work.updates)} valid updates, "
                f"federation.min-replies is {need} (after {attempts} retries); reasons: "
                + "; ".join(work.reasons[-5:])
            )

    # -- 3. aggregate -----------------------------------------------------------------
    def aggregate(self, work: RoundWork) -> bool:
        """Aggregate ``work.updates`` into ``work.global_tensors`` through the layers and
        the strategy; ``False`` (and the global adapter unchanged) when no update is
        valid or the aggregation fails."""
        server_round = work.server_round
        if not work.updates:
            log.warning("round %d: no valid update; the global adapter is unchanged", server_round)
            return False
        try:
            output: RoundOutput[Any] = self.aggregator.aggregate(
                work.aggregator, work.global_tensors, work.updates, server_round
            )
            self._check_output(work, output)
        except (FedPeftError, ValueError, RuntimeError) as err:
            work.reasons.append(f"aggregation failed: {err}")
            log.error("round %d: aggregation failed (%s); the global adapter is unchanged", server_round, err)
            return False
        for node_id, why in output.rejected.items():  # left out by a layer (e.g. outliers)
            work.rejected += 1
            reason = f"node {node_id}: {why}"
            work.reasons.append(reason)
            log.warning("round %d: rejected the update of %s", server_round, reason)
        updates = list(output.updates) if output.updates is not None else list(work.updates)
        telemetry = self._telemetry(work, updates, output.tensors)
        work.aggregator = output.state
        work.global_tensors = dict(output.tensors)
        work.clients = [self._client_record(work, u) for u in updates]
        if self.devices:  # the selector sees each device's simulated round time
            updates = [
                dataclasses.replace(u, metrics={**u.metrics, "simulated-seconds": c["client_seconds"]})
                for u, c in zip(updates, work.clients, strict=True)
            ]
        work.selector = self.selector.feedback(work.selector, updates, output)
        work.metrics.update({**_weighted_metrics(updates), **telemetry, **dict(output.metrics)})
        work.strategy_metrics = {k: float(v) for k, v in output.metrics.items() if "layer/" not in k}
        return True

    def _check_output(self, work: RoundWork, output: RoundOutput[Any]) -> None:
        missing = sorted(set(work.global_tensors) - set(output.tensors))
        if missing:
            raise IncompatibleUpdateError(f"aggregator dropped global keys {missing[:3]}")
        for key, value in output.tensors.items():
            if not bool(torch.isfinite(value).all()):
                raise IncompatibleUpdateError(f"aggregated {key!r} has non-finite values")

    def _client_record(self, work: RoundWork, u: ClientUpdate) -> ClientRecord:
        """One client's line in ``summary.json``: plan, bytes, metrics and
        ``client_seconds`` — simulated on its device profile when ``devices.profile``
        is set (:func:`fedpeft.devices.simulated_round_seconds`), else measured."""
        up = work.ledger.per_client(work.server_round, "uplink").get(u.node_id, 0)
        down = work.ledger.per_client(work.server_round, "downlink").get(u.node_id, 0)
        measured = float(u.metrics.get("client-seconds", 0.0))
        out: ClientRecord = {
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

    def _telemetry(self, work: RoundWork, updates: Sequence[ClientUpdate], new_global: TensorDict) -> dict[str, float]:
        """Aggregation error of the LoRA product (ALGORITHMS.md §13)."""
        old_global = work.global_tensors
        try:
            # a tensor the client did not upload is the one it received (e.g. FFA-LoRA's
            # frozen A); modules with a factor the server never saw are skipped
            factors = []
            for u in updates:
                known = {**old_global, **work.sent.get(u.node_id, {})}
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
                old = old_global.get(key)
                shift[base_delta_module(key)] = value - old if old is not None else value
        # the ideal mean Σ p_k s B_k A_k under the run's weighting
        if self.cfg.aggregation.weighting == "equal":
            weights = [1.0 / len(updates)] * len(updates)
        else:
            weights = client_weights(updates)
        err = aggregation_error(factors, weights, global_factors, shift or None)
        return {
            "aggregation_error": err["relative"],
            "aggregation_cosine": err["cosine"],
            **{f"layer/{k}": v for k, v in err.items() if "/" in k},
        }

    # -- 4. finish --------------------------------------------------------------------
    def finish_round(self, work: RoundWork, global_tensors: TensorDict | None = None) -> RoundResult:
        """The new state and the round's record, after server-side evaluation.

        ``global_tensors`` replaces the aggregate when a wrapper changed it after
        aggregation (Flower's central-DP wrapper adds noise)."""
        tensors = dict(global_tensors) if global_tensors is not None else work.global_tensors
        state = ServerState(
            round=work.server_round,
            global_tensors=tensors,
            aggregator=work.aggregator,
            selector=work.selector,
            downlink=dict(work.downlink),
            ledger=tuple(work.ledger.entries),
        )
        return self._result(state, work)

    def initial_result(self, state: ServerState) -> RoundResult:
        """Round 0: the initial adapter evaluated."""
        return self._result(state, None)

    def _result(self, state: ServerState, work: RoundWork | None) -> RoundResult:
        evaluation = dict(self.evaluate(state.global_tensors))
        server_round = state.round
        ledger = ByteLedger(list(state.ledger))
        metrics = work.metrics if work is not None else {}
        record: RoundRecord = {
            "round": server_round,
            "accuracy": evaluation.get("accuracy"),
            "loss": evaluation.get("loss", metrics.get("train-loss")),
            "uplink_bytes": ledger.round_total(server_round, "uplink"),
            "downlink_bytes": ledger.round_total(server_round, "downlink"),
            "uplink_payload_bytes": ledger.round_total(server_round, "uplink", payload=True),
            "downlink_payload_bytes": ledger.round_total(server_round, "downlink", payload=True),
            "seconds": (time.perf_counter() - work.started) if work is not None else 0.0,
            "sampled": work.sampled if work is not None else 0,
            "rejected": work.rejected if work is not None else 0,
            "failed": work.failed if work is not None else 0,
        }
        if "perplexity" in evaluation:
            record["perplexity"] = evaluation["perplexity"]
        for key in ("backdoor_asr", "backdoor_flip"):  # faults.attack=backdoor (fedpeft.attacks)
            if key in evaluation:
                record[key] = evaluation[key]
        if work is not None:
            record["train_loss"] = metrics.get("train-loss")
            record["aggregation_error"] = metrics.get("aggregation_error")
            record["aggregation_cosine"] = metrics.get("aggregation_cosine")
            record["clients"] = work.clients
            if self.cfg.devices.profile and work.clients:
                # a synchronous round lasts as long as its slowest device
                record["simulated_seconds"] = max(c["client_seconds"] for c in work.clients)
            record["strategy_metrics"] = dict(work.strategy_metrics)
            record["server_codec_seconds"] = work.codec_seconds
            record.update({k: v for k, v in metrics.items() if k.startswith("client_")})
        return RoundResult(state, record, evaluation)


@dataclass(frozen=True)
class RoundResult:
    """A finished round: the state after it, its record and the server evaluation."""

    state: ServerState
    record: RoundRecord
    evaluation: Mapping[str, float]


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
