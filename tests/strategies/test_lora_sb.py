"""``lora-sb`` (Fed-SB): exact aggregation of R, frozen A and B, r×r uplink, real runs."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from fedpeft import (
    ConfigError,
    IncompatibleUpdateError,
    StrategyEnv,
    get_strategy,
    parse_run_config,
)
from fedpeft.flower.inprocess import run_in_process
from fedpeft.lora.peft_io import factor_keys, lora_modules
from fedpeft.server.setup import build_strategy
from fedpeft.tasks import get_task
from fedpeft.tasks.train import evaluate
from strategies import lora_sb as S
from tests.strategies import _factories as fx

R = 4


def _fed():
    return get_strategy("lora-sb").build(S.LoraSbConfig(), fx.env(rank=R))


def _glob():
    return fx.adapter(99, rank=R, zero_b=True, dtype=torch.float32)


def _client(fed, state, glob, pid, server_round, size=0.1):
    """payload → start → stand-in training (noise on R and the head) → finish."""
    p = fx.plan(pid, rank=R)
    received = fed.aggregator.client_payload(state, glob, p)
    start, trainable = fed.client.start(received, _glob(), {}, p)
    gen = torch.Generator().manual_seed(100 * server_round + pid)
    trained = {}
    for key in trainable:
        base = received[key] if key.endswith("lora_B.weight") else start[key]  # R (r, r)
        trained[key] = base + size * torch.randn(base.shape, generator=gen)
    trained.update({k: v for k, v in start.items() if k.endswith("lora_A.weight")})
    upload, new_state = fed.client.finish(trained, received, {}, p)
    assert new_state == {}
    return received, start, trainable, fx.update(upload, num_examples=10 + 7 * pid, partition_id=pid, rank=R)


def _rounds(n=3):
    fed = _fed()
    glob = _glob()
    state, tensors, history = fed.aggregator.initialize(glob), glob, []
    for rnd in range(1, n + 1):
        clients = [_client(fed, state, tensors, pid, rnd) for pid in range(3)]
        out = fed.aggregator.aggregate(state, tensors, [c[3] for c in clients], rnd)
        history.append((clients, out))
        state, tensors = out.state, out.tensors
    return fed, glob, history


def test_mean_of_r_is_the_exact_mean_product():
    fed, glob, history = _rounds()
    clients, out = history[-1]
    ups = [c[3] for c in clients]
    w = fx.weights_of([u.num_examples for u in ups])
    s = fx.LAYOUT.scaling(R)
    for module, (d_out, _) in fx.SHAPES.items():
        key_a, key_b = factor_keys(module)
        a, b = glob[key_a].double(), S.basis_b(0, module, d_out, R).double()
        ideal = sum(wk * s * b @ u.tensors[key_b].double() @ a for wk, u in zip(w, ups, strict=True))
        got = fx.factors(out.tensors)[module].delta().double()  # s · lora_B · lora_A = s·B R̄ A
        assert (got - ideal).abs().max() < 1e-6
        r_bar = sum(wk * u.tensors[key_b].double() for wk, u in zip(w, ups, strict=True))
        assert torch.allclose(out.state[S.STATE_R + module].double(), r_bar, atol=1e-6)
    assert fx.HEAD in out.tensors  # the head is averaged too
    head = sum(wk * u.tensors[fx.HEAD].double() for wk, u in zip(w, ups, strict=True))
    assert torch.allclose(out.tensors[fx.HEAD].double(), head, atol=1e-6)


def test_a_and_b_are_the_same_on_both_ends_and_never_change():
    fed, glob, history = _rounds()
    b0 = S.bases(0, glob)
    assert all(torch.equal(b0[m], S.bases(0, glob)[m]) for m in b0)  # a pure function of the seed
    assert all(torch.allclose(b.norm(dim=0), torch.ones(R)) for b in b0.values())  # unit columns
    assert all(int(torch.linalg.matrix_rank(b.double())) == R for b in b0.values())
    assert not torch.equal(S.basis_b(0, "enc.0.q", 7, R), S.basis_b(1, "enc.0.q", 7, R))
    for clients, out in history:
        for module in fx.SHAPES:
            key_a, key_b = factor_keys(module)
            assert torch.equal(out.tensors[key_a], glob[key_a])  # the global A never changes
            # the published lora_B lies in span(B): B B⁺ lora_B = lora_B
            lora_b = out.tensors[key_b].double()
            assert torch.allclose(b0[module].double() @ S._lstsq(b0[module], lora_b), lora_b, atol=1e-6)
        for received, start, trainable, _ in clients:
            assert torch.equal(received[S.FINGERPRINT], out.state["fingerprint"])
            for module in fx.SHAPES:
                key_a, key_b = factor_keys(module)
                assert torch.equal(start[key_a], glob[key_a])  # the client's own seeded A
                assert key_a not in trainable
                folded = b0[module].double() @ received[key_b].double()
                assert torch.allclose(start[key_b].double(), folded, atol=1e-6)


def test_only_r_and_the_head_cross_the_wire():
    fed, glob, history = _rounds()
    for clients, _ in history:
        for received, _, _, update in clients:
            assert set(update.tensors) == {factor_keys(m)[1] for m in fx.SHAPES} | {fx.HEAD}
            assert set(received) == set(update.tensors) | {S.FINGERPRINT}
            assert received[S.FINGERPRINT].dtype == torch.int64 and received[S.FINGERPRINT].numel() == 1
            for module in fx.SHAPES:
                key_b = factor_keys(module)[1]
                assert tuple(update.tensors[key_b].shape) == (R, R)
                assert tuple(received[key_b].shape) == (R, R)
                # the server expects that shape for the upload
                shape = tuple(glob[key_b].shape)
                assert fed.aggregator.upload_shape(key_b, shape, update.tensors, update.plan) == (R, R)


def test_mismatched_or_missing_basis_and_bad_uploads_are_refused():
    fed = _fed()
    glob = _glob()
    state = fed.aggregator.initialize(glob)
    received = fed.aggregator.client_payload(state, glob, fx.plan(0, R))
    other_a = fx.adapter(5, rank=R, zero_b=True, dtype=torch.float32)  # another seeded A
    with pytest.raises(IncompatibleUpdateError, match="differ from the server"):
        fed.client.start(received, other_a, {}, fx.plan(0, R))
    env = StrategyEnv(seed=1, num_rounds=1, clients_per_round=1, rank=R)
    other_seed = get_strategy("lora-sb").build(S.LoraSbConfig(), env)
    with pytest.raises(IncompatibleUpdateError, match="differ from the server"):
        other_seed.client.start(received, _glob(), {}, fx.plan(0, R))
    as_float = {**received, S.FINGERPRINT: received[S.FINGERPRINT].float()}  # a delta-coded downlink
    fed.client.start(as_float, _glob(), {}, fx.plan(0, R))
    no_fp = {k: v for k, v in received.items() if k != S.FINGERPRINT}
    with pytest.raises(IncompatibleUpdateError, match="no 'aux.lora-sb.basis'"):
        fed.client.start(no_fp, _glob(), {}, fx.plan(0, R))
    folded = {**received, **{k: v for k, v in glob.items() if k.endswith("lora_B.weight")}}
    with pytest.raises(IncompatibleUpdateError, match="expected R"):
        fed.client.start(folded, _glob(), {}, fx.plan(0, R))
    with pytest.raises(IncompatibleUpdateError, match="lora-sb freezes A"):
        fed.aggregator.check_update(state, glob, fx.plan(0, R))
    with pytest.raises(IncompatibleUpdateError, match="no R for"):
        fed.aggregator.check_update(state, {fx.HEAD: glob[fx.HEAD]}, fx.plan(0, R))
    with pytest.raises(IncompatibleUpdateError, match="should hold R"):
        fed.client.finish(glob, received, {}, fx.plan(0, R))
    with pytest.raises(IncompatibleUpdateError, match="initial lora_B to be zero"):
        fed.aggregator.initialize(fx.adapter(99, rank=R, dtype=torch.float32))


def test_bad_options_are_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"lora-sb.init='svd'.*not implemented"):
        parse_run_config({"strategy.name": "lora-sb", "lora-sb.init": "svd"})
    with pytest.raises(ConfigError, match="lora-sb.init must be 'seeded', got 'gauss'"):
        parse_run_config({"strategy.name": "lora-sb", "lora-sb.init": "gauss"})
    with pytest.raises(ConfigError, match="not implemented"):
        get_strategy("lora-sb").build(S.LoraSbConfig(init="svd"), fx.env())
    with pytest.raises(ConfigError, match="server-opt"):
        build_strategy(parse_run_config({"strategy.name": "lora-sb", "server-opt.name": "adam", "server-opt.lr": 0.01}))
    cfg = parse_run_config({"strategy.name": "lora-sb"})
    assert cfg.options == S.LoraSbConfig()
    fed = get_strategy("lora-sb").build(cfg.options, fx.env())
    assert not fed.needs_individual_updates and not fed.mixed_ranks and fed.lossy_codecs


def test_local_round_trains_r_only_reduces_the_loss_and_restores_the_model(tiny_config):
    cfg = parse_run_config({**tiny_config, "strategy.name": "lora-sb", "train.local-steps": 30, "train.lr": 1e-1})
    task = get_task(cfg)
    model = task.model(8)
    env = StrategyEnv(seed=cfg.seed, num_rounds=1, clients_per_round=1, rank=8)
    fed = get_strategy("lora-sb").build(cfg.options, env)
    state = fed.aggregator.initialize(model.initial)
    plan = fx.plan(0, rank=8)
    received = fed.aggregator.client_payload(state, model.initial, plan)
    start, trainable = fed.client.start(received, model.initial, {}, plan)
    model.load(start)
    train, _ = task.client_data(0, 3)
    before = evaluate(model, train, 16, task.loss, True)["loss"]
    only_r = frozenset(k for k in trainable if k.endswith("lora_B.weight"))  # the head frozen
    assert only_r and trainable - only_r  # the head is trainable too, left out here
    head = {k: v.clone() for k, v in model.tensors().items() if k not in only_r}
    local = fed.client.local_round(task, model, train, only_r, plan, {})
    after = evaluate(model, train, 16, task.loss, True)["loss"]  # the restored model holds B R
    assert after < before - 0.005  # R alone lowers the training loss (1.097 -> 1.082)
    assert local.result.steps == 30
    assert all(torch.equal(model.tensors()[k], v) for k, v in head.items() if "lora_A" in k or "classifier" in k)
    upload, _ = fed.client.finish(local.tensors, received, {}, plan)
    modules = lora_modules(model.initial)
    assert modules and all(tuple(upload[factor_keys(m)[1]].shape) == (8, 8) for m in modules)
    assert not any(k.endswith("lora_A.weight") for k in upload)
    now = model.tensors()
    layer = model.model.get_submodule(modules[0])
    assert isinstance(layer.lora_B["default"], torch.nn.Linear)  # the original module is back
    assert set(now) == set(model.initial)
    for m in modules:
        key_a, key_b = factor_keys(m)
        assert torch.equal(now[key_a], model.initial[key_a])  # A untouched
        b = S.basis_b(cfg.seed, m, *now[key_b].shape)
        assert torch.allclose(now[key_b], b @ upload[key_b], atol=1e-6)  # lora_B = B R
        assert upload[key_b].abs().max() > 0  # R moved


def _clients(results):
    return [c for r in results.rounds[1:] for c in r["clients"]]


def test_end_to_end_bytes_against_fedit_and_with_a_lossy_uplink(tiny_config):
    runs = {}
    for name, lr, codec in [("fedit", 5e-3, "identity"), ("lora-sb", 3e-2, "identity"), ("lora-sb", 3e-2, "int8+zstd")]:
        out = f"{tiny_config['output.dir']}-{name}-{codec}"
        flat = {**tiny_config, "strategy.name": name, "train.lr": lr, "codec.uplink": codec, "output.dir": out}
        runs[name, codec] = (run_in_process(flat), out)
    for results, _ in runs.values():
        assert [r["round"] for r in results.rounds] == [0, 1, 2]
        assert all(r["rejected"] == 0 and r["failed"] == 0 for r in results.rounds)
        assert all(math.isfinite(r["loss"]) for r in results.rounds)
    fedit = _clients(runs["fedit", "identity"][0])
    sb, sb8 = _clients(runs["lora-sb", "identity"][0]), _clients(runs["lora-sb", "int8+zstd"][0])
    # tiny-bert, r = 8: R is 8×8 per layer against 8·(32+32) for A and B
    assert max(c["uplink_bytes"] for c in sb) < min(c["uplink_bytes"] for c in fedit) / 4
    assert max(c["downlink_bytes"] for c in sb) < min(c["downlink_bytes"] for c in fedit) / 4
    assert max(c["uplink_bytes"] for c in sb8) < min(c["uplink_bytes"] for c in sb) / 2
    losses = [r["loss"] for r in runs["lora-sb", "identity"][0].rounds]
    assert len(set(losses)) == 3  # the global model moves
    # the saved adapter is a plain peft adapter: A the initial one, lora_B = B R̄
    cfg = parse_run_config({**tiny_config, "strategy.name": "lora-sb"})
    initial = get_task(cfg).model(8).initial
    saved = load_file(str(pathlib.Path(runs["lora-sb", "identity"][1]) / "adapter" / "adapter_model.safetensors"))
    summary = json.loads((pathlib.Path(runs["lora-sb", "identity"][1]) / "summary.json").read_text())
    assert summary["rounds"][-1]["strategy_metrics"]["lora-sb/r_norm"] > 0
    modules = lora_modules(initial)
    for m in modules:
        key_a, key_b = factor_keys(m)
        saved_a = next(v for k, v in saved.items() if k.endswith(key_a.split("base_model.model.")[-1]))
        saved_b = next(v for k, v in saved.items() if k.endswith(key_b.split("base_model.model.")[-1]))
        assert torch.equal(saved_a, initial[key_a])
        b = S.basis_b(cfg.seed, m, *saved_b.shape)
        assert torch.allclose(b @ S._lstsq(b, saved_b).float(), saved_b, atol=1e-6)
        assert saved_b.abs().max() > 0
