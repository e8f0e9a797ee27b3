"""Shared fixtures: Flower task identity for in-process messages, tiny configs."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _flower_task_identity():
    """Building a Message outside a Flower runtime needs a task identity (FLOWER.md §4.1)."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # flwr not installed: pure tests still run
        yield
        return
    names = ("_run_id", "_node_id", "_task_id")
    old = {n: getattr(TaskIdentity, n, None) for n in names}
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    yield
    for name, value in old.items():
        setattr(TaskIdentity, name, value)


TINY = {
    "model.name": "tiny-bert",
    "data.max-examples": 48,
    "data.test-size": 120,
    "train.local-steps": 3,
    "train.batch-size": 8,
    "train.lr": 5e-3,
    "federation.rounds": 2,
    "federation.clients": 3,
    "output.save-adapter": True,
}


@pytest.fixture
def tiny_config(tmp_path):
    """A flat config of a seconds-long run on a tiny random BERT."""
    return {**TINY, "output.dir": str(tmp_path / "run")}
