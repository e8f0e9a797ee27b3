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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from fedpeft import (
    AggregatorBase,
    ClientPlan,
    ClientUpdate,
    ConfigError,
    FedStrategy,
    RoundOutput,
    StrategyEnv,
    TensorDict,
    client_weights,
    register_strategy,
    weighted_mean,
)
from fedpeft.lora import AdapterLayout, LoraFactors, pad_rank, split_adapter, work_dtype
from fedpeft.lora.ops import resize_adapter_to
from fedpeft.lora.peft_io import factor_keys

PLACEMENTS = ("b", "a", "both")
NORMS = ("fro", "squared")
OBJECTIVES = ("fro-no-shrink", "fro", "residual", "cosine", "cosine-rescaled")
_FRO = ("fro", "fro-no-shrink")  # the closed-form ridge (then floored, for the second)
MAX_SWEEPS = 10
"""Block-coordinate sweeps of ``placement="both"``; each B- or A-step gets
``ceil(max_iters / MAX_SWEEPS)`` iterations, so each factor gets at most ``max_iters``."""
_ARMIJO_C1 = 1e-4
_MAX_BACKTRACKS = 60
_CHUNK_BYTES = 1 << 26  # stacked client factors per batch of layers (64 MiB)


@dataclass(frozen=True)
class LoraFairConfig:
    """Options of ``lora-fair`` (run-config section ``lora-fair``).

    Attributes:
        lam: regularisation weight λ (paper: 0.01; its units depend on the objective,
            module doc).
        placement: which factor is corrected: ``"b"`` (paper), ``"a"`` or ``"both"``.
        norm: ``"fro"`` for ``λ‖ΔB‖_F`` or ``"squared"`` for ``λ‖ΔB‖_F²``.
        scale_free: use ``λ‖ΔB‖/‖B̄‖`` so λ does not depend on the scale of B.
        objective: one of :data:`OBJECTIVES` (module doc); default ``"fro-no-shrink"``
            (the paper's S, read as cosine in ALGORITHMS.md §8, is ``"cosine"``).
        max_iters: gradient-descent iterations per layer (and per sweep).
        tol: stop when the relative objective change is below this.
        equal_weights: weight clients equally instead of by example count.
    """

    lam: float = 0.01
    placement: str = "b"
    norm: str = "fro"
    scale_free: bool = False
    objective: str = "fro-no-shrink"
    max_iters: int = 200
    tol: float = 1e-8
    equal_weights: bool = False

    def problems(self) -> list[str]:
        """Invalid values, one line each."""
        out = []
        if not self.lam >= 0.0:
            out.append(f"lora-fair.lam must be >= 0, got {self.lam}")
        if self.placement not in PLACEMENTS:
            out.append(f"lora-fair.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.norm not in NORMS:
            out.append(f"lora-fair.norm must be one of {NORMS}, got {self.norm!r}")
        if self.objective not in OBJECTIVES:
            out.append(f"lora-fair.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.max_iters < 0:
            out.append(f"lora-fair.max-iters must be >= 0, got {self.max_iters}")
        if not self.tol >= 0.0:
            out.append(f"lora-fair.tol must be >= 0, got {self.tol}")
        return out


# -- the factored problem ---------------------------------------------------------------


@dataclass(frozen=True)
class FairProblem:
    """A batch of ``L`` independent corrections of a left factor, in factored form.

    For each batch entry: correct ``base`` (``L̄``, ``(k, r)``) in the product ``L̄ R̄``
    toward the target ``T = Σ_k p_k L_k R_k``. Only three quantities of the target
    and of ``R̄`` are needed. For ``placement="b"``: ``L̄ = B̄``, ``R̄ = Ā``; for ``"a"``:
    ``L̄ = Āᵀ``, ``R̄ = B̄ᵀ`` (same problem transposed).

    Attributes:
        g: ``T R̄ᵀ``, ``(L, k, r)``.
        base: ``L̄``, ``(L, k, r)``.
        gram: ``R̄ R̄ᵀ``, ``(L, r, r)``.
        target2: ``‖T‖_F²``, ``(L,)``.
        lam: effective λ per entry, ``(L,)``.
        squared: squared regulariser.
        objective: one of :data:`OBJECTIVES` (``"cosine-rescaled"`` is solved as
            ``"cosine"`` and ``"fro-no-shrink"`` as ``"fro"``; their final scaling is
            :meth:`rescaled`).
    """

    g: torch.Tensor
    base: torch.Tensor
    gram: torch.Tensor
    target2: torch.Tensor
    lam: torch.Tensor
    squared: bool = False
    objective: str = "cosine"

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``⟨T, (L̄+X)R̄⟩ = ⟨G, L̄+X⟩`` and ``‖(L̄+X)R̄‖² = tr((L̄+X)ᵀ(L̄+X) R̄R̄ᵀ)``."""
        bp = self.base + x  # (L, k, r)
        inner = (self.g * bp).sum((-2, -1))  # (L,)
        norm2 = ((bp.mT @ bp) * self.gram).sum((-2, -1))  # (L, r, k)@(L, k, r); gram symmetric
        return inner, norm2

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """``cos(T, (L̄+X)R̄)`` per entry (0 where a norm vanishes)."""
        inner, norm2 = self.parts(x)
        denom = (self.target2 * norm2.clamp_min(0.0)).sqrt()
        return torch.where(denom > 0, inner / torch.where(denom > 0, denom, 1.0), 0.0)

    def relative_error(self, x: torch.Tensor) -> torch.Tensor:
        """``‖T − (L̄+X)R̄‖ / ‖T‖`` per entry (0 where ``T = 0``)."""
        inner, norm2 = self.parts(x)
        err2 = (self.target2 - 2.0 * inner + norm2).clamp_min(0.0)
        safe = torch.where(self.target2 > 0, self.target2, 1.0)
        return torch.where(self.target2 > 0, (err2 / safe).sqrt(), 0.0)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """``‖T − (L̄+X)R̄‖_F`` per entry."""
        inner, norm2 = self.parts(x)
        return (self.target2 - 2.0 * inner + norm2).clamp_min(0.0).sqrt()

    def rescaled(
        self, x: torch.Tensor, goal2: torch.Tensor, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``X'`` with ``L̄ + X' = s (L̄ + X)``, ``s = sqrt(goal2 / ‖(L̄+X)R̄‖²)``, so that
        ``‖(L̄+X')R̄‖² = goal2`` (entries where a norm vanishes, or not ``active``, keep
        ``X``)."""
        _, norm2 = self.parts(x)
        ok = (norm2 > 0) & (goal2 > 0)
        if active is not None:
            ok = ok & active
        scale = (goal2 / torch.where(ok, norm2, 1.0)).sqrt()  # (L,)
        moved = scale[:, None, None] * (self.base + x) - self.base  # (L, k, r)
        return torch.where(ok[:, None, None], moved, x)

    def regulariser(self, x: torch.Tensor) -> torch.Tensor:
        """``λ‖X‖`` (or ``λ‖X‖²``) per entry."""
        sq = (x * x).sum((-2, -1))
        squared = self.squared or self.objective in _FRO
        return self.lam * (sq if squared else sq.sqrt())

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """The objective per entry."""
        if self.objective in _FRO:
            inner, norm2 = self.parts(x)
            return self.target2 - 2.0 * inner + norm2 + self.regulariser(x)
        if self.objective == "residual":
            return self.residual(x) + self.regulariser(x)
        return 1.0 - self.cosine(x) + self.regulariser(x)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        """Analytic gradient of :meth:`value` with respect to ``X`` (``(L, k, r)``)."""
        bp = self.base + x  # (L, k, r)
        bs = bp @ self.gram  # (L, k, r) @ (L, r, r)
        if self.objective in _FRO:
            return 2.0 * (bs - self.g) + 2.0 * self.lam[:, None, None] * x
        if self.objective == "residual":  # ∂‖R‖/∂X = (L'S − G)/‖R‖, 0 where R = 0
            res = self.residual(x)
            ok = res > 0
            dres = (bs - self.g) / torch.where(ok, res, 1.0)[:, None, None]
            return torch.where(ok[:, None, None], dres, 0.0) + self._regulariser_grad(x)
        inner, norm2 = self.parts(x)
        w = self.target2.sqrt()
        q = norm2.clamp_min(0.0).sqrt()
        ok = (w > 0) & (q > 0)
        wq = torch.where(ok, w * q, 1.0)
        q2 = torch.where(ok, norm2, 1.0)
        dcos = self.g / wq[:, None, None] - (inner / (wq * q2))[:, None, None] * bs
        dcos = torch.where(ok[:, None, None], dcos, 0.0)
        return -dcos + self._regulariser_grad(x)

    def _regulariser_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Gradient of :meth:`regulariser` (the zero sub-gradient at ``X = 0``)."""
        if self.squared:
            return 2.0 * self.lam[:, None, None] * x
        nx = x.flatten(1).norm(dim=1)  # (L,)
        return torch.where(
            (nx > 0)[:, None, None],
            self.lam[:, None, None] * x / torch.where(nx > 0, nx, 1.0)[:, None, None],
            0.0,
        )

    def reduce(self, x0: torch.Tensor | None = None) -> tuple[FairProblem, torch.Tensor | None]:
        """The same problem in an orthonormal basis ``Q`` of ``span[G, L̄, X0]``.

        Returns ``(reduced, Q)`` with ``Q`` ``(L, k, c)``; iterates map back as
        ``X = Q X_c``. ``Q`` is ``None`` when the basis would not be smaller.
        """
        cols = [self.g, self.base] + ([x0] if x0 is not None else [])
        span = torch.cat(cols, dim=-1)  # (L, k, c)
        if span.shape[-1] >= span.shape[-2]:
            return self, None
        q, _ = torch.linalg.qr(span)  # (L, k, c)
        reduced = replace(self, g=q.mT @ self.g, base=q.mT @ self.base)  # (L, c, r)
        return reduced, q

    def to(self, dtype: torch.dtype) -> FairProblem:
        """The problem in ``dtype``."""
        return replace(
            self,
            g=self.g.to(dtype),
            base=self.base.to(dtype),
            gram=self.gram.to(dtype),
            target2=self.target2.to(dtype),
            lam=self.lam.to(dtype),
        )


def product_norm2(left_stack: torch.Tensor, right_stack: torch.Tensor) -> torch.Tensor:
    """``‖L_st R_st‖_F²`` per batch entry from the two Gram matrices, ``(L,)``.

    Args:
        left_stack: ``(L, m, K)``; right_stack: ``(L, K, n)``.
    """
    gl = left_stack.mT @ left_stack  # (L, K, m) @ (L, m, K)
    gr = right_stack @ right_stack.mT  # (L, K, n) @ (L, n, K)
    return (gl * gr).sum((-2, -1))  # tr(gl gr) with gr symmetric


def build_problem(
    left_stack: torch.Tensor,
    right_stack: torch.Tensor,
    base: torch.Tensor,
    right: torch.Tensor,
    target2: torch.Tensor,
    config: LoraFairConfig,
) -> FairProblem:
    """The problem of correcting ``base`` in ``base @ right`` toward ``L_st R_st``.

    Args:
        left_stack: ``[p_1 L_1, …, p_N L_N]``, ``(L, m, K)``.
        right_stack: ``[R_1; …; R_N]``, ``(L, K, n)``.
        base: ``L̄``, ``(L, m, r)``.
        right: ``R̄`` (current value of the other factor), ``(L, r, n)``.
        target2: :func:`product_norm2` of the stacks, ``(L,)``.
        config: λ, norm and scale options.
    """
    g = left_stack @ (right_stack @ right.mT)  # (L, m, K) @ ((L, K, n) @ (L, n, r))
    gram = right @ right.mT  # (L, r, n) @ (L, n, r)
    squared = config.norm == "squared" or config.objective in _FRO
    lam = torch.full_like(target2, config.lam)
    if config.scale_free:
        nb = base.flatten(1).norm(dim=1)  # (L,)
        nb = nb * nb if squared else nb
        lam = torch.where(nb > 0, lam / torch.where(nb > 0, nb, 1.0), lam)
    return FairProblem(
        g=g,
        base=base,
        gram=gram,
        target2=target2,
        lam=lam,
        squared=config.norm == "squared",
        objective=config.objective,
    )


def solve_fro(problem: FairProblem) -> torch.Tensor:
    """Closed form of the ``fro`` objective: ``X = (G − L̄ S)(S + λI)⁺``, ``(L, k, r)``."""
    r = problem.gram.shape[-1]
    eye = torch.eye(r, dtype=problem.gram.dtype)
    reg = problem.gram + problem.lam[:, None, None] * eye  # (L, r, r)
    rhs = problem.g - problem.base @ problem.gram  # (L, k, r)
    return rhs @ torch.linalg.pinv(reg, hermitian=True)  # (L, k, r) @ (L, r, r)


def solve_cosine(
    problem: FairProblem,
    x0: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    max_iters: int = 200,
    tol: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient descent with Armijo backtracking (Barzilai–Borwein first trial step),
    batched over the entries.

    Runs in float64 in the reduced basis of :meth:`FairProblem.reduce` (exact).

    Args:
        problem: the batch of problems.
        x0: starting point (zeros when ``None``).
        active: entries to solve; the others return ``x0`` unchanged.
        max_iters: iteration budget per entry.
        tol: relative objective change that stops an entry.

    Returns:
        ``X`` ``(L, k, r)`` in the problem's dtype and the accepted steps per entry.
    """
    dtype = problem.base.dtype
    x_start = torch.zeros_like(problem.base) if x0 is None else x0
    count = problem.base.shape[0]
    active = torch.ones(count, dtype=torch.bool) if active is None else active.clone()
    iters = torch.zeros(count, dtype=torch.int64)
    if max_iters == 0 or not bool(active.any()):
        return x_start, iters
    small, q = problem.reduce(x0)
    small = small.to(torch.float64)
    x = (q.mT @ x_start if q is not None else x_start).to(torch.float64)  # (L, c, r)
    f = small.value(x)
    g = small.grad(x)
    gn2 = (g * g).sum((-2, -1))
    active &= gn2 > 0
    size = (small.base + x).flatten(1).norm(dim=1)
    t = torch.where((gn2 > 0) & (size > 0), size / gn2.clamp_min(1e-300).sqrt(), 1.0)
    for _ in range(max_iters):
        if not bool(active.any()):
            break
        done = ~active
        moved = torch.zeros(count, dtype=torch.bool)
        x_new, f_new, trial = x, f, t.clone()
        for _ in range(_MAX_BACKTRACKS):
            cand = x - trial[:, None, None] * g
            fc = small.value(cand)
            ok = ~done & (fc <= f - _ARMIJO_C1 * trial * gn2)
            x_new = torch.where(ok[:, None, None], cand, x_new)
            f_new = torch.where(ok, fc, f_new)
            moved |= ok
            done |= ok
            if bool(done.all()):
                break
            trial = torch.where(done, trial, 0.5 * trial)
        rel = (f - f_new).abs() / f.abs().clamp_min(1e-300)
        iters += moved.to(torch.int64)
        step = x_new - x
        x, f = x_new, f_new
        active &= moved & (rel >= tol)
        if bool(active.any()):
            g_new = small.grad(x)
            # next trial step: Barzilai–Borwein ⟨s,s⟩/⟨s,y⟩ when it is positive, else 2t
            sy = (step * (g_new - g)).sum((-2, -1))
            bb = (step * step).sum((-2, -1)) / torch.where(sy > 0, sy, 1.0)
            t = torch.where(moved, torch.where(sy > 0, bb, 2.0 * trial), t)
            g = g_new
            gn2 = (g * g).sum((-2, -1))
            active &= gn2 > 0
    out = (q @ x.to(dtype)) if q is not None else x.to(dtype)  # (L, k, c) @ (L, c, r)
    solved = iters > 0
    return torch.where(solved[:, None, None], out, x_start), iters


def _solve(
    problem: FairProblem, x0: torch.Tensor | None, active: torch.Tensor, config: LoraFairConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    if config.objective in _FRO:
        x = solve_fro(problem)
        start = torch.zeros_like(x) if x0 is None else x0
        steps = active.to(torch.int64)
        return torch.where(active[:, None, None], x, start), steps
    return solve_cosine(problem, x0, active, config.max_iters, config.tol)


def _rescale(
    problem: FairProblem,
    x: torch.Tensor,
    fedit2: torch.Tensor,
    active: torch.Tensor,
    config: LoraFairConfig,
) -> torch.Tensor:
    """The final scaling of the corrected factor (module doc, "Objectives").

    ``cosine-rescaled``: ``‖L'R̄‖ = ‖ΔW‖``; ``fro-no-shrink``: ``‖L'R̄‖`` raised to FedIT's
    ``fedit2 = ‖B̄Ā‖²`` when it is below it; the other objectives: ``x`` unchanged.
    """
    if config.objective == "cosine-rescaled":
        return problem.rescaled(x, problem.target2, active)
    if config.objective == "fro-no-shrink":
        _, norm2 = problem.parts(x)
        return problem.rescaled(x, torch.maximum(norm2, fedit2), active)
    return x


# -- the aggregator ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Totals:
    """Sums over layers behind the pooled metrics."""

    inner0: float = 0.0
    norm0: float = 0.0
    inner1: float = 0.0
    norm1: float = 0.0
    target: float = 0.0
    obj0: float = 0.0
    obj1: float = 0.0
    db2: float = 0.0
    da2: float = 0.0
    b2: float = 0.0
    a2: float = 0.0
    iters: int = 0
    iters_max: int = 0
    degenerate: int = 0
    layers: int = 0


@dataclass(frozen=True)
class _Chunk:
    """A batch of layers of one shape: the averaged factors and the problem at ΔB = 0."""

    keys: list[tuple[str, str]]
    b_bar: torch.Tensor  # (L, m, r)
    a_bar: torch.Tensor  # (L, r, n)
    target2: torch.Tensor  # (L,)
    active: torch.Tensor  # (L,) bool
    problem_b: FairProblem
    b_stack: torch.Tensor | None  # (L, m, N r), only while still needed
    a_stack: torch.Tensor | None  # (L, N r, n)


@dataclass(frozen=True)
class _Result:
    """The correction of one chunk and the quantities after it."""

    db: torch.Tensor  # (L, m, r)
    da_t: torch.Tensor  # ΔAᵀ, (L, n, r)
    steps: torch.Tensor  # (L,)
    inner1: torch.Tensor
    norm1: torch.Tensor
    obj1: torch.Tensor


@dataclass(frozen=True)
class LoraFairAggregator(AggregatorBase[Any]):
    """FedIT's weighted mean followed by the LoRA-FAIR correction (see module doc).

    Attributes:
        config: the strategy options.
        layout: scaling of client and global ranks.
    """

    config: LoraFairConfig
    layout: AdapterLayout

    def initialize(self, global_tensors: TensorDict) -> dict[str, Any]:
        """LoRA-FAIR keeps no state between rounds."""
        return {}

    def client_payload(
        self, state: dict[str, Any], global_tensors: TensorDict, plan: ClientPlan
    ) -> TensorDict:
        """The global adapter, truncated to the client's rank when it is smaller."""
        return resize_adapter_to(global_tensors, plan.rank, self.layout)

    def aggregate(
        self,
        state: dict[str, Any],
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[dict[str, Any]]:
        """Average A and B (padding ranks), then correct each layer's B (or A).

        Clients are processed in partition-id order, so the result does not depend on
        the order of ``updates`` even bitwise (the iterative solver would amplify
        rounding differences when it stops before convergence).
        """
        updates = sorted(updates, key=lambda u: (u.plan.partition_id, u.node_id))
        weights = client_weights(updates, self.config.equal_weights)
        gfactors, _ = split_adapter(global_tensors, self.layout)
        padded: list[TensorDict] = []
        clients: list[dict[str, LoraFactors]] = []
        for u in updates:
            factors, extra = split_adapter(u.tensors, self.layout)
            fixed = {m: pad_rank(factors[m], g.rank, g.scaling) for m, g in gfactors.items()}
            clients.append(fixed)
            tensors = {k: v for k, v in extra.items() if k in global_tensors}
            for m, f in fixed.items():
                a_key, b_key = factor_keys(m)
                tensors[a_key], tensors[b_key] = f.a, f.b
            padded.append(tensors)
        new = dict(global_tensors)
        new.update(weighted_mean(padded, weights))
        kept = [i for i, w in enumerate(weights) if w != 0.0]
        totals = _Totals()
        if len(kept) >= 2:
            kept_clients = [clients[i] for i in kept]
            totals = self._correct(new, gfactors, kept_clients, [weights[i] for i in kept])
        return RoundOutput(state=state, tensors=new, metrics=_metrics(totals))

    # -- per-layer work, batched over layers of equal shape ------------------------------
    def _correct(
        self,
        new: TensorDict,
        gfactors: dict[str, LoraFactors],
        clients: list[dict[str, LoraFactors]],
        weights: list[float],
    ) -> _Totals:
        """Correct every layer; write the results into ``new``; return the sums."""
        cfg = self.config
        groups: dict[tuple[int, int, int, torch.dtype], list[str]] = {}
        for m, g in gfactors.items():
            groups.setdefault((g.d_out, g.d_in, g.rank, g.a.dtype), []).append(m)
        totals = _Totals()
        deferred: list[tuple[_Chunk, FairProblem, torch.Tensor | None]] = []
        for (d_out, d_in, rank, dtype), modules in groups.items():
            per_layer = (d_out + d_in) * rank * len(clients) * torch.finfo(dtype).bits // 8
            size = max(1, _CHUNK_BYTES // max(per_layer, 1))
            for start in range(0, len(modules), size):
                chunk = self._setup(new, modules[start : start + size], clients, weights)
                if cfg.placement == "both" or cfg.objective in _FRO:
                    totals = self._finish(new, chunk, self._solve_now(chunk), totals)
                    continue
                problem = chunk.problem_b if cfg.placement == "b" else _problem_a(chunk, cfg)
                small, q = problem.reduce()
                deferred.append((replace(chunk, b_stack=None, a_stack=None), small, q))
        # one batched solve for all reduced problems of the same rank (all layers,
        # usually); fewer rows are zero-padded, which changes nothing
        buckets: dict[int, list[int]] = {}
        for i, (_, small, _) in enumerate(deferred):
            buckets.setdefault(int(small.base.shape[-1]), []).append(i)
        for members in buckets.values():
            parts = [deferred[i] for i in members]
            joined = _concat([small.to(torch.float64) for _, small, _ in parts])
            active = torch.cat([chunk.active for chunk, _, _ in parts])
            xs, steps = solve_cosine(joined, None, active, cfg.max_iters, cfg.tol)
            changed = steps > 0
            if cfg.objective == "cosine-rescaled":
                xs = _rescale(joined, xs, joined.parts(torch.zeros_like(xs))[1], active, cfg)
                changed = active
            inner1, norm1 = joined.parts(xs)
            obj1 = joined.value(xs)
            offset = 0
            for chunk, small, q in parts:
                sl = slice(offset, offset + small.base.shape[0])
                offset = sl.stop
                x = xs[sl, : small.base.shape[1]].to(small.base.dtype)  # drop padded rows
                x = q @ x if q is not None else x  # (L, m, c) @ (L, c, r)
                x = torch.where(changed[sl][:, None, None], x, 0.0)
                zero_b, zero_a = torch.zeros_like(chunk.b_bar), torch.zeros_like(chunk.a_bar.mT)
                result = _Result(
                    db=x if cfg.placement == "b" else zero_b,
                    da_t=x if cfg.placement == "a" else zero_a,
                    steps=steps[sl],
                    inner1=inner1[sl],
                    norm1=norm1[sl],
                    obj1=obj1[sl],
                )
                totals = self._finish(new, chunk, result, totals)
        return totals

    def _setup(
        self,
        new: TensorDict,
        modules: list[str],
        clients: list[dict[str, LoraFactors]],
        weights: list[float],
    ) -> _Chunk:
        """Stacks, averaged factors, ``‖ΔW‖²`` and the degenerate-layer guard."""
        cfg = self.config
        keys = [factor_keys(m) for m in modules]
        dtype = work_dtype(new[keys[0][0]].dtype)
        eps = 100.0 * torch.finfo(dtype).eps
        pairs = list(zip(clients, weights, strict=True))
        a_bar = torch.stack([new[a].to(dtype) for a, _ in keys])  # (L, r, n)
        b_bar = torch.stack([new[b].to(dtype) for _, b in keys])  # (L, m, r)
        count, rank, n_clients = len(modules), a_bar.shape[1], len(pairs)
        b_stack = b_bar.new_empty(count, b_bar.shape[1], rank * n_clients)  # (L, m, N r)
        a_stack = a_bar.new_empty(count, rank * n_clients, a_bar.shape[2])  # (L, N r, n)
        for i, m in enumerate(modules):
            torch.cat([c[m].b.to(dtype) for c, _ in pairs], dim=1, out=b_stack[i])
            torch.cat([c[m].a.to(dtype) for c, _ in pairs], dim=0, out=a_stack[i])
        w = torch.tensor(weights, dtype=dtype)
        b_stack.view(count, -1, n_clients, rank).mul_(w[:, None])  # client blocks scaled by p_k
        a_norms = a_stack.view(count, n_clients, rank, -1).norm(dim=(2, 3))  # (L, N) ‖A_k‖
        b_norms = b_stack.view(count, -1, n_clients, rank).norm(dim=(1, 3))  # (L, N) p_k ‖B_k‖
        a_scale = (a_norms * w).sum(1)  # Σ p_k ‖A_k‖ ≥ ‖Ā‖
        ab_scale = (a_norms * b_norms).sum(1)  # Σ p_k ‖B_k‖‖A_k‖ ≥ ‖ΔW‖
        target2 = product_norm2(b_stack, a_stack)  # (L,) ‖ΔW‖²
        problem_b = build_problem(b_stack, a_stack, b_bar, a_bar, target2, cfg)
        _, norm0 = problem_b.parts(torch.zeros_like(b_bar))
        tiny = eps * ab_scale
        has_target = target2.clamp_min(0).sqrt() > tiny  # ‖ΔW‖ ≉ 0
        has_product = norm0.clamp_min(0).sqrt() > tiny  # ‖B̄Ā‖ ≉ 0
        if cfg.objective in (*_FRO, "residual"):  # Ā ≈ 0: nothing reachable; both ≈ 0: exact
            active = (a_bar.flatten(1).norm(dim=1) > eps * a_scale) & (has_target | has_product)
        else:  # cos is undefined when ‖ΔW‖ ≈ 0 or ‖B̄Ā‖ ≈ 0
            active = has_target & has_product
        return _Chunk(keys, b_bar, a_bar, target2, active, problem_b, b_stack, a_stack)

    def _solve_now(self, chunk: _Chunk) -> _Result:
        """``fro`` objective (closed form) and ``placement="both"`` (sweeps)."""
        cfg = self.config
        if cfg.placement == "both":
            return self._sweeps(chunk)
        db = torch.zeros_like(chunk.b_bar)
        da_t = torch.zeros_like(chunk.a_bar.mT)
        problem = chunk.problem_b if cfg.placement == "b" else _problem_a(chunk, cfg)
        x, steps = _solve(problem, None, chunk.active, cfg)
        x = _rescale(problem, x, problem.parts(torch.zeros_like(x))[1], chunk.active, cfg)
        inner1, norm1 = problem.parts(x)
        if cfg.placement == "b":
            db = x
        else:
            da_t = x
        return _Result(db, da_t, steps, inner1, norm1, problem.value(x))

    def _sweeps(self, chunk: _Chunk) -> _Result:
        """``placement="both"``: alternate a B-step and an A-step (each monotone)."""
        cfg = replace(self.config, max_iters=-(-self.config.max_iters // MAX_SWEEPS))
        assert chunk.b_stack is not None and chunk.a_stack is not None
        bs, as_, t2 = chunk.b_stack, chunk.a_stack, chunk.target2
        b_bar, a_bar = chunk.b_bar, chunk.a_bar
        db = torch.zeros_like(b_bar)  # (L, m, r)
        da_t = torch.zeros_like(a_bar.mT)  # ΔAᵀ, (L, n, r)
        steps = torch.zeros(b_bar.shape[0], dtype=torch.int64)
        prev = chunk.problem_b.value(db)
        pa = _problem_a(chunk, cfg)
        for _ in range(MAX_SWEEPS):
            pb = build_problem(bs, as_, b_bar, a_bar + da_t.mT, t2, cfg)
            db, sb = _solve(pb, db if bool(db.any()) else None, chunk.active, cfg)
            pa = build_problem(as_.mT, bs.mT, a_bar.mT, (b_bar + db).mT, t2, cfg)
            da_t, sa = _solve(pa, da_t if bool(da_t.any()) else None, chunk.active, cfg)
            steps = steps + sb + sa
            obj = pa.value(da_t) + pb.regulariser(db)  # the A-step objective + B's penalty
            rel = (prev - obj).abs() / prev.abs().clamp_min(1e-300)
            prev = obj
            if not bool((chunk.active & (rel >= cfg.tol) & ((sb + sa) > 0)).any()):
                break
        if cfg.objective in ("cosine-rescaled", "fro-no-shrink"):  # scale B' (module doc)
            pb = build_problem(bs, as_, b_bar, a_bar + da_t.mT, t2, cfg)
            _, fedit2 = chunk.problem_b.parts(torch.zeros_like(b_bar))
            db = _rescale(pb, db, fedit2, chunk.active, cfg)
            inner1, norm1 = pb.parts(db)
            return _Result(db, da_t, steps, inner1, norm1, pb.value(db) + pa.regulariser(da_t))
        inner1, norm1 = pa.parts(da_t)
        return _Result(db, da_t, steps, inner1, norm1, prev)

    def _finish(self, new: TensorDict, chunk: _Chunk, res: _Result, totals: _Totals) -> _Totals:
        """Write ``(Ā + ΔA, B̄ + ΔB)`` into ``new`` and add the chunk to the sums."""
        for i, (a_key, b_key) in enumerate(chunk.keys):
            if self.config.placement in ("b", "both"):
                new[b_key] = (chunk.b_bar[i] + res.db[i]).to(new[b_key].dtype)
            if self.config.placement in ("a", "both"):
                new[a_key] = (chunk.a_bar[i] + res.da_t[i].T).to(new[a_key].dtype)
        zero = torch.zeros_like(chunk.b_bar)
        inner0, norm0 = chunk.problem_b.parts(zero)
        return _Totals(
            inner0=totals.inner0 + float(inner0.sum()),
            norm0=totals.norm0 + float(norm0.sum()),
            inner1=totals.inner1 + float(res.inner1.sum()),
            norm1=totals.norm1 + float(res.norm1.sum()),
            target=totals.target + float(chunk.target2.sum()),
            obj0=totals.obj0 + float(chunk.problem_b.value(zero).sum()),
            obj1=totals.obj1 + float(res.obj1.sum()),
            db2=totals.db2 + float((res.db * res.db).sum()),
            da2=totals.da2 + float((res.da_t * res.da_t).sum()),
            b2=totals.b2 + float((chunk.b_bar * chunk.b_bar).sum()),
            a2=totals.a2 + float((chunk.a_bar * chunk.a_bar).sum()),
            iters=totals.iters + int(res.steps.sum()),
            iters_max=max(totals.iters_max, int(res.steps.max())),
            degenerate=totals.degenerate + int((~chunk.active).sum()),
            layers=totals.layers + len(chunk.keys),
        )


def _problem_a(chunk: _Chunk, config: LoraFairConfig) -> FairProblem:
    """The A-correction: the B-problem transposed (``L̄ = Āᵀ``, ``R̄ = B̄ᵀ``)."""
    assert chunk.b_stack is not None and chunk.a_stack is not None
    return build_problem(
        chunk.a_stack.mT, chunk.b_stack.mT, chunk.a_bar.mT, chunk.b_bar.mT, chunk.target2, config
    )


def _concat(problems: list[FairProblem]) -> FairProblem:
    """One batch from problems of one rank; ``g`` and ``base`` zero-padded to equal rows."""
    if len(problems) == 1:
        return problems[0]
    rows = max(p.base.shape[1] for p in problems)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[1]))  # (L, rows, r)

    return replace(
        problems[0],
        g=torch.cat([pad(p.g) for p in problems]),
        base=torch.cat([pad(p.base) for p in problems]),
        gram=torch.cat([p.gram for p in problems]),
        target2=torch.cat([p.target2 for p in problems]),
        lam=torch.cat([p.lam for p in problems]),
    )


def _metrics(t: _Totals) -> dict[str, float]:
    if t.layers == 0:  # a single client: FedIT's result, exact
        return {
            "lora_fair/cosine_before": 1.0,
            "lora_fair/cosine_after": 1.0,
            "lora_fair/relative_error_before": 0.0,
            "lora_fair/relative_error_after": 0.0,
            "lora_fair/norm_ratio_before": 1.0,
            "lora_fair/norm_ratio": 1.0,
            "lora_fair/iterations": 0.0,
            "lora_fair/iterations_max": 0.0,
            "lora_fair/delta_b_norm": 0.0,
            "lora_fair/delta_a_norm": 0.0,
            "lora_fair/degenerate_layers": 0.0,
        }

    def cos(inner: float, norm: float) -> float:
        d = (t.target * norm) ** 0.5
        return inner / d if d > 0 else 0.0

    def rel(inner: float, norm: float) -> float:
        return (max(t.target - 2 * inner + norm, 0.0) / t.target) ** 0.5 if t.target > 0 else 0.0

    def ratio(norm: float) -> float:
        return (max(norm, 0.0) / t.target) ** 0.5 if t.target > 0 else 0.0

    return {
        "lora_fair/cosine_before": cos(t.inner0, t.norm0),
        "lora_fair/cosine_after": cos(t.inner1, t.norm1),
        "lora_fair/relative_error_before": rel(t.inner0, t.norm0),
        "lora_fair/relative_error_after": rel(t.inner1, t.norm1),
        "lora_fair/norm_ratio_before": ratio(t.norm0),
        "lora_fair/norm_ratio": ratio(t.norm1),
        "lora_fair/objective_before": t.obj0 / t.layers,
        "lora_fair/objective_after": t.obj1 / t.layers,
        "lora_fair/iterations": t.iters / t.layers,
        "lora_fair/iterations_max": float(t.iters_max),
        "lora_fair/delta_b_norm": (t.db2 / t.b2) ** 0.5 if t.b2 > 0 else 0.0,
        "lora_fair/delta_a_norm": (t.da2 / t.a2) ** 0.5 if t.a2 > 0 else 0.0,
        "lora_fair/degenerate_layers": float(t.degenerate),
    }


def build(config: LoraFairConfig, env: StrategyEnv) -> FedStrategy:
    """LoRA-FAIR server correction; clients train the full adapter (FedIT's client)."""
    problems = config.problems()
    if problems:
        raise ConfigError(problems)
    layout = env.layout
    return FedStrategy(
        aggregator=LoraFairAggregator(config, layout),
        needs_individual_updates=True,
        mixed_ranks=True,
    )


register_strategy(
    "lora-fair",
    config_cls=LoraFairConfig,
    build=build,
    summary="FedIT + server-side correction of B toward the mean product (Bian et al., ICCV 2025)",
)
