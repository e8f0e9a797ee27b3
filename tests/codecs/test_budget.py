"""``budget.bytes-per-round``: the ``topk`` fraction is tuned per round to a bytes target."""

from __future__ import annotations

import pytest
import torch

from fedpeft.codecs import CodecContext, build_codec
from fedpeft.codecs.analysis import encoded_nbytes
from fedpeft.codecs.budget import encode_within, with_fraction
from fedpeft.codecs.tensors import decode_tensors, encode_tensors
from fedpeft.config import parse_run_config
from fedpeft.errors import ConfigError
from fedpeft.flower.inprocess import run_in_process
from fedpeft.server.setup import build_strategy


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"l{i}.lora_{ab}.weight": torch.randn(*shape, generator=g) * 0.01
        for i in range(4)
        for ab, shape in (("A", (8, 384)), ("B", (384, 8)))
    }


@pytest.mark.parametrize("spec", ["topk:0.5+int8+zstd", "topk:0.5", "topk:0.5+fp16"])
@pytest.mark.parametrize("target", [4_000, 10_000, 30_000])
def test_the_payload_fits_and_a_larger_fraction_would_not(spec, target):
    chain, ctx = build_codec(spec), CodecContext(seed=1)
    tensors = _update()
    fit = encode_within(tensors, chain, {}, ctx, target)
    assert fit.nbytes == encoded_nbytes(fit.payload) <= target
    if fit.fraction < 1.0:  # near the largest fraction that fits
        bigger, _ = encode_tensors(tensors, with_fraction(chain, min(1.0, fit.fraction * 1.05)), {}, ctx)
        assert encoded_nbytes(bigger) > target
    decoded = decode_tensors(fit.payload, chain, ctx)  # the decoder needs no fraction
    assert {k: v.shape for k, v in decoded.items()} == {k: v.shape for k, v in tensors.items()}


def test_a_target_below_the_fixed_cost_sends_the_least_and_says_so():
    fit = encode_within(_update(), build_codec("topk:0.1+int8"), {}, CodecContext(), 50)
    assert fit.nbytes > 50 and fit.fraction == pytest.approx(1 / 3072)


def test_the_residual_kept_is_the_one_of_what_was_sent():
    chain, ctx = build_codec("topk:0.5"), CodecContext()
    tensors = _update()
    fit = encode_within(tensors, chain, {}, ctx, 8_000)
    sent = decode_tensors(fit.payload, chain, ctx)
    for key, value in tensors.items():  # e_1 = u_1 − c_1
        torch.testing.assert_close(torch.from_numpy(fit.state["ef/" + key]).float(), value - sent[key])


def test_a_chain_without_topk_is_refused_with_the_key():
    with pytest.raises(ConfigError, match="budget.bytes-per-round tunes the one 'topk' stage.*'int4\\+zstd'"):
        build_strategy(parse_run_config({"budget.bytes-per-round": 1000, "codec.uplink": "int4+zstd"}))
    with pytest.raises(ConfigError, match="budget.bytes-per-round must be >= 0"):
        parse_run_config({"budget.bytes-per-round": -1})


def test_a_run_meets_the_target_every_round_and_reports_it(tiny_config):
    target = 3_000
    res = run_in_process({**tiny_config, "federation.rounds": 2, "codec.uplink": "topk:0.9+int8+zstd",
                          "budget.bytes-per-round": target})
    plain = run_in_process({**tiny_config, "federation.rounds": 1, "output.dir": tiny_config["output.dir"] + "-p"})
    for r in res.rounds[1:]:
        assert len(r["clients"]) == 3
        for c in r["clients"]:
            assert c["uplink-fitted-bytes"] <= target and 0 < c["uplink-fraction"] < 0.9
            # the message adds the metrics and record framing to the codec's bytes
            assert c["uplink-fitted-bytes"] <= c["uplink_bytes"] <= target + 1_500
        assert r["uplink_bytes"] * 3 < plain.rounds[1]["uplink_bytes"]
