"""Hand-built adapters, updates and a pure-torch round loop for strategy tests."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from fedpeft import ClientPlan, ClientUpdate, FedStrategy, RoundOutput, StrategyEnv, TensorDict
from fedpeft.client import finish_with_carry
from fedpeft.lora import AdapterLayout, LoraFactors, split_adapter

SHAPES: dict[str, tuple[int, int]] = {
    "enc.0.q": (7, 5),  # (d_out, d_in), non-square
    "enc.0.v": (7, 5),  # same shape: batched with enc.0.q
    "enc.1.q": (4, 9),
}
HEAD = "head.weight"
ALPHA = 8.0
LAYOUT = AdapterLayout(lora_alpha=ALPHA)


def env(rank: int = 4, ranks: tuple[int, ...] = (), clients: int = 3) -> StrategyEnv:
    """A run environment with α = 8."""
    return StrategyEnv(
        seed=0, num_rounds=3, clients_per_round=clients, rank=rank, ranks=ranks, lora_alpha=ALPHA
    )


def adapter(
    seed: int,
    rank: int = 4,
    shapes: Mapping[str, tuple[int, int]] = SHAPES,
    head: bool = True,
    zero_b: bool = False,
    dtype: torch.dtype = torch.float64,
) -> TensorDict:
    """A random peft-keyed adapter: ``<m>.lora_A.weight`` (r, n), ``<m>.lora_B.weight``
    (m, r) and a head ``(3, 5)``."""
    gen = torch.Generator().manual_seed(seed)
    out: TensorDict = {}
    for module, (m, n) in shapes.items():
        out[f"{module}.lora_A.weight"] = torch.randn(rank, n, generator=gen, dtype=dtype)
        b = torch.randn(m, rank, generator=gen, dtype=dtype)
        out[f"{module}.lora_B.weight"] = torch.zeros_like(b) if zero_b else b
    if head:
        out[HEAD] = torch.randn(3, 5, generator=gen, dtype=dtype)
    return out


def plan(partition_id: int, rank: int = 4, seed: int = 0) -> ClientPlan:
    """A plan for node ``100 + partition_id``."""
    return ClientPlan(node_id=100 + partition_id, partition_id=partition_id, rank=rank, seed=seed)


def update(
    tensors: TensorDict, num_examples: int = 10, partition_id: int = 0, rank: int | None = None
) -> ClientUpdate:
    """A ``ClientUpdate`` whose plan rank is read from the tensors unless given."""
    if rank is None:
        rank = next(int(v.shape[0]) for k, v in tensors.items() if k.endswith("lora_A.weight"))
    return ClientUpdate(
        node_id=100 + partition_id,
        tensors=tensors,
        num_examples=num_examples,
        metrics={},
        plan=plan(partition_id, rank),
    )


def factors(
    tensors: Mapping[str, torch.Tensor], layout: AdapterLayout = LAYOUT
) -> dict[str, LoraFactors]:
    """The LoRA factors of a peft-keyed adapter."""
    return split_adapter({k: v for k, v in tensors.items() if "lora_" in k}, layout)[0]


def ideal(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], module: str
) -> torch.Tensor:
    """Dense ``Σ_k p_k s_k B_k A_k`` of one module, ``(d_out, d_in)``."""
    return sum(w * factors(t)[module].delta() for t, w in zip(updates, weights, strict=True))


def weights_of(counts: Sequence[int]) -> list[float]:
    total = float(sum(counts))
    return [c / total for c in counts]


def save_load(obj: Any) -> Any:
    """``torch.save`` / ``torch.load`` through memory (what a checkpoint does)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def allclose(
    x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], atol: float = 1e-10
) -> bool:
    """Same keys and values within ``atol``."""
    return set(x) == set(y) and all(
        x[k].shape == y[k].shape and torch.allclose(x[k], y[k], atol=atol, rtol=0) for k in x
    )


Trainer = Callable[[TensorDict, frozenset[str], int], TensorDict]


def perturb(
    tensors: TensorDict, trainable: frozenset[str], seed: int, size: float = 0.1
) -> TensorDict:
    """Stand-in for local training: add seeded noise to the trainable tensors."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: (v + size * torch.randn(v.shape, generator=gen, dtype=v.dtype)) if k in trainable else v
        for k, v in tensors.items()
    }


def run_round(
    fed: FedStrategy,
    state: Any,
    global_tensors: TensorDict,
    client_states: dict[int, TensorDict],
    plans: Sequence[ClientPlan],
    server_round: int,
    init: Callable[[int], TensorDict],
    counts: Mapping[int, int] | None = None,
    train: Trainer = perturb,
) -> tuple[RoundOutput[Any], list[ClientUpdate], dict[int, TensorDict]]:
    """One round through payload → start → train → finish → aggregate, as the Flower
    apps run it (client state survives through ``save_load``)."""
    updates = []
    new_states = dict(client_states)
    for p in plans:
        received = fed.aggregator.client_payload(state, global_tensors, p)
        cstate = save_load(client_states.get(p.partition_id, {}))
        started = fed.client.start(received, init(p.rank), cstate, p)
        start, trainable = started
        trained = train(start, trainable, 1000 * server_round + p.partition_id)
        trained = {k: v for k, v in trained.items() if k in init(p.rank)}  # model.tensors()
        upload, new_state = finish_with_carry(fed.client, started, trained, received, cstate, p)
        new_states[p.partition_id] = new_state
        n = (counts or {}).get(p.partition_id, 10 + p.partition_id)
        updates.append(
            ClientUpdate(node_id=p.node_id, tensors=upload, num_examples=n, metrics={}, plan=p)
        )
    out = fed.aggregator.aggregate(state, global_tensors, updates, server_round)
    return out, updates, new_states
