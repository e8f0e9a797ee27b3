"""Downlink delta coding (``codec.downlink-delta``): both ends keep what the client
decoded last, the server codes the difference, a client without that reference refuses
the message and the server falls back to the tensors themselves."""

from __future__ import annotations

import pytest
import torch

from fedpeft.codecs import CodecContext, build_codec
from fedpeft.codecs.tensors import (
    REF_ROUND,
    decode_downlink,
    encode_downlink,
    held_reference,
    reference_state,
    split_reference,
)
from fedpeft.errors import CodecError
from fedpeft.flower.inprocess import run_in_process
from fedpeft.server import Reply
from tests.strategies import _factories as fx
from tests.test_engine import NODES, _engine, _reply


def _globals(seed: int, steps: int) -> list[dict[str, torch.Tensor]]:
    """A global adapter drifting a little each round, as training makes it."""
    g = torch.Generator().manual_seed(seed)
    x = {"a": torch.randn(8, 64, generator=g), "b": torch.randn(64, 8, generator=g) * 0.1}
    out = []
    for _ in range(steps):
        x = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in x.items()}
        out.append(x)
    return out


def _err(a, b) -> float:
    num = sum(float((a[k] - b[k]).norm() ** 2) for k in a)
    return (num / sum(float(b[k].norm() ** 2) for k in b)) ** 0.5


def test_the_client_decodes_exactly_what_the_server_kept_and_refs_are_named():
    chain = build_codec("int4")
    ctx = CodecContext(seed=3, direction="downlink")
    held_s: dict = {}
    held_c: dict = {}
    for t, g in enumerate(_globals(0, 4), start=1):
        payload, kept = encode_downlink(g, chain, held_s, ctx)
        assert payload.meta[REF_ROUND] == (t - 1)  # round 1: no reference (0)
        got = decode_downlink(payload, chain, held_c, ctx)
        assert all(torch.equal(got[k], kept[k]) for k in g)
        held_s, held_c = reference_state(t, kept), reference_state(t, got)
        assert held_reference(held_c)[0] == t


def test_delta_coding_converges_to_the_global_where_raw_coding_stays_at_its_error():
    """Coding g − ĝ is its own error feedback: a fixed global is reached geometrically."""
    chain = build_codec("int4")  # relative error ~0.12 per coding: a contraction
    ctx = CodecContext(seed=1, direction="downlink")
    g = _globals(1, 1)[0]
    held: dict = {}
    errors = []
    for t in range(1, 5):
        payload, kept = encode_downlink(g, chain, held, ctx)
        held = reference_state(t, kept)
        errors.append(_err(kept, g))
    raw = _err(encode_downlink(g, chain, {}, ctx)[1], g)
    assert errors[0] == pytest.approx(raw)
    assert errors[-1] < raw / 20 and all(b < a for a, b in zip(errors, errors[1:], strict=False))


def test_a_client_without_the_named_reference_refuses_with_the_reason():
    chain = build_codec("int8")
    ctx = CodecContext(seed=0, direction="downlink")
    g1, g2 = _globals(2, 2)
    _, kept = encode_downlink(g1, chain, {}, ctx)
    payload, _ = encode_downlink(g2, chain, reference_state(1, kept), ctx)
    with pytest.raises(CodecError, match="coded against round 1's payload and this client holds none"):
        decode_downlink(payload, chain, {}, ctx)
    with pytest.raises(CodecError, match="holds round 3's"):
        decode_downlink(payload, chain, reference_state(3, kept), ctx)


def test_split_reference_keeps_uplink_residuals_apart():
    held = reference_state(2, {"x": torch.ones(3)})
    both = {**held, "ef/x": torch.zeros(3).numpy(), "0/y": torch.zeros(1).numpy()}
    ref, rest = split_reference(both)
    assert set(ref) == set(held) and set(rest) == {"ef/x", "0/y"}


def _round(engine, state, replies_for):
    work = engine.plan_round(state)
    outs = engine.outgoing(work, list(work.plans.values()), attempt=0)
    refs = {o.plan.node_id: o.payload.meta.get(REF_ROUND) for o in outs}
    replies = [replies_for(engine, work, n) for n in NODES]
    engine.receive(work, [r for r in replies if r is not None], list(work.plans.values()))
    engine.aggregate(work)
    return engine.finish_round(work).state, refs


def test_the_engine_names_the_last_completed_round_and_forgets_after_errors_and_silence():
    engine = _engine(**{"codec.downlink": "int8"})
    state = engine.initial_state(fx.adapter(0, dtype=torch.float32))

    def normal(engine, work, n):
        return _reply(engine, work, n.node_id, fx.adapter(10 + n.partition_id, dtype=torch.float32))

    def second_fails_third_silent(engine, work, n):
        if n.partition_id == 1:
            return Reply(n.node_id, error="boom")
        return None if n.partition_id == 2 else normal(engine, work, n)

    state, refs = _round(engine, state, normal)
    assert set(refs.values()) == {0}
    state, refs = _round(engine, state, second_fails_third_silent)
    assert set(refs.values()) == {1}
    state, refs = _round(engine, state, normal)
    assert refs == {100: 2, 101: 0, 102: 0}
    # what the server keeps per partition survives a checkpoint (it is ServerState.downlink)
    assert held_reference(state.downlink[0])[0] == 3


def test_a_delta_coded_downlink_run_learns_like_lossless_with_fewer_bytes(tiny_config):
    base = {**tiny_config, "federation.rounds": 3}
    plain = run_in_process(base)
    coded = run_in_process({**base, "output.dir": tiny_config["output.dir"] + "-d",
                            "codec.downlink": "int4+zstd", "codec.uplink": "int4+zstd"})
    raw = run_in_process({**base, "output.dir": tiny_config["output.dir"] + "-r",
                          "codec.downlink": "int4+zstd", "codec.uplink": "int4+zstd",
                          "codec.downlink-delta": False})
    down = [r["downlink_payload_bytes"] for r in coded.rounds[1:]]
    assert all(d * 5 < p["downlink_payload_bytes"] for d, p in zip(down, plain.rounds[1:], strict=True))
    # every client decoded every delta (a missing reference would be a failed client)
    assert all(r["failed"] == 0 and r["rejected"] == 0 for r in coded.rounds[1:])
    assert coded.rounds[-1]["loss"] == pytest.approx(plain.rounds[-1]["loss"], abs=0.05)
    assert abs(coded.rounds[-1]["loss"] - plain.rounds[-1]["loss"]) <= abs(
        raw.rounds[-1]["loss"] - plain.rounds[-1]["loss"]
    ) + 0.01
