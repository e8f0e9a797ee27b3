"""The FedProx proximal term, added to every client's local loss (off by default).

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, eq. (2)::

    h_k(w; w^t) = F_k(w) + (μ/2) ‖w − w^t‖²

with ``w^t`` the tensors the client starts the round from (what its strategy's
``start`` loaded: the global adapter for FedIT, the kept B for FedSA-LoRA) and ``w`` the
trainable tensors, the norm taken over all of them together (the sum of every
tensor's squared norm). Flower's FedProx strategy only sends ``proximal-mu`` to the
clients; its examples add ``(μ/2)·(Σ_tensors ‖w − w^t‖)²`` — the square of a sum of
norms — which is not the paper's term; this follows the paper.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def proximal_term(
    params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], mu: float
) -> torch.Tensor | None:
    """``(μ/2) Σ_key ‖params[key] − anchor[key]‖²`` over the keys both have (any
    shapes, equal per key); ``None`` when none is shared."""
    terms = [
        ((p - anchor[k].to(p.device, p.dtype)) ** 2).sum() for k, p in params.items() if k in anchor
    ]
    if not terms:
        return None
    return 0.5 * mu * torch.stack(terms).sum()
