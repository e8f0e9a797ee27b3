"""LoRA-FAIR's aggregator: a layer over FedIT's weighted mean (the inner aggregator)
that corrects its result with :mod:`strategies.lora_fair.solver`, batched over layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fedpeft import (
    ClientUpdate,
    IncompatibleUpdateError,
    Layer,
    RoundOutput,
    TensorDict,
    WeightedMean,
    client_weights,
)
from fedpeft.lora import AdapterLayout, LoraFactors, split_adapter, work_dtype
from fedpeft.lora.peft_io import factor_keys
from strategies.lora_fair.config import _CHUNK_BYTES, _FRO, MAX_SWEEPS, LoraFairConfig
from strategies.lora_fair.solver import (
    FairProblem,
    _rescale,
    _solve,
    build_problem,
    product_norm2,
    solve_cosine,
)

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
class LoraFairAggregator(Layer):
    """The inner mean (FedIT's weighted mean of A and B), then the LoRA-FAIR correction
    (see the package doc). Mixed ranks: the strategy wraps it in
    :class:`fedpeft.PadToRank`, so every update arrives at the global rank.

    Attributes:
        config: the strategy options.
        layout: scaling of the global rank.
        inner: the mean it corrects (FedIT's :class:`fedpeft.WeightedMean`).
    """

    config: LoraFairConfig
    layout: AdapterLayout
    inner: Any = field(default_factory=WeightedMean)
    name = "lora_fair"

    def aggregate(
        self,
        state: dict[str, Any],
        global_tensors: TensorDict,
        updates: Sequence[ClientUpdate],
        server_round: int,
    ) -> RoundOutput[dict[str, Any]]:
        """The inner mean ``(Ā, B̄)``, then each layer's B (or A) corrected.

        Clients are processed in partition-id order, so the result does not depend on
        the order of ``updates`` even bitwise (the iterative solver would amplify
        rounding differences when it stops before convergence).
        """
        updates = sorted(updates, key=lambda u: (u.plan.partition_id, u.node_id))
        mean = self.inner.aggregate(state, global_tensors, updates, server_round)
        weights = client_weights(updates)
        gfactors, _ = split_adapter(global_tensors, self.layout)
        clients = []
        for u in updates:
            factors, _ = split_adapter(u.tensors, self.layout)
            if any(factors[m].rank != g.rank for m, g in gfactors.items()):
                raise IncompatibleUpdateError(
                    f"lora-fair: the update of node {u.node_id} is not at the global rank; "
                    "mixed ranks need the PadToRank layer (lora_fair.build adds it)"
                )
            clients.append({m: factors[m] for m in gfactors})  # at the global rank and scaling
        new = dict(mean.tensors)
        kept = [i for i, w in enumerate(weights) if w != 0.0]
        totals = _Totals()
        if len(kept) >= 2:
            kept_clients = [clients[i] for i in kept]
            totals = self._correct(new, gfactors, kept_clients, [weights[i] for i in kept])
        return RoundOutput(state=mean.state, tensors=new, metrics={**mean.metrics, **_metrics(totals)})

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
