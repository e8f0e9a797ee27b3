"""Config, model, data and the local train / evaluate loops of the reference app."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

_CACHE: dict[Any, Any] = {}
"""Per-process cache (a Ray actor serves many messages): model, data, pad id."""


@dataclass(frozen=True)
class RefConfig:
    """The reference run (defaults: the budget of ``REFERENCE_RESULTS.md``).

    Attributes:
        model: ``minilm`` (all-MiniLM-L6-v2, offline package) or ``tiny-bert``.
        max_length: tokens per tweet (truncation).
        r: LoRA rank.
        alpha: LoRA α (scale α / r).
        dropout: LoRA dropout.
        targets: LoRA target modules.
        clients: number of clients (virtual SuperNodes), all trained every round.
        rounds: federated rounds.
        local_steps: AdamW steps per client per round.
        batch_size: examples per step.
        lr: constant learning rate.
        partition: ``iid`` or ``dirichlet`` (over labels).
        dirichlet_alpha: Dirichlet concentration.
        test_size: held-out test tweets (centralised evaluation).
        eval_batch_size: examples per evaluation batch.
        seed: run seed (model init, batch order, dropout; the data split).
        out: directory for ``summary.json``.
    """

    model: str = "minilm"
    max_length: int = 64
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")
    clients: int = 4
    rounds: int = 5
    local_steps: int = 30
    batch_size: int = 16
    lr: float = 5e-4
    partition: str = "iid"
    dirichlet_alpha: float = 0.1
    test_size: int = 2000
    eval_batch_size: int = 64
    seed: int = 42
    out: str = ""

    def to_json(self) -> str:
        """The config as JSON (read back by :meth:`from_json`)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RefConfig:
        """Parse :meth:`to_json`'s output."""
        raw = json.loads(text)
        raw["targets"] = tuple(raw.get("targets", cls.targets))
        return cls(**raw)

    def data_config(self) -> dict[str, Any]:
        """The fedpeft run-config keys that decide the data (tokenisation and splits),
        spelled as ``fedpeft simulate`` gets them (``data.alpha`` only for Dirichlet),
        so both implementations hit the same cached partitions."""
        flat: dict[str, Any] = {
            "seed": self.seed,
            "model.name": self.model,
            "model.max-length": self.max_length,
            "data.partition": self.partition,
            "data.test-size": self.test_size,
            "federation.clients": self.clients,
        }
        if self.partition == "dirichlet":
            flat["data.alpha"] = self.dirichlet_alpha
        return flat


def _quiet() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _task(cfg: RefConfig) -> Any:
    from fedpeft.config import parse_run_config
    from fedpeft.tasks import get_task

    return get_task(parse_run_config(cfg.data_config()))


def _model_dir() -> str:
    from fedpeft.tasks.packages import minilm_dir

    return str(minilm_dir())


def pad_id(cfg: RefConfig) -> int:
    """The tokenizer's padding id (MiniLM's tokenizer also serves ``tiny-bert``)."""
    if "pad" not in _CACHE:
        from transformers import AutoTokenizer

        _CACHE["pad"] = int(AutoTokenizer.from_pretrained(_model_dir()).pad_token_id)
    return _CACHE["pad"]


def build_model(cfg: RefConfig) -> Any:
    """A peft model: LoRA on ``cfg.targets`` and a new trainable 3-way head
    (``task_type="SEQ_CLS"`` puts the classifier in ``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertForSequenceClassification,
    )

    _quiet()
    torch.manual_seed(cfg.seed)
    if cfg.model == "tiny-bert":
        from transformers import AutoTokenizer

        vocab = AutoTokenizer.from_pretrained(_model_dir()).vocab_size
        base = BertForSequenceClassification(
            BertConfig(
                vocab_size=vocab,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                max_position_embeddings=512,
                num_labels=3,
            )
        )
    elif cfg.model == "minilm":
        base = AutoModelForSequenceClassification.from_pretrained(_model_dir(), num_labels=3)
    else:
        raise ValueError(f"reference app: model must be 'minilm' or 'tiny-bert', got {cfg.model!r}")
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        task_type="SEQ_CLS",
    )
    model = get_peft_model(base, lora)
    model.eval()
    return model


def cached_model(cfg: RefConfig) -> Any:
    """:func:`build_model`, once per process (every message loads its adapter into it)."""
    if "model" not in _CACHE:
        _CACHE["model"] = build_model(cfg)
    return _CACHE["model"]


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """What travels: the peft adapter state dict (LoRA A/B and the head), fp32."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter(model: Any, state: dict[str, torch.Tensor]) -> None:
    """Load a received adapter state dict into ``model``."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, state)


def train_data(cfg: RefConfig, partition_id: int) -> Any:
    """Client ``partition_id``'s training examples (``input_ids`` and ``labels`` lists)."""
    key = ("train", partition_id)
    if key not in _CACHE:
        _CACHE[key] = _task(cfg).client_data(partition_id, cfg.clients)[0]
    return _CACHE[key]


def test_data(cfg: RefConfig) -> Any:
    """The held-out test examples."""
    if "test" not in _CACHE:
        _CACHE["test"] = _task(cfg).test_data()
    return _CACHE["test"]


def _batch(data: Any, indices: list[int], pad: int) -> dict[str, torch.Tensor]:
    seqs = [data.input_ids[i] for i in indices]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)  # (B,)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train(model: Any, data: Any, cfg: RefConfig, server_round: int, partition_id: int) -> float:
    """``cfg.local_steps`` AdamW steps on shuffled batches; return the mean loss.

    Batches come from a generator seeded by ``(seed, round, partition)``, reshuffled
    when fewer than a batch remain (an endless shuffled loader that drops the tail).
    """
    rng = np.random.default_rng([cfg.seed, server_round, partition_id])
    torch.manual_seed(int(rng.integers(2**31)))  # dropout inside the base model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    pad, n, size = pad_id(cfg), len(data), min(cfg.batch_size, len(data))
    order: list[int] = []
    total = 0.0
    model.train()
    for _ in range(cfg.local_steps):
        if len(order) < size:
            order = rng.permutation(n).tolist()
        idx, order = order[:size], order[size:]
        loss = model(**_batch(data, idx, pad)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        total += float(loss.detach())
    model.eval()
    return total / max(cfg.local_steps, 1)


def evaluate(model: Any, data: Any, cfg: RefConfig) -> dict[str, float]:
    """Mean cross-entropy and accuracy over ``data``, in batches in data order."""
    pad = pad_id(cfg)
    loss_sum, correct = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(data), cfg.eval_batch_size):
            idx = list(range(start, min(start + cfg.eval_batch_size, len(data))))
            batch = _batch(data, idx, pad)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            loss_sum += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return {"loss": loss_sum / len(data), "accuracy": correct / len(data)}
