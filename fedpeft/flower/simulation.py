"""Running the apps on Flower's simulation engine (Ray backend) from Python.

Scale note (measured with flwr 1.41, see ``docs/scale.md``): the engine's message
extractor (``vce_api.add_messages_to_queue``) asks the in-memory link state for one
message *per registered node* every 0.1 s, and each of those calls scans every stored
instruction. With 1,000 virtual nodes that is O(nodes × messages) work per sweep on
the driver (``simulations/bench_extractor.py`` measures it side by side: 52 s vs 40 s
before the first round, 1.27× the wall time of a short run). :func:`fast_extractor`
replaces the extractor for the duration of a run with one that first finds which
nodes have undelivered messages (one pass over the store) and polls only those,
through the same public ``get_message_ins`` call (TTL checks and delivery marking
unchanged). If the link state does not look as expected, the original runs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from queue import Queue
from typing import Any

from flwr.simulation import run_simulation

from fedpeft.config import RunConfig
from fedpeft.flower.client_app import make_client_app
from fedpeft.flower.server_app import Observer, make_server_app

log = logging.getLogger("fedpeft")


def pending_node_ids(state: Any) -> list[int] | None:
    """Destination nodes of undelivered instructions, in store order, or ``None``
    when ``state`` is not an in-memory link state this module understands."""
    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    if not isinstance(store, dict) or lock is None:
        return None
    with lock:
        messages = list(store.values())
    seen: dict[int, None] = {}
    for msg in messages:
        meta = msg.metadata
        if meta.delivered_at == "":
            seen.setdefault(int(meta.dst_node_id), None)
    return list(seen)


def make_extractor(original: Callable[..., None], interval: float = 0.1) -> Callable[..., None]:
    """An ``add_messages_to_queue`` that polls only nodes with pending messages.

    Same contract as flwr's: loop until ``f_stop``; each sweep moves at most one
    undelivered message per node into ``queue``, then waits ``interval`` seconds.
    """

    def add_messages_to_queue(
        state: Any, queue: Queue[Any], nodes_mapping: Mapping[int, int], f_stop: threading.Event
    ) -> None:
        if pending_node_ids(state) is None:
            log.warning("simulation: unknown link state %s; using Flower's extractor", type(state))
            original(state, queue, nodes_mapping, f_stop)
            return
        while not f_stop.is_set():
            for node_id in pending_node_ids(state) or []:
                if node_id not in nodes_mapping:
                    continue
                for msg in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(msg)
            f_stop.wait(interval)

    return add_messages_to_queue


@contextlib.contextmanager
def fast_extractor() -> Iterator[None]:
    """Use :func:`make_extractor`'s extractor inside the block (restored after)."""
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = make_extractor(original)  # type: ignore[assignment]
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = original  # type: ignore[assignment]


def backend_config(cfg: RunConfig, num_cpus: int) -> dict[str, Any]:
    """The Ray backend config: ``simulation.cpus-per-client`` CPUs per ClientApp
    actor out of ``num_cpus`` (2 cores, 1 per client → two clients train at once)."""
    return {
        "client_resources": {"num_cpus": cfg.simulation.cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus, "include_dashboard": False},
    }


def run_simulation_engine(
    flat: Mapping[str, Any], cfg: RunConfig, observer: Observer, num_cpus: int, verbose: bool
) -> None:
    """Run the ServerApp and ``cfg.federation.clients`` virtual SuperNodes.

    ``run_simulation`` passes no run config to the apps, so ``flat`` is bound into both
    (see :func:`~fedpeft.flower.server_app.make_server_app`).
    """
    with fast_extractor():
        run_simulation(
            server_app=make_server_app(flat, observer),
            client_app=make_client_app(flat),
            num_supernodes=cfg.federation.clients,
            backend_config=backend_config(cfg, num_cpus),  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
