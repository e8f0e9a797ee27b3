"""Ferret: first-order local updates sent as coordinates on shared random bases.

Paper: Shu, Hu, Ng, Low, Yu, "Ferret: Federated Full-Parameter Tuning at Scale for Large
Language Models", ICML 2025 (PMLR 267), arXiv 2409.06277; code ``allen4747/Ferret``.
Specification: ALGORITHMS.md §10. Pure functions (state in, state out); no Flower.

One round, for parameters ``w`` partitioned into blocks ``l`` of size ``d_l``
(:mod:`fedpeft.projection.blocks`) and a pool of ``K`` shared seeds::

    client k:  Δ_l = w_{t−1,l} − w^{(k)}_{t,l}                  (old minus new)
               K_l = max(2, ⌊K·‖Δ_l‖ / max_i ‖Δ_i‖⌋)             (adaptive budget)
               J_l ⊂ {0..K−1}, |J_l| = K_l, drawn from the client's seed
               γ_{l,j} = c_l·⟨Δ_l, v_{l,j}⟩,  j ∈ J_l
    server:    Γ_t[l, j] = μ·Γ_{t−1}[l, j] + Σ_k p_k γ^{(k)}_{l,j}   (0 where unused)
               w_t = w_{t−1} − η_s·Σ_{l,j} clip(Γ_t[l, j]·v_{l,j}, C)

with ``c_l = 1/(K_l σ_l²)`` (``unbiased``: ``E[Σ_j γ_j v_j] = Δ_l`` over the draw of the
bases — see "When the estimate is unbiased" below) or ``c_l = d_l/K_l``
(``reference``, the authors' code: expected reconstruction ``d_l σ_l² Δ_l ≈ Δ_l/3``,
compensated by ``η_s = 10`` and ``C = 10``; see :data:`REFERENCE`).

Seeds (every stream is :func:`fedpeft.seeding.derive_seed` of named parts)::

    pool seed      P   = derive_seed(run_seed, "ferret-pool", e)   e = the round (default,
                                                                   the paper's fresh shared
                                                                   randomness each round) or 0
                                                                   (one pool for the run, as
                                                                   the reference code)
    shared pool    s_j = derive_seed(P, "ferret-seed", j),  j < K
    basis (l, j)   derive_seed(s_j, "ferret-block", l)      (the reference reuses s_j in every
                                                             block, so equal-sized blocks
                                                             share directions; we do not)
    client subset  derive_seed(client_seed, "ferret-subset", index),
                   client_seed = derive_seed(run_seed, "ferret-client", round, partition_id)

**When the estimate is unbiased.** Take one block (drop ``l``), ``unbiased``
normalisation and no clipping. Given the round's pool ``P`` (hence its bases
``v_0 … v_{K−1}``), a client's reconstruction is ``Δ̃ = c Σ_{j∈J} ⟨Δ, v_j⟩ v_j`` and,
over its uniformly drawn subset ``J`` (``|J| = K_l``)::

    E_J[Δ̃ | P] = M_P Δ,    M_P = (K σ²)^{-1} Σ_{j<K} v_j v_jᵀ,    E_P[M_P] = I

so ``Δ̃`` is unbiased over the draw of the bases (the pool), **not** given the pool:
``E‖M_P Δ − Δ‖² ≈ (d_l/K)‖Δ‖²``. Consequences:

* Clients of one round share ``P``. Averaging them removes only the subset noise; by
  linearity the round's table ``Γ_t`` reconstructs ``M_P Σ_k p_k Δ_k`` — relative error
  ``≈ sqrt(d_l/K)`` however many clients there are.
* Fresh pool each round (``refresh_pool=True``, the default): the ``M_{P_t}`` of
  different rounds are independent with mean ``I``, so the projection errors of
  successive rounds are independent, zero-mean and partly cancel in the sum of the
  steps (for a constant ``Δ``, the ``R``-round average has relative error
  ``≈ sqrt(d_l/(K R))``).
* Fixed pool (``refresh_pool=False``, the reference code): every round applies the
  same ``M_P``, so the run-long average of the reconstructions converges to
  ``M_P · (average Δ)``, biased by the fixed basis with relative error
  ``≈ sqrt(d_l/K)`` that no number of rounds or clients removes; the estimate is
  unbiased only on average over runs (run seeds). Measured on ``d = 256``, ``K = 32``,
  50 rounds: 2.8 fixed vs 0.4 fresh (``tests/projection/test_ferret.py``).

``reference`` normalisation replaces ``M_P`` by ``d_l σ_l² M_P`` (mean ``≈ I/3``);
clipping (``clip_norm``) and server momentum bias the step further.

Catch-up: the downlink of a round is a :class:`RoundUpdate` ``(round, P, Γ_t, η_s)``;
:func:`apply_update` rebuilds ``w_t`` from ``w_{t−1}`` bit for bit on any machine (see
:func:`fedpeft.projection.bases.reconstruct`), so a client that missed rounds replays
them with :func:`catch_up` instead of downloading the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from fedpeft.errors import ConfigError, FedPeftError, IncompatibleUpdateError
from fedpeft.projection import bases
from fedpeft.projection.bases import DEFAULT_MAX_ELEMENTS, Normalisation
from fedpeft.projection.blocks import BlockLayout
from fedpeft.seeding import derive_seed
from fedpeft.types import TensorDict

BasisKind = Literal["uniform", "orthonormal"]

MAX_SEEDS = 1 << 16
"""Pool indices travel as ``uint16``, so ``K <= 65536``."""


@dataclass(frozen=True)
class FerretConfig:
    """Settings of the Ferret projection core.

    Attributes:
        num_seeds: ``K``, the shared pool size and the largest per-block budget
            (reference script: 200; argparse default 4096).
        normalisation: ``"unbiased"`` (``γ = ⟨Δ, v⟩/(K_l σ²)``) or ``"reference"``
            (``γ = ⟨Δ, v⟩·d_l/K_l``, as the authors' code).
        basis: ``"uniform"`` (seeded grid bases of :mod:`bases`, the protocol) or
            ``"orthonormal"`` (columns of a seeded Haar matrix; tests only: with
            ``K_l = d_l`` the reconstruction is exact; needs ``K <= d_l``).
        server_lr: ``η_s`` (reference: 10 with ``"reference"``; 1 with ``"unbiased"``).
        clip_norm: ``C``, per-(block, seed) term clip of the server update; ``None``
            disables it (reference: 10).
        momentum: ``μ``, server momentum on the coordinate table (reference script: 0).
        min_seeds: floor of the per-block budget (reference: 2).
        refresh_pool: draw a new seed pool every round (``e = round``; default, the
            paper's per-round shared randomness) instead of one fixed pool for the run
            (``False``; the reference code draws its ``K`` candidate seeds once in
            ``main.py``). Only a fresh pool makes the errors of successive rounds
            independent; with a fixed pool every round is biased by the same basis (see
            the module docstring). ``True`` is incompatible with ``momentum > 0``.
        max_elements: basis entries generated per chunk during projection.
    """

    num_seeds: int = 200
    normalisation: Normalisation = "unbiased"
    basis: BasisKind = "uniform"
    server_lr: float = 1.0
    clip_norm: float | None = None
    momentum: float = 0.0
    min_seeds: int = 2
    refresh_pool: bool = True
    max_elements: int = DEFAULT_MAX_ELEMENTS

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.num_seeds <= MAX_SEEDS:
            problems.append(f"num_seeds must be in [1, {MAX_SEEDS}], got {self.num_seeds}")
        if self.normalisation not in ("unbiased", "reference"):
            problems.append(
                f"normalisation must be 'unbiased' or 'reference', got {self.normalisation!r}"
            )
        if self.basis not in ("uniform", "orthonormal"):
            problems.append(f"basis must be 'uniform' or 'orthonormal', got {self.basis!r}")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0.0):
            problems.append(f"server_lr must be a finite number > 0, got {self.server_lr}")
        if self.clip_norm is not None and not self.clip_norm > 0.0:
            problems.append(f"clip_norm must be > 0 or None, got {self.clip_norm}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum must be in [0, 1), got {self.momentum}")
        if not 1 <= self.min_seeds <= self.num_seeds:
            problems.append(
                f"min_seeds must be in [1, num_seeds={self.num_seeds}], got {self.min_seeds}"
            )
        if self.refresh_pool and self.momentum > 0.0:
            problems.append(
                f"refresh_pool=True needs momentum=0 (got {self.momentum}): momentum "
                "would mix coordinates of different bases; set refresh_pool=False (one "
                "seed pool for the run, as the reference code) to use server momentum"
            )
        if self.max_elements < 1:
            problems.append(f"max_elements must be >= 1, got {self.max_elements}")
        if problems:
            raise ConfigError(problems)


REFERENCE = FerretConfig(
    normalisation="reference", server_lr=10.0, clip_norm=10.0, refresh_pool=False
)
"""The authors' script settings: K=200, ``d_l/K_l`` scaling, ``η_s = 10``, clip 10 and
one seed pool for the whole run."""


# --------------------------------------------------------------------------- seeds


def pool_seed(run_seed: int, server_round: int, config: FerretConfig) -> int:
    """The round's pool seed ``P``: new every round with ``refresh_pool`` (default),
    else the same for the whole run."""
    return derive_seed(run_seed, "ferret-pool", server_round if config.refresh_pool else 0)


def seed_pool(pool_seed: int, num_seeds: int) -> np.ndarray:
    """The shared pool ``(s_0, …, s_{K−1})`` as a ``(K,)`` uint64 array."""
    return np.array(
        [derive_seed(pool_seed, "ferret-seed", j) for j in range(num_seeds)], dtype=np.uint64
    )


def block_seeds(pool: np.ndarray, block_index: int, pool_indices: Sequence[int]) -> list[int]:
    """Basis seeds of block ``l`` for the given pool indices."""
    return [derive_seed(int(pool[j]), "ferret-block", block_index) for j in pool_indices]


def client_seed(run_seed: int, server_round: int, partition_id: int) -> int:
    """The seed of a client's pool subsets in one round."""
    return derive_seed(run_seed, "ferret-client", server_round, partition_id)


def block_budgets(norms: Sequence[float], num_seeds: int, min_seeds: int = 2) -> tuple[int, ...]:
    """``K_l = max(min_seeds, ⌊K·‖Δ_l‖/max_i ‖Δ_i‖⌋)``; all-zero updates get ``min_seeds``."""
    top = max((float(n) for n in norms), default=0.0)
    if top <= 0.0:
        return tuple(min_seeds for _ in norms)
    return tuple(
        min(num_seeds, max(min_seeds, math.floor(num_seeds * float(n) / top))) for n in norms
    )


def basis_variance(config: FerretConfig, d: int) -> float:
    """Per-entry variance ``σ_l²`` of the configured basis family for block size ``d``."""
    return bases.basis_variance(d) if config.basis == "uniform" else 1.0 / d


def _orthonormal(
    pool_seed: int, block_index: int, d: int, pool_indices: np.ndarray
) -> torch.Tensor:
    """Columns ``pool_indices`` of block ``l``'s Haar matrix, ``(d, n)`` float64."""
    if pool_indices.size and int(pool_indices.max()) >= d:
        raise ConfigError(
            f"basis='orthonormal' needs pool indices < d_l; block {block_index} has "
            f"d_l={d} but uses index {int(pool_indices.max())} (lower num_seeds to <= {d})"
        )
    q = bases.orthonormal_basis(derive_seed(pool_seed, "ferret-orthonormal", block_index), d)
    return q[:, torch.from_numpy(pool_indices.astype(np.int64))]  # (d, n)


# --------------------------------------------------------------------------- client


@dataclass(frozen=True)
class Coefficients:
    """One client's sparse coordinates ``{(l, j, γ_{l,j})}`` in CSR layout.

    Block ``l`` owns entries ``offsets[l]:offsets[l+1]`` of ``indices`` (pool indices,
    strictly increasing within a block) and ``values`` (float32 ``γ``, what is sent and
    what both ends reconstruct from).

    Attributes:
        offsets: ``(L+1,)`` int64, ``offsets[0] = 0``.
        indices: ``(n,)`` int64 pool indices, ``n = Σ_l K_l``.
        values: ``(n,)`` float32 coordinates.
        num_seeds: ``K`` (pool size; indices are ``< K``).
    """

    offsets: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    num_seeds: int

    @property
    def num_blocks(self) -> int:
        """``L``."""
        return int(self.offsets.shape[0]) - 1

    @property
    def budgets(self) -> tuple[int, ...]:
        """``(K_1, …, K_L)``."""
        return tuple(int(k) for k in np.diff(self.offsets))

    def table(self) -> torch.Tensor:
        """Dense ``(L, K)`` float64 table with zeros where a seed was not used."""
        table = np.zeros((self.num_blocks, self.num_seeds), dtype=np.float64)  # (L, K)
        rows = np.repeat(np.arange(self.num_blocks), np.diff(self.offsets))  # (n,)
        table[rows, self.indices] = self.values
        return torch.from_numpy(table)


def encode_update(
    old: Mapping[str, torch.Tensor],
    new: Mapping[str, torch.Tensor],
    layout: BlockLayout,
    *,
    pool_seed: int,
    client_seed: int,
    config: FerretConfig,
) -> Coefficients:
    """Project the local update ``Δ = old − new`` onto the shared bases (client side).

    Args:
        old: parameters the client started from (``w_{t−1}``).
        new: parameters after local training.
        layout: the block layout both ends built from the same ``(name, numel)`` list.
        pool_seed: the round's ``P`` (:func:`pool_seed`; sent by the server).
        client_seed: this client's subset seed (:func:`client_seed`).
        config: Ferret settings.

    Returns:
        The sparse coordinates to upload (see :mod:`fedpeft.projection.wire`).
    """
    layout.check(old, "old parameters")
    layout.check(new, "new parameters")

    def delta(index: int) -> torch.Tensor:
        return layout.vector(old, index) - layout.vector(new, index)  # (d_l,) float64

    # Two passes (norms, then projections) keep memory at O(max_l d_l).
    norms = [float(torch.linalg.vector_norm(delta(i))) for i in range(layout.num_blocks)]
    bad = [i for i, n in enumerate(norms) if not math.isfinite(n)]
    if bad:
        raise FedPeftError(
            f"Ferret update of block {bad[0]} (tensors {list(layout.blocks[bad[0]].names)[:3]}) "
            f"has a non-finite norm ({norms[bad[0]]}); local training diverged, lower the "
            "learning rate"
        )
    budgets = block_budgets(norms, config.num_seeds, config.min_seeds)
    pool = seed_pool(pool_seed, config.num_seeds) if config.basis == "uniform" else None
    indices, values = [], []
    for index, k_l in enumerate(budgets):
        block_delta = delta(index)  # (d_l,) float64
        rng = np.random.Generator(
            np.random.Philox(key=derive_seed(client_seed, "ferret-subset", index))
        )
        chosen = np.sort(rng.choice(config.num_seeds, size=k_l, replace=False))  # (K_l,)
        d = block_delta.numel()
        if pool is not None:
            gamma = bases.project(
                block_delta,
                block_seeds(pool, index, chosen),
                config.normalisation,
                max_elements=config.max_elements,
            )  # (K_l,) float64
        else:
            const = bases.normalisation_constant(
                d, k_l, config.normalisation, basis_variance(config, d)
            )
            gamma = (_orthonormal(pool_seed, index, d, chosen).T @ block_delta) * const  # (K_l,)
        gamma32 = gamma.to(torch.float32).numpy()
        if not np.isfinite(gamma32).all():
            raise FedPeftError(
                f"Ferret coordinates of block {index} overflow float32 (max |γ| = "
                f"{float(gamma.abs().max()):.3g}); the local update is too large"
            )
        indices.append(chosen.astype(np.int64))
        values.append(gamma32)
    offsets = np.concatenate([[0], np.cumsum(budgets)]).astype(np.int64)  # (L+1,)
    return Coefficients(offsets, np.concatenate(indices), np.concatenate(values), config.num_seeds)


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class RoundUpdate:
    """The downlink of one round: everything needed to rebuild ``w_t`` from ``w_{t−1}``.

    Attributes:
        server_round: ``t``.
        pool_seed: the round's pool seed ``P``.
        gamma: ``(L, K)`` float32 coordinate table ``Γ_t`` (after momentum).
        server_lr: ``η_s`` used this round (annealing schedules change it per round).
    """

    server_round: int
    pool_seed: int
    gamma: torch.Tensor
    server_lr: float


@dataclass(frozen=True)
class FerretServerState:
    """Server state between rounds.

    Attributes:
        gamma: the last ``(L, K)`` float32 table (for momentum), ``None`` before round 1.
        server_round: last aggregated round (0 before round 1).
    """

    gamma: torch.Tensor | None = None
    server_round: int = 0


def aggregate_coefficients(
    uploads: Sequence[Coefficients], weights: Sequence[float]
) -> torch.Tensor:
    """``Γ[l, j] = Σ_k p_k γ^{(k)}_{l,j}`` as a dense ``(L, K)`` float64 table.

    Summed in client order in float64. Because the seeds are shared, this is also the
    coordinate table of the weighted mean of the clients' reconstructions (linearity).
    """
    if not uploads:
        raise IncompatibleUpdateError("Ferret cannot aggregate an empty list of uploads")
    if len(uploads) != len(weights):
        raise IncompatibleUpdateError(
            f"got {len(uploads)} Ferret uploads but {len(weights)} weights; expected one each"
        )
    shape = (uploads[0].num_blocks, uploads[0].num_seeds)
    table = np.zeros(shape, dtype=np.float64)  # (L, K)
    for k, (up, p) in enumerate(zip(uploads, weights, strict=True)):
        if (up.num_blocks, up.num_seeds) != shape:
            raise IncompatibleUpdateError(
                f"Ferret upload {k} has {up.num_blocks} blocks × {up.num_seeds} seeds, "
                f"expected {shape[0]} × {shape[1]} like upload 0"
            )
        rows = np.repeat(np.arange(up.num_blocks), np.diff(up.offsets))  # (n,)
        table[rows, up.indices] += float(p) * up.values.astype(np.float64)
    return torch.from_numpy(table)


def server_update(
    state: FerretServerState,
    uploads: Sequence[Coefficients],
    weights: Sequence[float],
    *,
    server_round: int,
    pool_seed: int,
    config: FerretConfig,
    server_lr: float | None = None,
) -> tuple[FerretServerState, RoundUpdate]:
    """Aggregate one round: ``Γ_t = μ Γ_{t−1} + Σ_k p_k γ^{(k)}`` (server side).

    Args:
        state: the previous server state.
        uploads: decoded client coordinates of this round (same ``pool_seed``).
        weights: ``p_k`` (normalised; equal weights in the reference script).
        server_round: ``t``.
        pool_seed: the pool seed the clients were given this round.
        config: Ferret settings.
        server_lr: overrides ``config.server_lr`` (e.g. linear annealing 10 → 0).

    Returns:
        The new state and the round's downlink record; apply it with :func:`apply_update`.
    """
    table = aggregate_coefficients(uploads, weights)  # (L, K) float64
    if config.momentum > 0.0 and state.gamma is not None:
        if tuple(state.gamma.shape) != tuple(table.shape):
            raise IncompatibleUpdateError(
                f"Ferret momentum table has shape {tuple(state.gamma.shape)}, "
                f"this round's table {tuple(table.shape)}"
            )
        table = config.momentum * state.gamma.to(torch.float64) + table
    gamma = table.to(torch.float32)
    if not torch.isfinite(gamma).all():
        raise IncompatibleUpdateError("Ferret aggregated coordinates are not finite in float32")
    slr = config.server_lr if server_lr is None else float(server_lr)
    update = RoundUpdate(server_round, pool_seed, gamma, slr)
    return FerretServerState(gamma, server_round), update


# --------------------------------------------------------------------------- both ends


def reconstruct_block(
    gamma_row: torch.Tensor,
    block_index: int,
    d: int,
    *,
    pool_seed: int,
    config: FerretConfig,
    pool: np.ndarray | None = None,
) -> torch.Tensor:
    """``Σ_j clip(Γ[l, j]·v_{l,j}, C)`` of one block, ``(d,)`` float64 (zeros skipped)."""
    row = gamma_row.detach().to("cpu", torch.float64).numpy()  # (K,)
    used = np.flatnonzero(row)  # pool indices with Γ ≠ 0, increasing
    if config.basis == "orthonormal":
        coef = torch.from_numpy(row[used].copy())  # (n,)
        if config.clip_norm is not None:
            coef = coef.clamp(-config.clip_norm, config.clip_norm)  # ‖c·q‖ = |c|
        return _orthonormal(pool_seed, block_index, d, used) @ coef  # (d, n) @ (n,)
    if pool is None:
        pool = seed_pool(pool_seed, config.num_seeds)
    return bases.reconstruct(
        row[used], block_seeds(pool, block_index, used), d, clip_norm=config.clip_norm
    )


def reconstruct_update(
    gamma: torch.Tensor,
    layout: BlockLayout,
    like: Mapping[str, torch.Tensor],
    *,
    pool_seed: int,
    config: FerretConfig,
) -> TensorDict:
    """Dense float64 estimate ``Δ̃`` (before ``η_s``) of the update encoded by ``gamma``.

    Use ``coefficients.table()`` for one client's own upload (what the server will see)
    or a round's ``Γ_t``; shapes come from ``like``.
    """
    _check_table(gamma, layout, config)
    pool = seed_pool(pool_seed, config.num_seeds) if config.basis == "uniform" else None
    out: TensorDict = {}
    for index, block in enumerate(layout.blocks):
        vec = reconstruct_block(
            gamma[index], index, block.size, pool_seed=pool_seed, config=config, pool=pool
        )
        out.update(layout.split(vec, index, like))
    return out


def apply_update(
    params: Mapping[str, torch.Tensor],
    layout: BlockLayout,
    update: RoundUpdate,
    config: FerretConfig,
) -> TensorDict:
    """``w_t = w_{t−1} − η_s·Σ_{l,j} clip(Γ_t[l, j]·v_{l,j}, C)``, block by block.

    Computed in float64 with separate IEEE multiply and subtract, then cast to each
    parameter's dtype; identical bits on the server and on every client. Memory is
    ``O(max_l d_l)`` beyond the output.
    """
    layout.check(params, "parameters")
    _check_table(update.gamma, layout, config)
    pool = seed_pool(update.pool_seed, config.num_seeds) if config.basis == "uniform" else None
    out: TensorDict = {}
    for index, block in enumerate(layout.blocks):
        step = reconstruct_block(
            update.gamma[index],
            index,
            block.size,
            pool_seed=update.pool_seed,
            config=config,
            pool=pool,
        )  # (d_l,) float64
        step.mul_(update.server_lr)
        flat = layout.vector(params, index).sub_(step)  # (d_l,) float64
        for name, value in layout.split(flat, index, params).items():
            out[name] = value.to(params[name].dtype)
    return out


def catch_up(
    params: Mapping[str, torch.Tensor],
    layout: BlockLayout,
    history: Sequence[RoundUpdate],
    config: FerretConfig,
    *,
    synced_round: int,
) -> tuple[TensorDict, int]:
    """Replay the rounds a client missed: apply every update after ``synced_round``.

    Args:
        params: the client's replica, equal to the global model after ``synced_round``.
        layout: the block layout.
        history: round updates in increasing round order; entries up to
            ``synced_round`` are skipped, the rest must be consecutive.
        config: Ferret settings.
        synced_round: the last round already contained in ``params``.

    Returns:
        The replica after the last round of ``history`` and that round's number.
    """
    current = dict(params)
    last = synced_round
    for update in history:
        if update.server_round <= last:
            continue
        if update.server_round != last + 1:
            raise IncompatibleUpdateError(
                f"Ferret catch-up from round {synced_round} is missing round {last + 1} "
                f"(next update is round {update.server_round}); send every round after "
                f"{synced_round} or the full model"
            )
        current = apply_update(current, layout, update, config)
        last = update.server_round
    return current, last


def _check_table(gamma: torch.Tensor, layout: BlockLayout, config: FerretConfig) -> None:
    expected = (layout.num_blocks, config.num_seeds)
    if tuple(gamma.shape) != expected:
        raise IncompatibleUpdateError(
            f"Ferret coordinate table has shape {tuple(gamma.shape)}, expected "
            f"(num_blocks, num_seeds) = {expected}"
        )
