"""Ferret core (ALGORITHMS.md §10 tests): exactness, linearity, budgets, replay, catch-up."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedpeft.errors import ConfigError, FedPeftError, IncompatibleUpdateError
from fedpeft.projection import bases, ferret, wire
from fedpeft.projection.blocks import layout_of

RUN_SEED = 17


def _params(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(*s, generator=gen) for i, s in enumerate(sizes)}


def _trained(params, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: v - scale * torch.randn(v.shape, generator=gen) for k, v in params.items()}


def _flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors.values()])


def _encode(old, new, layout, config, server_round=1, partition_id=0):
    return ferret.encode_update(
        old,
        new,
        layout,
        pool_seed=ferret.pool_seed(RUN_SEED, server_round, config),
        client_seed=ferret.client_seed(RUN_SEED, server_round, partition_id),
        config=config,
    )


EXACT = ferret.FerretConfig(num_seeds=32, basis="orthonormal", min_seeds=32)


def test_orthonormal_with_k_equal_d_reconstructs_the_update():
    old = _params([(4, 8), (32,), (8, 4)])  # three blocks of 32 = K
    new = _trained(old, 0.1, 1)
    layout = layout_of(old)
    assert layout.sizes == (32, 32, 32)
    coeffs = _encode(old, new, layout, EXACT)
    assert coeffs.budgets == (32, 32, 32)
    rebuilt = ferret.reconstruct_update(
        coeffs.table(), layout, old, pool_seed=ferret.pool_seed(RUN_SEED, 1, EXACT), config=EXACT
    )
    delta = _flat(old) - _flat(new)
    # float32 coordinates on the wire bound the exactness at float32 rounding.
    assert ((_flat(rebuilt) - delta).norm() / delta.norm()).item() < 1e-6


def _quadratic_local(w, target, steps=5, lr=0.1):
    """Plain SGD on 0.5·‖w − target‖² (ALGORITHMS.md §10: T steps, momentum 0)."""
    w = {k: v.clone() for k, v in w.items()}
    for _ in range(steps):
        w = {k: v - lr * (v - target[k]) for k, v in w.items()}
    return w


def test_exact_mode_rounds_equal_fedavg_on_a_quadratic():
    config = replace(EXACT, server_lr=1.0, clip_norm=None)
    w_fedavg = w_ferret = _params([(4, 8), (32,)], seed=3)
    layout = layout_of(w_ferret)
    targets = [_params([(4, 8), (32,)], seed=10 + k) for k in range(2)]
    weights = [0.25, 0.75]
    state = ferret.FerretServerState()
    for t in range(1, 4):
        locals_avg = [_quadratic_local(w_fedavg, tg) for tg in targets]
        w_fedavg = {
            k: sum(p * loc[k] for p, loc in zip(weights, locals_avg, strict=True)) for k in w_fedavg
        }
        uploads = [
            _encode(w_ferret, _quadratic_local(w_ferret, tg), layout, config, t, k)
            for k, tg in enumerate(targets)
        ]
        state, update = ferret.server_update(
            state,
            uploads,
            weights,
            server_round=t,
            pool_seed=ferret.pool_seed(RUN_SEED, t, config),
            config=config,
        )
        w_ferret = ferret.apply_update(w_ferret, layout, update, config)
    assert (_flat(w_ferret) - _flat(w_fedavg)).abs().max().item() < 1e-5


def test_linearity_aggregate_then_reconstruct():
    config = ferret.FerretConfig(num_seeds=40)
    old = _params([(30, 20), (20,), (600,)])
    layout = layout_of(old)
    uploads = [
        _encode(old, _trained(old, 0.01 * (k + 1), k), layout, config, 1, k) for k in range(3)
    ]
    weights = [0.2, 0.3, 0.5]
    pool = ferret.pool_seed(RUN_SEED, 1, config)
    table = ferret.aggregate_coefficients(uploads, weights)
    together = _flat(ferret.reconstruct_update(table, layout, old, pool_seed=pool, config=config))
    apart = sum(
        p * _flat(ferret.reconstruct_update(u.table(), layout, old, pool_seed=pool, config=config))
        for p, u in zip(weights, uploads, strict=True)
    )
    assert (together - apart).abs().max().item() < 1e-10 * max(1.0, apart.abs().max().item())


def test_adaptive_budget():
    assert ferret.block_budgets([0.0, 1.0, 0.5, 1e-3], 200) == (2, 200, 100, 2)
    assert ferret.block_budgets([0.0, 0.0], 200) == (2, 2)
    old = _params([(50, 10), (500,), (500,)])
    new = dict(old)
    new["p0"] = old["p0"] - 1.0  # largest update
    new["p1"] = old["p1"] - 0.01
    layout = layout_of(old)
    coeffs = _encode(old, new, layout, ferret.FerretConfig(num_seeds=64))
    assert coeffs.budgets == (64, 2, 2)  # p2 unchanged: zero block gets 2
    assert (coeffs.values[-2:] == 0).all()


def test_reference_mode_shrinks_to_a_third_end_to_end():
    config = ferret.FerretConfig(num_seeds=64, normalisation="reference", refresh_pool=True)
    unbiased = replace(config, normalisation="unbiased")
    old = _params([(1024,)])
    new = _trained(old, 0.1, 4)
    layout = layout_of(old)
    delta = _flat(old) - _flat(new)
    ratios = {"reference": [], "unbiased": []}
    for t in range(1, 51):
        for name, cfg in (("reference", config), ("unbiased", unbiased)):
            c = _encode(old, new, layout, cfg, server_round=t)
            rebuilt = ferret.reconstruct_update(
                c.table(), layout, old, pool_seed=ferret.pool_seed(RUN_SEED, t, cfg), config=cfg
            )
            ratios[name].append((_flat(rebuilt) @ delta / (delta @ delta)).item())
    shrink = bases.reference_shrinkage(1024)
    assert abs(sum(ratios["reference"]) / 50 - shrink) < 0.05
    assert abs(sum(ratios["unbiased"]) / 50 - 1.0) < 0.15
    assert abs(sum(ratios["unbiased"]) / sum(ratios["reference"]) - 1 / shrink) < 1e-4


def test_client_and_server_replays_are_bitwise_identical():
    config = ferret.REFERENCE
    old = _params([(40, 30), (30,), (900,)])
    new = _trained(old, 0.05, 2)
    layout = layout_of(old)
    pool = ferret.pool_seed(RUN_SEED, 1, config)
    coeffs = _encode(old, new, layout, config)
    # client side: its own coordinates; server side: what came off the wire
    received = wire.decode_coefficients(
        wire.encode_coefficients(coeffs), num_blocks=layout.num_blocks, num_seeds=config.num_seeds
    )
    mine = ferret.reconstruct_update(coeffs.table(), layout, old, pool_seed=pool, config=config)
    theirs = ferret.reconstruct_update(received.table(), layout, old, pool_seed=pool, config=config)
    assert all(torch.equal(mine[k], theirs[k]) for k in old)
    _, update = ferret.server_update(
        ferret.FerretServerState(), [received], [1.0], server_round=1, pool_seed=pool, config=config
    )
    server = ferret.apply_update(old, layout, update, config)
    replica = ferret.apply_update(
        old, layout, wire.decode_round_updates(wire.encode_round_updates([update]))[0], config
    )
    assert all(torch.equal(server[k], replica[k]) and server[k].dtype == old[k].dtype for k in old)


def test_lagging_client_catches_up_to_the_server():
    config = replace(ferret.REFERENCE, num_seeds=24, momentum=0.5)
    w0 = _params([(20, 10), (10,), (300,)])
    layout = layout_of(w0)
    state, server, history = ferret.FerretServerState(), w0, []
    for t in range(1, 4):
        uploads = [
            _encode(server, _trained(server, 0.02, 10 * t + k), layout, config, t, k)
            for k in range(2)
        ]
        state, update = ferret.server_update(
            state,
            uploads,
            [0.5, 0.5],
            server_round=t,
            pool_seed=ferret.pool_seed(RUN_SEED, t, config),
            config=config,
            server_lr=10.0 * (1 - (t - 1) / 3),  # the reference's linear annealing
        )
        server = ferret.apply_update(server, layout, update, config)
        history.append(update)
    replica_r1 = ferret.apply_update(w0, layout, history[0], config)
    shipped = wire.decode_round_updates(wire.encode_round_updates(history[1:]))
    replica, last = ferret.catch_up(replica_r1, layout, shipped, config, synced_round=1)
    assert last == 3 and all(torch.equal(replica[k], server[k]) for k in w0)
    fresh, last = ferret.catch_up(w0, layout, history, config, synced_round=0)
    assert last == 3 and all(torch.equal(fresh[k], server[k]) for k in w0)
    with pytest.raises(IncompatibleUpdateError, match="missing round 2"):
        ferret.catch_up(replica_r1, layout, history[2:], config, synced_round=1)


def test_momentum_and_clipping():
    # momentum mixes the tables of successive rounds: it needs one pool for the run
    config = ferret.FerretConfig(
        num_seeds=16, momentum=0.9, clip_norm=0.5, server_lr=2.0, refresh_pool=False
    )
    old = _params([(200,), (200,)])
    layout = layout_of(old)
    pool = ferret.pool_seed(RUN_SEED, 1, config)
    first = _encode(old, _trained(old, 5.0, 1), layout, config)
    second = _encode(old, _trained(old, 5.0, 2), layout, config, partition_id=1)
    state, _ = ferret.server_update(
        ferret.FerretServerState(), [first], [1.0], server_round=1, pool_seed=pool, config=config
    )
    state2, update = ferret.server_update(
        state, [second], [1.0], server_round=2, pool_seed=pool, config=config
    )
    expected = (0.9 * state.gamma.double() + second.table()).float()
    assert torch.equal(update.gamma, expected) and state2.server_round == 2
    moved = ferret.apply_update(old, layout, update, config)
    for index in range(layout.num_blocks):
        step = layout.vector(moved, index) - layout.vector(old, index)
        terms = int((update.gamma[index] != 0).sum())
        assert step.norm().item() <= 2.0 * 0.5 * terms * (1 + 1e-6)


def test_encoding_is_deterministic_and_client_specific():
    config = ferret.FerretConfig(num_seeds=100)
    old = _params([(300,), (300,)])
    new = _trained(old, 0.1, 0)
    layout = layout_of(old)
    a, b = _encode(old, new, layout, config), _encode(old, new, layout, config)
    other = _encode(old, new, layout, config, partition_id=1)
    assert (a.indices == b.indices).all() and (a.values == b.values).all()
    assert not (a.indices.shape == other.indices.shape and (a.indices == other.indices).all())


def test_rejects_bad_config_and_updates():
    with pytest.raises(ConfigError) as info:
        ferret.FerretConfig(num_seeds=70_000, momentum=1.0, clip_norm=0.0, refresh_pool=False)
    assert len(info.value.problems) == 3
    with pytest.raises(ConfigError, match="refresh_pool=True needs momentum=0"):
        ferret.FerretConfig(momentum=0.5)  # the default pool is fresh every round
    old = _params([(10,)])
    bad = {"p0": torch.full((10,), math.nan)}
    with pytest.raises(FedPeftError, match="non-finite norm"):
        _encode(old, bad, layout_of(old), ferret.FerretConfig(num_seeds=4))
    with pytest.raises(ConfigError, match="pool indices < d_l"):
        _encode(old, _trained(old, 1.0, 0), layout_of(old), replace(EXACT, num_seeds=32))


# --------------------------------------------------------------------------- seed pools
# Given the round's pool P, E[Δ̃ | P] = M_P Δ with E_P[M_P] = I and ‖M_P Δ − Δ‖ ≈
# sqrt(d/K)‖Δ‖ (module docstring of fedpeft.projection.ferret). d = 256, K = 32:
# one pool's error ≈ sqrt(8) = 2.83; the 50-round average of fresh pools ≈ sqrt(8/50) = 0.40.
POOL_D, POOL_K = 256, 32


def _average_reconstruction_error(refresh_pool, rounds, clients, run_seed, iid):
    """‖mean_t Γ̃_t − mean_t Δ̄_t‖ / ‖mean_t Δ̄_t‖ with Γ̃_t the round's reconstructed
    client average and Δ̄_t the true client average (equal weights)."""
    config = ferret.FerretConfig(num_seeds=POOL_K, refresh_pool=refresh_pool)
    gen = torch.Generator().manual_seed(run_seed)
    old = {"w": torch.randn(POOL_D, generator=gen, dtype=torch.float64)}
    layout = layout_of(old)
    common = 0.1 * torch.randn(POOL_D, generator=gen, dtype=torch.float64)
    rebuilt_sum = torch.zeros(POOL_D, dtype=torch.float64)
    delta_sum = torch.zeros(POOL_D, dtype=torch.float64)
    for t in range(1, rounds + 1):
        pool = ferret.pool_seed(run_seed, t, config)
        uploads = []
        for k in range(clients):
            noise = 0.1 * torch.randn(POOL_D, generator=gen, dtype=torch.float64)
            delta = common + noise if iid else common  # (d,)
            delta_sum += delta / clients
            uploads.append(
                ferret.encode_update(
                    old,
                    {"w": old["w"] - delta},
                    layout,
                    pool_seed=pool,
                    client_seed=ferret.client_seed(run_seed, t, k),
                    config=config,
                )
            )
        table = ferret.aggregate_coefficients(uploads, [1.0 / clients] * clients)
        rebuilt = ferret.reconstruct_update(table, layout, old, pool_seed=pool, config=config)
        rebuilt_sum += rebuilt["w"]
    return ((rebuilt_sum - delta_sum).norm() / delta_sum.norm()).item()


@pytest.mark.parametrize("iid", [False, True], ids=["same-delta", "iid-deltas"])
def test_a_fresh_pool_each_round_averages_the_projection_error_out(iid):
    assert ferret.FerretConfig().refresh_pool  # the paper's choice is the default
    errors = {
        refresh: sum(_average_reconstruction_error(refresh, 50, 2, s, iid) for s in range(3)) / 3
        for refresh in (True, False)
    }
    one_pool = math.sqrt(POOL_D / POOL_K)  # 2.83
    # fresh pools: ≈ sqrt(d/(K·50)) = 0.40 (0.57 with i.i.d. Δs, which are longer)
    assert errors[True] < 0.25 * one_pool, errors
    # one pool for the run: every round is biased by the same basis
    assert errors[False] > 0.7 * one_pool, errors


def test_clients_of_one_round_share_the_pool_so_their_average_keeps_the_error():
    for refresh in (True, False):
        error = sum(_average_reconstruction_error(refresh, 1, 50, s, True) for s in range(3)) / 3
        assert error > 0.7 * math.sqrt(POOL_D / POOL_K), (refresh, error)


def test_pool_seed_is_fresh_each_round_by_default_and_fixed_in_the_reference():
    fresh = ferret.FerretConfig()
    assert len({ferret.pool_seed(RUN_SEED, t, fresh) for t in range(1, 6)}) == 5
    assert len({ferret.pool_seed(RUN_SEED, t, ferret.REFERENCE) for t in range(1, 6)}) == 1
