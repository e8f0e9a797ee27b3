"""Partitions, tested on the data a user trains on: label statistics, not just sizes.

The embedded corpus is ordered by label, so a split that forgets to shuffle hands each
"IID" client one class while every size check still passes. These tests read the real
tokenised corpus (no model weights) and assert the property each scheme promises.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.config import parse_run_config
from fedpeft.seeding import derive_seed
from fedpeft.tasks import get_task
from fedpeft.tasks.data import all_partition_indices, label_histogram, partition_indices


def _shares(counts) -> np.ndarray:
    counts = np.asarray(counts, dtype=float)
    return counts / counts.sum()


def _summary(num_clients: int, seed: int = 0, **flat):
    cfg = parse_run_config({"seed": seed, "federation.clients": num_clients, **flat})
    return get_task(cfg).split_summary(num_clients)


@pytest.mark.parametrize("seed", [0, 7, 42])
@pytest.mark.parametrize("num_clients", [2, 4, 8])
def test_iid_clients_hold_the_pools_label_shares(seed, num_clients):
    # Prepare / Execute
    split = _summary(num_clients, seed)
    pool = _shares(split["pool"])

    # Assert: partitions of 4,000–18,000 tweets, every class within 2 points of the pool
    for client in split["clients"]:
        assert client["examples"] > 4000
        deviation = np.abs(_shares(client["labels"]) - pool).max()
        assert deviation < 0.02, (client, pool)
    sizes = [c["examples"] for c in split["clients"]]
    assert max(sizes) - min(sizes) <= 1


def test_iid_at_1000_clients_is_iid_on_the_lazy_path():
    """The 1,000-client path (partitioner fitted once, indices only) is IID too: the
    clients × labels table is consistent with independence (chi²/dof ≈ 1; label-sorted
    shards give hundreds), and consecutive client ids pooled into blocks of a few
    thousand examples hold the pool's shares within 2 points."""
    # Prepare / Execute
    split = _summary(1000)
    table = np.array([c["labels"] for c in split["clients"]], dtype=float)  # (1000, 3)

    # Assert
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2_per_dof = ((table - expected) ** 2 / expected).sum() / ((table.shape[0] - 1) * (table.shape[1] - 1))
    assert chi2_per_dof < 1.2
    pool = _shares(split["pool"])
    for block in table.reshape(10, 100, 3).sum(1):
        assert np.abs(_shares(block) - pool).max() < 0.02


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "topic"])
def test_all_partitions_at_once_equals_one_by_one(partition):
    # Prepare
    cfg = parse_run_config({"data.partition": partition, "data.alpha": 0.5, "seed": 3})
    pool = get_task(cfg).train_pool()
    seed = derive_seed(cfg.seed, "partition")

    # Execute
    together = all_partition_indices(pool, 6, cfg.data, seed)

    # Assert
    for pid, idx in enumerate(together):
        assert idx.tolist() == partition_indices(pool, pid, 6, cfg.data, seed)


def test_dirichlet_skew_grows_as_alpha_falls():
    """Mean total-variation distance of a client's label shares from the pool's, over
    three seeds: near 0 at α=1000 (near-IID), growing through α=10, 1 and 0.1."""
    # Prepare / Execute
    distance = {}
    for alpha in (1000.0, 10.0, 1.0, 0.1):
        per_seed = []
        for seed in (0, 1, 2):
            split = _summary(4, seed, **{"data.partition": "dirichlet", "data.alpha": alpha})
            pool = _shares(split["pool"])
            per_seed.append(
                np.mean([0.5 * np.abs(_shares(c["labels"]) - pool).sum() for c in split["clients"]])
            )
        distance[alpha] = float(np.mean(per_seed))

    # Assert
    assert distance[1000.0] < 0.03
    assert distance[1000.0] < distance[10.0] < distance[1.0] < distance[0.1]
    assert distance[0.1] > 0.35


@pytest.mark.parametrize("num_clients", [3, 4, 8])
def test_topic_partitions_hold_their_topic(num_clients):
    # Prepare
    cfg = parse_run_config({"data.partition": "topic", "federation.clients": num_clients})
    pool = get_task(cfg).train_pool()
    groups = np.asarray(pool.groups)
    num_groups = len(set(pool.groups))

    # Execute
    parts = all_partition_indices(pool, num_clients, cfg.data, derive_seed(cfg.seed, "partition"))

    # Assert: client i holds only topic i mod G (extra topics fold onto the first
    # clients when there are fewer clients than topics); clients sharing a topic split it
    for client, idx in enumerate(parts):
        held = set(groups[idx].tolist())
        folded = {g for g in range(num_clients, num_groups) if g % num_clients == client}
        assert held == {client % num_groups} | folded
    covered = np.sort(np.concatenate(parts))
    assert covered.tolist() == list(range(len(pool)))
    if num_clients == 8:  # two clients per topic, equal halves
        assert abs(len(parts[0]) - len(parts[4])) <= 1


def test_no_pool_example_repeats_a_test_example():
    """The corpus holds retweets; pool copies of test texts are dropped (counted)."""
    # Prepare
    task = get_task(parse_run_config({"seed": 42}))

    # Execute
    split = task.split_summary(4)
    test_tokens = {tuple(x) for x in task.test_data().input_ids}

    # Assert
    assert not any(tuple(x) in test_tokens for x in task.train_pool().input_ids)
    assert split["dropped_test_copies"] > 0
    assert sum(split["test"]) == 2000
    assert sum(split["pool"]) + 2000 + split["dropped_test_copies"] == len(task.corpus())
    assert split["label_names"] == ["negative", "neutral", "positive"]


def test_causal_lm_iid_split_spreads_every_category(tiny_config):
    """Same care for the Q/A corpus: IID clients see the categories in the pool's
    proportions (chi²/dof of the clients × categories table near 1); topic clients
    share no category."""
    # Prepare
    flat = {"task.name": "causal-lm", "model.name": "tiny-llama", "data.test-size": 200}
    iid = _summary(2, 0, **flat)

    # Assert
    table = np.array([c["labels"] for c in iid["clients"]], dtype=float)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2_per_dof = ((table - expected) ** 2 / expected).sum() / (table.shape[1] - 1)
    assert chi2_per_dof < 2.0
    topic = _summary(4, 0, **flat, **{"data.partition": "topic"})
    for client in topic["clients"]:
        assert sum(1 for n in client["labels"] if n) >= 1
    held = [tuple(i for i, n in enumerate(c["labels"]) if n) for c in topic["clients"]]
    assert len(set().union(*held)) == sum(len(h) for h in held)  # no category shared


def test_label_histogram_counts():
    from fedpeft.tasks.data import Examples

    ex = Examples(input_ids=[[1]] * 5, labels=[0, 2, 2, 1, 2], groups=[0] * 5, label_ids=[0, 2, 2, 1, 2])
    assert label_histogram(ex) == [1, 1, 3]
    assert label_histogram(ex, [1, 2]) == [0, 0, 2]


def test_the_validation_share_is_held_out_of_every_partition_and_never_the_test_set():
    base = {"seed": 3, "data.test-size": 300}
    plain = get_task(parse_run_config(base))
    task = get_task(parse_run_config({**base, "data.validation-size": 200}))
    val_task = get_task(parse_run_config({**base, "data.validation-size": 200, "eval.split": "validation"}))
    pool, val = task._pool_split()
    _, test = task._split()
    assert len(val) == 200 and not set(val) & set(pool) and not set(val) & set(test)
    corpus = task.corpus()
    seen = {tuple(corpus.input_ids[i]) for i in val}
    assert not any(tuple(corpus.input_ids[i]) in seen for i in pool)  # no copy of a validation text
    assert set(pool) <= set(plain._pool_split()[0]) and len(plain._pool_split()[1]) == 0
    parts = all_partition_indices(task.train_pool(), 4, task.cfg.data, 0)
    assert sum(len(p) for p in parts) == len(task.train_pool()) == len(pool)
    assert val_task.test_data().input_ids == corpus.subset(val.tolist()).input_ids
    assert task.test_data().input_ids == plain.test_data().input_ids  # the test set is unchanged
    assert task.split_summary(4)["validation"] == 200
