"""The ServerApp: Flower Messages in, :mod:`fedpeft.server` values out, and back.

``FlowerStrategyAdapter`` is the one class that subclasses Flower's ``Strategy``.
Flower's ``Strategy.start`` owns the round loop and calls it; the adapter turns each
call into a :class:`~fedpeft.server.engine.RoundEngine` step:

* ``configure_train``: the engine plans the round and encodes each client's payload;
  the adapter wraps each payload in a Message and reports its size.
* ``aggregate_train``: replies become :class:`~fedpeft.server.engine.Reply` values;
  the engine validates them; the adapter re-sends to failed clients while the engine
  asks for retries; the engine aggregates.
* ``evaluate_fn``: the engine finishes the round (evaluation, record, new state) and
  the round-end listeners write results, checkpoint and report progress.

Two grid wrappers sit between Flower's grid and the adapter: ``FaultGrid`` drops
replies as ``faults.drop-rate`` says (fault injection), ``ProgressGrid`` reports each
reply as it arrives and hands an error the SuperLink wrote for a node (e.g. "Node
Unavailable" after a SuperNode crashed) back as that node's error reply.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedpeft.config import FaultConfig, RunConfig
from fedpeft.errors import FedPeftError
from fedpeft.faults import draw_fault
from fedpeft.flower import records as rec
from fedpeft.results import RunResults
from fedpeft.server.engine import (
    BudgetExhausted,
    Outgoing,
    Reply,
    RoundEngine,
    RoundFailed,
    RoundWork,
    ServerState,
)
from fedpeft.server.listeners import Observer, RoundListener
from fedpeft.server.run import ServerRun
from fedpeft.types import NUM_EXAMPLES, ClientPlan, NodeInfo

log = logging.getLogger("fedpeft")


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


def reply_of(message: Message) -> Reply:
    """A reply Message as the engine's transport-neutral :class:`Reply`."""
    node_id = message.metadata.src_node_id
    if message.has_error():
        return Reply(node_id, error=str(message.error.reason))
    content = message.content
    nbytes, payload_nbytes = rec.content_nbytes(content), rec.arrays_nbytes(content)
    try:
        payload = rec.record_to_payload(content[rec.ARRAYS], content.get(rec.CODEC))
        metrics = dict(content[rec.METRICS])
    except (KeyError, ValueError, TypeError) as err:
        return Reply(node_id, nbytes=nbytes, payload_nbytes=payload_nbytes, malformed=str(err))
    return Reply(node_id, payload=payload, metrics=metrics, nbytes=nbytes, payload_nbytes=payload_nbytes)


def train_message(out: Outgoing) -> Message:
    """An :class:`Outgoing` payload as a training Message."""
    arrays, meta = rec.payload_to_record(out.payload)
    config: dict[str, Any] = {**rec.plan_to_config(out.plan, out.server_round), rec.ATTEMPT: out.attempt}
    if out.client_state_dir:
        config[rec.CLIENT_CHECKPOINT_DIR] = out.client_state_dir
    content = RecordDict({rec.ARRAYS: arrays, rec.CODEC: meta, rec.CONFIG: ConfigRecord(config)})
    return Message(content, dst_node_id=out.plan.node_id, message_type=MessageType.TRAIN)


class FlowerStrategyAdapter(Strategy):
    """Runs a :class:`~fedpeft.server.engine.RoundEngine` through Flower's strategy
    interface.

    Args:
        engine: the configured round engine.
        state: the state to continue from (round 0, or a resumed checkpoint's).
        listeners: called after every round (round 0 included).
        observer: progress callbacks.
    """

    def __init__(
        self,
        engine: RoundEngine,
        state: ServerState,
        listeners: Sequence[RoundListener] = (),
        observer: Observer | None = None,
    ) -> None:
        self.engine = engine
        self.cfg = engine.cfg
        self.state = state
        self.resumed = state.round > 0
        self.listeners = list(listeners)
        self.observer = observer or Observer()
        self.work: RoundWork | None = None
        self.grid: Grid | None = None

    def summary(self) -> None:
        """Log what runs."""
        log.info(
            "fedpeft strategy %r, uplink %r, downlink %r, %d nodes",
            self.cfg.strategy.name,
            self.engine.uplink.name,
            self.engine.downlink.name,
            len(self.engine.nodes),
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One training message per planned client."""
        self.grid = grid
        if self.cfg.privacy.dp != "none":  # the DP wrapper noised the aggregate: adopt it
            self.state = dataclasses.replace(self.state, global_tensors=rec.record_to_tensors(arrays))
        self.work = self.engine.plan_round(self.state)
        messages = self._messages(list(self.work.plans.values()), attempt=0)
        self.engine.check_budget(self.work)
        self.work.sampled = len(messages)
        self.observer.round_start(self.work.server_round, len(messages))
        return messages

    def _messages(self, plans: Sequence[ClientPlan], attempt: int) -> list[Message]:
        assert self.work is not None
        messages = []
        for out in self.engine.outgoing(self.work, plans, attempt):
            message = train_message(out)
            self.engine.sent(
                self.work, out.plan.node_id, rec.content_nbytes(message.content), out.payload.nbytes()
            )
            messages.append(message)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies (re-sending to failed clients), aggregate the good ones."""
        work = self.work
        assert work is not None, "aggregate_train before configure_train"
        failed = self.engine.receive(work, [reply_of(m) for m in replies], list(work.plans.values()))
        attempt = 0
        while self.grid is not None and (retry := self.engine.retry_plans(work, failed, attempt)):
            attempt += 1
            again = self.grid.send_and_receive(self._messages(retry, attempt), timeout=self.cfg.federation.timeout)
            failed = self.engine.receive(work, [reply_of(m) for m in again], retry)
        self.engine.require_enough(work, attempt)
        if not self.engine.aggregate(work):
            return rec.tensors_to_record(work.global_tensors), None
        return rec.tensors_to_record(work.global_tensors), rec.metrics_record(
            {k: v for k, v in work.metrics.items() if "/" not in k}
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Client-side evaluation of the global adapter (``eval.client``)."""
        if not self.cfg.eval.client or self.work is None:
            return []
        messages = []
        for node in self.engine.nodes:
            plan = ClientPlan(
                node_id=node.node_id, partition_id=node.partition_id, rank=self.cfg.lora.max_rank, seed=0
            )
            tensors = self.engine.aggregator.client_payload(self.work.aggregator, self.work.global_tensors, plan)
            content = RecordDict(
                {
                    rec.ARRAYS: rec.tensors_to_record(tensors),
                    rec.CONFIG: ConfigRecord(rec.plan_to_config(plan, self.work.server_round)),
                }
            )
            messages.append(Message(content, dst_node_id=node.node_id, message_type=MessageType.EVALUATE))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics."""
        good = [r for r in replies if not r.has_error()]
        if not good or self.work is None:
            return None
        weights, sums = 0, {}
        for r in good:
            m = r.content[rec.METRICS]
            n = int(m.get(NUM_EXAMPLES, 0))
            weights += n
            for k, v in m.items():
                if k != NUM_EXAMPLES:
                    sums[k] = sums.get(k, 0.0) + n * float(v)
        if weights == 0:
            return None
        out = {f"client_{k}": v / weights for k, v in sums.items()}
        self.work.metrics.update(out)
        return MetricRecord(out)

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: finish the round (or record round 0) and tell the
        listeners."""
        if server_round == 0:
            if self.resumed:
                return None  # round 0 of a resumed run was recorded before the interruption
            result = self.engine.initial_result(self.state)
            work = None
        else:
            work = self.work
            assert work is not None
            noised = rec.record_to_tensors(arrays) if self.cfg.privacy.dp != "none" else None
            result = self.engine.finish_round(work, noised)
            self.state, self.work = result.state, None
        for listener in self.listeners:
            listener.round_end(result.state, result.record, work)
        return rec.metrics_record(result.evaluation) if result.evaluation else None


class ForwardingGrid(Grid):
    """A ``Grid`` that forwards everything to ``inner``; wrappers override what they change."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

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
        """Forward."""
        return self.inner.send_and_receive(messages, timeout=timeout)


class FaultGrid(ForwardingGrid):
    """Drops replies as ``faults.drop-rate`` says (fault injection in simulation): the
    server then sees no reply from that client, exactly as after a lost message."""

    def __init__(self, inner: Grid, faults: FaultConfig, seed: int) -> None:
        super().__init__(inner)
        self.faults = faults
        self.seed = seed

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Send, then drop the replies of training messages the fault draw drops."""
        messages = list(messages)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        if not self.faults.drop_rate:
            return replies
        sent = {
            m.metadata.dst_node_id: m.content[rec.CONFIG]
            for m in messages
            if m.metadata.message_type == MessageType.TRAIN
        }
        kept = []
        for reply in replies:
            config = sent.get(reply.metadata.src_node_id)
            if config is not None and draw_fault(
                self.faults,
                self.seed,
                int(config[rec.SERVER_ROUND]),
                int(config[rec.PLAN_PREFIX + "partition-id"]),
                int(config.get(rec.ATTEMPT, 0)),
            ) == "drop":
                log.warning(
                    "round %d: dropped the reply of node %d (injected fault)",
                    int(config[rec.SERVER_ROUND]), reply.metadata.src_node_id,
                )
                continue
            kept.append(reply)
        return kept


class ProgressGrid(ForwardingGrid):
    """A ``Grid`` that forwards to another and reports each reply as it arrives."""

    def __init__(self, inner: Grid, observer: Observer, pull_interval: float = 0.1) -> None:
        super().__init__(inner)
        self.observer = observer
        self.pull_interval = pull_interval
        self.current_round = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every reply arrived or ``timeout`` passed."""
        messages = list(messages)
        if not messages:
            return []
        try:
            pushed = list(self.inner.push_messages(messages))
        except NotImplementedError:  # a grid that only offers send_and_receive
            replies = list(self.inner.send_and_receive(messages, timeout=timeout))
            for r in replies:
                self.observer.reply(self.current_round, r.metadata.src_node_id, not r.has_error())
            return replies
        sent = {mid: m for mid, m in zip(pushed, messages, strict=False) if mid}
        ids = set(sent)
        end = time.time() + (timeout if timeout is not None else 1e12)
        out: list[Message] = []
        while ids and time.time() < end:
            got = [on_behalf_of_node(r, sent) for r in self.inner.pull_messages(ids)]
            for r in got:
                ids.discard(r.metadata.reply_to_message_id)
                self.observer.reply(self.current_round, r.metadata.src_node_id, not r.has_error())
            out.extend(got)
            if ids:
                time.sleep(self.pull_interval)
        return out


def on_behalf_of_node(reply: Message, sent: Mapping[str, Message]) -> Message:
    """``reply`` as the reply of the node its request went to.

    When a SuperNode is gone, the SuperLink answers the messages addressed to it with
    an error it writes itself ("Node Unavailable — … heartbeat"); Flower gives that
    reply the SuperLink's node id (1) as sender. Re-addressed, the round engine counts
    the failure once, for the right node, instead of a stray error from node 1 plus a
    missing reply.

    Args:
        reply: a pulled reply.
        sent: the pushed messages by message id.
    """
    request = sent.get(reply.metadata.reply_to_message_id)
    if (
        request is None
        or not reply.has_error()
        or reply.metadata.src_node_id == request.metadata.dst_node_id
        or request.metadata.message_id != reply.metadata.reply_to_message_id
    ):
        return reply
    return Message(reply.error, reply_to=request)


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
    run = ServerRun(run_config, observer)
    try:
        progress = ProgressGrid(grid, run.observer)
        nodes = discover_nodes(progress, run.cfg)
        engine, state, listeners = run.start(nodes)
        adapter = FlowerStrategyAdapter(engine, state, listeners, run.observer)
        remaining = run.cfg.federation.rounds - state.round
        if remaining > 0:
            try:
                wrap_privacy(run.cfg, adapter).start(
                    grid=FaultGrid(progress, run.cfg.faults, run.cfg.seed),
                    initial_arrays=rec.tensors_to_record(state.global_tensors),
                    num_rounds=remaining,
                    timeout=run.cfg.federation.timeout,
                    evaluate_fn=adapter.evaluate,
                )
            except RoundFailed as err:
                run.stop(err, "failed")
                raise
            except BudgetExhausted as err:
                run.stop(err, "budget")
        return run.finish(adapter.state)
    finally:
        run.close()


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

__all__ = ["FaultGrid", "FlowerStrategyAdapter", "ProgressGrid", "app", "make_server_app", "run_server"]
