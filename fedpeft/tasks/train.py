"""Local training and evaluation loops shared by every task.

A plain PyTorch loop (no ``transformers.Trainer``): the round is a fixed number of
optimizer steps on seeded batches, so two runs with the same seeds do the same
arithmetic, and the per-step overhead over a bare peft loop is what
``simulations/bench_overhead.py`` measures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.config import TrainConfig
from fedpeft.tasks.data import Examples, collate
from fedpeft.tasks.device import autocast, grad_scaler
from fedpeft.tasks.model import AdapterModel, seeded

LossFn = Callable[[AdapterModel, Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
"""``loss_fn(model, batch) -> (mean loss, logits)``."""

PenaltyFn = Callable[[Mapping[str, torch.Tensor]], "torch.Tensor | None"]
StepFn = Callable[[int, torch.optim.Optimizer], None]
"""Called as ``on_step(step, optimizer)`` after each optimizer step (1-based), before
the gradients are cleared: the LoRA gradients of that step are still readable, and
the callback may shrink parameters in place (FedSpine's pruning) and their
optimizer state."""


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did.

    Attributes:
        num_examples: size of the local training set (FedAvg weight).
        steps: optimizer steps taken.
        loss: mean training loss over the steps.
        seconds: wall-clock time of the loop.
        tokens: non-padding input tokens trained on (``attention_mask`` ones; 0 for
            batches without a mask), for tokens per second.
    """

    num_examples: int
    steps: int
    loss: float
    seconds: float
    tokens: int = 0


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """Index batches for ``steps`` steps: seeded reshuffles of ``range(n)``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    size = min(batch_size, n)
    out: list[np.ndarray] = []
    order = rng.permutation(n)
    pos = 0
    while len(out) < steps:
        if pos + size > n:
            order, pos = rng.permutation(n), 0
        out.append(order[pos : pos + size])
        pos += size
    return out


def _backward(
    model: AdapterModel,
    batch: Mapping[str, torch.Tensor],
    loss_fn: LossFn,
    penalty: PenaltyFn | None,
    live: Mapping[str, torch.Tensor],
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """Forward (under ``precision``'s autocast) and backward of one batch; return the
    task loss. The autograd graph dies with this frame, so nothing keeps stale shape
    metadata of the parameters."""
    with autocast(model.device, precision):
        loss, _ = loss_fn(model, batch)
    value = float(loss.detach())
    if penalty is not None:
        extra = penalty(live)
        if extra is not None:
            loss = loss + extra
    (scaler.scale(loss) if scaler is not None else loss).backward()
    return value


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on ``device`` (no copy when they are there already)."""
    return {k: v.to(device) for k, v in batch.items()}


def local_train(
    model: AdapterModel,
    data: Examples,
    cfg: TrainConfig,
    trainable: frozenset[str],
    loss_fn: LossFn,
    seed: int,
    penalty: PenaltyFn | None = None,
    on_step: StepFn | None = None,
    batch_fn: Callable[[list[int]], Mapping[str, torch.Tensor]] | None = None,
) -> TrainResult:
    """Train the loaded adapter's ``trainable`` tensors for one round.

    Steps: ``cfg.local_steps``, or ``ceil(local_epochs · n / batch_size)`` when
    ``local_epochs > 0``. Dropout and batch order are seeded by ``seed``; the global
    RNG is restored afterwards. ``batch_fn(indices)`` builds a batch (default: the
    token batch of ``data``, :func:`fedpeft.tasks.data.collate`); ``data`` needs only
    ``len()`` then.
    """
    start = time.perf_counter()
    n = len(data)
    if n == 0:
        return TrainResult(num_examples=0, steps=0, loss=float("nan"), seconds=0.0)
    steps = (
        max(1, math.ceil(cfg.local_epochs * n / cfg.batch_size))
        if cfg.local_epochs > 0
        else cfg.local_steps
    )
    params = model.set_trainable(trainable)
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    live = {k: p for k, p in model.params.items() if k in trainable}
    total, tokens = 0.0, 0
    device = model.device
    scaler = grad_scaler(device, cfg.precision)
    model.model.train()
    with seeded(seed):
        for step, idx in enumerate(batch_schedule(n, cfg.batch_size, steps, seed), start=1):
            batch = (
                batch_fn(idx.tolist()) if batch_fn is not None else collate(data, idx.tolist(), model.pad_id)
            )
            if "attention_mask" in batch:
                tokens += int(batch["attention_mask"].sum())
            total += _backward(model, to_device(batch, device), loss_fn, penalty, live, cfg.precision, scaler)
            if scaler is not None:
                scaler.step(opt)  # unscales the gradients first; skips the step on inf/nan
                scaler.update()
            else:
                opt.step()
            if on_step is not None:  # the step's graph is gone: parameters may change shape
                on_step(step, opt)
            opt.zero_grad(set_to_none=True)
    model.model.eval()
    return TrainResult(
        num_examples=n, steps=steps, loss=total / steps, seconds=time.perf_counter() - start, tokens=tokens
    )


def _inference_batches(
    model: AdapterModel, data: Examples, batch_size: int, loss_fn: LossFn, precision: str
) -> Iterator[tuple[list[int], Mapping[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    """``(indices into data, batch, mean loss, logits)`` for every batch, under
    ``precision``'s autocast on the model's device, in evaluation mode. Examples are
    batched by length so padding is minimal (results do not depend on the order); one
    batching for :func:`evaluate` and :func:`predict`, so they see the same logits."""
    model.model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = to_device(collate(data, idx, model.pad_id), model.device)
            with autocast(model.device, precision):
                loss, logits = loss_fn(model, batch)
            yield idx, batch, loss, logits


def evaluate(
    model: AdapterModel,
    data: Examples,
    batch_size: int,
    loss_fn: LossFn,
    classification: bool,
    precision: str = "fp32",
) -> dict[str, float]:
    """Mean loss (and accuracy for classification; perplexity for language models),
    under ``precision``'s autocast on the model's device."""
    if len(data) == 0:
        return {}
    loss_sum, weight, correct = 0.0, 0, 0
    for idx, batch, loss, logits in _inference_batches(model, data, batch_size, loss_fn, precision):
        if classification:
            count = len(idx)
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        else:
            count = int((batch["labels"][:, 1:] != -100).sum())
        loss_sum += float(loss) * count
        weight += count
    out = {"loss": loss_sum / max(weight, 1)}
    if classification:
        out["accuracy"] = correct / len(data)
    else:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out


def predict(
    model: AdapterModel, data: Examples, batch_size: int, loss_fn: LossFn, precision: str = "fp32"
) -> np.ndarray:
    """Each example's predicted class (the argmax of its logits), in ``data``'s order
    (classification; shape ``(len(data),)``, int64)."""
    out = np.zeros(len(data), dtype=np.int64)
    for idx, _, _, logits in _inference_batches(model, data, batch_size, loss_fn, precision):
        out[idx] = logits.argmax(-1).cpu().numpy()
    return out
