"""``lora-fair``: FedIT averaging plus a server-side residual correction of B.

Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", ICCV 2025 (arXiv 2411.14961); ALGORITHMS.md §8. Per layer,
with weights ``p_k``::

    Ā  = Σ_k p_k A_k            # (r, d_in)
    B̄  = Σ_k p_k B_k            # (d_out, r)
    ΔW = Σ_k p_k B_k A_k        # (d_out, d_in), never formed
    ΔB* = argmin_ΔB  S(ΔW, (B̄ + ΔB) Ā) + λ ‖ΔB‖      (paper; λ = 0.01)

and every client starts the next round from ``(Ā, B̄ + ΔB*)``; the base weight is not
touched and the wire cost is FedIT's.

**Objectives** (``objective``; ``B' = B̄ + ΔB``, FedIT's product ``B̄Ā``):

* ``"fro-no-shrink"`` (default): the ``"fro"`` solution, then, in a layer where
  ``0 < ‖B'Ā‖ < ‖B̄Ā‖``, ``B'`` scaled by ``‖B̄Ā‖ / ‖B'Ā‖``. For λ = 0 this is exactly the
  product closest to ``ΔW`` among the reachable ones (``XĀ``) that are not shorter
  than FedIT's: the projection ``Y = ΔW Āᵀ(ĀĀᵀ)⁺Ā`` if ``‖Y‖ ≥ ‖B̄Ā‖``, else ``Y``
  moved radially onto that sphere; its error is never above FedIT's:
  ``‖ΔW − sY‖² = ‖ΔW‖² − ‖Y‖² + (‖B̄Ā‖ − ‖Y‖)² ≤ ‖ΔW‖² − ‖Y‖² + ‖Y − B̄Ā‖²``
  (``s = ‖B̄Ā‖/‖Y‖``; reverse triangle inequality), the right side being FedIT's.
  With λ > 0 the ridge step is slightly shorter and this bound is not proved; it held
  in all 76 problems of the table below.
* ``"fro"``: ``‖B'Ā − ΔW‖_F² + λ‖ΔB‖_F²``, closed form
  ``ΔB = (G − B̄S_A)(S_A + λI)⁺`` (ridge regression; λ → 0 gives ``Y``). Its minimum is
  at most its value at ΔB = 0, so the error never exceeds FedIT's, but ``Y`` can be
  shorter than ``B̄Ā`` (the table: 8 of 36 shared-start problems, by < 0.1 %).
* ``"residual"``: ``‖B'Ā − ΔW‖_F + λ‖ΔB‖_F`` (``λ‖ΔB‖²`` with ``norm="squared"``),
  by the gradient-descent solver below; error never above FedIT's either.
* ``"cosine"``: ``1 − cos(ΔW, B'Ā) + λ‖ΔB‖_F``, ALGORITHMS.md §8's reading of S.
* ``"cosine-rescaled"``: the ``"cosine"`` solution ``B'_c``, then ``B' = s·B'_c`` with
  ``s = ‖ΔW‖ / ‖B'_cĀ‖`` per layer, so ``‖B'Ā‖ = ‖ΔW‖`` with cosine's direction.

The rescalings act on the corrected factor (A for ``placement="a"``, B for ``"b"`` and
``"both"``) and skip the layers the guards leave alone. Units of λ: in the ``fro``
objectives both terms scale as ``‖B‖²`` and in ``residual`` as ``‖B‖``, so λ does
not depend on the scale of B; it is compared with the eigenvalues of ``S_A = ĀĀᵀ``
(about 1/3 for rows of LoRA's Kaiming-uniform A) and shrinks the ridge step by
about ``λ/(λ + σ²)``. In the cosine objectives λ is in the units of B (see
``scale_free``, meant for them).

**Why the default is not the paper's cosine.** The paper's S could not be verified:
its method section was not readable here (only the abstract and introduction of the
arXiv HTML were), and the authors' code (``jmbian/LoRA-FAIR``) was not available. A
secondary summary (paper notes, ICCV 2025) names S "cosine similarity" with
``λ‖ΔB‖`` and λ = 0.01, solved by SGD; two third-party re-implementations (not the
authors') minimise ``1 − cos`` (one over the flattened product; one per column,
averaged, from a Xavier-initialised ΔB, SGD lr 0.01) plus ``λ‖ΔB‖²`` by SGD. Cosine is
scale-invariant: it fixes the direction of ``B'Ā`` and leaves its length to the
regulariser, which pulls ``B'`` back toward ``B̄`` and, with λ absolute, more so the
larger B is. Measured with ``simulations/bench_lora_fair_objectives.py`` (pooled
metrics of every problem, then means; ``ok``: problems with error below FedIT's
*and* ``‖B'Ā‖ ≥ ‖B̄Ā‖``; 36 random problems per family: B entries of scale 1e-4,
1e-3, 1e-2 and 1e-1, (clients, rank) in (2, 8), (4, 16), (8, 4), seeds 0–2, four
layers; real: the uploads of rounds 1 and 2 (round 2 from FedIT's aggregate) of 4
clients on the embedded task, MiniLM, Dirichlet α = 0.1 and 0.5, seed 42, 30 local
steps, batch 16, lr 5e-4; error
``‖ΔW − B'Ā‖/‖ΔW‖``, ratio ``‖B'Ā‖/‖ΔW‖``)::

    objective          random, independent     random, shared start    real (4 rounds)
                       err    ratio  ok        err    ratio  ok        err    ratio  ok
    FedIT (B̄Ā)         0.769  0.557            0.104  0.994            0.208  0.952
    fro-no-shrink      0.680  0.672  36/36     0.093  0.996  36/36     0.198  0.977  4/4
    fro                0.680  0.672  36/36     0.093  0.996  28/36     0.198  0.977  4/4
    residual           0.678  0.683  36/36     0.093  0.996  28/36     0.198  0.976  4/4
    cosine             0.711  0.560  17/36     0.094  0.993  17/36     0.201  0.950  0/4
    cosine-rescaled    0.748  1.000  24/36     0.094  1.000  36/36     0.199  1.000  4/4
    fro, λ = 0         0.677  0.699  36/36     0.093  0.996  28/36     0.198  0.977  4/4

On the independent problems ``cosine`` shrinks the product below FedIT's at B scale
1e-2 and 1e-1 (ratio 0.478 and 0.462 against 0.557; 0/9 ok each) and not at 1e-4
(0.696): its ok count depends on the scale of B, the ``fro`` objectives' does not.
``cosine-rescaled`` overshoots the length where cos stays low (its error
``‖ΔW‖·sqrt(2(1 − cos))`` exceeded FedIT's in 12 of 36). ``fro-no-shrink`` meets both
conditions everywhere, with the ``fro``/least-squares error, in closed form (no
iterations).

**Factored objective (memory-free).** With ``B' = B̄ + ΔB``, ``S_A = ĀĀᵀ`` (r×r),
``G = ΔW Āᵀ = Σ_k p_k B_k (A_k Āᵀ)`` (m×r) and the constant
``‖ΔW‖² = Σ_{k,l} p_k p_l tr((B_kᵀB_l)(A_l A_kᵀ))``::

    cos = ⟨G, B'⟩ / (‖ΔW‖ · sqrt(tr(B'ᵀB' S_A)))
    ∂cos/∂B' = G / (‖ΔW‖ ‖B'Ā‖) − ⟨G, B'⟩ · B' S_A / (‖ΔW‖ ‖B'Ā‖³)
    ‖ΔW − B'Ā‖² = ‖ΔW‖² − 2⟨G, B'⟩ + tr(B'ᵀB' S_A),   ∂/∂B' = 2(B'S_A − G)

Every gradient-descent iterate stays in the column span of ``[G, B̄]`` (the gradient
is ``G·α + B'S_A·β + ΔB·γ``), so the solver runs exactly in that ``2r``-dimensional
subspace: ``ΔB = Q X`` with ``Q`` an orthonormal basis (QR of the ``(m, 2r)`` matrix)
and ``X`` ``(2r, r)``, in float64. Cost ``O(N² r² (m + n))`` for ``‖ΔW‖`` (the
dominant term), ``O(N r² (m + n))`` for ``G``, ``O(r³)`` per iteration; memory
``O(N r (m + n))`` per chunk of layers. The per-layer quantities are built in chunks
of equal-shape layers (bounded memory); the reduced problems of all layers of one rank
are then solved in one batch (fewer rows zero-padded, which changes nothing). Clients
are taken in partition-id order, so the result is independent of the order of the
updates bitwise (an unconverged iterative solve would amplify rounding differences).

**Solver.** Deterministic gradient descent from ``ΔB = 0`` with Armijo backtracking
(sufficient-decrease constant 1e-4; each iteration's first trial step is the
Barzilai–Borwein step ``⟨s,s⟩/⟨s,y⟩`` of the last move, halved until the Armijo
condition holds, so every accepted step decreases the objective), at most
``max_iters`` iterations, stop when the relative objective change is below ``tol``
or no step decreases the objective. The sub-gradient of ``‖ΔB‖`` at 0 is taken as 0.
Since the objective never increases and ``λ‖ΔB‖ ≥ 0``, ``cos`` (``cosine``) and
``‖ΔW − B'Ā‖`` (``residual``) never get worse than FedIT's.

**Options** (ALGORITHMS.md §8 proposals). ``norm="squared"`` uses ``λ‖ΔB‖²`` (the
``fro`` objectives always do); ``scale_free`` divides the regulariser by ``‖B̄‖``
(``‖B̄‖²`` when squared; absolute λ when ``B̄ = 0``); ``placement="a"`` corrects A
instead (the same problem transposed), ``"both"`` alternates a B-step and an A-step
(inexact block-coordinate descent, at most :data:`MAX_SWEEPS` sweeps sharing the
``max_iters`` budget of each factor).

**Guards.** One client with non-zero weight: no correction (the result is exactly
FedIT's). For the cosine objectives a layer with ``‖ΔW‖ ≈ 0`` or ``‖B̄Ā‖ ≈ 0`` (``Ā = 0``
in the scalar counterexample of §1), for the others a layer with ``Ā ≈ 0`` or with
both ``‖ΔW‖ ≈ 0`` and ``‖B̄Ā‖ ≈ 0``, is left uncorrected and counted in
``lora_fair/degenerate_layers``.

**Mixed ranks.** Every client is zero-padded to the global rank with the scaling
folded into B (:func:`fedpeft.lora.pad_rank`), so all products share the global
scaling; averaging and correction then run at the global rank and a client of rank
``r_k`` receives the leading ``r_k`` ranks (:func:`fedpeft.lora.truncate_adapter_to`).
The paper assumes one rank.

Metrics (all layers pooled): ``lora_fair/cosine_before``, ``cosine_after``,
``relative_error_before``, ``relative_error_after`` (``‖ΔW − B̄Ā‖/‖ΔW‖`` and
``‖ΔW − B'Ā‖/‖ΔW‖``), ``norm_ratio_before`` and ``norm_ratio`` (``‖B̄Ā‖/‖ΔW‖`` and
``‖B'Ā‖/‖ΔW‖``), ``objective_before``, ``objective_after`` (layer means, at the returned
point), ``iterations`` (mean), ``iterations_max``, ``delta_b_norm`` / ``delta_a_norm``
(``‖ΔB‖/‖B̄‖``), ``degenerate_layers``.

Layout (peft's ``tuners/<method>/`` anatomy): :mod:`.config` (options and their
checks), :mod:`.solver` (the per-layer problem and its solvers), :mod:`.aggregator`
(FedIT's means, then the correction, batched over layers); this module builds and
registers the strategy.
"""

from __future__ import annotations

from fedpeft import ConfigError, FedStrategy, PadToRank, StrategyEnv, register_strategy
from strategies.lora_fair.aggregator import LoraFairAggregator
from strategies.lora_fair.config import NORMS, OBJECTIVES, PLACEMENTS, LoraFairConfig
from strategies.lora_fair.solver import (
    FairProblem,
    build_problem,
    product_norm2,
    solve_cosine,
    solve_fro,
)


def build(config: LoraFairConfig, env: StrategyEnv) -> FedStrategy:
    """LoRA-FAIR server correction; clients train the full adapter (FedIT's client)."""
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    aggregator = LoraFairAggregator(config, env.layout)
    if len(set(env.ranks)) > 1:  # clients zero-padded to the global rank first
        aggregator = PadToRank(aggregator, env.rank, env.layout)
    return FedStrategy(
        aggregator=aggregator,
        needs_individual_updates=True,
        mixed_ranks=True,
    )


register_strategy(
    "lora-fair",
    config_cls=LoraFairConfig,
    build=build,
    summary="FedIT + server-side correction of B toward the mean product (Bian et al., ICCV 2025)",
)


__all__ = [
    "NORMS",
    "OBJECTIVES",
    "PLACEMENTS",
    "FairProblem",
    "LoraFairAggregator",
    "LoraFairConfig",
    "build",
    "build_problem",
    "product_norm2",
    "solve_cosine",
    "solve_fro",
]
