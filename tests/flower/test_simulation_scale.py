"""Scale helpers: the pending-only message extractor and lazy, cached partitions."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from queue import Queue

from fedpeft.flower.simulation import make_extractor, pending_node_ids


@dataclass
class _Meta:
    dst_node_id: int
    delivered_at: str = ""


@dataclass
class _Msg:
    metadata: _Meta


@dataclass
class _State:
    """The parts of flwr's in-memory link state the extractor touches."""

    message_ins_store: dict[str, _Msg] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    polled: list[int] = field(default_factory=list)

    def get_message_ins(self, node_id: int, limit: int) -> list[_Msg]:
        self.polled.append(node_id)
        out = []
        for msg in self.message_ins_store.values():
            if msg.metadata.dst_node_id == node_id and msg.metadata.delivered_at == "":
                msg.metadata.delivered_at = "now"
                out.append(msg)
                if len(out) == limit:
                    break
        return out


def test_pending_node_ids_lists_undelivered_destinations_once():
    state = _State({str(i): _Msg(_Meta(n)) for i, n in enumerate([5, 3, 5, 9])})
    state.message_ins_store["3"].metadata.delivered_at = "earlier"
    assert pending_node_ids(state) == [5, 3]
    assert pending_node_ids(object()) is None


def test_extractor_delivers_every_message_and_polls_only_pending_nodes():
    nodes = {n: n for n in range(1000)}
    state = _State({str(i): _Msg(_Meta(n)) for i, n in enumerate([7, 7, 42])})
    queue: Queue = Queue()
    stop = threading.Event()
    extractor = make_extractor(lambda *a: None, interval=0.01)
    thread = threading.Thread(target=extractor, args=(state, queue, nodes, stop))
    thread.start()
    got = [queue.get(timeout=5) for _ in range(3)]
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert sorted(m.metadata.dst_node_id for m in got) == [7, 7, 42]
    assert set(state.polled) <= {7, 42}  # never the 998 idle nodes


def test_extractor_falls_back_to_flowers_on_an_unknown_state():
    calls = []
    extractor = make_extractor(lambda *a: calls.append(a))
    stop = threading.Event()
    extractor(object(), Queue(), {}, stop)
    assert len(calls) == 1


def test_partitions_are_built_lazily_and_match_a_fresh_split(tiny_config):
    from fedpeft.config import parse_run_config
    from fedpeft.tasks import base, data, get_task

    cfg = parse_run_config({**tiny_config, "federation.clients": 50, "data.max-examples": 0})
    task = get_task(cfg)
    before = dict(base.PARTITIONS_BUILT)
    first, _ = task.client_data(17, 50)
    again, _ = task.client_data(17, 50)
    built = {
        k: v - before.get(k, 0) for k, v in base.PARTITIONS_BUILT.items() if v != before.get(k, 0)
    }
    assert built == {(17, 50): 1}  # one partition built, once; none of the other 49
    assert first.input_ids == again.input_ids
    data._PARTITIONERS.clear()  # a fresh fit gives the same assignment
    pool = task.train_pool()
    idx = data.partition_indices(pool, 17, 50, cfg.data, base.derive_seed(cfg.seed, "partition"))
    # the client shuffles its partition (seeded); same examples, other order
    assert sorted(map(tuple, pool.subset(idx).input_ids)) == sorted(map(tuple, first.input_ids))
    assert len(first) == len(idx) > 0
