"""The ``ferret`` strategy: sync by replay or full state, rejection, bytes, end to end.

Unit tests drive the strategy halves through ``_factories.run_round`` (payload → start
→ train → finish → aggregate, client state through ``torch.save``); end-to-end tests
run the real ClientApp/ServerApp on the tiny BERT through the in-process grid and check
the bytes in ``summary.json`` against the formulas of ALGORITHMS.md §10:

    uplink per client    6·Σ_l K_l + 4·(L + 1) + 24
    downlink per client  R·(4·L·K + 24) + 24          (R = rounds it missed)
"""

from __future__ import annotations

import json
import logging
import math
import pathlib

import numpy as np
import pytest
import torch
from flwr.app import Array, Error, Message

from fedpeft import ConfigError, FedPeftError, get_strategy
from fedpeft.flower import records as rec
from fedpeft.flower.inprocess import run_in_process
from strategies import ferret as F
from tests.strategies import _factories as fx

K = 8
SHAPES = {"enc.0.q": (40, 24), "enc.0.v": (40, 24), "enc.1.q": (16, 56)}
"""(d_out, d_in): large enough that replaying a few rounds beats sending the state."""


def _fed(mode="lora", **options):
    entry = get_strategy("ferret")
    return entry.build(F.FerretOptions(mode=mode, num_seeds=K, **options), fx.env())


def _init(mode):
    def init(rank):
        tensors = fx.adapter(0, rank, shapes=SHAPES, dtype=torch.float32)
        if mode == "full":
            tensors.update(
                {k: v for k, v in F.tuned_space(tensors, "full").items() if k not in tensors}
            )
        return tensors

    return init


def _rounds(fed, mode, schedule, state=None, global_tensors=None, client_states=None):
    """Run ``schedule`` (one list of partition ids per round); checkpoint the server
    state between rounds."""
    init = _init(mode)
    global_tensors = dict(init(4)) if global_tensors is None else global_tensors
    state = fed.aggregator.initialize(global_tensors) if state is None else state
    client_states = {} if client_states is None else client_states
    outs = []
    for server_round, pids in enumerate(schedule, start=1):
        plans = [fx.plan(p) for p in pids]
        out, _, client_states = fx.run_round(
            fed, state, global_tensors, client_states, plans, server_round, init
        )
        state, global_tensors = fx.save_load(out.state), out.tensors
        outs.append(out)
    return state, global_tensors, client_states, outs


def _synced_replica(fed, state, global_tensors, client_states, pid, mode):
    p = fx.plan(pid)
    received = fed.aggregator.client_payload(state, global_tensors, p)
    start, trainable = fed.client.start(
        received, _init(mode)(4), fx.save_load(client_states.get(pid, {})), p
    )
    return received, {k: start[k] for k in trainable}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_client_that_missed_rounds_replays_to_the_global_bit_exactly(mode, caplog):
    caplog.set_level(logging.INFO, logger="fedpeft")
    fed = _fed(mode)
    state, glob, cstates, outs = _rounds(fed, mode, [[0, 1, 2], [1, 2], [1], [2, 1]])
    received, replica = _synced_replica(fed, state, glob, cstates, 0, mode)
    assert received[F.REPLAY["gamma"]].shape[0] == 4  # it trained from version 0
    assert not any(k.startswith(F.FULL) for k in received)
    space = F.tuned_space(glob, mode)
    assert set(replica) == set(space)
    for key in space:
        assert torch.equal(replica[key], space[key]), key
    assert "catches up from version 0 by replaying 4 round(s)" in caplog.text
    assert all(out.metrics["ferret/step_norm"] > 0 for out in outs)


def test_client_that_never_trained_replays_from_the_initial_tensors():
    fed = _fed()
    state, glob, cstates, _ = _rounds(fed, "lora", [[1], [1]])
    _, replica = _synced_replica(fed, state, glob, cstates, 2, "lora")
    assert all(torch.equal(replica[k], v) for k, v in F.tuned_space(glob, "lora").items())


def test_beyond_max_replay_the_full_state_is_sent_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="fedpeft")
    fed = _fed(max_replay=1)
    state, glob, cstates, _ = _rounds(fed, "lora", [[0, 1], [1], [1]])
    received, replica = _synced_replica(fed, state, glob, cstates, 0, "lora")
    assert F.REPLAY["gamma"] not in received and any(k.startswith(F.FULL) for k in received)
    assert "sending the full state" in caplog.text
    assert all(torch.equal(replica[k], v) for k, v in F.tuned_space(glob, "lora").items())
    *_, outs = _rounds(fed, "lora", [[0, 1]], state, glob, cstates)
    assert outs[0].metrics["ferret/full_syncs"] == 1.0  # client 0's header says "full state"
    assert outs[0].metrics["ferret/replayed_rounds"] == 1.0  # client 1 replayed one round


def test_lost_client_state_errors_then_the_server_resyncs_it():
    fed = _fed()
    state, glob, cstates, _ = _rounds(fed, "lora", [[0, 1], [0, 1]])
    cstates[0] = {}  # the node restarted and lost its Context.state
    with pytest.raises(FedPeftError, match="state was lost"):
        _synced_replica(fed, state, glob, cstates, 0, "lora")
    state = fed.aggregator.client_failed(state, fx.plan(0), "lost")
    received, replica = _synced_replica(fed, state, glob, cstates, 0, "lora")
    assert received[F.REPLAY["gamma"]].shape[0] == 2  # replay from version 0
    assert all(torch.equal(replica[k], v) for k, v in F.tuned_space(glob, "lora").items())


def _one_upload(fed):
    init = _init("lora")
    glob = init(4)
    state = fed.aggregator.initialize(glob)
    out, updates, _ = fx.run_round(fed, state, glob, {}, [fx.plan(0)], 1, init)
    return state, updates[0]


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda t: t.update({F.UPLOAD["offsets"]: t[F.UPLOAD["offsets"]][:-1]}), "offsets"),
        (
            lambda t: t.update(
                {F.UPLOAD["indices"]: torch.from_numpy(t[F.UPLOAD["indices"]].numpy() + K)}
            ),
            "pool index",
        ),
        (lambda t: t.update({F.HEADER: torch.tensor([7, 1, 0])}), "current version"),
        (lambda t: t.update({"aux.ferret.extra": torch.zeros(1)}), "unexpected"),
        (lambda t: t.pop(F.UPLOAD["values"]), "values"),
    ],
)
def test_malformed_uploads_are_rejected(corrupt, match):
    fed = _fed()
    state, good = _one_upload(fed)
    fed.aggregator.check_update(state, good.tensors, good.plan)  # the real one passes
    tensors = dict(good.tensors)
    corrupt(tensors)
    with pytest.raises(FedPeftError, match=match):  # the server rejects and logs it
        fed.aggregator.check_update(state, tensors, good.plan)


def test_dense_baseline_is_fedavg_on_the_tuned_tensors():
    fed = _fed(projection=False)
    init = _init("lora")
    glob = init(4)
    state = fed.aggregator.initialize(glob)
    plans = [fx.plan(0), fx.plan(1)]
    out, updates, _ = fx.run_round(fed, state, glob, {}, plans, 1, init, counts={0: 1, 1: 3})
    space = F.tuned_space(glob, "lora")
    trained = [fx.perturb(glob, frozenset(space), 1000 + p.partition_id) for p in plans]
    for key in space:
        expected = 0.25 * trained[0][key] + 0.75 * trained[1][key]
        assert torch.allclose(out.tensors[key], expected, atol=1e-6), key
    assert out.metrics["ferret/uplink_formula_bytes"] == 2 * (
        sum(v.numel() * 4 for v in F.tuned_space(glob, "lora").values()) + F.HEADER_BYTES
    )


def test_config_errors_name_the_key():
    entry = get_strategy("ferret")
    with pytest.raises(ConfigError, match="lora.ranks"):
        entry.build(F.FerretOptions(), fx.env(ranks=(4, 8)))
    with pytest.raises(ConfigError, match="max-replay"):
        entry.build(F.FerretOptions(max_replay=-1), fx.env())


# --------------------------------------------------------------------------- end to end


def _recorder():
    """A tamper hook that keeps every upload's block offsets (in delivery order)."""
    seen: list[tuple[int, np.ndarray]] = []

    def tamper(pid, instruction, reply):
        arrays = reply.content[rec.ARRAYS]
        key = next(k for k in arrays.keys() if k.endswith("ferret.offsets"))
        seen.append(
            (int(instruction.content[rec.CONFIG][rec.SERVER_ROUND]), arrays[key].numpy().copy())
        )
        return reply

    return tamper, seen


def _check_bytes(cfg, seen, clients):
    summary = json.loads((pathlib.Path(cfg["output.dir"]) / "summary.json").read_text())
    rounds = summary["rounds"]
    num_blocks = {len(o) - 1 for _, o in seen}
    assert len(num_blocks) == 1
    L = num_blocks.pop()
    for r in rounds[1:]:
        offsets = [o for t, o in seen if t == r["round"]]
        assert len(offsets) == clients
        uplink = sum(6 * int(o[-1]) + 4 * len(o) + 24 for o in offsets)
        assert r["uplink_payload_bytes"] == uplink
        assert r["strategy_metrics"]["ferret/uplink_formula_bytes"] == uplink
        missed = 0 if r["round"] == 1 else 1  # every client trains every round
        assert r["downlink_payload_bytes"] == clients * (missed * (4 * L * K + 24) + 24)
        assert all(2 * L <= int(o[-1]) <= K * L for o in offsets)
    assert summary["totals"]["uplink_payload_bytes"] == sum(
        r["uplink_payload_bytes"] for r in rounds
    )
    return rounds


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_end_to_end_bytes_match_the_formulas(mode, tiny_config):
    tamper, seen = _recorder()
    cfg = {
        **tiny_config,
        "strategy.name": "ferret",
        "ferret.mode": mode,
        "ferret.num-seeds": K,
        "federation.rounds": 3,
    }
    if mode == "full":
        cfg["lora.target-modules"] = "all-linear"
    run_in_process(cfg, tamper=tamper)
    rounds = _check_bytes(cfg, seen, clients=3)
    assert all(r["rejected"] == 0 and r["failed"] == 0 for r in rounds)
    assert all(math.isfinite(r["loss"]) for r in rounds)
    assert len({r["loss"] for r in rounds}) > 1  # the global model moves
    assert all(r["strategy_metrics"]["ferret/step_norm"] > 0 for r in rounds[1:])


def test_end_to_end_rejects_a_corrupt_upload_and_resyncs_a_failed_client(tiny_config, caplog):
    caplog.set_level(logging.INFO, logger="fedpeft")

    def tamper(pid, instruction, reply):
        server_round = int(instruction.content[rec.CONFIG][rec.SERVER_ROUND])
        if pid == 1 and server_round == 1:
            arrays = reply.content[rec.ARRAYS]
            key = next(k for k in arrays.keys() if k.endswith("ferret.values"))
            value = arrays[key].numpy().copy()
            value[0] = np.nan
            arrays[key] = Array(value)
        if pid == 2 and server_round == 1:
            return Message(Error(code=1, reason="node lost"), reply_to=instruction)
        return reply

    cfg = {**tiny_config, "strategy.name": "ferret", "ferret.num-seeds": K, "federation.rounds": 3}
    results = run_in_process(cfg, tamper=tamper)
    r1, r2, r3 = results.rounds[1:]
    assert r1["rejected"] == 1 and r1["failed"] == 1 and len(r1["clients"]) == 1
    assert "rejected the update of node" in caplog.text
    assert r2["rejected"] == 0 and r2["failed"] == 0 and r3["failed"] == 0
    assert all(math.isfinite(r["loss"]) for r in results.rounds)
