"""Logit-adjusted cross-entropy for label-skewed clients (off by default).

Menon et al., "Long-tail learning via logit adjustment", ICLR 2021 (the logit-adjusted
loss); with ``τ = 1`` it is the balanced softmax of Ren et al., NeurIPS 2020. For
federated label skew the prior is the client's own label distribution, so a client
that sees mostly one class no longer learns "always that class" from its local loss
(the idea behind FedLC, Zhang et al., ICML 2022, whose calibration term has another
form — ``−τ·n_c^{−1/4}`` — and is not what this implements). Training only; evaluation
uses the raw logits::

    π_c = n_c / Σ n                     # (C,) the client's label shares
    loss = CE(z + τ·log π, y)           # z: (batch, C) logits, y: (batch,)

A class the client never saw gets ``log π_c`` clamped at ``log 1e-8``, so its logit is
pushed down by about 18τ and its softmax gradient is close to zero: the client's loss
says nothing about it instead of teaching it is absent.

Interaction: a client holding a single class then barely moves (its loss is ≈ 0), so
with many such clients the round's low median update norm is tiny and the default
outlier rule (``validation.norm-factor`` = 10 × that median) rejects the others'
ordinary updates; raise the factor or set it to 0 with this loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

FLOOR = 1e-8
"""Smallest prior share (an absent class)."""


def log_prior(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """``log π`` of a client's labels, shape ``(C,)``, shares clamped at :data:`FLOOR`."""
    counts = torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes)
    share = counts.double() / max(int(counts.sum()), 1)
    return share.clamp_min(FLOOR).log().float()


def adjusted_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, prior_log: torch.Tensor, tau: float
) -> torch.Tensor:
    """Mean ``CE(z + τ·log π, y)``; ``logits`` ``(batch, C)``, ``labels`` ``(batch,)``."""
    return F.cross_entropy(logits + tau * prior_log.to(logits.device, logits.dtype), labels)
