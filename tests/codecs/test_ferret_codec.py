"""The ``ferret:K`` uplink codec: wire size, unbiasedness, direction, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedpeft.codecs import CodecContext, build_codec, from_payload, to_payload
from fedpeft.config import parse_run_config
from fedpeft.errors import CodecError, ConfigError
from fedpeft.flower.inprocess import run_in_process
from fedpeft.projection import partition_blocks
from fedpeft.server.setup import build_strategy


def _update() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "a": torch.randn(4, 30, generator=g),
        "b": torch.randn(30, 4, generator=g) * 0.1,
        "bias": torch.randn(7, generator=g),
    }


def test_wire_size_is_six_bytes_per_coefficient_plus_offsets():
    codec = build_codec("ferret:16")
    encoded, _ = codec.encode(to_payload(_update()), {}, CodecContext(seed=5))
    offsets = encoded.arrays["ferret::offsets"]
    layout = partition_blocks([(k, v.numel()) for k, v in _update().items()], 0.9)
    assert offsets.dtype == np.int32 and offsets.shape == (layout.num_blocks + 1,)
    total = int(offsets[-1])
    assert encoded.arrays["ferret::values"].shape == (total,)
    assert encoded.arrays["ferret::indices"].dtype == np.uint16
    nbytes = sum(a.nbytes for a in encoded.arrays.values())
    assert nbytes == 6 * total + 4 * (layout.num_blocks + 1)
    assert 2 * layout.num_blocks <= total <= 16 * layout.num_blocks
    assert [k for k, _, _ in json.loads(encoded.meta["ferret::keys"])] == ["a", "b", "bias"]


def test_estimate_is_unbiased_over_seeds():
    """The mean over S seeds has relative error ≈ sqrt((d/K)/S) (ALGORITHMS.md §10)."""
    update = _update()
    codec = build_codec("ferret:32")
    seeds = 200
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in update.items()}
    for seed in range(seeds):
        ctx = CodecContext(seed=seed)
        encoded, _ = codec.encode(to_payload(update), {}, ctx)
        decoded = from_payload(codec.decode(encoded, ctx))
        for k in total:
            total[k] += decoded[k].double()
    flat = torch.cat([v.reshape(-1).double() for v in update.values()])
    mean = torch.cat([(v / seeds).reshape(-1) for v in total.values()])
    rel = float(torch.linalg.vector_norm(mean - flat) / torch.linalg.vector_norm(flat))
    d_over_k = flat.numel() / 32  # one block's worth, the worst case
    assert rel < 2.5 * (d_over_k / seeds) ** 0.5
    ctx = CodecContext(seed=0)
    single = from_payload(codec.decode(codec.encode(to_payload(update), {}, ctx)[0], ctx))
    one = torch.cat([v.reshape(-1).double() for v in single.values()])
    assert float(torch.linalg.vector_norm(one - flat) / torch.linalg.vector_norm(flat)) > 2 * rel


def test_decode_with_other_seed_gives_a_different_estimate():
    codec = build_codec("ferret:8")
    encoded, _ = codec.encode(to_payload(_update()), {}, CodecContext(seed=1))
    a = from_payload(codec.decode(encoded, CodecContext(seed=1)))
    b = from_payload(codec.decode(encoded, CodecContext(seed=2)))
    assert not torch.equal(a["a"], b["a"])


def test_downlink_encode_is_refused():
    with pytest.raises(CodecError, match="uplink-only"):
        build_codec("ferret:8").encode(
            to_payload(_update()), {}, CodecContext(direction="downlink")
        )


def test_downlink_config_names_the_key():
    with pytest.raises(ConfigError, match="codec.downlink"):
        build_strategy(parse_run_config({"codec.downlink": "ferret:8"}))


def test_fedit_with_ferret_uplink_runs_and_sends_coefficients(tiny_config):
    results = run_in_process({**tiny_config, "codec.uplink": "ferret:16"})
    plain = run_in_process({**tiny_config, "output.dir": tiny_config["output.dir"] + "-plain"})
    up = [r["uplink_payload_bytes"] for r in results.rounds[1:]]
    assert all(u > 0 for u in up)
    assert sum(up) * 20 < sum(r["uplink_payload_bytes"] for r in plain.rounds[1:])
    assert all(np.isfinite(r["loss"]) for r in results.rounds)
    assert all(r["rejected"] == 0 and r["failed"] == 0 for r in results.rounds)
    assert results.rounds[-1]["loss"] != plain.rounds[-1]["loss"]
