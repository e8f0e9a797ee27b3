"""The per-layer correction problem of LoRA-FAIR and its solvers (shapes in
:class:`FairProblem`; objectives in the package docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from strategies.lora_fair.config import (
    _ARMIJO_C1,
    _FRO,
    _MAX_BACKTRACKS,
    LoraFairConfig,
)

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
