"""FedSpine: mask-aware aggregation by hand, client pruning on a real peft model,
per-device payloads, upload validation, and end-to-end runs with device profiles."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
from flwr.app import Array

from fedpeft import ConfigError, get_strategy, parse_run_config
from fedpeft.devices import profile_for, simulated_round_seconds
from fedpeft.flower import records as rec
from fedpeft.flower.inprocess import run_in_process
from fedpeft.lora import AdapterLayout, split_adapter
from fedpeft.pruning.bert import encoder_layers, prune_bert_, structure_counts
from fedpeft.tasks import get_task
from fedpeft.tasks.data import collate
from strategies import fedspine as F
from tests.strategies import _factories as fx

Q = "bert.encoder.layer.0.attention.self.query"  # (H·d_h, d_in) = (2·2, 4)
UP = "bert.encoder.layer.0.intermediate.dense"  # (d_ff, d_in) = (3, 4)
SHAPES = {Q: (4, 4), UP: (3, 4)}
LAYOUT = AdapterLayout(lora_alpha=fx.ALPHA)
FFN_TARGETS = "query,value,intermediate.dense,output.dense"


def _agg(**options) -> F.FedSpineAggregator:
    return F.FedSpineAggregator(LAYOUT, F.FedSpineConfig(**options))


def _pruned(tensors, heads, channels):
    """Keep rows of a full-coordinate adapter by the masks (what a client uploads)."""
    out = dict(tensors)
    rows = {
        Q: torch.tensor(heads[0], dtype=torch.bool).repeat_interleave(2),
        UP: torch.tensor(channels[0], dtype=torch.bool),
    }
    for m, keep in rows.items():
        out[f"{m}.lora_B.weight"] = tensors[f"{m}.lora_B.weight"][keep]
    out[F.HEADS_KEY] = torch.tensor(heads, dtype=torch.int8)
    out[F.CHANNELS_KEY] = torch.tensor(channels, dtype=torch.int8)
    return out


def _product(tensors, module, rank):
    a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
    return (fx.ALPHA / rank) * (b.double() @ a.double())


def test_mask_aware_aggregation_matches_a_hand_computed_case():
    glob = fx.adapter(0, rank=4, shapes=SHAPES, head=True)
    c0 = fx.adapter(1, rank=2, shapes=SHAPES, head=True)  # prunes head 1 and channel 0
    c1 = fx.adapter(2, rank=1, shapes=SHAPES, head=True)  # keeps everything
    up0 = _pruned(c0, [[1, 0]], [[0, 1, 1]])
    up1 = _pruned(c1, [[1, 1]], [[1, 1, 1]])
    u0 = fx.update(up0, num_examples=30, partition_id=0, rank=2)
    u1 = fx.update(up1, num_examples=10, partition_id=1, rank=1)
    out = _agg().aggregate(_agg().initialize(glob), glob, [u0, u1], 1)

    p0, p1 = _product(c0, Q, 2), _product(c1, Q, 1)
    want_q = p1.clone()
    want_q[:2] = 0.75 * p0[:2] + 0.25 * p1[:2]  # head 0 (rows 0-1): both; head 1: client 1 only
    p0, p1 = _product(c0, UP, 2), _product(c1, UP, 1)
    want_up = 0.75 * p0 + 0.25 * p1
    want_up[0] = p1[0]  # channel 0: client 1 only
    got = split_adapter({k: v for k, v in out.tensors.items() if "lora" in k}, LAYOUT)[0]
    # r_max = 4 ≥ min(d_out, d_in): the truncation keeps ΔW exactly
    torch.testing.assert_close(got[Q].delta().double(), want_q, atol=1e-10, rtol=0)
    torch.testing.assert_close(got[UP].delta().double(), want_up, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.tensors[fx.HEAD], 0.75 * c0[fx.HEAD] + 0.25 * c1[fx.HEAD])
    assert set(out.state["masks"]) == {"0", "1"}


def test_entries_nobody_kept_keep_the_previous_global_value():
    glob = fx.adapter(0, rank=4, shapes=SHAPES)
    ups = [
        fx.update(
            _pruned(fx.adapter(s, rank=4, shapes=SHAPES), [[1, 0]], [[1, 1, 1]]),
            partition_id=s,
            rank=4,
        )
        for s in (1, 2)
    ]
    out = _agg().aggregate({"masks": {}}, glob, ups, 1)
    before = fx.factors(glob, LAYOUT)[Q].delta()
    after = split_adapter({k: v for k, v in out.tensors.items() if "lora" in k}, LAYOUT)[0][
        Q
    ].delta()
    torch.testing.assert_close(after[2:], before[2:], atol=1e-10, rtol=0)  # head 1: nobody
    assert not torch.allclose(after[:2], before[:2])


def test_payload_is_the_best_rank_r_approximation_on_the_kept_rows():
    agg = _agg()
    glob = fx.adapter(0, rank=4, shapes=SHAPES)
    state = {
        "masks": {
            "0": (
                torch.tensor([[1, 0]], dtype=torch.int8),
                torch.tensor([[0, 1, 1]], dtype=torch.int8),
            )
        }
    }
    payload = agg.client_payload(state, glob, fx.plan(0, rank=2))
    got = fx.factors(payload, LAYOUT)
    full = fx.factors(glob, LAYOUT)
    assert got[Q].a.shape == (2, 4) and got[Q].b.shape == (4, 2)  # full coordinates
    assert torch.count_nonzero(got[Q].b[2:]) == 0 and torch.count_nonzero(got[UP].b[0]) == 0
    kept = full[Q].delta().double()[:2]
    u, s, vh = torch.linalg.svd(kept)
    best = (u[:, :2] * s[:2]) @ vh[:2]
    torch.testing.assert_close(got[Q].delta().double()[:2], best, atol=1e-9, rtol=0)
    # a device the server has no masks for gets the plain rank-2 truncation
    plain = fx.factors(agg.client_payload(state, glob, fx.plan(5, rank=2)), LAYOUT)
    assert torch.count_nonzero(plain[Q].b[2:]) > 0


def test_upload_shapes_follow_the_masks_and_bad_masks_are_refused():
    agg = _agg()
    up = _pruned(fx.adapter(1, rank=2, shapes=SHAPES), [[1, 0]], [[0, 1, 1]])
    assert agg.upload_shape(f"{Q}.lora_B.weight", (4, 2), up, fx.plan(0, 2)) == (2, 2)
    assert agg.upload_shape(f"{Q}.lora_A.weight", (2, 4), up, fx.plan(0, 2)) == (2, 4)
    assert agg.upload_shape(f"{UP}.lora_B.weight", (3, 2), up, fx.plan(0, 2)) == (2, 2)
    no_masks = fx.adapter(1, rank=2, shapes=SHAPES)
    assert agg.upload_shape(f"{Q}.lora_B.weight", (4, 2), no_masks, fx.plan(0, 2)) == (4, 2)
    empty = {**up, F.HEADS_KEY: torch.tensor([[0, 0]], dtype=torch.int8)}
    with pytest.raises(Exception, match="removes every head"):
        agg.upload_shape(f"{Q}.lora_B.weight", (4, 2), empty, fx.plan(0, 2))
    wrong = {**up, F.CHANNELS_KEY: torch.tensor([[1, 1]], dtype=torch.int8)}
    with pytest.raises(Exception, match="2 channels but .* has 3"):
        agg.upload_shape(f"{UP}.lora_B.weight", (3, 2), wrong, fx.plan(0, 2))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="fedspine.fixed-prune-ratio must be < 1"):
        parse_run_config({"strategy.name": "fedspine", "fedspine.fixed-prune-ratio": 1.5})
    with pytest.raises(ConfigError, match=r"fedspine.fixed-rank must be <= lora.r=8"):
        get_strategy("fedspine").build(F.FedSpineConfig(fixed_rank=16), fx.env(rank=8))
    with pytest.raises(ConfigError, match=r"fedspine.ranks must include a rank <= lora.r=8"):
        get_strategy("fedspine").build(F.FedSpineConfig(ranks="16,32"), fx.env(rank=8))
    with pytest.raises(ConfigError, match="devices.profile must be '' or one of"):
        parse_run_config({"devices.profile": "fast-only"})


@pytest.mark.parametrize(
    ("lora_r", "offered"), [(8, (2, 4, 8)), (16, (2, 4, 8, 16)), (32, (2, 4, 8, 16, 32))]
)
def test_default_rank_set_is_the_spec_set_clipped_to_lora_r(lora_r, offered, caplog):
    caplog.set_level(logging.INFO, logger="fedpeft")
    F._note_dropped_ranks.cache_clear()
    assert F.FedSpineConfig().rank_choices() == (2, 4, 8, 16, 32)  # ALGORITHMS.md §11.4
    fed = get_strategy("fedspine").build(F.FedSpineConfig(), fx.env(rank=lora_r))
    assert fed.selector.sucb.ranks == offered
    assert ("are not offered" in caplog.text) == (lora_r < 32)
    explicit = get_strategy("fedspine").build(F.FedSpineConfig(ranks="4,16"), fx.env(rank=8))
    assert explicit.selector.sucb.ranks == (4,)


def _task(tmp_path, **extra):
    from tests.conftest import TINY

    flat = {
        **TINY,
        "output.dir": str(tmp_path),
        "strategy.name": "fedspine",
        "lora.target-modules": FFN_TARGETS,
        "train.local-steps": 4,
        **extra,
    }
    cfg = parse_run_config(flat)
    return cfg, get_task(cfg)


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_client_prunes_ratio_p_of_the_structures_and_the_pruned_model_runs(tmp_path, ratio):
    cfg, task = _task(tmp_path)
    rank = 4
    model = task.model(rank)
    shapes_before = {k: tuple(v.shape) for k, v in model.tensors().items()}
    client = F.FedSpineClient(LAYOUT, cfg.options)
    plan = fx.plan(0, rank)
    plan = type(plan)(
        plan.node_id,
        0,
        rank,
        7,
        {"prune-ratio": ratio, "target-sparsity": 0.9, "prune-interval": 2},
    )
    data, _ = task.client_data(0, 3)
    start, trainable = client.start({}, model.initial, {}, plan)
    model.load(start)
    local = client.local_round(task, model, data, trainable, plan, {})

    heads_n, channels_n = structure_counts(model.model)
    num_layers = len(heads_n)
    heads, channels = local.tensors[F.HEADS_KEY].bool(), local.tensors[F.CHANNELS_KEY].bool()
    last = num_layers - 1  # protected (and ⌊0.1·L⌋ = 0 first layers for tiny-bert)
    assert bool(heads[last].all()) and bool(channels[last].all())
    prunable = [i for i in range(num_layers) if i != last]
    for mask, counts in ((heads, heads_n), (channels, channels_n)):
        total = sum(counts[i] for i in prunable)
        removed = sum(counts[i] - int(mask[i].sum()) for i in prunable)
        assert removed == math.floor(ratio * total + 1e-9)
        assert all(int(mask[i].sum()) >= 1 for i in range(num_layers))
    assert local.metrics["sparsity"] == pytest.approx(
        (local.metrics["head-sparsity"] + local.metrics["channel-sparsity"]) / 2
    )
    assert (
        all(math.isfinite(v) for v in local.metrics.values()) and local.metrics["update-norm"] > 0
    )
    # the cached model is untouched (other clients share it)
    assert {k: tuple(v.shape) for k, v in model.tensors().items()} == shapes_before
    # uploads have exactly the shapes the server expects from the masks
    agg = F.FedSpineAggregator(LAYOUT, cfg.options)
    for key, value in local.tensors.items():
        if key in shapes_before and "lora_" in key:
            assert tuple(value.shape) == agg.upload_shape(
                key, shapes_before[key], local.tensors, plan
            ), key
    # the pruned structures re-apply from the state and the pruned copy runs
    work = copy.deepcopy(model)
    prune_bert_(
        work.model,
        {i: heads[i] for i in range(num_layers)},
        {i: channels[i] for i in range(num_layers)},
    )
    assert encoder_layers(work.model)[0].attention.self.num_attention_heads == int(heads[0].sum())
    loss, logits = task.loss(work, collate(data, list(range(4)), work.pad_id))
    assert logits.shape[0] == 4 and math.isfinite(float(loss))
    # a second round starts from the stored masks and only prunes further
    plan2 = type(plan)(plan.node_id, 0, rank, 8, {**plan.options, "prune-ratio": 0.0})
    model.load(start)
    again = client.local_round(task, model, data, trainable, plan2, local.state)
    assert torch.equal(again.tensors[F.HEADS_KEY], local.tensors[F.HEADS_KEY])
    assert again.metrics["sparsity"] == local.metrics["sparsity"]


def _e2e_config(tiny_config, **extra):
    return {
        **tiny_config,
        "strategy.name": "fedspine",
        "devices.profile": "mixed-3-tier",
        "lora.target-modules": FFN_TARGETS,
        "train.local-steps": 4,
        "fedspine.prune-interval": 2,
        "fedspine.p-max": 0.5,
        "federation.rounds": 3,
        **extra,
    }


def test_end_to_end_per_client_decisions_and_simulated_times(tiny_config):
    results = run_in_process(_e2e_config(tiny_config))
    rounds = results.rounds
    assert all(r["rejected"] == 0 and r["failed"] == 0 for r in rounds)
    sparsity: dict[int, list[float]] = {}
    uplink: dict[int, list[int]] = {}
    for r in rounds[1:]:
        assert r["simulated_seconds"] == max(c["client_seconds"] for c in r["clients"])
        for c in r["clients"]:
            assert c["rank"] in (2, 4, 8) and 0.0 <= c["prune_ratio"] <= 0.5
            assert c["device"] == ("fast", "medium", "slow")[c["partition_id"] % 3]
            profile = profile_for("mixed-3-tier", c["partition_id"])
            want = simulated_round_seconds(
                c["measured_seconds"], profile, c["uplink_bytes"], c["downlink_bytes"]
            )
            assert c["client_seconds"] == pytest.approx(want)
            sparsity.setdefault(c["partition_id"], []).append(c["sparsity"])
            uplink.setdefault(c["partition_id"], []).append(
                (c["sparsity"], c["rank"], c["uplink_bytes"])
            )
    for pid, values in sparsity.items():
        assert values == sorted(values), pid  # sparsity never decreases
    # at a fixed rank, more pruning sends fewer bytes
    for entries in uplink.values():
        for s1, r1, b1 in entries:
            for s2, r2, b2 in entries:
                if r1 == r2 and s2 > s1:
                    assert b2 < b1
    assert rounds[-1]["strategy_metrics"]["fedspine/sparsity_mean"] > 0


def test_fixed_allocation_without_pruning_is_reproducible(tiny_config):
    cfg = _e2e_config(tiny_config, **{"fedspine.fixed-rank": 8, "fedspine.fixed-prune-ratio": 0.0})
    a = run_in_process({**cfg, "output.dir": tiny_config["output.dir"] + "-a"})
    b = run_in_process({**cfg, "output.dir": tiny_config["output.dir"] + "-b"})
    assert [r["loss"] for r in a.rounds] == [r["loss"] for r in b.rounds]
    for r in a.rounds[1:]:
        assert all(
            c["rank"] == 8 and c["prune_ratio"] == 0.0 and c["sparsity"] == 0.0
            for c in r["clients"]
        )


def test_a_malformed_mask_is_rejected_and_the_global_model_stays_intact(tiny_config, caplog):
    caplog.set_level(logging.WARNING, logger="fedpeft")

    def tamper(pid, instruction, reply):
        if pid == 1 and int(instruction.content[rec.CONFIG][rec.SERVER_ROUND]) == 1:
            arrays = reply.content[rec.ARRAYS]
            key = next(k for k in arrays.keys() if k.endswith("fedspine.heads"))
            value = arrays[key].numpy().copy()
            value[0] = 0  # removes every head of layer 0
            arrays[key] = Array(value)
        return reply

    results = run_in_process(_e2e_config(tiny_config, **{"federation.rounds": 2}), tamper=tamper)
    r1 = results.rounds[1]
    assert r1["rejected"] == 1 and len(r1["clients"]) == 2
    assert "removes every head" in caplog.text
    assert all(math.isfinite(r["loss"]) for r in results.rounds)


# -- candidate final sparsities (issue 18) -------------------------------------------


@pytest.mark.parametrize("bad", ["0.1,abc", "0.2,1.0", "0.1,-0.1", "0.2,0.2", "nan"])
def test_malformed_candidate_sparsities_name_the_key_and_the_expected_value(bad):
    with pytest.raises(
        ConfigError, match=r"fedspine.sparsities must be .*in \[0, 1\), e.g. '0.1,0.2,0.3,0.5'"
    ):
        parse_run_config({"strategy.name": "fedspine", "fedspine.sparsities": bad})


def test_candidate_sparsities_reach_the_bandit_and_the_default_has_none():
    cfg = parse_run_config({"strategy.name": "fedspine", "fedspine.sparsities": "0.5, 0.1,0.3,0.2"})
    fed = get_strategy("fedspine").build(cfg.options, fx.env(rank=8))
    assert fed.selector.sucb.sparsities == (0.1, 0.2, 0.3, 0.5) and fed.selector.sucb.dims == 3
    default = get_strategy("fedspine").build(F.FedSpineConfig(), fx.env(rank=8))
    assert default.selector.sucb.sparsities == () and default.selector.sucb.dims == 2
    assert default.selector.target_sparsity == 0.5


def test_time_reference_reaches_the_selector_and_a_bad_one_names_the_key():
    cfg = parse_run_config({"strategy.name": "fedspine", "fedspine.time-reference": "device"})
    assert get_strategy("fedspine").build(cfg.options, fx.env(rank=8)).selector.time_reference == "device"
    assert get_strategy("fedspine").build(F.FedSpineConfig(), fx.env(rank=8)).selector.time_reference == "round"
    with pytest.raises(ConfigError, match="fedspine.time-reference must be one of round, device, got 'x'"):
        parse_run_config({"strategy.name": "fedspine", "fedspine.time-reference": "x"})


@pytest.mark.parametrize("candidates", ["", "0.2,0.5"])
def test_a_device_that_chose_0_2_stops_pruning_at_0_2_of_its_structures(tmp_path, candidates):
    cfg, task = _task(tmp_path, **{"fedspine.sparsities": candidates})
    rank = 4
    model = task.model(rank)
    client = F.FedSpineClient(LAYOUT, cfg.options)
    options = {"prune-ratio": 0.5, "target-sparsity": 0.2, "prune-interval": 2}
    data, _ = task.client_data(0, 3)
    start, trainable = client.start({}, model.initial, {}, fx.plan(0, rank))
    heads_n, channels_n = structure_counts(model.model)
    prunable = [i for i in range(len(heads_n)) if i != len(heads_n) - 1]  # last protected
    state = {}
    for seed in (7, 8):  # the second round asks for 0.5 of the remainder again
        plan = type(fx.plan(0, rank))(100, 0, rank, seed, options)
        model.load(start)
        local = client.local_round(task, model, data, trainable, plan, state)
        state = local.state
        heads, channels = local.tensors[F.HEADS_KEY].bool(), local.tensors[F.CHANNELS_KEY].bool()
        for mask, counts in ((heads, heads_n), (channels, channels_n)):
            total = sum(counts[i] for i in prunable)
            removed = sum(counts[i] - int(mask[i].sum()) for i in prunable)
            assert removed == math.floor(0.2 * total + 1e-9)  # tiny-bert: 0 of 4 heads, 25 of 128
        # 1 with candidates: nothing left to prune for 0.2, although sparsity (the mean of
        # head and channel sparsity, 0.098) is below 0.2
        assert local.metrics.get("at-target") == (1.0 if candidates else None)
        assert local.metrics["sparsity"] < 0.2


def _sparsity_by_device(results):
    out: dict[int, list[tuple[float, float]]] = {}
    for r in results.rounds[1:]:
        for c in r["clients"]:
            out.setdefault(c["partition_id"], []).append((c["sparsity"], c["prune_ratio"]))
    return out


def test_a_fixed_allocation_with_a_low_cap_ends_at_the_cap(tiny_config):
    # tiny-bert prunes 4 heads and 128 channels: 0.25 is exact (1 head, 32 channels)
    caps = {"fedspine.fixed-rank": 8, "fedspine.fixed-prune-ratio": 0.3}
    results = run_in_process(_e2e_config(tiny_config, **caps, **{"fedspine.target-sparsity": 0.25}))
    for pid, entries in _sparsity_by_device(results).items():
        assert [s for s, _ in entries] == [0.25] * len(entries), pid


def test_end_to_end_the_bandit_chooses_final_sparsities_among_the_candidates(tiny_config):
    from fedpeft.checkpoint import load_latest

    cfg = _e2e_config(
        tiny_config,
        **{"fedspine.sparsities": "0.0,0.25,0.5", "federation.rounds": 4, "checkpoint.every": 4},
    )
    results = run_in_process(cfg)
    assert all(r["rejected"] == 0 and r["failed"] == 0 for r in results.rounds)
    log = load_latest(Path(cfg["output.dir"]) / "checkpoint").states["selector"]["log"]
    assert {d["target_sparsity"] for d in log} <= {0.0, 0.25, 0.5}
    by_device: dict[int, list[dict]] = {}
    for d in log:
        by_device.setdefault(d["partition_id"], []).append(d)
    for pid, decisions in by_device.items():
        # three candidates, four rounds: each device tried every candidate first
        assert {d["target_sparsity"] for d in decisions[:3]} == {0.0, 0.25, 0.5}, pid
        reached = 0.0
        for d in decisions:
            assert d["sparsity"] >= reached  # never un-prunes
            if d["target_sparsity"] <= reached + 1e-9 or d["prune_ratio"] == 0.0:
                assert d["sparsity"] == reached  # a cap at or below it prunes nothing
            assert d["sparsity"] <= max(reached, d["target_sparsity"]) + 1e-9
            reached = d["sparsity"]
