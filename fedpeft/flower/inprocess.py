"""An in-process Flower ``Grid``: each message is delivered by calling the ClientApp.

No Ray, no ports: clients run one after another in this process, each with its own
``Context`` that persists across rounds like in the real runtimes (FLOWER.md §8).
Used by the tests, the benchmarks' sweeps and the fault matrix; ``tamper`` lets
them inject broken or hostile replies. Building messages outside a Flower runtime
needs a task identity, which :func:`run_in_process` sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid


class InProcessGrid(Grid):
    """Delivers messages synchronously to ``client_app``.

    Args:
        client_app: a ``ClientApp``.
        num_nodes: number of fake nodes (partition ids 0..n-1).
        run_config: the run config every node's context carries.
        node_config: extra node-config entries per partition id.
        tamper: optional ``tamper(partition_id, instruction, reply) -> reply`` applied
            to train replies (hostile or broken clients in tests).
    """

    def __init__(
        self,
        client_app: Any,
        num_nodes: int,
        run_config: dict[str, Any] | None = None,
        node_config: dict[int, dict[str, Any]] | None = None,
        tamper: Callable[[int, Message, Message], Message] | None = None,
    ) -> None:
        self.app = client_app
        self.tamper = tamper
        self.ctx = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config or {}).get(i, {})},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for i in range(num_nodes)
        }
        self.delivered: list[Message] = []

    def set_run(self, run: Any) -> None:
        """Not needed in-process."""

    @property
    def run(self) -> Any:
        """No run object in-process."""
        return None

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        """Build an instruction message."""
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The fake nodes."""
        return list(self.ctx)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Use ``send_and_receive``."""
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Use ``send_and_receive``."""
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Call the ClientApp for every message; exceptions become error replies."""
        replies = []
        for m in messages:
            ctx = self.ctx[m.metadata.dst_node_id]
            try:
                reply = self.app(m, ctx)
            except Exception as err:  # the real runtimes turn exceptions into errors too
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=m)
            if self.tamper is not None and m.metadata.message_type == "train":
                reply = self.tamper(int(ctx.node_config["partition-id"]), m, reply)
            self.delivered.append(m)
            replies.append(reply)
        return replies


def set_task_identity() -> None:
    """Give this process the task identity Flower needs to build messages."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


def run_in_process(
    flat_config: dict[str, Any],
    tamper: Callable[[int, Message, Message], Message] | None = None,
    observer: Any = None,
) -> Any:
    """Run a whole federated fine-tune in this process; return its ``RunResults``."""
    from fedpeft.config import parse_run_config
    from fedpeft.flower.client_app import make_client_app
    from fedpeft.flower.server_app import run_server

    set_task_identity()
    cfg = parse_run_config(flat_config)
    grid = InProcessGrid(make_client_app(), cfg.federation.clients, run_config=flat_config, tamper=tamper)
    return run_server(grid, flat_config, observer)
